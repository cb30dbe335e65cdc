#!/bin/bash
# TNF pre-training of BERT-large on N nodes x G GPUs (one task per GPU), requeued on pre-emption.
# Submit from the repository root:   CORPUS="/data/wiki /data/books" sbatch slurm/pretrain_large.sh
# A named run, which resubmitting the same command continues: RUN_DIR=runs/bert-large-p1 CORPUS=... sbatch ...
# BERT's phase 2 (512 tokens, from phase 1's weights and notes): PHASE=2 PHASE1_DIR=runs/slurm-<phase 1 job> sbatch ...
# Override any #SBATCH default on the command line: sbatch --nodes=8 --partition=gpu --account=me ...
#SBATCH --job-name=tnf-bert-large
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ ! -f tnf_scale/train.py ]; then  # the batch shell runs where sbatch was called; every task would fail
    echo "error: submitted from $PWD, which is not the tnf_scale checkout; cd to the repository root and submit again." >&2
    exit 2
fi

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: no SLURM job: this is a batch script; submit it with sbatch slurm/pretrain_large.sh (see slurm/README.md)." >&2
    exit 2
fi
: "${CORPUS:?set CORPUS to your corpus files or folders (see README)}"
PRESET=${PRESET:-bert-large}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
PYTHON=${PYTHON:-python}
RUN_ROOT=${RUN_ROOT:-runs}
TRAIN_ARGS=${TRAIN_ARGS:-}
PHASE=${PHASE:-1}
for flag in --output_dir --resume --overwrite --corpus --preset --deepspeed_config; do
    # the script sets these itself: a requeued job must find its checkpoints where the script looks
    if [[ " $TRAIN_ARGS " == *" $flag "* || " $TRAIN_ARGS " == *" $flag="* ]]; then
        echo "error: TRAIN_ARGS sets $flag, which this script sets itself; use RUN_DIR, CORPUS, PRESET or DS_CONFIG instead (see slurm/README.md)." >&2
        exit 2
    fi
done
# Name the run (RUN_DIR=runs/bert-large-p1) and a resubmitted job continues it; by default the directory is named
# after the job id, which a requeued job keeps
RUN_DIR=${RUN_DIR:-$RUN_ROOT/slurm-$SLURM_JOB_ID}

case "$PHASE" in
    1) phase=() ;;
    2)  # phase 1's run gives the weights, notes, tokenizer, rare words and data settings; the corpus is phase 1's
        : "${PHASE1_DIR:?set PHASE1_DIR to the run directory of phase 1 (runs/slurm-<its job id>)}"
        phase=(--init_from "$PHASE1_DIR" --max_seq_len "${SEQ_LEN:-512}") ;;
    *) echo "error: PHASE=$PHASE; BERT's recipe has phases 1 (128 tokens) and 2 (from phase 1, 512 tokens)." >&2
       exit 2 ;;
esac

# DeepSpeed's JIT-built ops (fused Adam), built once into the checkout on the shared file system: `make install`
# (python -m tnf_scale.ops) fills it, and no job compiles them again
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): phase $PHASE, $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES nodes, master $MASTER_ADDR:$MASTER_PORT, run $RUN_DIR"

# SIGUSR1 is for train.py (through srun); should it reach this shell too, it must not end the job before
# the requeue below. A trap with a command (not '') keeps srun's own USR1 handling intact.
trap 'echo "batch shell: SIGUSR1 noted; train.py checkpoints and the job is requeued"' USR1

# Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without it each task would get one core for
# its step, its prefetch worker and its communication threads
cpus=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi

set +e
# shellcheck disable=SC2086  # CORPUS and TRAIN_ARGS are word lists on purpose
srun --kill-on-bad-exit=1 "${cpus[@]}" "$PYTHON" tnf_scale/train.py --preset "$PRESET" --deepspeed_config "$DS_CONFIG" \
    --corpus $CORPUS --output_dir "$RUN_DIR" --resume auto "${phase[@]}" $TRAIN_ARGS
rc=$?
set -e
if [ "$rc" -eq 85 ] || [ -f "$RUN_DIR/PREEMPTED" ]; then  # train.py checkpointed on SIGUSR1: run again from there
    rm -f "$RUN_DIR/PREEMPTED"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
