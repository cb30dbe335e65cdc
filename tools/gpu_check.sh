#!/usr/bin/env bash
# The first hour on a lent GPU node, in one call of at most 9 minutes, cold start included; one markdown report.
#
#   tools/gpu_check.sh [--out DIR] [--dry_run]        (from the repository root)
#
# Without .venv it runs `make install` first (the node needs PyPI for that; its minutes count). Then, with
# DeepSpeed's fused Adam building and the BERT-large data preparing in the background: the facts (GPU, MFU table,
# capability, NCCL, nvcc against torch's CUDA), the per-task binding simulated on gloo, the note store on the device,
# with 2+ GPUs the sharded store on NCCL, the host syncs per step under torch's sync debug mode, BERT-large bf16 with
# TNF off and on at a real micro-batch (with the export) and their throughput, a resume with dropout on against the
# noise floor of a second run, ZeRO-3 with activation checkpointing, the fused Adam build's outcome, with 2+ GPUs a
# data-parallel TNF run resumed on 1 rank through the universal form and 2 pipeline stages, a fine-tuning of the TNF
# export, ELECTRA-Base last. Each step has a timeout, no step starts after minute 7, and the report
# (DIR/gpu_check.md, default runs/gpu_check) is rewritten after every step. The steps: tnf_scale/node_check/plan.py.
#
# --dry_run runs every step at its smallest size (tiny presets, CPU ranks where there is no GPU, the 2-GPU steps
# too), so the script can be checked end to end on any machine; its report says it was a dry run.
set -uo pipefail
export GPU_CHECK_STARTED=${GPU_CHECK_STARTED:-$(date +%s)}
for arg in "$@"; do
    [ "$arg" = --dry_run ] && DRY=1
done
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "no $PY: make install first (its time counts in the 9 minutes)"
    timeout 300 make install || { echo "error: make install failed; see its output above." >&2; exit 2; }
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if [ "${DRY:-0}" = 1 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
exec "$PY" -m tnf_scale.node_check "$@"
