"""The timeline: `--trace FILE` writes Chrome trace-event JSON that Perfetto and chrome://tracing
open, with a compute lane, one lane per I/O thread, the work's identity in each event's args, and
waits of the compute thread on I/O (the bubbles) as their own events.

Runs are tiny: the default model (12 layers) at a quarter of its weight bytes, 2 new tokens.
"""

from __future__ import annotations

import collections
import json
import pathlib
from typing import Any

import pytest

import klotski_jax
from klotski_jax import cli
from klotski_jax.models.specs import total_bytes
from klotski_jax.runtime.trace import Tracer

EVENT_KEYS = ("name", "ph", "ts", "dur", "pid", "tid")
PROMPTS = ["The with statement is used to", "A class"]
SLACK_US = 1.0  # timestamps are floats in microseconds


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from klotski_jax.checkpoints.default_model import default_checkpoint

    return default_checkpoint(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def cli_run(ckpt: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trace, stats) of `klotski generate --trace --stats` with the klotski schedule at 25%."""
    out = tmp_path_factory.mktemp("run")
    argv = ["generate", str(ckpt), "--max-new-tokens", "2", "--device-budget", "25%", "-q",
            "--groups", "2",
            "--trace", str(out / "trace.json"), "--stats", str(out / "stats.json")]
    assert cli.main(argv + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "trace.json"]  # no temp files
    assert (out / "trace.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    return (json.loads((out / "trace.json").read_text()),
            json.loads((out / "stats.json").read_text()))


def complete_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def lanes(trace: dict[str, Any]) -> dict[int, str]:
    """tid -> lane name, from the thread_name metadata events."""
    return {e["tid"]: e["args"]["name"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


def test_chrome_trace_format(cli_run: tuple[dict[str, Any], dict[str, Any]]) -> None:
    trace, _ = cli_run
    assert isinstance(trace["traceEvents"], list)
    events = complete_events(trace)
    assert events
    for e in events:
        assert all(k in e for k in EVENT_KEYS), e
        assert isinstance(e["name"], str) and isinstance(e["args"], dict)
        assert isinstance(e["ts"], int | float) and isinstance(e["dur"], int | float)
        assert e["ts"] >= 0 and e["dur"] >= 0
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
    names = lanes(trace)
    assert "compute" in names.values()
    assert any(n.startswith("io-") for n in names.values())
    assert {e["tid"] for e in events} <= set(names)  # every lane with events is named
    assert len(set(names.values())) == len(names)


def test_events_carry_the_work(cli_run: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Expert computes name (step, layer, expert, tokens); loads name their bytes. The events add
    up to the stats: load bytes to bytes_to_device, compute events to compute_s."""
    trace, stats = cli_run
    cfg = klotski_jax.Engine(stats["checkpoint"]).config
    names = lanes(trace)
    by_name = collections.defaultdict(list)
    for e in complete_events(trace):
        by_name[e["name"]].append(e)
    experts = by_name["expert"]
    assert experts and all(names[e["tid"]] == "compute" for e in experts)
    for e in experts:
        a = e["args"]
        assert 0 <= a["layer"] < cfg.num_layers and 0 <= a["expert"] < cfg.num_experts
        assert a["tokens"] >= 1 and a["step"] in ("prefill", "decode 1")
    assert {e["args"]["group"] for e in by_name["attention"]} == {0, 1}  # two groups
    loads = [e for e in complete_events(trace) if e["name"].startswith("load")]
    assert loads and all(names[e["tid"]].startswith("io-") for e in loads)
    assert all(isinstance(e["args"]["bytes"], int) and e["args"]["bytes"] > 0 for e in loads)
    assert sum(e["args"]["bytes"] for e in loads) == stats["bytes_to_device"]
    assert sum(e["name"] == "load expert" for e in loads) == stats["expert_loads"]
    work = [e for e in complete_events(trace) if names[e["tid"]] == "compute" and e["name"] != "wait"]
    assert sum(e["dur"] for e in work) / 1e6 == pytest.approx(stats["compute_s"], rel=1e-6)


def test_lanes_do_not_overlap(cli_run: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """One thread does one thing at a time. An I/O lane is a plain sequence of loads; on the
    compute lane, events follow each other or nest (the viewers draw nested events as a stack),
    but two events never partly overlap."""
    trace, _ = cli_run
    names = lanes(trace)
    per_lane: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in complete_events(trace):
        per_lane[names[e["tid"]]].append(e)
    for lane, events in per_lane.items():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))  # a parent before its first child
        if lane.startswith("io-"):
            for a, b in zip(events, events[1:]):
                assert a["ts"] + a["dur"] <= b["ts"] + SLACK_US, (lane, a, b)
            continue
        open_spans: list[dict[str, Any]] = []
        for e in events:
            while open_spans and end(open_spans[-1]) <= e["ts"] + SLACK_US:
                open_spans.pop()  # closed before e starts
            if open_spans:  # e starts inside the innermost open span: it must end inside too
                assert end(e) <= end(open_spans[-1]) + SLACK_US, (lane, open_spans[-1], e)
            open_spans.append(e)


def end(e: dict[str, Any]) -> float:
    return e["ts"] + e["dur"]


def test_waits_show_the_bubbles_when_streaming(ckpt: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """sequential loads each streamed layer synchronously: its compute lane must show waits on
    streamed (not resident) experts, and the waits add up to the stats' io_wait_s."""
    tracer = Tracer()
    budget = klotski_jax.parse_size("25%", total=total_bytes(klotski_jax.Engine(ckpt).config))
    engine = klotski_jax.Engine(ckpt, klotski_jax.Policy(schedule="sequential",
                                                          device_budget=budget))
    gen = engine.generate(PROMPTS, max_new_tokens=2, trace=tracer)
    path = tracer.write(tmp_path / "t.json")
    trace = json.loads(path.read_text())
    names = lanes(trace)
    waits = [e for e in complete_events(trace) if e["name"] == "wait"]
    assert waits and all(names[e["tid"]] == "compute" for e in waits)
    streamed = [e for e in waits if "expert" in e["args"]["key"] and not e["args"].get("resident")]
    assert streamed, "a 25% budget streams experts, so compute must wait for some"
    assert sum(e["dur"] for e in waits) / 1e6 == pytest.approx(gen.stats.io_wait_s, rel=1e-6)
    assert gen.stats.peak_device_bytes <= budget


def test_disabled_tracer_records_nothing() -> None:
    tracer = Tracer(enabled=False)
    tracer.add("compute", "expert", 0.0, 1.0, layer=0)
    with tracer.span("io-0", "load expert", bytes=1):
        pass
    assert tracer.events() == []

