"""Profiles with the engine in the loop: `profile_checkpoint` measures the pieces (profiler.py)
and calibrates their overheads against timed steps of the real `Engine`.

Lives above the engine (layers: planning <- runtime <- profiler <- engine <- here), so the
profiler needs no engine: it takes the timing probe as an argument.
"""

from __future__ import annotations

import os
import pathlib
import statistics

import numpy as np

from klotski_jax.planning.costs import Profile
from klotski_jax.profiler import Probe, ProfileOptions, get_profile


def engine_probe(ckpt_dir: str | os.PathLike[str], repeats: int = 3) -> Probe:
    """Timed generation of seeded random prompts: (median prefill s, median decode step s) of
    `repeats` runs after one warm-up run, for n groups of b sequences under a device budget."""
    from klotski_jax.engine import Engine
    from klotski_jax.planning.policy import Policy

    def probe(groups: int, batch: int, device_budget: int | None, prompt_len: int,
              new_tokens: int, prefetch_threshold: float = 0.5) -> tuple[float, float]:
        # Every choice fixed: the planner has nothing to do while it is measured.
        engine = Engine(ckpt_dir, Policy(groups=groups, batch_size=batch,
                                         device_budget=device_budget,
                                         prefetch_threshold=prefetch_threshold))
        cfg = engine.config
        rng = np.random.default_rng(0)
        special = {cfg.bos_token_id, cfg.pad_token_id, *cfg.eos_token_ids} - {None}
        ids = [t for t in range(cfg.vocab_size) if t not in special]
        prompts = [rng.choice(ids, prompt_len).tolist() for _ in range(groups * batch)]
        runs = [engine.generate(prompts, max_new_tokens=new_tokens, stop_at_eos=False).stats
                for _ in range(repeats + 1)][1:]
        return (statistics.median(r.prefill_s for r in runs),
                statistics.median(r.decode_s / max(1, new_tokens - 1) for r in runs))

    return probe


def profile_checkpoint(ckpt_dir: str | os.PathLike[str], *, refresh: bool = False,
                       options: ProfileOptions | None = None
                       ) -> tuple[Profile, pathlib.Path, bool]:
    """The cached profile of this model on this device, else measured and calibrated now:
    (profile, cache file, whether it was measured now)."""
    options = options or ProfileOptions()
    return get_profile(ckpt_dir, refresh=refresh, options=options,
                       probe=engine_probe(ckpt_dir, repeats=options.repeats))
