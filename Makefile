# klotski-jax developer entry points. On a fresh machine:
#   make demo    # venv without torch, builds the default model, benchmarks the schedules on it
#   make test    # same venv plus torch (CPU) and the test extra, runs the fast tests
#
# One venv serves both: `make demo` installs the package only; `make test` adds torch + the
# `test` extra on top. Stamp files under .venv record what is installed, so reruns skip pip until
# pyproject.toml changes.

VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Must match the `test` extra in pyproject.toml. Installed FIRST and pinned: an unpinned torch (or
# accelerate in a venv without torch) resolves to a multi-GB CUDA build.
TORCH  := torch==2.13.0
PYTEST_ARGS ?=
# pytest-xdist workers (test files stay whole on one worker: their module fixtures are built
# once). Two fit the 2-core CI machine; 0 runs the suite in-process, without workers.
PYTEST_WORKERS ?= 2
# Where `make demo` writes its JSON lines, plot and trace.
BENCH_OUT ?= bench-out

# Persistent XLA compilation cache: repeated test runs skip most compiles.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES ?= 0

.PHONY: help demo test test-slow lint install install-test

help:
	@echo "make demo       build the default model, run 'klotski bench' on it at a 25% device budget"
	@echo "make test       fast tests (pytest -m 'not slow'); installs torch $(TORCH) + [test]"
	@echo "make test-slow  the slow-marked tests only"
	@echo "make lint       ruff check"

$(PY):
	python3 -m venv $(VENV)

# The package alone (what `make demo` needs).
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

# torch first, then the package with its test extra; this also satisfies the plain install.
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Every schedule on the default model at a quarter of its weight bytes on the device and half in
# host RAM, the checkpoint evicted from the page cache before each run; hf-accelerate runs when
# torch is installed (`make test` installs it), else it is reported as skipped. --profile
# measures the model on this machine once (about 35 s, then cached) so that klotski runs with the
# planner's n, batch size and K. The CPU preset (8 prompts x 32 tokens -> 8) on any machine.
demo: $(VENV)/.installed
	$(VENV)/bin/klotski bench --schedules klotski,flexgen,lru,sequential,hf-accelerate --profile \
	    --preset cpu --device-budget 25% --host-budget 50% --cold-disk --repeats 3 --sample 3 \
	    --json $(BENCH_OUT)/demo.jsonl --plot $(BENCH_OUT)/demo.png --trace $(BENCH_OUT)/demo-trace.json

test: $(VENV)/.installed-test
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# pytest exits 5 when nothing is selected: not a failure while no test is marked slow.
test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m slow $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "no slow tests"; }

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
