"""The CPUs a run's process may use: what Ray assigned to it, else its cores shared by the node's
ranks. Inductor's compile workers (`orchestrator.cluster.worker`) and an image folder's decoding
workers (`images`) take their number from it."""
from __future__ import annotations

import os
import sys


def assigned_cpus() -> float | None:
    """The CPUs Ray assigned to this process (a Ray worker), else None. Under Ray the CPUs a
    process may run on are the whole node's, shared by every trial there."""
    ray = sys.modules.get("ray")  # imported by any Ray worker; not imported here otherwise
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_assigned_resources().get("CPU")


def default_workers() -> int:
    """This process's share of the CPU cores, less one for the training loop: its Ray
    worker's CPUs, else the cores it may use shared by the node's ranks (LOCAL_WORLD_SIZE, as
    torchrun sets it)."""
    cpus = assigned_cpus()
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, int(cpus) - 1)
