"""The result vocabulary: what a run reports, how a trial's outcome is read from it, and what
its training cost. Every reader (the sweep's summary, the MLflow tracker, the searchers, the
report) uses these, so the names live here once."""
from __future__ import annotations

from typing import Literal

# Reported at the end of every epoch (the loop), logged per epoch to MLflow (the tracker).
# test_error is top-1 (what studies and n0 use); data_time_s is the training loop's wait for
# input, step_time_s the rest of the epoch's training: data time near the total is input-bound.
EPOCH_METRICS = ("train_loss", "train_error", "test_error", "test_error_top5", "lr", "images_per_s",
                 "epoch_time_s", "data_time_s", "step_time_s", "skipped_images", "train_gflops")
# Worker system metrics (CPU, memory, GPU) are reported under MLflow's own prefix.
SYSTEM_PREFIX = "system/"
# What a study may optimise (searcher.objectives[].metric).
ObjectiveMetric = Literal["test_error", "best_test_error", "train_loss", "train_gflops",
                          "time_total_s"]
# The file a run's checkpoint is written to, in its checkpoint dir (or Ray Train checkpoint).
CHECKPOINT_FILE = "checkpoint.pt"
# A diverged run reports this key (the reason) instead of raising: a restart would diverge again.
DIVERGED = "diverged"

DONE, STOPPED, DIVERGED_OUTCOME, FAILED = "done", "stopped", "diverged", "failed"


def outcome(metrics: dict | None, errored: bool = False) -> str:
    """done: trained every epoch; stopped: ended early by the trial scheduler (ASHA);
    diverged: the loss became non-finite; failed: raised (or never reported)."""
    metrics = metrics or {}
    if metrics.get(DIVERGED):
        return DIVERGED_OUTCOME
    if errored or "epoch" not in metrics:
        return FAILED
    return STOPPED if metrics["epoch"] < metrics.get("epochs_total", 0) else DONE


def trained(outcome_: str) -> bool:
    """Whether a trial with this outcome has a test error to compare."""
    return outcome_ in (DONE, STOPPED)


def training_flops(forward_flops: float, steps: int, batch_size: int) -> float:
    """Training cost: forward + backward is about 3x the forward FLOPs, per image of each step."""
    return 3.0 * forward_flops * steps * batch_size
