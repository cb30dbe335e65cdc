"""`tnf-step-anatomy` run from a checkout: the command line is tnf_scale/cli/step_anatomy.py."""

import sys

from tnf_scale.cli.step_anatomy import main

sys.exit(main())
