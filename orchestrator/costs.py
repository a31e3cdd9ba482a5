"""What training costs, in one home: a trial's FLOPs, epochs as GPU time at the measured speed,
and the most an n0 study trains under its caps. The dry run, the placement advice
(`orchestrator.study.placement`) and the n0 searcher (`orchestrator.analysis.n0_policy`) all ask here,
so their numbers agree (tests/test_n0_search.py checks the searcher against `most_epochs`).

Caps in epochs round down: the searcher never starts a trial that would pass `budget.epochs`, so
a budget of 1,100 epochs holds five 200-epoch trials, not six. Plain arithmetic: no torch."""
from __future__ import annotations

import math

from orchestrator.results import training_flops

# The one measured speed GPU time is priced with: bench/RESULTS.md, "GPU: the first
# measurement", pre-resnet-68 in `orchestrator.train` epochs on one H200 (the slower of the two
# ~1M-parameter CIFAR nets measured there).
GPU_IMAGES_PER_S = 15_686
SLACK = 1e-9  # a budget given as a float holds what it holds up to rounding


def trial_flops(forward_flops: float, epochs: int, images: int, batch_size: int,
                steps: int | None = None) -> float:
    """Training FLOPs of one trial: every full batch of every epoch (or `steps`, if fewer)."""
    total = epochs * (images // batch_size)
    return training_flops(forward_flops, min(total, steps) if steps else total, batch_size)


def gpu_hours(epochs: float, images: int) -> float:
    """Epochs (summed over trials) of `images` each, as GPU hours at GPU_IMAGES_PER_S."""
    return epochs * images / GPU_IMAGES_PER_S / 3600


def most_full_trials(epochs: int, max_trials: int, budget_epochs: float | None) -> int:
    """The full-schedule trials of `epochs` a study may train: `trials`, or what the epoch
    budget holds whole, whichever is fewer."""
    if budget_epochs is None:
        return max_trials
    return min(max_trials, math.floor(budget_epochs / epochs + SLACK))


def most_epochs(epochs: int, max_trials: int, budget_epochs: float | None, nets: int, pairs: int,
                seeds: int, short_epochs: int | None = None, short_cap: float = 0.0) -> float:
    """The most epochs (summed over trials) an n0 study of `nets` nets in `pairs` pairs and
    `seeds` seeds trains: full schedules within `trials`, the grid and the budget, in whole
    trials; with short schedules (`short_epochs` each) also up to two seeds a net of those, a
    pair started while both nets fit in `short_cap` (a net shared by pairs may pass it: its
    partners follow), all within the budget."""
    grid = min(max_trials, nets * seeds)
    if short_epochs is None:
        return float(min(grid, most_full_trials(epochs, max_trials, budget_epochs)) * epochs)
    started = math.floor(short_cap / short_epochs + SLACK) + 2 * pairs - nets
    short = short_epochs * min(nets * min(2, seeds), started)
    total = float(short + grid * epochs)
    return total if budget_epochs is None else min(float(budget_epochs), total)
