"""What a run should do: the schedule, the memory budgets, the batch groups and the ablations."""

from __future__ import annotations

import dataclasses
import enum
import re

from klotski_jax.constants import PolicyError

IO_MODES = ("buffered", "direct", "tensorstore")
# P(routed in the coming step) at or above which an expert is prefetched when nobody chose the
# threshold (the planner does when it runs): experts more likely used than not.
DEFAULT_PREFETCH_THRESHOLD = 0.5


class Schedule(enum.StrEnum):
    """The schedules the engine runs, all over the same tiers and budgets."""

    KLOTSKI = "klotski"  # expert-aware multi-batch pipeline (hot experts first, cold in load order)
    FLEXGEN = "flexgen"  # n groups share each layer; the whole next layer is prefetched
    LRU = "lru"  # one group, experts loaded on demand into an LRU device cache (mixtral-offloading)
    SEQUENTIAL = "sequential"  # one group, each layer loaded whole before compute (HF Accelerate)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Options of one run. Budgets are bytes; None means unlimited.

    groups / batch_size: the n batch groups of the multi-batch pipeline and the sequences per
    group. None lets the planner choose (Engine: klotski with a profile of the device, see
    planning/planner.py); without a plan, 2 groups with the prompts split evenly over them.
    Schedules that run a single group (lru, sequential) put every prompt in it.

    The klotski prefetch rule (which experts of the next MoE layer load before its router):
      prefetch_threshold: every expert whose probability of being routed by the coming step's
        tokens is at least this, most expected tokens first (planning/hot.py `expected_use`):
        with many tokens in flight nearly every expert qualifies (whole-layer prefetch), with
        few only the hot ones do. None: the planner's choice, else DEFAULT_PREFETCH_THRESHOLD.
      hot_experts: K, an explicit override: the K predicted hottest experts (the paper's rule).

    Ablations of the klotski schedule (the paper's ladder):
      multi_batch: n groups share each loaded layer (off: each group runs through the model alone)
      hot_only_prefetch: prefetch only the predicted hot experts (off: the whole MoE layer)
      reorder: hot experts first, then cold ones in load order (off: ascending expert id, loads
        issued in that order after all routing; the hot set is then the K rule's, K = top_k
        unless given, since running experts in id order needs a slot per prefetched expert)

    expert_batch: experts computed in one jitted call in decode steps when several are ready at
      once with at most 8 rows each (a model with 64+ experts runs hundreds of small expert
      calls a step, each paying a dispatch); 1 turns it off. Every schedule uses it.

    devices: how many local devices the run spans, on a 1-D mesh (expert parallelism: each MoE
      layer's routed experts are spread over the devices, attention is replicated), or "all".
      None: every local device when they are accelerators, one on a CPU. The device budget
      applies to each device.
    """

    schedule: Schedule = Schedule.KLOTSKI
    device_budget: int | None = None
    host_budget: int | None = None
    groups: int | None = None
    batch_size: int | None = None
    hot_experts: int | None = None  # K: the fixed-size hot-set rule instead of the threshold
    prefetch_threshold: float | None = None  # see above; None: the planner's, else the default
    multi_batch: bool = True
    hot_only_prefetch: bool = True
    reorder: bool = True
    io_threads: int = 2
    io_mode: str = "buffered"  # expert reads: "buffered" readinto, "direct" (O_DIRECT), "tensorstore"
    evict_page_cache: bool = False  # drop the store's files from the page cache before the run
    pinned_host: bool | None = None  # host cache in pinned host memory (None: on GPU/TPU only)
    verify_memory: bool = False  # cross-check the ledger against live device arrays (tests)
    verify_checksums: bool = True  # check each expert's checksum on its first read from disk
    devices: int | str | None = None  # N local devices, "all", or None (see above)
    expert_batch: int = 4  # ready experts of few rows per jitted call (1: one call per expert)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "schedule", Schedule(self.schedule))
        except ValueError:
            raise PolicyError(f"schedule must be one of {[s.value for s in Schedule]}, "
                              f"got {self.schedule!r}") from None
        if self.groups is not None and self.groups < 1:
            raise PolicyError(f"groups must be >= 1, got {self.groups}")
        if self.batch_size is not None and self.batch_size < 1:
            raise PolicyError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.io_mode not in IO_MODES:
            raise PolicyError(f"io_mode must be one of {IO_MODES}, got {self.io_mode!r}")
        if self.expert_batch < 1 or self.expert_batch & (self.expert_batch - 1):
            raise PolicyError(f"expert_batch must be a power of two (1: no batched expert "
                              f"calls), got {self.expert_batch}")
        if self.io_threads < 1:
            raise PolicyError(f"io_threads must be >= 1, got {self.io_threads}")
        if self.hot_experts is not None and self.hot_experts < 0:
            raise PolicyError(f"hot_experts must be >= 0, got {self.hot_experts}")
        if self.prefetch_threshold is not None and not 0 <= self.prefetch_threshold <= 1:
            raise PolicyError(f"prefetch_threshold must be in [0, 1], got "
                              f"{self.prefetch_threshold}")
        if self.devices is not None and self.devices != "all" and (
                isinstance(self.devices, bool) or not isinstance(self.devices, int)
                or self.devices < 1):
            raise PolicyError(f"devices must be a positive number of devices or 'all', got "
                              f"{self.devices!r}")
        for name in ("device_budget", "host_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise PolicyError(f"{name} must be positive, got {value}")

    @property
    def single_group(self) -> bool:
        """Schedules that run every prompt as one group."""
        return self.schedule in (Schedule.LRU, Schedule.SEQUENTIAL)

    @property
    def uses_threshold(self) -> bool:
        """Whether klotski's hot set comes from the expected-use threshold (else the K rule)."""
        return self.hot_only_prefetch and self.reorder and self.hot_experts is None

    @property
    def threshold(self) -> float:
        """The prefetch threshold in effect (the default when none was chosen)."""
        return (DEFAULT_PREFETCH_THRESHOLD if self.prefetch_threshold is None
                else self.prefetch_threshold)

    @property
    def device_count(self) -> int:
        """The number of devices the placement plans for (the engine resolves None and "all" to
        a number before it places anything; unresolved they count as one)."""
        return self.devices if isinstance(self.devices, int) else 1

    def replace(self, **changes) -> Policy:
        return dataclasses.replace(self, **changes)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20,
          "g": 2**30}


def parse_size(text: str | int, *, total: int | None = None) -> int:
    """Parse '512MB', '2GiB', '1.5g', '123456' or '30%' (of `total`, e.g. the weight bytes)."""
    if isinstance(text, int):
        return text
    s = text.strip().lower().replace(" ", "")
    if s.endswith("%"):
        if total is None:
            raise PolicyError(f"size {text!r} is a percentage but there is nothing to take it of")
        try:
            pct = float(s[:-1])
        except ValueError:
            raise PolicyError(f"cannot parse size {text!r}") from None
        if not 0 < pct <= 1000:
            raise PolicyError(f"percentage {text!r} must be in (0, 1000]")
        return int(total * pct / 100)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise PolicyError(f"cannot parse size {text!r} (use e.g. 512MB, 2GiB or 30%)")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise PolicyError(f"size {text!r} must be positive")
    return value
