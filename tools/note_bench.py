"""`tnf-note-bench` run from a checkout: the command line is tnf_scale/cli/note_bench.py."""

import sys

from tnf_scale.cli.note_bench import main

sys.exit(main())
