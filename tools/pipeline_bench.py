"""`tnf-pipeline-bench` run from a checkout: the command line is tnf_scale/cli/pipeline_bench.py."""

import sys

from tnf_scale.cli.pipeline_bench import main

sys.exit(main())
