"""`tnf-inspect-notes` run from a checkout: the command line is tnf_scale/cli/inspect_notes.py."""

import sys

from tnf_scale.cli.inspect_notes import main

sys.exit(main())
