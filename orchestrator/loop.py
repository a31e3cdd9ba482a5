"""The training loop: one process, or one Ray Train worker.

`train_loop(config, session)` knows nothing about where it runs. The session decides where
metrics, step logs and checkpoints go: `LocalSession` (files, a progress bar) for
`python -m orchestrator.train`; a Ray session reports through `ray.train.report`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from orchestrator.config import ConfigError, TrainConfig
from orchestrator.data import CLASSES, Batches, load_dataset
from orchestrator.parallel import ShardedModel
from orchestrator.step import TrainingStep

CHECKPOINT_FILE = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class OutOfMemory(RuntimeError):
    """The run does not fit in the GPU memory it was given; the message says what to lower."""


def out_of_memory(cfg: TrainConfig, share: float | None = None) -> str:
    held = f"its {share:g} share of a GPU" if share else "the GPU"
    more = ", or raise resources.gpus_per_worker" if share else ""
    return (f"out of GPU memory: {cfg.architecture.name} at batch_size {cfg.batch_size} does not "
            f"fit in {held}; lower batch_size, use precision bf16 (or fp16){more}")


class Session(Protocol):
    interactive: bool  # show a progress bar

    def restore(self) -> dict | None: ...
    def log_step(self, record: dict) -> None: ...
    def report(self, metrics: dict, state: dict | None) -> None: ...  # state on rank 0 only


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_loop(cfg: TrainConfig, session: Session) -> dict:
    """Train `cfg` to the end (or from the session's checkpoint); returns the final metrics.

    Runs as one process, or as one rank of the mesh that `cfg.parallel` describes (every rank
    calls it; the collectives inside keep them in step)."""
    cfg = cfg.resolved(torch.cuda.is_available())
    device = torch.device(cfg.device)
    train_split, test_split = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_size,
                                           cfg.test_size, cfg.seed)
    if CLASSES[cfg.dataset] != cfg.architecture.num_classes:
        raise ConfigError(f"{cfg.dataset} has {CLASSES[cfg.dataset]} classes, the architecture "
                          f"{cfg.architecture.num_classes}")
    sharded = ShardedModel(cfg, device)
    p = cfg.parallel
    train_batches = Batches(train_split, cfg.dataset, cfg.batch_size, device, train=True,
                            seed=cfg.seed, shard=(sharded.mesh.dp_rank, p.dp),
                            channels_last=cfg.channels_last)
    # Pipeline stages and CUDA graphs keep the shapes of the first step: evaluate in batches of
    # the training size there.
    fixed_shapes = p.pp > 1 or cfg.compile != "none"
    test_size = cfg.batch_size if fixed_shapes else max(cfg.batch_size, 256)
    test_batches = Batches(test_split, cfg.dataset, test_size, device, train=False,
                           channels_last=cfg.channels_last)
    if len(train_batches) == 0:
        raise ConfigError(f"train_size {len(train_split)} is smaller than one batch "
                          f"({cfg.batch_size}); raise train_size or lower batch_size")

    per_epoch = len(train_batches)
    total_steps = min(cfg.steps or math.inf, cfg.epochs * per_epoch)
    epochs = math.ceil(total_steps / per_epoch)
    train_step = TrainingStep(cfg, sharded, total_steps)

    start_epoch, best = 0, math.inf
    state = session.restore()
    if state is not None:
        check_same_run(state, cfg)
        train_step.load_state_dict(state)
        start_epoch, best = state["epoch"], state["best_test_error"]
        set_rng_state(state["rng"])

    metrics: dict = state["metrics"] if state is not None else {}
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        sharded.model.train()
        seen = loss_sum = wrong = 0.0
        steps_this_epoch = min(per_epoch, total_steps - epoch * per_epoch)
        bar = tqdm(total=steps_this_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                   disable=not session.interactive, leave=False, file=sys.stderr)
        for i, (x, y) in enumerate(train_batches.epoch(epoch)):
            if i == steps_this_epoch:
                break
            lr = train_step.lr  # the rate this step uses
            train_step(x, y)
            bar.update()
            if (i + 1) % cfg.log_every and i + 1 < steps_this_epoch:
                continue  # the device runs ahead; nothing is read back until the next log line
            window = train_step.read()
            if window.first_nonfinite is not None:
                raise TrainingDiverged(
                    f"loss became non-finite at step {window.first_nonfinite} (epoch "
                    f"{(window.first_nonfinite - 1) // per_epoch + 1}); lower the learning rate")
            seen, loss_sum, wrong = seen + window.images, loss_sum + window.loss_sum, \
                wrong + window.wrong
            session.log_step({"kind": "step", "step": train_step.steps_done, "epoch": epoch + 1,
                              "loss": window.loss, "lr": lr})
            bar.set_postfix(loss=f"{window.loss:.3f}", refresh=False)
        bar.close()
        train_time = time.perf_counter() - started
        sharded.check_replicas()
        test_error = sharded.evaluate(test_batches, train_step.forward_context)
        best = min(best, test_error)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_error": wrong / seen,
            "test_error": test_error,
            "best_test_error": best,
            "lr": train_step.lr,
            "images_per_s": seen / train_time,
            "epoch_time_s": time.perf_counter() - started,
            "step": train_step.steps_done,
            "epochs_total": epochs,
        }
        state = train_step.state_dict()  # a collective; the full state on rank 0
        if state is not None:
            state.update({
                "epoch": epoch + 1, "best_test_error": best, "rng": rng_state(),
                "metrics": metrics, "architecture": cfg.architecture.model_dump(mode="json"),
                "config": cfg.model_dump(mode="json")})
        session.report(metrics, state)
    return metrics


# What changes a run's result; a resumed run must keep all of it (the mesh, the execution form
# and compile mode may change: they compute the same thing).
RESULT_KEYS = ("dataset", "train_size", "test_size", "epochs", "steps", "batch_size", "lr",
               "momentum", "nesterov", "weight_decay", "lr_milestones", "lr_gamma",
               "grad_clip_norm", "seed", "precision", "dtype")


def check_same_run(state: dict, cfg: TrainConfig) -> None:
    if state["architecture"] != cfg.architecture.model_dump(mode="json"):
        raise CheckpointError(
            f"the checkpoint holds a different architecture ({state['architecture']}); "
            f"use a fresh checkpoint dir or the matching architecture flags")
    saved, now = state["config"], cfg.model_dump(mode="json")
    changed = [key for key in RESULT_KEYS if key in saved and saved[key] != now[key]]
    if changed:
        was = ", ".join(f"{key}={saved[key]}" for key in changed)
        asked = ", ".join(f"{key}={now[key]}" for key in changed)
        raise CheckpointError(f"the checkpoint was trained with {was}, this run asks for "
                              f"{asked}; resume with the checkpoint's values or start a fresh "
                              f"--checkpoint-dir")


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a partial checkpoint."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # from a writer killed mid-save
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# What every checkpoint of this loop holds (TrainingStep.state_dict and the loop's own keys).
CHECKPOINT_KEYS = ("model", "momentum", "scheduler", "step", "epoch", "best_test_error", "rng",
                   "metrics", "architecture", "config")


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}); "
                              f"delete it to start over") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (it lacks "
                              f"{', '.join(missing)}); delete it to start over")
    return state


def check_outputs(cfg: TrainConfig, checkpoint_dir: bool = True) -> None:
    """Before any training: a new run never replaces an earlier run's checkpoint or log, and
    the folders it will write to can be written."""
    if cfg.log_json:
        log = Path(cfg.log_json)
        if not cfg.resume and log.is_file() and log.stat().st_size:
            raise ConfigError(f"--log-json {log} exists; pass --resume to continue its run, or "
                              f"choose another file")
        _check_writable(log.parent, f"--log-json {log}")
    if checkpoint_dir and cfg.checkpoint_dir:
        folder = Path(cfg.checkpoint_dir)
        if not cfg.resume and (folder / CHECKPOINT_FILE).exists():
            raise CheckpointError(f"{folder / CHECKPOINT_FILE} exists; pass --resume to continue "
                                  f"that run, or choose another --checkpoint-dir")
        _check_writable(folder, f"--checkpoint-dir {folder}")


def _check_writable(folder: Path, what: str) -> None:
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write there ({exc.strerror or exc}); choose a "
                          f"writable folder") from None
    finally:
        for path in created:  # nothing is left behind until the run writes there
            with contextlib.suppress(OSError):
                path.rmdir()


def keep_log_until(path: Path, step: int, epoch: int) -> None:
    """On resume: drop the log lines of steps after the checkpoint (they are trained again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        record = json.loads(line)
        if (record["step"] <= step if record["kind"] == "step" else record["epoch"] <= epoch):
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class LocalSession:
    """Epoch lines on stdout and JSON lines to a file (from the lead rank only), checkpoints in a
    folder (written by world rank 0, the one that holds the gathered state). `guard`: refuse to
    replace an earlier run's outputs (off where Ray restarts a worker of the same run)."""

    def __init__(self, cfg: TrainConfig, interactive: bool | None = None, echo: bool = True,
                 guard: bool = True):
        self.lead = not dist.is_initialized() or dist.get_rank() == 0
        self.interactive = self.lead and (sys.stderr.isatty() if interactive is None
                                          else interactive)
        self.echo = echo and self.lead
        self.dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.resume = cfg.resume
        self.log_path = Path(cfg.log_json) if cfg.log_json and self.lead else None
        self.log = None
        if guard and self.lead:
            check_outputs(cfg)

    def restore(self) -> dict | None:
        if not self.resume:
            return None
        path = self.dir / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"no checkpoint in {self.dir} to resume from; run without "
                                  f"--resume to start training")
        state = load_checkpoint(path)
        if self.log_path is not None:
            keep_log_until(self.log_path, state["step"], state["epoch"])
        return state

    def _write(self, line: str) -> None:
        if self.log_path is None:
            return
        if self.log is None:  # opened at the first line: a run that fails earlier writes nothing
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(self.log_path, "a" if self.resume else "w")
        self.log.write(line)

    def log_step(self, record: dict) -> None:
        self._write(json.dumps(record) + "\n")

    def report(self, metrics: dict, state: dict | None) -> None:
        self.write_epoch(metrics)
        if self.dir is not None and state is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_atomic(state, self.dir / CHECKPOINT_FILE)

    def write_epoch(self, metrics: dict) -> None:
        if self.log_path is not None:
            keys = ("epoch", "train_loss", "train_error", "test_error", "lr", "images_per_s",
                    "epoch_time_s")
            self._write(json.dumps({"kind": "epoch", **{k: metrics[k] for k in keys}}) + "\n")
            self.log.flush()
        if self.echo:
            print(f"epoch {metrics['epoch']:>3}  train loss {metrics['train_loss']:.4f}  "
                  f"train err {100 * metrics['train_error']:5.2f}%  "
                  f"test err {100 * metrics['test_error']:5.2f}%  lr {metrics['lr']:.4g}  "
                  f"{metrics['images_per_s']:7.1f} img/s  {metrics['epoch_time_s']:6.1f} s",
                  flush=True)

    def close(self) -> None:
        if self.log:
            self.log.close()
