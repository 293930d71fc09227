"""Multi-host runs: one process per host, one JAX mesh over every host's devices.

Each process runs the same program (JAX's multi-controller model): the same prompts, the same
schedule and the same replicated attention, routing and sampling, so every process takes the
same decisions; each one loads and computes only the routed experts its own devices own, from
its own copy of the checkpoint (or a shared mount), and the combine's psum sums every device's
experts across hosts. Process 0 writes the outputs.

`initialize()` starts JAX's distributed runtime before anything else uses JAX, from the
standard environment: TPU pod slices, SLURM and Open MPI are detected by JAX itself; elsewhere
set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def initialize() -> None:
    """Join the job's other processes (idempotent). CPU processes exchange their collectives
    through gloo (the CPU client has no other cross-process transport)."""
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in os.environ:
        kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kw)
    log.info("process %d of %d: %d local device(s) of %d", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def is_writer() -> bool:
    """Whether this process writes the run's outputs (process 0; always in a one-process run)."""
    return jax.process_index() == 0
