"""The training loop as a Ray Train worker: `train_loop_per_worker(config)`.

The loop is `orchestrator.loop.train_loop`; this module only gives it a session that restores
from `ray.train.get_checkpoint()` and reports with `ray.train.report`, so Ray Train keeps the
checkpoints (and restores them after a worker or trial restart) and Tune receives the metrics
through `TuneReportCallback`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train

from models.summary import summarize
from orchestrator.config import TrainConfig
from orchestrator.loop import CHECKPOINT_FILE, load_checkpoint, save_atomic, train_loop


class RaySession:
    interactive = False

    def __init__(self, cfg: TrainConfig):
        info = summarize(cfg.architecture)
        self.flops, self.batch_size = info["flops"], cfg.batch_size

    def restore(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / CHECKPOINT_FILE)

    def log_step(self, record: dict) -> None:
        pass  # per-step records stay in the worker; Tune and MLflow receive epochs

    def report(self, metrics: dict, state: dict | None) -> None:
        # Training cost so far: forward + backward is about 3x the forward FLOPs.
        metrics = {**metrics, "train_gflops": 3 * self.flops * metrics["step"] * self.batch_size / 1e9}
        if state is None:  # not world rank 0: the checkpoint comes from rank 0
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_atomic(state, Path(folder) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig(**config)
    train_loop(cfg, RaySession(cfg))
