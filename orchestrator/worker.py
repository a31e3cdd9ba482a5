"""The training loop as a Ray Train worker: `train_loop_per_worker(config)`.

The loop is `orchestrator.loop.train_loop`; this module only gives it a session that restores
from `ray.train.get_checkpoint()` and reports with `ray.train.report`, so Ray Train keeps the
checkpoints (and restores them after a worker or trial restart) and Tune receives the metrics
through `TuneReportCallback`. Ray Train has already joined the workers into one process group
(gloo on CPU, nccl on GPU); the loop builds its mesh on it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train

from models.summary import summarize
from orchestrator.config import TrainConfig
from orchestrator.loop import CHECKPOINT_FILE, LocalSession, load_checkpoint, save_atomic, train_loop


class RaySession(LocalSession):
    def __init__(self, cfg: TrainConfig, echo: bool):
        # Checkpoints go to Ray Train's storage, not to a folder of our own.
        super().__init__(cfg.model_copy(update={"checkpoint_dir": None, "resume": False}),
                         interactive=False, echo=echo)
        info = summarize(cfg.architecture)
        self.flops, self.batch_size = info["flops"], cfg.batch_size

    def restore(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / CHECKPOINT_FILE)

    def report(self, metrics: dict, state: dict | None) -> None:
        # Training cost so far: forward + backward is about 3x the forward FLOPs.
        metrics = {**metrics, "train_gflops": 3 * self.flops * metrics["step"] * self.batch_size / 1e9}
        self.write_epoch(metrics)
        if state is None:  # not world rank 0: the checkpoint comes from rank 0
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_atomic(state, Path(folder) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def build_trainer(cfg: TrainConfig, *, name: str, storage_path: str, echo: bool,
                  cpus_per_worker: float = 1, gpus_per_worker: float = 0, max_failures: int = 0,
                  callbacks: list | None = None):
    """A TorchTrainer with one worker per rank of cfg.parallel's mesh. The same (storage_path,
    name) restores the run from its latest checkpoint."""
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.model_dump(mode="json"), "echo": echo},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.parallel.world_size,
                                               use_gpu=gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path,
                                       callbacks=callbacks or [],
                                       failure_config=ray.train.FailureConfig(max_failures)))


def train_loop_per_worker(config: dict) -> None:
    """config: {"run": TrainConfig fields, "echo": print epoch lines}."""
    cfg = TrainConfig(**config["run"])
    session = RaySession(cfg, echo=config.get("echo", False))
    try:
        train_loop(cfg, session)
    finally:
        session.close()
