"""`klotski bench`: throughput of the schedules, side by side, on one checkpoint and workload.

Every schedule runs in this one process, on the same prompts (token ids) and the same budgets:
klotski, flexgen, lru, sequential (our engine), hf-accelerate (HF transformers + accelerate
offloading, the real peer; see bench/hf.py) and `resident` (klotski with every weight on the
device: the compute bound the efficiency figure uses). Each (configuration, schedule) runs once
untimed (warm-up: compiles, first reads), then `repeats` timed runs; within a repeat the
schedules alternate, and the order rotates by one every repeat, so slow drift of a shared
machine does not favour whichever runs first.

Configurations: the base workload, or one per n of `--sweep-groups` (n groups of a fixed
per-group batch, so n x batch sequences). `--ablation` adds the paper's ladder on our engine:
single-batch simple pipeline -> + multi-batch -> + hot-only prefetch -> + reorder (= klotski).

Metrics per (schedule, configuration): the paper's throughput (generated tokens / (prefill +
decode) seconds), prefill and decode throughput apart, I/O wait and its share of the time,
bytes read from the chunk files and moved to the device, memory peaks, and an efficiency figure:
a lower bound for this machine over the measured time (`lower_bound`). One JSON line per
(schedule, configuration), a Markdown table, and optionally a plot (bench/plot.py) and a trace.

Modules, each importing only those before it: options (schedules, presets, configurations, run
order), metrics, bounds (the lower bound), hf (the HF peer), report (Markdown), plot, runner
(`Bench` and `run_bench`, the entry point of `klotski bench`).
"""
