"""The n0 searcher: which matched pair (and seed) to train next so that the interval of n0 narrows
fastest, and when to stop. `N0Policy` is pure (no Ray; bench/n0_search.py replays it on
published numbers); `N0Search` is the same policy as a Ray Tune searcher."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from ray.tune.search import Searcher

from orchestrator.analysis.n0 import N0, crossing_draws, estimate_n0, interval, pair_differences
from orchestrator.results import DIVERGED, DONE
from orchestrator.study.config import StudyConfig
from orchestrator.study.pairs import Pair
from orchestrator.study.searchers import WAIT, Stateful


@dataclass
class N0Policy:
    """Which (architecture, seed) to train next to locate n0; pure (no Ray), used by N0Search and
    by bench/n0_search.py.

    - First a coarse bracket: the shallowest, the deepest and a middle pair, `min_seeds` seeds
      for both nets of each.
    - Then, while the estimated crossing lies between two trained pairs with untrained pairs
      between them, the untrained pair nearest the crossing (bisection).
    - Also any untrained pair in a gap between trained pairs that the 95% interval of n0 reaches
      into (a straight line across such a gap can miss the crossing).
    - Then one more seed for both nets of the least sure pair (its difference interval
      straddles zero) among the pairs that bound those gaps.
    - It stops when the 95% interval of n0 is narrower than `target_width`, when `max_trials`
      trials are taken, or when no seed is left for a pair that could still narrow it.
    A decision waits for the results of every trial taken so far."""

    configs: dict[str, tuple]          # name -> (depth, k, width, params), analysis's key
    pairs: list[Pair]                  # by depth
    seeds: list[int]
    target_width: float
    max_trials: int
    min_seeds: int = 2
    draws: int = 1000
    taken: dict[tuple[str, int], float | None] = field(default_factory=dict)  # error, % or nan
    queue: list[tuple[str, int]] = field(default_factory=list)
    opened: set[int] = field(default_factory=set)      # pairs with trials
    stopped: str | None = None                         # why the search ended

    def __post_init__(self):
        self.pairs = sorted(self.pairs, key=lambda p: p.depth)
        self.min_seeds = min(self.min_seeds, len(self.seeds))

    # -- what the searcher calls
    def suggest(self) -> tuple[str, int] | None:
        """The next (architecture, seed), or None: wait for results (or stopped)."""
        if self.stopped:
            return None
        if not self.queue and not self.pending():
            self.decide()
        if self.queue and len(self.taken) >= self.max_trials:
            self.stopped = f"trial budget spent ({self.max_trials} trials)"
        if self.stopped or not self.queue:
            return None
        item = self.queue.pop(0)
        self.taken[item] = None
        return item

    def observe(self, name: str, seed: int, error: float) -> None:
        """A trial's final test error in percent (nan: it failed or diverged)."""
        self.taken[(name, seed)] = error

    def pending(self) -> bool:
        return any(v is None for v in self.taken.values())

    # -- the decision
    def runs(self) -> pd.DataFrame:
        rows = [(*self.configs[name], seed, error) for (name, seed), error in self.taken.items()
                if error is not None and math.isfinite(error)]
        return pd.DataFrame(rows, columns=["depth", "k", "width", "params", "seed",
                                           "test_error"])

    def trained_pairs(self, runs: pd.DataFrame) -> list[int]:
        have = set(map(tuple, runs[["depth", "k", "width", "params"]].to_numpy().tolist()))
        return [i for i in sorted(self.opened)
                if self.configs[self.pairs[i].deep] in have
                and self.configs[self.pairs[i].multi] in have]

    def keys(self, pairs: list[int]) -> list[tuple[tuple, tuple]]:
        """The analysis keys (deep, multi) of these pairs."""
        return [(self.configs[self.pairs[i].deep], self.configs[self.pairs[i].multi])
                for i in pairs]

    def estimate(self) -> tuple[N0, pd.DataFrame, list[int]]:
        runs = self.runs()
        trained = self.trained_pairs(runs)
        keys = self.keys(trained)
        return estimate_n0(runs, keys, self.draws), runs, trained

    def decide(self) -> None:
        if not self.opened:
            last = len(self.pairs) - 1
            for i in sorted({0, last // 2, last}):
                self.open(i)
            return
        n0, runs, trained = self.estimate()
        keys = self.keys(trained)
        samples = crossing_draws(runs, keys, self.draws)
        if samples is not None:
            low, high = interval(samples)
            centre = float(np.median(samples[np.isfinite(samples)])) if np.isfinite(
                samples).any() else n0.value
        else:  # no interval yet: the bracket, or everything when nothing crosses
            low, high = n0.bracket if n0.value is not None else (-np.inf, np.inf)
            centre = n0.value
        centre = centre if centre is not None else np.mean([p.depth for p in self.pairs])
        # Untrained pairs in a gap between trained pairs where n0 may lie: a straight line
        # across such a gap can put the crossing far from where it is.
        depths = sorted(self.pairs[i].depth for i in trained)
        unexplored = []
        for i in set(range(len(self.pairs))) - self.opened:
            d = self.pairs[i].depth
            below = max((t for t in depths if t < d), default=-np.inf)
            above = min((t for t in depths if t > d), default=np.inf)
            if below < high and above > low:
                unexplored.append(i)
        if unexplored:
            self.open(min(unexplored, key=lambda i: abs(self.pairs[i].depth - centre)))
            return
        if n0.value is not None and n0.width < self.target_width:
            self.stopped = (f"converged: the 95% interval of n0 ({n0.width:.1f} layers) is "
                            f"narrower than n0.target_width {self.target_width:g}")
            return
        for i in self.worth_more_seeds(runs, trained, (low, high)):
            if self.add_seed(i):
                return
        self.stopped = ("no trial left that narrows it: every seed of the pairs that decide n0 "
                        "is used" if n0.value is not None else f"n0 not found ({n0.message})")

    def worth_more_seeds(self, runs: pd.DataFrame, trained: list[int],
                         span: tuple[float, float]) -> list[int]:
        """Pairs whose difference could still have the other sign (its interval straddles
        zero), among those that bound the gaps the 95% interval of n0 reaches into (a flipped
        sign there moves the crossing into another gap): the least sure first. While there is
        no interval yet, every trained pair in the span."""
        if not trained:
            return []
        keys = self.keys(trained)
        diffs = pair_differences(runs, keys, self.draws)
        depths = sorted(self.pairs[i].depth for i in trained)
        low = max((d for d in depths if d <= span[0]), default=depths[0])
        high = min((d for d in depths if d >= span[1]), default=depths[-1])
        unsure = {}
        for i, row in zip(trained, diffs.itertuples()):
            if low <= self.pairs[i].depth <= high and not row.diff_low > 0 \
                    and not row.diff_high < 0:  # nan: no interval yet
                spread = row.diff_high - row.diff_low
                unsure[i] = abs(row.diff) / spread if spread > 0 else 0.0
        return sorted(unsure, key=unsure.get)

    def seeds_of(self, name: str) -> list[int]:
        return [s for (n, s) in self.taken if n == name] + [s for (n, s) in self.queue
                                                            if n == name]

    def open(self, i: int) -> None:
        self.opened.add(i)
        self.add_seed(i, self.min_seeds)

    def add_seed(self, i: int, target: int | None = None) -> bool:
        """Queue seeds so that both nets of pair i have `target` (default: one more than the
        fewer of the two); a net shared with another pair may have them already."""
        pair = self.pairs[i]
        if target is None:
            target = min(len(self.seeds_of(pair.deep)), len(self.seeds_of(pair.multi))) + 1
        added = False
        for name in (pair.deep, pair.multi):
            have = self.seeds_of(name)
            for seed in self.seeds:
                if len(have) >= target:
                    break
                if seed not in have:
                    self.queue.append((name, seed))
                    have.append(seed)
                    added = True
        return added


def n0_policy(study: StudyConfig) -> N0Policy:
    configs = {c.name: (c.architecture.total_depth, c.architecture.k, c.architecture.width,
                        c.params) for c in study.feasible()}
    return N0Policy(configs, study.pairs_to_train(), study.seeds, study.n0.target_width,
                    study.trials, study.n0.min_seeds)


def search_verdict(study: StudyConfig, rows: list[dict]) -> str | None:
    """Why an n0 search ended, replayed from its finished trials (the sweep's summary rows);
    None when it would have wanted more trials (it was interrupted)."""
    policy = n0_policy(study)
    for row in rows:
        error = row["final_test_error"]
        ok = row["status"] == DONE and error is not None
        policy.observe(row["architecture"], row["seed"], 100 * error if ok else float("nan"))
    policy.opened = {i for i, pair in enumerate(policy.pairs)
                     if any(name in (pair.deep, pair.multi) for name, _ in policy.taken)}
    policy.decide()
    if policy.queue and len(policy.taken) >= policy.max_trials:
        return f"trial budget spent ({policy.max_trials} trials)"
    return policy.stopped


class N0Search(Stateful):
    """The n0 policy as a Ray Tune searcher: suggests {arch, seed}, reads each trial's final
    test error, and ends the study (`Searcher.FINISHED`) when the policy stops."""

    def __init__(self, policy: N0Policy, fixed: dict | None = None):
        super().__init__(metric="test_error", mode="min")
        self.policy, self.fixed = policy, dict(fixed or {})
        self.trials: dict[str, tuple[str, int]] = {}  # trial id -> (architecture, seed)

    def suggest(self, trial_id: str):
        item = self.policy.suggest()
        if item is None:
            return Searcher.FINISHED if self.policy.stopped else WAIT
        self.trials[trial_id] = item
        return {**self.fixed, "arch": item[0], "seed": item[1]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.trials:
            return
        ok = result and not error and DIVERGED not in result and "test_error" in result
        self.policy.observe(*self.trials[trial_id],
                            100 * result["test_error"] if ok else float("nan"))
