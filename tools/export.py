"""`tnf-export` run from a checkout: the command line is tnf_scale/cli/export.py."""

import sys

from tnf_scale.cli.export import main

sys.exit(main())
