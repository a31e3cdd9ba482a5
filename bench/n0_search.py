"""How many trained epochs each searcher needs to locate n0, on simulated studies (no Ray runs).

    python bench/n0_search.py                 # 200 studies per searcher
    python bench/n0_search.py --studies 50 --json out.json

A synthetic oracle stands in for training: a ladder of matched pairs (a k=1 net against a k=4
net of the same parameters) at multi-residual depths 8..56; the k=4 net's test error minus the
k=1 net's is a(n0/depth - 1) points (positive below n0, as the paper's Table II: +1.5 at depth 8,
~0 at 20, -0.1 at 30 for a ~ 0.85), plus seed noise of sd 0.1-0.3 points (Table II's spread).
Each simulated study draws its own n0 (12-50), a and sd. Every trial trains the full schedule
(no early stopping), so trained epochs = trials x epochs.

The searchers are the sweep's own (`orchestrator.study.searchers`,
`orchestrator.study.n0_search`), driven through Ray Tune's Searcher interface: the grid (every configuration with every seed), random and TPE (Optuna, given 40% of
the grid's trials) and the n0 searcher (target width 10 layers, a trial budget of 42, under half
the grid; it decides in batches, as with unlimited concurrency).
Every study's n0 and its 95% interval come from `orchestrator.analysis.n0.estimate_n0` on what was
trained. Reported: trained epochs as a fraction of the grid's, how often the interval contains
the true n0 (a study that finds no crossing counts as a miss), and the median interval width.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import optuna
import pandas as pd
from ray.tune.search import Searcher

from orchestrator.analysis.n0 import estimate_n0, find_pairs
from orchestrator.study.n0_search import N0Policy, N0Search
from orchestrator.study.pairs import Pair
from orchestrator.study.searchers import replicate_search

DEPTHS = [8, 14, 20, 26, 32, 38, 44, 50, 56]
SEEDS = [0, 1, 2, 3, 4]  # Table II: five runs per net
EPOCHS = 200


class Oracle:
    """Final test error (%) of (architecture, seed) for one simulated study."""

    def __init__(self, rng: np.random.Generator):
        self.n0 = rng.uniform(12, 50)
        self.scale = rng.uniform(0.6, 1.2)
        self.sd = rng.uniform(0.1, 0.3)
        self.noise = {(name, s): rng.normal(0, self.sd) for name in CONFIGS for s in SEEDS}

    def error(self, name: str, seed: int) -> float:
        depth, k = CONFIGS[name][:2]
        multi_depth = depth if k > 1 else DEPTH_OF_DEEP[depth]
        base = 5.5 + 8.0 / multi_depth  # bigger pairs are better
        gap = self.scale * (self.n0 / multi_depth - 1) if k > 1 else 0.0
        return base + gap + self.noise[(name, seed)]


# The ladder: pair i = (k=1 net of 4x the depth, k=4 net), parameters matched within 1%.
CONFIGS: dict[str, tuple] = {}
DEPTH_OF_DEEP: dict[int, int] = {}
for d in DEPTHS:
    deep_depth = 4 * (d - 2) + 2
    DEPTH_OF_DEEP[deep_depth] = d
    CONFIGS[f"d{deep_depth}-k1"] = (deep_depth, 1, 1, 10_000 * d)
    CONFIGS[f"d{d}-k4"] = (d, 4, 1, 10_000 * d + 50 * d)
PAIRS = [Pair(f"d{4 * (d - 2) + 2}-k1", f"d{d}-k4", d) for d in DEPTHS]
GRID_TRIALS = len(CONFIGS) * len(SEEDS)


def n0_of(results: dict[tuple[str, int], float]):
    rows = [(*CONFIGS[name], seed, err) for (name, seed), err in results.items()]
    runs = pd.DataFrame(rows, columns=["depth", "k", "width", "params", "seed", "test_error"])
    return estimate_n0(runs, find_pairs(runs), 1000) if len(runs) else None


def drive(searcher: Searcher, oracle: Oracle, max_trials: int, parallel: bool):
    """Suggest, train (ask the oracle), report; in parallel batches (all that the searcher gives
    before it waits) or one at a time."""
    results, count = {}, 0
    while count < max_trials:
        batch = []
        while count < max_trials and (parallel or not batch):
            config = searcher.suggest(f"t{count}")
            if config in (None, Searcher.FINISHED):
                break
            batch.append((f"t{count}", config))
            count += 1
        if not batch:
            break
        for trial_id, config in batch:
            error = oracle.error(config["arch"], config["seed"])
            results[(config["arch"], config["seed"])] = error
            searcher.on_trial_complete(trial_id, {"test_error": error / 100, "epoch": EPOCHS})
    return results


def grid(oracle: Oracle, _seed: int):
    return {(name, s): oracle.error(name, s) for name in CONFIGS for s in SEEDS}


def optuna_searcher(sampler: str):
    def run(oracle: Oracle, seed: int):
        space = {"arch": optuna.distributions.CategoricalDistribution(list(CONFIGS))}
        search = replicate_search(space, SEEDS, sampler, seed, "test_error", "min")
        return drive(search, oracle, int(0.4 * GRID_TRIALS), parallel=False)
    return run


def n0_searcher(target_width: float, min_seeds: int, trials: int):
    def run(oracle: Oracle, _seed: int):
        policy = N0Policy(CONFIGS, PAIRS, SEEDS, target_width, trials, min_seeds)
        return drive(N0Search(policy), oracle, trials, parallel=True)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", type=int, default=200)
    p.add_argument("--target-width", type=float, default=10.0, help="n0.target_width")
    p.add_argument("--min-seeds", type=int, default=2, help="n0.min_seeds")
    p.add_argument("--trials", type=int, default=42, help="the n0 study's trial budget")
    p.add_argument("--json", help="write the per-searcher summary here")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    methods = {"grid": grid, "random": optuna_searcher("random"), "tpe": optuna_searcher("tpe"),
               f"n0 (width {args.target_width:g}, {args.trials} trials)": n0_searcher(
                   args.target_width, args.min_seeds, args.trials)}
    rows = []
    for name, method in methods.items():
        start = time.time()
        trials, hits, widths, found = [], 0, [], 0
        for study in range(args.studies):
            oracle = Oracle(np.random.default_rng(study))
            results = method(oracle, study)
            n0 = n0_of(results)
            trials.append(len(results))
            if n0 is not None and n0.value is not None:
                found += 1
                widths.append(n0.width)
                hits += n0.low is not None and n0.low <= oracle.n0 <= n0.high
            else:
                widths.append(math.inf)
        rows.append({"searcher": name, "epochs vs grid": np.mean(trials) / GRID_TRIALS,
                     "trials (mean)": np.mean(trials), "n0 found": found / args.studies,
                     "true n0 in 95% interval": hits / args.studies,
                     "interval width (median)": float(np.median(widths)),
                     "seconds": time.time() - start})
    table = pd.DataFrame(rows)
    print(f"{args.studies} simulated studies per searcher; grid = {len(CONFIGS)} nets x "
          f"{len(SEEDS)} seeds = {GRID_TRIALS} trials of {EPOCHS} epochs")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.json:
        table.to_json(args.json, orient="records", indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
