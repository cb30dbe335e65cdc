"""`tnf-data-bench` run from a checkout: the command line is tnf_scale/cli/data_bench.py."""

import sys

from tnf_scale.cli.data_bench import main

sys.exit(main())
