"""Run a function on N local processes joined into one process group, without Ray: for the
parity tests and bench/parallel_bench.py (gloo on CPU; nccl with one GPU per process)."""
from __future__ import annotations

import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.parallel import process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind((process_group.LOOPBACK, 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, backend: str, fn, args, errors):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # one core per rank, as a 1-CPU Ray Train worker
    if rank == 0:
        process_group.listen(process_group.LOOPBACK, port)
    process_group.join(backend, rank, world, process_group.LOOPBACK, port)
    try:
        fn(rank, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    errors.put(DONE)  # fn and the group's teardown finished: what the caller checks is written


DONE = "done"
PRELOAD = ["tests.ranks", "orchestrator.run.step", "orchestrator.run.loop"]


def run_ranks(world: int, fn, *args, backend: str = "gloo") -> None:
    """fn(rank, *args) on `world` processes; raises with the first rank's traceback."""
    ctx = mp.get_context("forkserver")
    # Ranks fork from one server process that imported torch and the project once a session:
    # spawned, each rank paid those imports anew (seconds a rank on a small machine).
    ctx.set_forkserver_preload(PRELOAD)
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, backend, fn, args, errors))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    failures = [m for m in messages if m != DONE]
    if failures:
        raise AssertionError(failures[0])
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    # A rank that finished its work and destroyed its process group can still abort while the
    # interpreter exits ("terminate called without an active exception": a gloo thread torn down
    # at exit; seen about once in a few hundred pipelined runs under load). Its results are
    # written and checked by the caller; any other exit, or an abort before DONE, fails.
    if bad and not (messages.count(DONE) == world and set(bad) == {-6}):
        raise AssertionError(f"ranks exited with {bad}")
