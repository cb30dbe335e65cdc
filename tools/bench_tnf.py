"""`tnf-bench` run from a checkout: the command line is tnf_scale/cli/bench_tnf.py."""

import sys

from tnf_scale.cli.bench_tnf import main

sys.exit(main())
