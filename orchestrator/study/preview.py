"""What a study will do before it runs (`--dry-run`): its architectures in and outside the
budget, the searcher's first trials with their size and cost, what an n0 study likely costs and
buys, and on a results folder that holds it, what running it again continues or adds."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from models.complexity import summarize
from orchestrator.costs import GPU_IMAGES_PER_S, trial_flops
from orchestrator.costs import gpu_hours as hours_of
from orchestrator.run.images import train_images
from orchestrator.study.config import StudyConfig
from orchestrator.study.extension import (ContinuedSearch, check_extension, earlier_study,
                                          last_state, trained_so_far)
from orchestrator.study.folder import config_hash, read_state, resolve_paths
from orchestrator.study.n0_search import n0_plan, simulated_studies
from orchestrator.study.searchers import build_searcher
from orchestrator.study.trials import planned_trials


def study_images(study: StudyConfig) -> int:
    """The training images a trial's epoch goes over."""
    train = study.train
    return train.train_size or train_images(train.dataset, train.data_dir)


def estimated_cost(study: StudyConfig, flops: float) -> float:
    """Training FLOPs of one trial (`orchestrator.costs.trial_flops`)."""
    train = study.train
    return trial_flops(flops, train.epochs, study_images(study), train.batch_size, train.steps)


def first_trials(study: StudyConfig, count: int, seed: dict | None = None) -> list[dict]:
    """What the searcher would start first, before any result comes back (after the finished
    trials of `seed`, a saved searcher state, for an extension)."""
    searcher = build_searcher(study)
    searcher = searcher if seed is None else ContinuedSearch(searcher, seed)
    out = []
    for i in range(count):
        suggestion = searcher.suggest(f"dry{i}")
        if not isinstance(suggestion, dict):
            break
        out.append(suggestion)
    return out


def dry_run(study: StudyConfig, count: int) -> None:
    feasible, excluded = study.feasible(), study.excluded()
    print(f"study {study.name}: {len(feasible)} architectures in the budget, "
          f"{len(excluded)} outside it (never sampled)")
    if excluded:
        print_table([{"outside the budget": c.name, "why": c.excluded} for c in excluded])
    rows = []
    seed = extension_cost(study)
    trials = first_trials(study, count, seed)
    for sampled in trials:
        cfg = study.trial_config(sampled)
        info = summarize(cfg.architecture)
        rows.append({"architecture": cfg.architecture.name, "seed": cfg.seed,
                     **{k: v for k, v in sampled.items() if k not in ("arch", "seed")},
                     "params": f"{info['params']:,}",
                     "GFLOPs/img": f"{info['flops'] / 1e9:.3f}",
                     "train PFLOPs": f"{estimated_cost(study, info['flops']) / 1e15:.2f}"})
    if study.searcher.sampler == "n0":
        n0_cost(study)
    waits = len(trials) < count and study.searcher.sampler == "n0"
    print(f"\nat most {planned_trials(study)} trials, sampler {study.searcher.sampler} (seed "
          f"{study.searcher.seed}), seeds {study.seeds}; the first {len(rows)}"
          f"{' (then it waits for their results)' if waits else ''}:")
    print_table(rows)


def gpu_hours(study: StudyConfig, epochs: float) -> str:
    """Epochs summed over trials as GPU time at the measured speed ("" for a CPU study)."""
    if study.train.device == "cpu":
        return ""
    return f"{hours_of(epochs, study_images(study)):,.1f} GPU hours"


def worst_epochs(study: StudyConfig) -> tuple[float, int]:
    """(the most epochs an n0 study may train, the grid's epochs): what its searcher's plan
    holds (`orchestrator.costs.most_epochs`)."""
    pairs = study.pairs_to_train()
    nets = len({n for p in pairs for n in (p.deep, p.multi)})
    return n0_plan(study).most_epochs(pairs), nets * len(study.seeds) * study.train.epochs


