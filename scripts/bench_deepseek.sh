#!/usr/bin/env bash
# The DeepSeek bench table: klotski against every baseline on deepseek-mini, DeepSeek-V3's
# architecture at CPU size (scripts/make_bench_model.py: 11 layers, 64 routed experts of 1.4 MB,
# top-8, noaux_tc routing, latent attention; 0.94 GB in bf16), at a quarter of its weight bytes
# on the device and half in host RAM, the page cache evicted before each run (--cold-disk), as
# the cpu-mid table of docs/benchmarks.md was run. klotski runs with the planner over a measured
# profile (--profile, cached per model and machine). Writes OUT.md, OUT.jsonl, OUT.png and
# OUT-trace.json.
#
# Usage: scripts/bench_deepseek.sh [OUT]    (default OUT: benchmarks/results/bench-deepseek-mini-<UTC date>)
#
# Environment:
#   PY=.venv/bin/python   the interpreter (the venv with the test extra: hf-accelerate needs torch)
#   WORK=/tmp/klotski-bench   where the HF checkpoint and its conversion go (reused if present)
#   LAYERS=N              decoder layers (default: the preset's 11; with fewer, a quarter of the
#                         model no longer holds flexgen's two MoE layers and its row is skipped)
#   REPEATS=3             timed repeats per schedule
#   SCHEDULES=klotski,flexgen,lru,sequential,hf-accelerate
#   BENCH_ARGS="..."      more `klotski bench` flags, e.g. a smoke run's
#                         "--prompt-len 8 --gen-len 2 --num-prompts 2", or --ablation, --io-mode direct
#
# A smoke run (a tiny workload, one repeat; its numbers are not results):
#   REPEATS=1 BENCH_ARGS="--prompt-len 8 --gen-len 2 --num-prompts 2" \
#       scripts/bench_deepseek.sh /tmp/klotski-bench/smoke
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's klotski_jax, whatever the venv

PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/klotski-bench}
REPEATS=${REPEATS:-3}
SCHEDULES=${SCHEDULES:-klotski,flexgen,lru,sequential,hf-accelerate}
OUT=${1:-benchmarks/results/bench-deepseek-mini-$(date -u +%Y%m%d)}
PRESET=deepseek-mini
name=$PRESET${LAYERS:+-l$LAYERS}
hf=$WORK/$name-hf
ckpt=$WORK/$name

mkdir -p "$WORK" "$(dirname "$OUT")"
if [[ ! -f $ckpt/manifest.json ]]; then
  t0=$SECONDS
  "$PY" scripts/make_bench_model.py "$PRESET" "$hf" ${LAYERS:+--layers "$LAYERS"} \
      --convert "$ckpt" --overwrite
  echo "built $ckpt in $((SECONDS - t0)) s"
fi

t0=$SECONDS
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
"$PY" -m klotski_jax.cli bench "$ckpt" --schedules "$SCHEDULES" --profile \
    --device-budget 25% --host-budget 50% --cold-disk --repeats "$REPEATS" \
    --json "$OUT.jsonl" --markdown "$OUT.md" --plot "$OUT.png" --trace "$OUT-trace.json" \
    ${BENCH_ARGS:-}
echo "bench of $ckpt in $((SECONDS - t0)) s: $OUT.md"
