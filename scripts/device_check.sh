#!/usr/bin/env bash
# The prepared accelerator check: what a lent GPU/TPU session runs in one go (about 5-8 minutes).
#
#   OUT=/tmp/out PLATFORM=cuda bash scripts/device_check.sh      # on the device machine
#   OUT=/tmp/out PLATFORM=cpu PY=.venv/bin/python bash scripts/device_check.sh   # dry run here
#
# It needs no network: the package runs from this checkout (PYTHONPATH), and the machine's own
# jax, flax, optax, tensorstore, torch and transformers are used; what the machine lacks
# (xxhash, pytest, ...) travels as wheels from scripts/device_wheels.sh (its header says how). Steps, each logged to $OUT:
#   1. versions and devices (env.txt);
#   2. the pipeline test matrix on the device (tests/test_pipeline.py: every family x schedule at
#      the minimum budget, tokens and logits against the reference, memory checks; the same on
#      int4, int8 and fp8 stores, tests/test_quant.py and test_fp8.py; DeepSeek's latent
#      attention and routers, tests/test_deepseek.py; host KV caches in pinned memory) and the
#      CLI tests (pytest-*.txt);
#   3. one `klotski generate` per schedule on the default model at 25% of its weights with the
#      host cache in pinned host memory, stats as JSON (generate-SCHEDULE.json);
#   4. `klotski bench` of the default model, profiled, with a klotski row on its int4 store
#      (dequantization on the device: bench-default.{jsonl,md,png});
#   5. the quickstart notebook (tests/test_notebook.py, where nbclient is installed);
#   6. where the machine has more than one accelerator: every schedule on all of them
#      (`--devices all`, 25% of the weights on each) against the one-device runs of step 3, token
#      agreement and per-device peaks in mesh-compare.txt, and a bench of every schedule on one
#      device and on all (bench-mesh.{jsonl,md}: measured and predicted scaling; skipped, and
#      said, on one device);
#   7. a profiled bench at Mixtral-8x7B's layer shapes (4 layers, random weights) at 25% of its
#      weights (bench-m87.{jsonl,md}). Copy what it writes under benchmarks/results/.
# A failing step is recorded (its exit code in summary.txt) and the next one still runs.
set -u
OUT=${OUT:?set OUT to the folder for the results}
PLATFORM=${PLATFORM:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS="$PLATFORM"
export KLOTSKI_JAX_CACHE="$OUT/cache" XLA_PYTHON_CLIENT_PREALLOCATE=false
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record the exit code and the seconds
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$summary"
}

step env 120 "$PY" -c '
import importlib.metadata as md, platform, jax
print("python", platform.python_version(), "devices", jax.devices())
for mod in ("jax", "jaxlib", "flax", "optax", "tensorstore", "numpy", "torch", "transformers",
            "accelerate", "safetensors", "tokenizers", "tqdm", "xxhash", "psutil", "matplotlib",
            "pytest", "nbclient", "ipykernel"):
    try:
        print(mod, md.version(mod))
    except md.PackageNotFoundError:
        print(mod, "missing")
d = jax.devices()[0]
print("memory kinds", sorted(m.kind for m in d.addressable_memories()))
'

step pytest-pipeline 360 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_pipeline.py \
    tests/test_quant.py tests/test_fp8.py tests/test_deepseek.py
step pytest-cli 180 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cli_generate.py
# The quickstart notebook on the device (skipped where nbclient / ipykernel are not installed).
step notebook 180 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_notebook.py

CKPT=$("$PY" -c 'from klotski_jax.checkpoints.default_model import default_checkpoint as d; print(d())' \
       2>> "$OUT/default-model.txt")
for s in klotski flexgen lru sequential; do
  step "generate-$s" 120 "$PY" -m klotski_jax.cli generate "$CKPT" \
      --prompt "The with statement is used to" --prompt "Return a new list containing" \
      --prompt "If the file does not exist," --prompt "In Python, a class definition" \
      --max-new-tokens 16 --schedule "$s" --device-budget 25% --pinned-host on \
      --repetition-penalty 1.3 --stats "$OUT/generate-$s.json" --output "$OUT/generate-$s.jsonl" -q
