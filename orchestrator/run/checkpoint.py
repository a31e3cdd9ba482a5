"""Checkpoints: written whole or not at all, read without running code, checked to belong to the
run that resumes from them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from orchestrator.errors import CheckpointError, short
from orchestrator.storage import check_regular
from orchestrator.run.config import TrainConfig

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


# checkpoint_every: auto. Checkpoints up to SMALL_CHECKPOINT_BYTES (weights and momentum) are
# written after every epoch: a few MB for the thin nets, well under 5% of even a 1 s epoch. A
# larger one is written when the last one cost (as measured) at most CHECKPOINT_SHARE of the
# training since it, and at least every CHECKPOINT_MAX_INTERVAL_S, so a lost worker costs at most
# that plus one epoch. Measured on an H200 (bench/RESULTS.md): the wide net's 555 MiB took 10-20%
# of its epoch when written every epoch; now every few epochs, about 5%.
SMALL_CHECKPOINT_BYTES = 64 * 2**20
CHECKPOINT_SHARE = 0.05
CHECKPOINT_MAX_INTERVAL_S = 120.0


def checkpoint_due(every: int | Literal["auto"], epoch: int, last_epoch: int, size_bytes: int,
                   since_s: float, last_write_s: float | None) -> bool:
    """Whether epoch `epoch` (counted from 1) ends with a checkpoint of `size_bytes`. `since_s`:
    seconds since the last checkpoint (or since training started in this process);
    `last_write_s`: what that checkpoint cost (None: none written by this process yet)."""
    if epoch >= last_epoch:
        return True
    if every != "auto":
        return epoch % every == 0
    if size_bytes <= SMALL_CHECKPOINT_BYTES or last_write_s is None:
        return True
    return since_s >= CHECKPOINT_MAX_INTERVAL_S or last_write_s <= CHECKPOINT_SHARE * since_s


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


# The checkpoint's entries the loop reads as they are: their kinds, checked when it is loaded.
KINDS = {"step": int, "epoch": int, "best_test_error": float, "rng": dict, "metrics": dict,
         "architecture": dict, "config": dict}


def load_checkpoint(path: Path) -> dict:
    """A checkpoint read back: a regular file (a pipe is never opened), loaded without running
    code, with every key of a training checkpoint, each of its kind."""
    try:
        check_regular(path, error=CheckpointError, fix="delete it to start over")
    except FileNotFoundError:
        pass  # told below, as torch.load reports it
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}); "
                              f"delete it to start over") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (it lacks "
                              f"{', '.join(missing)}); delete it to start over")
    for key, kind in KINDS.items():
        value = state[key]
        fits = (isinstance(value, (int, float)) and not isinstance(value, bool) and
                value >= 0 if kind is not dict else isinstance(value, dict))
        if kind is int:
            fits = fits and float(value).is_integer()
        if not fits:
            raise CheckpointError(f"{path} is not a training checkpoint (its {key} holds "
                                  f"{short(repr(value), 60)}, not "
                                  f"{'a mapping' if kind is dict else 'a number of 0 or more'})"
                                  f"; delete it to start over")
    odd = next((k for k, v in state["metrics"].items() if not isinstance(k, str) or not (
        v is None or isinstance(v, (int, float)) and not isinstance(v, bool))), None)
    if odd is not None:  # reported again as the run's final metrics when nothing is left to train
        raise CheckpointError(f"{path} is not a training checkpoint (its metrics hold "
                              f"{short(repr(odd), 40)}: {short(repr(state['metrics'][odd]), 40)}, "
                              f"not a number); delete it to start over")
    return state
