"""Runs of the engine on several simulated CPU devices, for tests/test_mesh.py.

JAX fixes its device count when it starts, so the multi-device runs happen in a child process
started with `XLA_FLAGS=--xla_force_host_platform_device_count=N`:

    python tests/mesh_runs.py SPEC.json OUT.json

SPEC is a list of runs {"ckpt", "prompts", "new", "schedule", "devices", "budget": "min" or
null, "trace": bool}; OUT gets one record per run: its tokens, the per-device ledger peaks and
budget, the bytes moved per device, the trace lanes, and the jitted functions compiled after the
warm-up (there should be none).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_default_matmul_precision", "highest")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

import contract  # noqa: E402

from klotski_jax.engine import Engine  # noqa: E402
from klotski_jax.planning.policy import Policy  # noqa: E402
from klotski_jax.runtime import scheduler as scheduler_mod  # noqa: E402
from klotski_jax.runtime.trace import Tracer  # noqa: E402

_timed = [False]
_compiled_timed: list[str] = []


def _on_event(event: str, duration: float, **kw) -> None:
    if event == "/jax/core/compile/jaxpr_trace_duration" and _timed[0]:
        _compiled_timed.append(str(kw.get("fun_name", "?")))


def _mark_timed() -> None:
    warm_up = scheduler_mod.Scheduler.warm_up

    def marked(self, *a, **kw):
        _timed[0] = False
        warm_up(self, *a, **kw)
        _timed[0] = True

    scheduler_mod.Scheduler.warm_up = marked
    jax.monitoring.register_event_duration_secs_listener(_on_event)


def run(spec: dict) -> dict:
    prompts, new = spec["prompts"], spec["new"]
    policy = Policy(schedule=spec["schedule"], groups=spec.get("groups", 2),
                    batch_size=spec.get("batch_size"), devices=spec["devices"],
                    verify_memory=True)
    if spec.get("budget") == "min":
        policy = policy.replace(device_budget=contract.smallest_budget(
            spec["ckpt"], policy, len(prompts), max(map(len, prompts)), new))
    tracer = Tracer(enabled=bool(spec.get("trace")))
    _compiled_timed.clear()
    engine = Engine(spec["ckpt"], policy)
    out = engine.generate(prompts, max_new_tokens=new, stop_at_eos=False, trace=tracer)
    lanes = sorted({ev["args"]["name"] for ev in tracer.to_json()["traceEvents"]
                    if ev.get("ph") == "M" and ev.get("name") == "thread_name"})
    expert_devices = sorted({ev["args"]["device"] for ev in tracer.events()
                             if ev.get("name") == "expert" and "device" in ev.get("args", {})})
    st = out.stats
    return {"spec": spec, "tokens": out.token_ids, "budget": policy.device_budget,
            "devices": len(engine.devices), "peak": st.peak_device_bytes,
            "peaks": st.peak_device_bytes_per_device,
            "bytes_per_device": st.bytes_to_device_per_device, "lanes": lanes,
            "expert_devices": expert_devices, "placement": out.placement,
            "compiled_after_warm_up": list(_compiled_timed)}


def main() -> None:
    specs = json.loads(pathlib.Path(sys.argv[1]).read_text())
    _mark_timed()
    records = [run(spec) for spec in specs]
    pathlib.Path(sys.argv[2]).write_text(json.dumps(records))


if __name__ == "__main__":
    main()
