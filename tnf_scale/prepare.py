"""`python -m tnf_scale.prepare`, the preparation command's former name, which earlier scripts and docs used: it runs
`tnf-prepare` (tnf_scale/cli/prepare.py) with the same flags."""

import runpy

if __name__ == "__main__":
    runpy.run_module("tnf_scale.cli.prepare", run_name="__main__", alter_sys=True)
