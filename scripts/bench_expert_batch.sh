#!/usr/bin/env bash
# Batched expert calls (`--expert-batch`) against one call per expert, with the engine's own
# choices otherwise: every engine schedule on deepseek-mini (64 experts of 1.4 MB, top-8: the
# shape with the most expert calls per step), and klotski on the two Mixtral-shaped models of
# the dominance matrix (mid16, cpu-mid) for a decode-heavy and a prefill-heavy workload. Each
# table has its `resident` row (no budget), which shows the effect without streaming.
#
# Usage: scripts/bench_expert_batch.sh OUT_DIR
# Environment: PY (default .venv/bin/python), WORK (default /tmp/klotski-bench: where the
# deepseek-mini checkpoint is, built if missing), MODELS (default /tmp/kb: where mid16 and
# cpu-mid are, from scripts/make_bench_model.py; a missing one is skipped), REPEATS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/klotski-bench}
MODELS=${MODELS:-/tmp/kb}
REPEATS=${REPEATS:-3}
OUT=${1:?usage: scripts/bench_expert_batch.sh OUT_DIR}
mkdir -p "$OUT"

ds=$WORK/deepseek-mini
if [[ ! -f $ds/manifest.json ]]; then
  "$PY" scripts/make_bench_model.py deepseek-mini "$WORK/deepseek-mini-hf" --convert "$ds" --overwrite
fi

bench() {  # NAME CKPT SCHEDULES EXPERT_BATCH [more flags]
  local name=$1 ckpt=$2 schedules=$3 batch=$4
  shift 4
  "$PY" -m klotski_jax.cli bench "$ckpt" --schedules "$schedules" --device-budget 25% \
      --cold-disk --repeats "$REPEATS" --expert-batch "$batch" \
      --json "$OUT/$name-b$batch.jsonl" --markdown "$OUT/$name-b$batch.md" -q "$@" > /dev/null
  echo "$OUT/$name-b$batch.md"
}

for batch in 1 4; do
  bench deepseek-mini "$ds" klotski,flexgen,lru,sequential "$batch" --profile --host-budget 50%
done
for model in mid16 cpu-mid; do
  [[ -f $MODELS/$model/manifest.json ]] || { echo "skip $model: no $MODELS/$model"; continue; }
  for batch in 1 4; do
    bench "$model-c" "$MODELS/$model" klotski "$batch" --prompt-len 16 --gen-len 64 --num-prompts 8
    bench "$model-d" "$MODELS/$model" klotski "$batch" --prompt-len 128 --gen-len 8 --num-prompts 32
  done
done
