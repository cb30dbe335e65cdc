"""The command lines: `python -m tnf_scale.cli.NAME`, `python tools/NAME.py`, or the `tnf-*` console scripts."""
