"""The driver's side of Ray: connect to a cluster (or start a private local one), and a Ray Train
trainer whose workers are a run's ranks (`orchestrator.cluster.worker`) in one torch process group.

This module imports no torch: each trial's driver and Ray Train's controller load it, and neither
trains (torch costs each about 3 CPU-s to import)."""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import (DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                 TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from orchestrator.compat import (PLACEMENT_GROUP_ID, RAY_CONSTANTS, TORCH_DISTRIBUTED_ENV,
                                 TORCH_SHUTDOWN, TORCH_TRAIN_CONTEXT, TRAINING_FRAMEWORK, resolve)
from orchestrator.errors import ConfigError, TrainingDiverged, UserError, sigterm_as_ctrl_c
from orchestrator.parallel import process_group
from orchestrator.results import DIVERGED
from orchestrator.run.config import TrainConfig
from orchestrator.storage import check_writable

# Ray's loopback-only mode for a single machine (see init_ray).
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray Train's controller checks its workers every 2 s by default, and a run ends about three
# checks after its last report: 6 s of every trial. A check is one small call per worker.
HEALTH_CHECK_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train watches a run's nodes for preemption to move the run before they go, with an actor of
# its own per run; a private local Ray has no other node to move it to.
PREEMPTION_WATCHER = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train gives a run's workers 60 s to start, then tears them down and starts again: on a
# loaded machine a worker importing torch can take longer, and the run then never starts. Ten
# minutes, as Ray Train allows a started worker to answer a health check.
WORKER_GROUP_START_TIMEOUT = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
# The port a local Ray's GCS listens on, read by ray.init (the address is then known before).
GCS_PORT = "RAY_GCS_SERVER_PORT"


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster at RAY_ADDRESS (`auto`: the one `ray start` began on this machine;
    host:port is checked first, as Ray itself waits minutes where nothing answers), or start a
    private local Ray that listens on 127.0.0.1 only."""
    if ray.is_initialized():
        return
    _connect(num_cpus)
    # ray.init makes SIGTERM end the driver at once (inside Tune: an abort, runs left RUNNING);
    # the commands stop on it as on Ctrl-C instead.
    sigterm_as_ctrl_c()


def release_placement_groups(settle_s: float = 2.0, limit_s: float = 15.0) -> None:
    """Remove the placement groups this driver's job still holds once its trials have ended,
    until none has appeared for `settle_s` (at most `limit_s`). Ray removes a job's groups when
    the job ends, but a Ray Train worker group made as Ctrl-C or SIGTERM arrived (its trial
    already stopped, its controller not yet gone) was seen to outlive the job, holding its CPUs
    or GPUs on a long-lived cluster until someone removed it by hand."""
    PlacementGroupID = resolve(PLACEMENT_GROUP_ID)

    job = ray.get_runtime_context().get_job_id()
    start = last = time.monotonic()
    while True:
        for group, info in placement_group_table().items():
            # A group's id ends with the id of the job that made it (Ray's id layout).
            if group.endswith(job) and info.get("state") != "REMOVED":
                remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group)))
                last = time.monotonic()
        now = time.monotonic()
        if now - last >= settle_s or now - start >= limit_s:
            return
        time.sleep(0.2)


def _connect(num_cpus: int | None) -> None:
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        # Ray gives a local node the machine's routable address, and its servers then listen on
        # every interface; its loopback-only mode (meant for laptops) keeps them on 127.0.0.1.
        os.environ[LOOPBACK_ONLY] = "0"  # for the processes Ray starts
        os.environ.setdefault(*PREEMPTION_WATCHER)
        resolve(RAY_CONSTANTS).ENABLE_RAY_CLUSTER = False  # read when ray was imported
        _start_local(num_cpus)
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


def _start_local(num_cpus: int | None) -> None:
    """Start a local Ray on a port chosen here, with RAY_ADDRESS naming it in the environment
    of every process it starts: Ray's own helpers (Ray Train's placement group cleaner, the
    state API) otherwise look for "the" Ray on the machine, and fail or pick another study's
    where there are several."""
    with socket.socket() as probe:  # a free port (another process may take it meanwhile: rare)
        probe.bind((process_group.LOOPBACK, 0))
        port = probe.getsockname()[1]
    os.environ[GCS_PORT] = str(port)
    os.environ["RAY_ADDRESS"] = f"{process_group.LOOPBACK}:{port}"
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True)
    except BaseException:
        del os.environ["RAY_ADDRESS"]
        raise
    finally:
        del os.environ[GCS_PORT]
    # What the driver's own clients (Tune, Train, the state API) connect to: the same instance.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


@dataclass
class ScopedTorchConfig(BackendConfig):
    """The torch process group that Ray Train's TorchConfig sets up, but with its rendezvous store
    listening on the address the ranks use (127.0.0.1 when a trial's workers share a machine), not
    on every interface. Not a TorchConfig: that module imports torch wherever the config goes."""

    backend: str | None = None  # None: nccl where the workers have GPUs, else gloo
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return ScopedTorchBackend

    @property
    def train_func_context(self):
        return OnTorchDevice

    @property
    def framework(self):
        return resolve(TRAINING_FRAMEWORK).TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "timeout_s": self.timeout_s}


class ScopedTorchBackend(Backend):
    """Ray Train's torch backend, but for the rendezvous; its steps on the workers are Ray's."""

    share_cuda_visible_devices = True  # as Ray's: a node's ranks see each other's GPUs

    def on_start(self, worker_group, backend_config: BackendConfig):
        assert isinstance(backend_config, ScopedTorchConfig), "the backend of ScopedTorchConfig"
        world_size = len(worker_group)
        if len(set(worker_group.execute(_node_id))) == 1:
            address = process_group.LOOPBACK
        else:
            address = worker_group.execute_single(0, ray.util.get_node_ip_address)
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus else "gloo")
        port = worker_group.execute_single(0, process_group.listen, address)
        worker_group.execute(on_worker, TORCH_DISTRIBUTED_ENV)
        timeout = datetime.timedelta(seconds=backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, process_group.join, backend, rank,
                                                   world_size, address, port, timeout)
                 for rank in range(world_size)])

    def on_shutdown(self, worker_group, backend_config: BackendConfig):
        done = worker_group.execute_async(on_worker, TORCH_SHUTDOWN,
                                          destroy_process_group=len(worker_group) > 1)
        try:
            ray.get(done, timeout=int(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                                     DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)))
        except GetTimeoutError:
            pass  # as Ray's: the workers are being torn down anyway


def on_worker(name: str, *args, **kwargs):
    """One of Ray's torch steps, found by name on the worker (which imports torch anyway)."""
    return resolve(name)(*args, **kwargs)


class OnTorchDevice:
    """Ray's torch context around the training function (it sets the rank's CUDA device), built
    on the worker."""

    def __enter__(self):
        self.inner = resolve(TORCH_TRAIN_CONTEXT)()
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


def run_rank(config: dict) -> None:
    """What Ray Train runs in each worker: `orchestrator.cluster.worker`, imported there. A trial's
    driver and Ray Train's controller load this module to start a run; the worker's imports (the
    training loop, torchvision and its compiler) would cost each of them about 2 CPU-s a trial."""
    from orchestrator.cluster.worker import train_loop_per_worker

    train_loop_per_worker(config)


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def build_trainer(cfg: TrainConfig, *, name: str, storage_path: str, echo: bool,
                  cpus_per_worker: float = 1, gpus_per_worker: float = 0, max_failures: int = 0,
                  callbacks: list | None = None):
    """A Ray Train run with one worker per rank of cfg.parallel's mesh, the ranks in one torch
    process group (`ScopedTorchConfig`). The same (storage_path, name) restores the run from its
    latest checkpoint."""
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    if not gpus_per_worker:  # Ray (2.60) no longer hides GPUs from a worker given none
        cfg = cfg.model_copy(update={"device": "cpu"})  # (auto: every rank on cuda:0, gloo)
    for setting in (HEALTH_CHECK_INTERVAL, WORKER_GROUP_START_TIMEOUT):
        os.environ.setdefault(*setting)  # Ray Train passes them to its controller
    return DataParallelTrainer(
        run_rank,
        train_loop_config={"run": cfg.model_dump(mode="json"), "echo": echo},
        backend_config=ScopedTorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.parallel.world_size,
                                               use_gpu=gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path,
                                       callbacks=callbacks or [],
                                       failure_config=ray.train.FailureConfig(max_failures)))


