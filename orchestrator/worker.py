"""The training loop as a Ray Train worker: `train_loop_per_worker(config)`.

The loop is `orchestrator.loop.train_loop`; this module only gives it a session that restores
from `ray.train.get_checkpoint()` and reports with `ray.train.report`, so Ray Train keeps the
checkpoints (and restores them after a worker or trial restart) and Tune receives the metrics
through `TuneReportCallback`. Ray Train has already joined the workers into one process group
(gloo on CPU, nccl on GPU); the loop builds its mesh on it.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
from ray.train.torch import TorchConfig
# Private: Ray's own process-group backend, reused for everything but the rendezvous.
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend
from ray.tune.integration.ray_train import TuneReportCallback

from models.summary import summarize
from orchestrator.config import ConfigError, TrainConfig
from orchestrator.loop import (CHECKPOINT_FILE, LocalSession, OutOfMemory, TrainingDiverged,
                               load_checkpoint, out_of_memory, save_atomic, train_loop)
from orchestrator.parallel import process_group

# Ray's loopback-only mode for a single machine (see init_ray).
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RaySession(LocalSession):
    def __init__(self, cfg: TrainConfig, echo: bool):
        # Checkpoints go to Ray Train's storage, not to a folder of our own.
        super().__init__(cfg.model_copy(update={"checkpoint_dir": None, "resume": False}),
                         interactive=False, echo=echo, guard=False)
        info = summarize(cfg.architecture)
        self.flops, self.batch_size = info["flops"], cfg.batch_size

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
        # Training cost so far: forward + backward is about 3x the forward FLOPs.
        return {**metrics, "train_gflops": 3 * self.flops * metrics["step"] * self.batch_size / 1e9}

    def report(self, metrics: dict, state: dict | None) -> None:
        metrics = self.with_cost(metrics)
        self.write_epoch(metrics)
        if state is None:  # not world rank 0: the checkpoint comes from rank 0
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_atomic(state, Path(folder) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


class TuneReport(TuneReportCallback):
    """Ray Train's reports to Tune (in a trial); a diverged run's report also carries the
    worst objective values, for the searcher and the scheduler."""

    def __init__(self, worst: dict[str, float]):
        super().__init__()
        self.worst = worst

    def after_report(self, run_context, metrics, checkpoint):
        if "diverged" in metrics[0]:
            metrics = [{**self.worst, **metrics[0]}]
        super().after_report(run_context, metrics, checkpoint)


@dataclass
class ScopedTorchConfig(TorchConfig):
    """Ray Train's torch process group with its rendezvous store listening on the address the
    ranks use (127.0.0.1 when a trial's workers share a machine), not on every interface."""

    @property
    def backend_cls(self):
        return _ScopedTorchBackend


class _ScopedTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        world_size = len(worker_group)
        if len(set(worker_group.execute(_node_id))) == 1:
            address = process_group.LOOPBACK
        else:
            address = worker_group.execute_single(0, ray.util.get_node_ip_address)
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus else "gloo")
        port = worker_group.execute_single(0, process_group.listen, address)
        worker_group.execute(_set_torch_distributed_env_vars)
        timeout = datetime.timedelta(seconds=backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, process_group.join, backend, rank,
                                                   world_size, address, port, timeout)
                 for rank in range(world_size)])


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


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
        torch_config=ScopedTorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.parallel.world_size,
                                               use_gpu=gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path,
                                       callbacks=callbacks or [],
                                       failure_config=ray.train.FailureConfig(max_failures)))


def train_loop_per_worker(config: dict) -> None:
    """config: {"run": TrainConfig fields, "echo": print epoch lines}."""
    cfg = TrainConfig(**config["run"])
    share = limit_gpu_memory()
    session = RaySession(cfg, echo=config.get("echo", False))
    try:
        train_loop(cfg, session)
    except TrainingDiverged as exc:
        # Reported, not raised: Ray Train retries a raised error, and this one would come back.
        ray.train.report({"diverged": str(exc)})
    except torch.OutOfMemoryError:
        raise OutOfMemory(out_of_memory(cfg, share)) from None
    finally:
        session.close()


def limit_gpu_memory() -> float | None:
    """A worker given a fraction of a GPU (resources.gpus_per_worker < 1) may allocate that
    fraction of its memory, so that trials packed on one GPU cannot starve each other: one that
    needs more fails with an out-of-memory error naming its share. Returns the fraction."""
    share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0)
    if 0 < share < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(share)
        return share
    return None


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster at RAY_ADDRESS (`auto`: the one `ray start` began on this machine;
    host:port is checked first, as Ray itself waits minutes where nothing answers), or start a
    private local Ray that listens on 127.0.0.1 only."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        # Ray gives a local node the machine's routable address, and its servers then listen on
        # every interface; its loopback-only mode (meant for laptops) keeps them on 127.0.0.1.
        os.environ[LOOPBACK_ONLY] = "0"  # for the processes Ray starts
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray was imported
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True)
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        if port.isdigit():
            socket.create_connection((host, int(port)), timeout=10).close()
        ray.init(address=address)
    except Exception as exc:
        raise ConfigError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} "
                          f"({type(exc).__name__}); start it, fix the address or unset "
                          f"RAY_ADDRESS") from None