def n0_cost(study: StudyConfig, studies: int = 10) -> None:
    """What an n0 study will likely cost and buy, on simulated results: epochs and GPU time
    (expected, worst case), the chance that its interval closes, and what extending it to the
    whole grid would add where it does not."""
    pairs = ", ".join(f"{p.deep} / {p.multi}" for p in study.pairs_to_train())
    print(f"matched pairs (k=1 / k>1): {pairs}")
    plan = n0_plan(study)
    worst, grid = worst_epochs(study)
    whole = study.model_copy(update={"budget": study.budget.model_copy(update={"epochs": None}),
                                     "trials": grid // study.train.epochs})
    runs = simulated_studies(study, studies, then=whole)
    spent = [r["spent"] for r in runs]
    mean, p90 = float(np.mean(spent)), float(np.quantile(spent, 0.9))
    width, closed = float(np.median([r["width"] for r in runs])), \
        float(np.mean([math.isfinite(r["width"]) for r in runs]))
    schedules = (f"short schedules of {plan.epochs_at(plan.screen)} epochs first, "
                 if plan.screen else "full schedules only, ")
    print(f"cost in epochs summed over trials ({schedules}the grid: {grid:,}): worst case "
          f"{worst:,.0f} ({worst / grid:.0%} of the grid; budget.epochs, trials); expected "
          f"{mean:,.0f}, 90th percentile {p90:,.0f}, for a 95% interval of n0 "
          f"{'open-ended' if width == math.inf else f'{width:.0f} layers wide'} in the "
          f"median study, with two ends in {closed:.0%} (simulated: n0 anywhere among the "
          f"pairs, seed noise 0.2 points)")
    if gpu_hours(study, 1):
        print(f"GPU time: expected {gpu_hours(study, mean)}, worst case "
              f"{gpu_hours(study, worst)} (epochs x the training images at "
              f"{GPU_IMAGES_PER_S:,} images/s, bench/RESULTS.md)")
    opened = [r for r in runs if "extra" in r]
    chance = (f"chance to close: {closed:.0%} ({len(runs) - len(opened)} of {len(runs)} "
              f"simulated studies)")
    if opened:
        extra = float(np.median([r["extra"] for r in opened]))
        after = float(np.mean([math.isfinite(r["width_after"]) for r in opened]))
        print(f"{chance}; where it does not, extending it (same command, larger budget) up to "
              f"the whole grid closes {after:.0%} of those, with a median of {extra:,.0f} more "
              f"epochs{f' ({gpu_hours(study, extra)})' * bool(gpu_hours(study, 1))}")
    else:
        print(chance)


def extension_cost(study: StudyConfig) -> dict | None:
    """On a results folder that holds the study: what running it would do. Another budget:
    what the extension adds and costs (or the one line that refuses it), and the searcher
    state it continues from."""
    results = study.results_place()
    state = read_state(results)
    if state is None:
        return None
    resolved = resolve_paths(study, fetch=False)
    data = last_state(results, state)
    trials, spent = trained_so_far(data, study.train.epochs)
    done = f"{trials} trials trained ({spent:,.0f} epochs)"
    if state["config_hash"] == config_hash(resolved):
        print(f"{results} holds this study ({done}); running it continues it, or shows its "
              f"result if it ended")
        return None
    change = check_extension(state.get("config"), resolved.model_dump(mode="json"),
                             study.name, results)
    print(f"extends study {study.name} in {results}: {'; '.join(change.grown)}; {done} are "
          f"kept, none trained again")
    if study.searcher.sampler != "n0":
        added = planned_trials(study) - trials
        print(f"it adds up to {added} trials ({added * study.train.epochs:,} epochs"
              f"{f', {gpu_hours(study, added * study.train.epochs)}' * bool(gpu_hours(study, 1))})")
        return data

    worst = max(0.0, worst_epochs(study)[0] - spent)
    before = earlier_study(resolved, state["config"])
    opened = [r for r in simulated_studies(before, then=study) if "extra" in r]
    line = f"it adds at most {worst:,.0f} epochs"
    if opened:
        extra = float(np.mean([r["extra"] for r in opened]))
        after = float(np.mean([math.isfinite(r["width_after"]) for r in opened]))
        line += (f"; expected {extra:,.0f}, closing the interval in {after:.0%} of the "
                 f"simulated studies that the earlier settings left open")
    print(line + (f" (GPU time: at most {gpu_hours(study, worst)})" if gpu_hours(study, 1)
                  else ""))
    return data


def print_table(rows: list[dict]) -> None:
    if rows:
        print(pd.DataFrame(rows).to_string(index=False))
