"""Searchers of a study, as Ray Tune `Searcher`s: each trial they suggest is one architecture
(by name, `arch`), its recipe values and one replicate seed.

- `ReplicateSearch`: an Optuna sampler (TPE, random, grid through Ray Tune's `OptunaSearch`)
  chooses configurations; each gets the study's seeds in turn. A configuration whose seeds are
  all taken (finished, running or queued) is not trained again: Optuna is told what it gave (or
  that it is still running) and asked again.
- `N0Search`: trains matched pairs where they most narrow the interval of n0 (`N0Policy`), and
  stops when the interval is narrow enough.

Both keep their whole state in `save`/`restore`, which Tune calls with its experiment state, so a
resumed study (`Tuner.restore`) never repeats a trial.
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from ray.tune.search import Searcher

from orchestrator.analysis import (N0, crossing_draws, estimate_n0, interval,
                                   pair_differences)
from orchestrator.config import Pair, StudyConfig

WAIT = None  # Tune asks again later


class Stateful(Searcher):
    """Save and restore everything the searcher holds (Tune calls these with its own state)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # set at construction from the study


# ----------------------------------------------------------------------------- replicates

def config_key(config: dict) -> str:
    """A trial's configuration without its seed, as a stable string."""
    return json.dumps({k: v for k, v in sorted(config.items()) if k != "seed"}, default=str)


class ReplicateSearch(Stateful):
    """An Optuna sampler over the study's feasible configurations; seeds are replicates."""

    attempts = 200  # proposals of already-taken configurations before the space counts as done

    def __init__(self, optuna_search, seeds: list[int], metric, mode):
        super().__init__(metric=metric, mode=mode)
        self.optuna, self.seeds = optuna_search, list(seeds)
        self.taken: dict[str, tuple[str, int]] = {}       # trial id -> (configuration, seed)
        self.optuna_id: dict[str, str] = {}               # trial id -> Optuna's trial id
        self.results: dict[str, list[dict]] = {}          # configuration -> finished results
        self.asked = 0

    def suggest(self, trial_id: str):
        if self.optuna is None:  # nothing to choose: the one configuration, seed after seed
            return self.claim(trial_id, trial_id, {}, None)
        for _ in range(self.attempts):
            self.asked += 1
            ask_id = f"ask{self.asked}"
            config = self.optuna.suggest(ask_id)
            if config in (None, Searcher.FINISHED):
                return config
            suggestion = self.claim(trial_id, ask_id, config, config.get("seed"))
            if suggestion is not Searcher.FINISHED:
                return suggestion
            # Taken: Optuna learns what this configuration gave, or that it is still running.
            done = self.results.get(config_key(config))
            self.optuna.on_trial_complete(ask_id, result=done[-1] if done else None,
                                          error=not done)
        return Searcher.FINISHED

    def claim(self, trial_id: str, ask_id: str, config: dict, seed: int | None):
        key = config_key(config)
        used = {s for k, s in self.taken.values() if k == key}
        if seed is None:  # replicates: the next seed this configuration has not had
            seed = next((s for s in self.seeds if s not in used), None)
        if seed is None or seed in used:
            return Searcher.FINISHED
        self.taken[trial_id] = (key, seed)
        self.optuna_id[trial_id] = ask_id
        return {**config, "seed": seed}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.optuna is not None and trial_id in self.optuna_id:
            self.optuna.on_trial_result(self.optuna_id[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.taken:
            return
        if result and not error and "diverged" not in result:
            self.results.setdefault(self.taken[trial_id][0], []).append(result)
        if self.optuna is not None:
            self.optuna.on_trial_complete(self.optuna_id[trial_id], result=result, error=error)


def build_replicate_search(study: StudyConfig) -> ReplicateSearch:
    """An Optuna sampler (seeded) as the Ray Tune searcher, over `study.searched()`; the grid
    sampler's grid holds the seeds too (every configuration with every seed)."""
    import optuna.distributions as d

    from orchestrator.config import FloatRange, IntRange

    s = study.searcher
    metrics = [o.metric for o in s.objectives]
    modes = [o.mode for o in s.objectives]
    metric, mode = (metrics[0], modes[0]) if len(metrics) == 1 else (metrics, modes)
    searched = study.searched()
    if not searched:
        return ReplicateSearch(None, study.seeds, metric, mode)
    space = {}
    for key, dist in searched.items():
        if isinstance(dist, IntRange):
            space[key] = d.IntDistribution(dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, FloatRange):
            space[key] = d.FloatDistribution(dist.low, dist.high, log=dist.log)
        else:
            space[key] = d.CategoricalDistribution([json_safe(c) for c in dist.choices])
    return replicate_search(space, study.seeds, s.sampler, s.seed, metric, mode)


def replicate_search(space: dict, seeds: list[int], sampler: str, sampler_seed: int, metric,
                     mode) -> ReplicateSearch:
    """`space`: Optuna distributions by key. The grid sampler's grid holds the seeds too."""
    import optuna
    import optuna.distributions as d
    from ray.tune.search.optuna import OptunaSearch

    if sampler == "tpe":
        chosen = optuna.samplers.TPESampler(seed=sampler_seed)
    elif sampler == "random":
        chosen = optuna.samplers.RandomSampler(seed=sampler_seed)
    else:
        space = {**space, "seed": d.CategoricalDistribution(seeds)}
        grid = {k: list(v.choices) if isinstance(v, d.CategoricalDistribution)
                else list(range(v.low, v.high + 1, v.step)) for k, v in space.items()}
        chosen = optuna.samplers.GridSampler(grid, seed=sampler_seed)
    return ReplicateSearch(OptunaSearch(space=space, metric=metric, mode=mode, sampler=chosen),
                           seeds, metric, mode)


def json_safe(value):
    return tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- n0

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
        ok = row["status"] == "done" and error is not None
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
        ok = result and not error and "diverged" not in result and "test_error" in result
        self.policy.observe(*self.trials[trial_id],
                            100 * result["test_error"] if ok else float("nan"))


def build_searcher(study: StudyConfig) -> Searcher:
    if study.searcher.sampler == "n0":
        return N0Search(n0_policy(study))
    return build_replicate_search(study)
