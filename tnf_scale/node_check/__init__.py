"""The first hour on a lent GPU node: one call of at most 9 minutes that reports what the node gives tnf_scale.

`tools/gpu_check.sh` starts it (`python -m tnf_scale.node_check`); the steps are in plan.py, the timed runner and its
report in runner.py, and the check's own probes beside them (facts, binding, device_notes, sync_census, compare).
"""
