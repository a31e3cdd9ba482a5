"""A run's rank as a Ray Train worker: `train_loop_per_worker(config)`.

The loop is `orchestrator.run.loop.train_loop`; this module only gives it a session that restores
from `ray.train.get_checkpoint()` and reports with `ray.train.report`, so Ray Train keeps the
checkpoints (and restores them after a worker or trial restart) and, in a study, Tune receives
the metrics. Ray Train has already joined the workers into one process group (gloo on CPU, nccl
on GPU; see driver.ScopedTorchConfig); the loop builds its mesh on it.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import ray.train
import torch

from models.complexity import summarize
from orchestrator.cluster.system_metrics import SystemSampler
from orchestrator.errors import OutOfMemory, TrainingDiverged
from orchestrator.results import CHECKPOINT_FILE, DIVERGED, training_flops
from orchestrator.run.checkpoint import load_checkpoint, save_atomic
from orchestrator.run.config import TrainConfig
from orchestrator.run.cpus import assigned_cpus
from orchestrator.run.loop import out_of_memory, train_loop
from orchestrator.run.session import LocalSession


class RaySession(LocalSession):
    def __init__(self, cfg: TrainConfig, echo: bool):
        # Checkpoints go to Ray Train's storage, not to a folder of our own.
        super().__init__(cfg.model_copy(update={"checkpoint_dir": None, "resume": False}),
                         interactive=False, echo=echo, guard=False)
        info = summarize(cfg.architecture)
        self.flops, self.batch_size = info["flops"], cfg.batch_size
        self.system = SystemSampler(gpu=cfg.device != "cpu" and torch.cuda.is_available())

    def restore(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        # The report that carried this checkpoint may have died with the process (or node) that
        # sent it: send its epoch's metrics again (the tracker logs an epoch once).
        ray.train.report(self.with_cost(state["metrics"]))
        return state

    def with_cost(self, metrics: dict) -> dict:
        cost = training_flops(self.flops, metrics["step"], self.batch_size)
        return {**metrics, "train_gflops": cost / 1e9}

    def report(self, metrics: dict, state: dict | None) -> None:
        metrics = self.with_cost(metrics)
        self.write_epoch(metrics)
        metrics.update(self.system.read())
        if state is None:  # no checkpoint this epoch, or not world rank 0 (rank 0 sends it)
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_atomic(state, Path(folder) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def close(self) -> None:
        self.system.close()
        super().close()


def train_loop_per_worker(config: dict) -> None:
    """config: {"run": TrainConfig fields, "echo": print epoch lines}."""
    cfg = TrainConfig(**config["run"])
    share = limit_gpu_memory()
    limit_compile_threads()
    session = RaySession(cfg, echo=config.get("echo", False))
    try:
        train_loop(cfg, session)
    except TrainingDiverged as exc:
        # Reported, not raised: Ray Train retries a raised error, and this one would come back.
        ray.train.report({DIVERGED: str(exc)})
    except torch.OutOfMemoryError:
        raise OutOfMemory(out_of_memory(cfg, share)) from None
    finally:
        session.close()


def limit_compile_threads() -> None:
    """Inductor's compile workers from this worker's CPUs, not the node's (by default up to
    32 a process: with 8 trials on a node, 256 cold compiles at once)."""

    cpus = assigned_cpus()
    if cpus is None:
        return
    threads = max(1, int(cpus))
    # Inductor reads the variable when it is first imported: a run that does not compile never
    # imports it.
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is None:
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(threads)
    else:
        inductor.compile_threads = threads  # type: ignore[attr-defined]


def limit_gpu_memory() -> float | None:
    """A worker given a fraction of a GPU (resources.gpus_per_worker < 1) may allocate that
    fraction of its memory, so that trials packed on one GPU cannot starve each other: one that
    needs more fails with an out-of-memory error naming its share. Returns the fraction."""
    share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0)
    if 0 < share < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(share)
        return share
    return None