done

step bench-default 360 "$PY" -m klotski_jax.cli bench "$CKPT" \
    --schedules klotski,flexgen,lru,sequential,hf-accelerate --profile --quantized int4 \
    --device-budget 25% --host-budget 50% --cold-disk --repeats 3 --sample 2 \
    --json "$OUT/bench-default.jsonl" --markdown "$OUT/bench-default.md" \
    --plot "$OUT/bench-default.png" -q

# Several accelerators: expert parallelism over all local devices, against one device.
NDEV=$("$PY" -c 'import jax; print(jax.local_device_count())' 2>/dev/null || echo 1)
if [ "$NDEV" -gt 1 ]; then
  for s in klotski flexgen lru sequential; do
    step "mesh-$s" 180 "$PY" -m klotski_jax.cli generate "$CKPT" \
        --prompt "The with statement is used to" --prompt "Return a new list containing" \
        --prompt "If the file does not exist," --prompt "In Python, a class definition" \
        --max-new-tokens 16 --schedule "$s" --device-budget 25% --devices all \
        --repetition-penalty 1.3 --stats "$OUT/mesh-$s.json" --output "$OUT/mesh-$s.jsonl" -q
  done
  step mesh-compare 60 "$PY" -c '
import json, sys
out = sys.argv[1]
for s in ("klotski", "flexgen", "lru", "sequential"):
    try:
        one = [json.loads(x)["token_ids"] for x in open(f"{out}/generate-{s}.jsonl")]
        many = [json.loads(x)["token_ids"] for x in open(f"{out}/mesh-{s}.jsonl")]
        st = json.load(open(f"{out}/mesh-{s}.json"))
    except OSError as e:
        print(s, "missing:", e)
        continue
    same = sum(a == b for r, q in zip(one, many) for a, b in zip(r, q))
    print(s, f"tokens equal to one device: {same} of {sum(map(len, one))};",
          "peaks per device", st["peak_device_bytes_per_device"], "budget", st["device_budget_bytes"],
          "tok/s", round(st["throughput_tokens_per_s"], 1), "vs one device",
          round(json.load(open(f"{out}/generate-{s}.json"))["throughput_tokens_per_s"], 1))
' "$OUT"
  step bench-mesh 300 "$PY" -m klotski_jax.cli bench "$CKPT" \
      --schedules klotski,flexgen,lru,sequential --devices "1,$NDEV" --device-budget 25% \
      --repeats 2 --json "$OUT/bench-mesh.jsonl" --markdown "$OUT/bench-mesh.md" -q
else
  echo "mesh skipped: $NDEV accelerator(s)" | tee "$OUT/mesh-skipped.txt"
fi

# Mixtral-8x7B's layer shapes (random weights, 4 layers: 11.6 GB in bf16) at a device budget
# that forces streaming: klotski and the baselines where an expert is 352 MB. Last, so that a
# slow disk only costs this step.
step mixtral-shapes-model 240 "$PY" scripts/make_bench_model.py mixtral-8x7b "$OUT/m87-hf" \
    --layers 4 --convert "$OUT/m87"
step bench-mixtral-shapes 240 "$PY" -m klotski_jax.cli bench "$OUT/m87" \
    --schedules klotski,flexgen,lru,sequential --profile --device-budget 25% \
    --host-budget 50% --cold-disk --repeats 2 --json "$OUT/bench-m87.jsonl" \
    --markdown "$OUT/bench-m87.md" -q
rm -rf "$OUT/m87-hf" "$OUT/m87"  # 23 GB: the results are the .md / .jsonl

echo "done: $(grep -c 'rc=0 ' "$summary") of $(wc -l < "$summary") steps passed" | tee -a "$summary"
