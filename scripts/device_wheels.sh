#!/usr/bin/env bash
# Wheels for the lent accelerator machine (no network there), fetched here into .whl/ for
# Python 3.12 manylinux x86_64: the packages klotski-jax and device_check.sh need that the
# machine does not preinstall (it has jax, flax, optax, orbax-checkpoint, tensorstore, torch and
# transformers). device_check.sh's env step lists what is still missing there.
#
#   bash scripts/device_wheels.sh            # here, once; .whl/ is git-ignored
#   then, on the device (the `carry` of the run names .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#       && export PYTHONPATH=/tmp/site && OUT=$OUT PLATFORM=cuda bash scripts/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# xxhash: checkpoint checksums (a hard dependency); pytest and its two needs; psutil: the
# hf-accelerate peer's RAM check.
PACKAGES=(xxhash pytest pluggy iniconfig psutil)
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${PACKAGES[@]}"
ls -la .whl
