"""Where a single run's results go: epoch lines on stdout, JSON lines to a file, checkpoints to a
folder; and the checks, before any training, that none of it replaces an earlier run's."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist

from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.results import CHECKPOINT_FILE, EPOCH_METRICS
from orchestrator.run.checkpoint import load_checkpoint, save_atomic
from orchestrator.run.config import TrainConfig


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
            record = {k: metrics[k] for k in ("epoch", *EPOCH_METRICS) if k in metrics}
            self._write(json.dumps({"kind": "epoch", **record}) + "\n")
            self.log.flush()
        if self.echo:
            print(f"epoch {metrics['epoch']:>3}  train loss {metrics['train_loss']:.4f}  "
                  f"train err {100 * metrics['train_error']:5.2f}%  "
                  f"test err {100 * metrics['test_error']:5.2f}% (top-5 "
                  f"{100 * metrics['test_error_top5']:5.2f}%)  lr {metrics['lr']:.4g}  "
                  f"{metrics['images_per_s']:7.1f} img/s  {metrics['epoch_time_s']:6.1f} s "
                  f"(data {metrics['data_time_s']:.1f} s, steps {metrics['step_time_s']:.1f} s)"
                  + (f"  {metrics['skipped_images']} bad images skipped"
                     if metrics.get("skipped_images") else ""), flush=True)

    def close(self) -> None:
        if self.log:
            self.log.close()
