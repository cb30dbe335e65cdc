"""`tnf-time-to-loss` run from a checkout: the command line is tnf_scale/cli/time_to_loss.py."""

import sys

from tnf_scale.cli.time_to_loss import main

sys.exit(main())
