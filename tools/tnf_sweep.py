"""`tnf-sweep` run from a checkout: the command line is tnf_scale/cli/tnf_sweep.py."""

import sys

from tnf_scale.cli.tnf_sweep import main

sys.exit(main())
