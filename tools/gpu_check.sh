#!/usr/bin/env bash
# One command for a fresh GPU node: what it gives tnf_scale, written into one markdown report.
#
#   tools/gpu_check.sh [--out DIR] [--dry_run]        (from the repository root, after `make install`)
#
# Steps: versions and devices; DeepSpeed's fused Adam (built, or torch's fused AdamW instead); the MFU peak found for
# the device's name; where a tiny bf16 step reads values back from the GPU; tokens/s and MFU of BERT-base and
# BERT-large in bf16 with TNF off and on; a checkpoint at step N resumed to 2N against the uninterrupted run; ZeRO-3
# with activation checkpointing; ELECTRA-Base; with 2+ GPUs the sharded store on NCCL (W = 1 vs 2) and 2 pipeline
# stages. Under 10 minutes on one recent GPU.
#
# --dry_run runs every step's command at the smallest size (tiny presets, 3 steps, CPU ranks where there is no GPU),
# so the script can be checked end to end on any machine; its report says it was a dry run.
set -uo pipefail

OUT=runs/gpu_check
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --dry_run) DRY=1; shift ;;
        *) echo "error: unknown argument $1; use --out DIR and/or --dry_run." >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
[ -x "$PY" ] || { echo "error: $PY not found; run make install first (or set PYTHON)." >&2; exit 2; }
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
if [ "$DRY" = 1 ]; then
    BASE=tiny LARGE=tiny ELECTRA=electra-tiny STEPS=3 WARMUP=1 RANKS2=2
    export DS_ACCELERATOR=${DS_ACCELERATOR:-$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)}
else
    BASE=bert-base LARGE=bert-large ELECTRA=electra-base STEPS=30 WARMUP=10 RANKS2=$GPUS
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
# small batches keep every preset inside one GPU's memory and the whole check inside ten minutes
SMALL=(--global_batch_size 32 --micro_batch_size 16 --warmup_steps 2 --eval_sequences 32 --export false)
PORT=$((29800 + RANDOM % 100))
mkdir -p "$OUT"
REPORT=$OUT/gpu_check.md
FAILED=0

{
    echo "# GPU check: $(hostname), $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    [ "$DRY" = 1 ] && echo "**Dry run**: every step at its smallest size; no figure below describes a GPU." && echo
    echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); GPUs visible to torch: $GPUS."
} > "$REPORT"

# step TITLE COMMAND...: run it, keep its output, and say in the report how it went
step() {
    local title=$1; shift
    local log="$OUT/$(echo "$title" | tr -c 'a-zA-Z0-9\n' '_').log"
    echo "== $title"
    local start=$SECONDS
    "$@" > "$log" 2>&1
    local rc=$?
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    {
        echo
        echo "## $title: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - start)) s"
        echo
        echo '```'
        echo "\$ $*"
        grep -v "real_accelerator\|it/s\]\|step/s\]" "$log" | tail -n 15
        echo '```'
    } >> "$REPORT"
    return 0
}

train() {  # train RANKS OUTPUT_DIR FLAGS...
    local ranks=$1 out=$2; shift 2
    "$BIN/deepspeed" --num_gpus "$ranks" --master_port $((PORT++)) tnf_scale/train.py --output_dir "$out" \
        --overwrite true "${SMALL[@]}" "$@"
}

step "Versions and devices" "$PY" -c "import torch, deepspeed, transformers; from deepspeed.accelerator import \
get_accelerator as a; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| deepspeed', \
deepspeed.__version__, '| transformers', transformers.__version__, '| accelerator', a().device_name()); \
[print(i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]"
step "Fused Adam" "$PY" -c "from tnf_scale.ops import this_nodes_fused_adam, main; print(this_nodes_fused_adam()); main()"
step "MFU peak for this device" "$PY" -c "from tnf_scale.reports.throughput import device_peak; \
print(device_peak({'bf16', 'fp32'}))"
step "Device reads in a bf16 step" "$BIN/deepspeed" --num_gpus 1 --master_port $((PORT++)) \
    tests/workers/sync_worker.py "$OUT/syncs" --preset tiny --precision bf16 --output_dir "$OUT/syncs_run" \
    --overwrite true --max_steps 10
for preset in "$BASE" "$LARGE"; do
    for tnf in off on; do
        step "$preset bf16, TNF $tnf" train 1 "$OUT/${preset}_tnf_$tnf" --preset "$preset" --precision bf16 \
            --tnf "$tnf" --max_steps "$STEPS" --log_interval 1 --eval_interval $((10 * STEPS))
    done
    step "$preset throughput" "$BIN/tnf-throughput" --run "$OUT/${preset}_tnf_off" "$OUT/${preset}_tnf_on" \
        --warmup "$WARMUP" --out "$OUT/${preset}_throughput"
done
step "Train to step $((2 * STEPS)), checkpoint at $STEPS" train 1 "$OUT/resume_reference" --preset tiny \
    --max_steps $((2 * STEPS)) --save_interval "$STEPS" --dropout 0
step "Resume from step $STEPS to $((2 * STEPS))" bash -c "rm -rf '$OUT/resumed' && cp -r '$OUT/resume_reference' \
'$OUT/resumed' && rm -rf '$OUT/resumed/checkpoints/step$(printf %08d $((2 * STEPS)))' && \
'$BIN/deepspeed' --num_gpus 1 --master_port $((PORT++)) tnf_scale/train.py --output_dir '$OUT/resumed' \
--resume true ${SMALL[*]} --preset tiny --max_steps $((2 * STEPS)) --save_interval $STEPS --dropout 0 && \
'$PY' -c \"from tnf_scale.metrics import read_metrics as m; a, b = ({r['step']: r['loss'] for r in m(d) if 'loss' \
in r} for d in ('$OUT/resume_reference', '$OUT/resumed')); d = max(abs(a[s] - b[s]) / a[s] for s in a if s > $STEPS); \
print('largest relative loss difference after the resume:', d); assert d < 1e-5, d\""
step "ZeRO-3 with activation checkpointing" train 1 "$OUT/zero3" --preset "$BASE" --precision bf16 \
    --deepspeed_config ds_configs/zero3.json --activation_checkpointing true --max_steps "$STEPS"
step "ELECTRA" train 1 "$OUT/electra" --preset "$ELECTRA" --precision bf16 --max_steps "$STEPS"
if [ "$RANKS2" -ge 2 ]; then
    mkdir -p "$OUT/store"
    step "Sharded store on 2 ranks (W = 1 vs 2, bitwise)" "$BIN/deepspeed" --num_gpus 2 \
        --master_port $((PORT++)) tests/workers/store_worker.py "$OUT/store"
    step "2 pipeline stages" train 2 "$OUT/pipeline" --preset tiny --precision bf16 \
        --deepspeed_config ds_configs/tiny_pp2.json --max_steps "$STEPS"
else
    echo -e "\n## 2-rank steps: skipped (one GPU)" >> "$REPORT"
fi

echo -e "\n$FAILED step(s) failed." >> "$REPORT"
echo "report: $REPORT ($FAILED failed)"
[ "$FAILED" -eq 0 ]
