"""Where a single run's results go: epoch lines on stdout, JSON lines to a file, checkpoints to a
folder; and the checks, before any training, that none of it replaces an earlier run's."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO

import torch.distributed as dist

from orchestrator.errors import CheckpointError, ConfigError, StorageError
from orchestrator.results import CHECKPOINT_FILE, EPOCH_METRICS
from orchestrator.run.checkpoint import load_checkpoint, save_atomic
from orchestrator.run.config import TrainConfig
from orchestrator.storage import check_writable, writing


def check_outputs(cfg: TrainConfig, checkpoint_dir: bool = True) -> None:
    """Before any training: a new run never replaces an earlier run's checkpoint or log, and
    the folders it will write to can be written."""
    if cfg.log_json:
        log = Path(cfg.log_json)
        if not cfg.resume and log.is_file() and log.stat().st_size:
            raise ConfigError(f"--log-json {log} exists; pass --resume to continue its run, or "
                              f"choose another file")
        check_writable(log, "--log-json", file=True)
    if checkpoint_dir and cfg.checkpoint_dir:
        folder = Path(cfg.checkpoint_dir)
        if not cfg.resume and (folder / CHECKPOINT_FILE).exists():
            raise CheckpointError(f"{folder / CHECKPOINT_FILE} exists; pass --resume to continue "
                                  f"that run, or choose another --checkpoint-dir")
        check_writable(folder, "--checkpoint-dir")


def log_lines_until(path: Path, step: int, epoch: int) -> list[str] | None:
    """On resume: the log's lines up to the checkpoint (the later ones are trained again); reads
    only. A last line cut short (a crash mid-write) is dropped; any other unreadable line is an
    error."""
    if not path.is_file():
        return None  # none, or a device such as /dev/null (a pipe is refused at the start)
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            later = (record["step"] > step if record["kind"] == "step" else
                     record["epoch"] > epoch)
        except (ValueError, KeyError, TypeError):
            if number == len(lines) and not line.endswith("\n"):
                break  # torn by a crash while it was written
            raise CheckpointError(f"--log-json {path}, line {number}: not a log line of "
                                  f"orchestrator.train; give another --log-json file") from None
        if not later:
            kept.append(line)
    return kept


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
        self.log: TextIO | None = None
        self.kept_log: list[str] | None = None  # on resume: written back at the first new line
        self.log_failed: Exception | None = None  # raised after the epoch's checkpoint
        if guard and self.lead:
            check_outputs(cfg)

    def restore(self) -> dict | None:
        if not self.resume:
            return None
        assert self.dir is not None, "TrainConfig: resume needs checkpoint_dir"
        path = self.dir / CHECKPOINT_FILE
        if not path.exists():  # anything else there is told by load_checkpoint
            raise CheckpointError(f"no checkpoint in {self.dir} to resume from; run without "
                                  f"--resume to start training")
        state = load_checkpoint(path)
        if self.log_path is not None:
            self.kept_log = log_lines_until(self.log_path, state["step"], state["epoch"])
        return state

    def _write(self, line: str) -> None:
        if self.log_path is None or self.log_failed is not None:
            return
        if self.log is None:  # opened at the first line: a run that fails earlier (a resume
            # refused after its checks) writes and cuts nothing
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            if self.kept_log is not None:
                tmp = self.log_path.with_name(f".{self.log_path.name}.tmp-{os.getpid()}")
                tmp.write_text("".join(self.kept_log))
                os.replace(tmp, self.log_path)
            self.log = open(self.log_path, "a" if self.resume else "w")
        self.log.write(line)

    def log_step(self, record: dict) -> None:
        self._log_safely(lambda: self._write(json.dumps(record) + "\n"))

    def _log_safely(self, write) -> None:
        """A log that cannot be written (a full disk) ends the run, but only after the epoch's
        checkpoint: the error is kept and raised by `report`."""
        try:
            with writing(self.log_path, "--log-json"):
                write()
        except StorageError as exc:
            self.log_failed = exc

    def report(self, metrics: dict, state: dict | None) -> None:
        self.write_epoch(metrics)
        if self.dir is not None and state is not None:
            with writing(self.dir / CHECKPOINT_FILE, "--checkpoint-dir"):
                self.dir.mkdir(parents=True, exist_ok=True)
                save_atomic(state, self.dir / CHECKPOINT_FILE)
        if self.log_failed is not None:
            raise self.log_failed

    def write_epoch(self, metrics: dict) -> None:
        if self.log_path is not None:
            record = {k: metrics[k] for k in ("epoch", *EPOCH_METRICS) if k in metrics}

            def write():
                self._write(json.dumps({"kind": "epoch", **record}) + "\n")
                if self.log is not None:
                    self.log.flush()
            self._log_safely(write)
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
            try:
                with writing(self.log_path, "--log-json"):
                    self.log.close()
            except StorageError:  # the lines a full disk held back: said once, not twice
                if self.log_failed is None:
                    raise