def run_on_ray(cfg: TrainConfig) -> dict:
    """More than one rank: a local Ray Train run (or on RAY_ADDRESS), one worker per rank."""
    world = cfg.parallel.world_size
    if cfg.data_dir:
        cfg = cfg.model_copy(update={"data_dir": str(Path(cfg.data_dir).resolve())})
    if cfg.log_json:
        cfg = cfg.model_copy(update={"log_json": str(Path(cfg.log_json).resolve())})
    storage = Path(cfg.checkpoint_dir).resolve() if cfg.checkpoint_dir else \
        Path(tempfile.mkdtemp(prefix="multires-"))
    if (storage / "train").exists() and cfg.checkpoint_dir and not cfg.resume:
        raise ConfigError(f"{storage / 'train'} exists; pass --resume to continue it or choose "
                          f"another --checkpoint-dir")
    if cfg.resume and not (storage / "train").exists():
        raise ConfigError(f"no run to resume in {storage}; run without --resume")
    from orchestrator.run.session import check_outputs  # it imports torch: see the docstring

    check_outputs(cfg, checkpoint_dir=False)  # Ray Train keeps the checkpoints in storage/train
    check_writable(storage, "--checkpoint-dir")  # all of it before Ray starts
    init_ray()
    # One CPU per rank where the machine has them; ranks share CPUs on a smaller machine.
    cpus_per_worker = min(1.0, ray.cluster_resources().get("CPU", 1) / world)
    gpus = ray.cluster_resources().get("GPU", 0) if cfg.device != "cpu" else 0
    gpus_per_worker = 1 if gpus >= world else 0
    if cfg.device == "cuda" and not gpus_per_worker:
        raise ConfigError(f"device cuda: {world} ranks need a GPU each and the cluster has "
                          f"{gpus:g}; use device auto or cpu, or fewer ranks")
    trainer = build_trainer(cfg, name="train", storage_path=str(storage), echo=True,
                            cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as exc:
        raise worker_cause(exc) from None
    if DIVERGED in result.metrics:
        raise TrainingDiverged(result.metrics[DIVERGED])
    return result.metrics


def worker_cause(exc: ray.train.WorkerGroupError) -> Exception:
    """The first worker's own exception when it is one we explain, else Ray's."""
    for failure in exc.worker_failures.values():
        cause = getattr(failure, "cause", None) or failure  # a RayTaskError wraps it
        if isinstance(cause, UserError):
            return cause
    return exc
