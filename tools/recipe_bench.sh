#!/usr/bin/env bash
# BERT's recipe on the bench preset, TNF against the baseline at equal steps (docs/benchmarks.md):
#   1. two phases: STEPS at 128 tokens, then STEPS/9 at 256 (90% / 10%), from phase 1's weights and notes;
#   2. whole-word masking on and off, seeds 1234 and 2 (off with seed 1234 is phase 1 of 1.);
#   3. continued pre-training: from the baseline's phase-1 export, on a PostgreSQL manual corpus
#      (tools/build_domain_corpus.py), rare band counted on it, seeds 1234 and 2.
# Each comparison's report (tnf-time-to-loss) goes to tools/results/recipe/<name>/. Runs already trained are kept.
# Run from the repository root: bash tools/recipe_bench.sh   (STEPS=600 RUNS=runs/recipe by default)
set -euo pipefail
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-600}
RUNS=${RUNS:-runs/recipe}
RESULTS=tools/results/recipe
DOMAIN_HTML=${DOMAIN_HTML:-/usr/share/doc/postgresql-doc-15/html}
PHASE2_STEPS=$((STEPS / 9))
phase1=(--preset bench --max_steps "$STEPS" --warmup_steps $((STEPS / 10)) --eval_interval 100
        --max_position_embeddings 256)

train() {  # train OUT FLAGS...: a run, unless OUT holds a finished one
    local out=$1
    shift
    [ -f "$out/export/config.json" ] || "$PY" -m tnf_scale.train --output_dir "$out" --overwrite true "$@"
}

compare() {  # compare NAME BASELINE TNF: the time-to-loss report of the pair
    "$PY" -m tnf_scale.cli.time_to_loss --baseline "$2" --tnf "$3" --out "$RESULTS/$1"
}

for arm in off on; do
    train "$RUNS/phase1-$arm" "${phase1[@]}" --tnf "$arm"
    train "$RUNS/phase2-$arm" --init_from "$RUNS/phase1-$arm" --max_seq_len 256 --max_steps "$PHASE2_STEPS" \
        --warmup_steps $((PHASE2_STEPS / 10)) --eval_interval 20
done
compare two_phases "$RUNS/phase2-off" "$RUNS/phase2-on"
compare wwm_off_seed1234 "$RUNS/phase1-off" "$RUNS/phase1-on"

for seed in 1234 2; do
    for wwm in true false; do
        [ "$seed" = 1234 ] && [ "$wwm" = false ] && continue
        for arm in off on; do
            train "$RUNS/wwm_$wwm-seed$seed-$arm" "${phase1[@]}" --tnf "$arm" --seed "$seed" --whole_word_masking "$wwm"
        done
        compare "wwm_$([ "$wwm" = true ] && echo on || echo off)_seed$seed" \
            "$RUNS/wwm_$wwm-seed$seed-off" "$RUNS/wwm_$wwm-seed$seed-on"
    done
done

domain=$RUNS/postgresql.jsonl
[ -f "$domain" ] || "$PY" tools/build_domain_corpus.py --html "$DOMAIN_HTML" --out "$domain"
for seed in 1234 2; do
    for arm in off on; do
        train "$RUNS/domain-seed$seed-$arm" --preset bench --init_from "$RUNS/phase1-off/export" --corpus "$domain" \
            --max_steps $((STEPS / 2)) --warmup_steps $((STEPS / 20)) --eval_interval 50 --tnf "$arm" --seed "$seed"
    done
    compare "domain_seed$seed" "$RUNS/domain-seed$seed-off" "$RUNS/domain-seed$seed-on"
done
