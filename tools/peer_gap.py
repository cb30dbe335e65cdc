"""`tnf-peer-gap` run from a checkout: the command line is tnf_scale/cli/peer_gap.py."""

import sys

from tnf_scale.cli.peer_gap import main

sys.exit(main())
