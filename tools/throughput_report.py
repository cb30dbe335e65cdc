"""`tnf-throughput` run from a checkout: the command line is tnf_scale/cli/throughput_report.py."""

import sys

from tnf_scale.cli.throughput_report import main

sys.exit(main())
