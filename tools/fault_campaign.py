"""`tnf-fault-campaign` run from a checkout: the command line is tnf_scale/cli/fault_campaign.py."""

import sys

from tnf_scale.cli.fault_campaign import main

sys.exit(main())
