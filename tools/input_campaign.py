"""`tnf-input-campaign` run from a checkout: the command line is tnf_scale/cli/input_campaign.py."""

import sys

from tnf_scale.cli.input_campaign import main

sys.exit(main())
