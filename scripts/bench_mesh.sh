#!/usr/bin/env bash
# The expert-parallelism table: every engine schedule on 1, 2, 4 and 8 devices of the cpu-mid
# model (scripts/make_bench_model.py: Mixtral's shape at CPU size, 12 layers, 8 experts of 11 MB,
# 1.16 GB in bf16) at a quarter of its weight bytes on EACH device, klotski planned over a
# measured profile (--profile, cached per model and machine). On a CPU the devices are
# simulated (XLA_FLAGS=--xla_force_host_platform_device_count=8, set before JAX starts): they
# share this machine's cores, so the measured throughput cannot show a speed-up; the rows show
# that every schedule runs on every count, the bytes each device receives, each device's ledger
# peak under its budget, and the planner's predicted throughput for devices with their own links
# (docs/benchmarks.md, "Expert parallelism on simulated CPU devices"). Writes OUT.md, OUT.jsonl.
#
# Usage: scripts/bench_mesh.sh [OUT]    (default OUT: benchmarks/results/mesh-cpu-mid-<UTC date>)
#
# Environment:
#   PY=.venv/bin/python   the interpreter
#   WORK=/tmp/klotski-bench   where the HF checkpoint and its conversion go (reused if present)
#   DEVICES=1,2,4,8       device counts (the simulated devices are the largest of them)
#   REPEATS=1             timed repeats per row
#   SCHEDULES=klotski,flexgen,lru,sequential
#   BENCH_ARGS="..."      more `klotski bench` flags, e.g. a smoke run's
#                         "--prompt-len 8 --gen-len 2 --num-prompts 2"
#
# A smoke run (a tiny workload; its numbers are not results):
#   BENCH_ARGS="--prompt-len 8 --gen-len 2 --num-prompts 2" scripts/bench_mesh.sh /tmp/klotski-bench/mesh-smoke
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's klotski_jax, whatever the venv

PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/klotski-bench}
DEVICES=${DEVICES:-1,2,4,8}
REPEATS=${REPEATS:-1}
SCHEDULES=${SCHEDULES:-klotski,flexgen,lru,sequential}
OUT=${1:-benchmarks/results/mesh-cpu-mid-$(date -u +%Y%m%d)}
PRESET=cpu-mid
hf=$WORK/$PRESET-hf
ckpt=$WORK/$PRESET
most=$(tr ',' '\n' <<<"$DEVICES" | sort -n | tail -1)

mkdir -p "$WORK" "$(dirname "$OUT")"
if [[ ! -f $ckpt/manifest.json ]]; then
  t0=$SECONDS
  "$PY" scripts/make_bench_model.py "$PRESET" "$hf" --convert "$ckpt" --overwrite
  echo "built $ckpt in $((SECONDS - t0)) s"
fi

t0=$SECONDS
# JAX fixes its device count when it starts: the simulated devices are set here, before it does.
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$most" \
"$PY" -m klotski_jax.cli bench "$ckpt" --schedules "$SCHEDULES" --devices "$DEVICES" --profile \
    --device-budget 25% --repeats "$REPEATS" --json "$OUT.jsonl" --markdown "$OUT.md" \
    ${BENCH_ARGS:-}
echo "bench of $ckpt on $DEVICES devices in $((SECONDS - t0)) s: $OUT.md"
