"""Searchers of a study, as Ray Tune `Searcher`s: each trial they suggest is one architecture
(by name, `arch`), its recipe values and one replicate seed.

- `ReplicateSearch`: an Optuna sampler (TPE, random, grid through Ray Tune's `OptunaSearch`)
  chooses configurations; each gets the study's seeds in turn. A configuration whose seeds are
  all taken (finished, running or queued) is not trained again: Optuna is told what it gave (or
  that it is still running) and asked again.
- `N0Search` (n0_search.py): trains matched pairs where they most narrow the interval of n0,
  and stops when the interval is narrow enough.

Both keep their whole state in `save`/`restore`, which Tune calls with its experiment state, so a
resumed study (`Tuner.restore`) never repeats a trial. Optuna loads only for an Optuna sampler
(an n0 study's dry run goes without it).
"""
from __future__ import annotations

import json

from ray.tune.search import Searcher

from orchestrator.results import DIVERGED
from orchestrator.study.config import StudyConfig
from orchestrator.study.n0_search import N0Search, n0_policy
from orchestrator.study.samplers import OPTUNA_SAMPLERS
from orchestrator.study.search_state import JsonStateSearcher
from orchestrator.study.settings import FloatRange, IntRange


# ----------------------------------------------------------------------------- replicates

def config_key(config: dict) -> str:
    """A trial's configuration without its seed, as a stable string."""
    return json.dumps({k: v for k, v in sorted(config.items()) if k != "seed"}, default=str)


class ReplicateSearch(JsonStateSearcher):
    """An Optuna sampler over the study's feasible configurations; seeds are replicates."""

    attempts = 200  # proposals of already-taken configurations before the space counts as done

    def __init__(self, optuna_search, seeds: list[int], metric, mode):
        super().__init__(metric=metric, mode=mode)
        self.optuna, self.seeds = optuna_search, list(seeds)
        self.taken: dict[str, tuple[str, int]] = {}       # trial id -> (configuration, seed)
        self.optuna_id: dict[str, str] = {}               # trial id -> Optuna's trial id
        self.results: dict[str, list[dict]] = {}          # configuration -> finished results
        self.asked = 0
        # Optuna's trials of this process: one running when the study was saved is unknown to
        # the Optuna rebuilt on restore, which learns its result as an evaluated point instead.
        self.live: set[str] = set()

    def suggest(self, trial_id: str):
        if self.optuna is None:  # nothing to choose: the one configuration, seed after seed
            return self.claim(trial_id, trial_id, {}, None)
        for _ in range(self.attempts):
            self.asked += 1
            ask_id = f"ask{self.asked}"
            config = self.optuna.suggest(ask_id)
            if config in (None, Searcher.FINISHED):
                return config
            self.live.add(ask_id)
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

    def state(self) -> dict:
        """Data only: what was taken and what it gave (Optuna's own state is rebuilt from it)."""
        return {"taken": self.taken, "optuna_id": self.optuna_id, "results": self.results,
                "asked": self.asked}

    def load_state(self, data: dict) -> None:
        self.taken = {t: (key, seed) for t, (key, seed) in data["taken"].items()}
        self.optuna_id, self.results, self.asked = (data["optuna_id"], data["results"],
                                                    data["asked"])
        if self.optuna is None:
            return
        # Optuna learns every finished result again, as evaluated points.
        for key, results in self.results.items():
            for result in results:
                self.teach(key, result)

    def teach(self, key: str, result: dict) -> None:
        """Optuna learns a configuration's result as an evaluated point (single objective)."""
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result[m] for m in metrics if m in result]
        if len(values) == len(metrics) == 1:
            self.optuna.add_evaluated_point(json.loads(key), values[0])

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.optuna is not None and self.optuna_id.get(trial_id) in self.live:
            self.optuna.on_trial_result(self.optuna_id[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.taken:
            return
        key = self.taken[trial_id][0]
        finished = result if result and not error and DIVERGED not in result else None
        if finished is not None:
            self.results.setdefault(key, []).append(finished)
        if self.optuna is None:
            return
        if self.optuna_id[trial_id] in self.live:
            self.optuna.on_trial_complete(self.optuna_id[trial_id], result=result, error=error)
        elif finished is not None:  # running when the study was saved: resumed after a restore
            self.teach(key, finished)


def build_replicate_search(study: StudyConfig) -> ReplicateSearch:
    """An Optuna sampler (seeded) as the Ray Tune searcher, over `study.searched()`; the grid
    sampler's grid holds the seeds too (every configuration with every seed)."""
    import optuna.distributions as d

    s = study.searcher
    metrics = [o.metric for o in s.objectives]
    modes = [o.mode for o in s.objectives]
    metric, mode = (metrics[0], modes[0]) if len(metrics) == 1 else (metrics, modes)
    searched = study.searched()
    if not searched:
        return ReplicateSearch(None, study.seeds, metric, mode)
    space: dict[str, d.BaseDistribution] = {}
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
    import optuna.distributions as d
    from ray.tune.search.optuna import OptunaSearch

    grid = {}
    if sampler == "grid":  # the grid holds the seeds too: every configuration with every seed
        space = {**space, "seed": d.CategoricalDistribution(seeds)}
        grid = {k: list(v.choices) if isinstance(v, d.CategoricalDistribution)
                else list(range(v.low, v.high + 1, v.step)) for k, v in space.items()}
    chosen = OPTUNA_SAMPLERS[sampler](sampler_seed, grid)
    return ReplicateSearch(OptunaSearch(space=space, metric=metric, mode=mode, sampler=chosen),
                           seeds, metric, mode)


def json_safe(value):
    return tuple(value) if isinstance(value, list) else value


def build_searcher(study: StudyConfig) -> JsonStateSearcher:
    if study.searcher.sampler == "n0":
        return N0Search(n0_policy(study))
    return build_replicate_search(study)
