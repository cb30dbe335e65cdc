"""`tnf-finetune` run from a checkout: the command line is tnf_scale/cli/finetune.py."""

import sys

from tnf_scale.cli.finetune import main

sys.exit(main())
