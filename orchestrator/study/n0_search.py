"""The n0 policy (n0_policy.py) as a Ray Tune searcher, built from a study file; and why a
finished study's search ended, replayed from its trials."""
from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from models.architecture import Architecture, parameter_count
from models.complexity import summarize
from orchestrator.results import DIVERGED, DONE
from orchestrator.study.config import StudyConfig
from orchestrator.analysis.n0_policy import FULL, Growth, N0Plan, N0Policy, Net, Result, Trial
from orchestrator.analysis.pairs import Pair, matched_multi, next_deep
from orchestrator.study.search_state import WAIT, JsonStateSearcher


def n0_plan(study: StudyConfig) -> N0Plan:
    epochs = study.train.epochs
    # A short schedule as long as the full one is no short schedule.
    fidelities = tuple(sorted({f for f in study.n0.fidelities
                               if f == FULL or max(1, round(f * epochs)) < epochs}))
    return N0Plan(target_width=study.n0.target_width, seeds=tuple(study.seeds),
                  min_seeds=study.n0.min_seeds, fidelities=fidelities, epochs=epochs,
                  budget_epochs=study.budget.epochs, max_trials=study.trials,
                  level=study.n0.level, seed=study.searcher.seed)


def n0_policy(study: StudyConfig) -> N0Policy:
    nets = {}
    for c in study.feasible():
        a = c.architecture
        nets[c.name] = Net(c.name, a.total_depth, a.k, a.width, c.params,
                           float(summarize(a)["flops"]))
    pairs = study.pairs_to_train()
    used = {n for p in pairs for n in (p.deep, p.multi)}
    return N0Policy({n: v for n, v in nets.items() if n in used}, pairs, n0_plan(study),
                    grow=ladder_of(study))


def ladder_of(study: StudyConfig):
    """How the study makes a pair beyond an end: from its `pairs:` design (one step past the
    end's deep net, the multi net matched as the design does), within min/max_params; None
    for a study without one."""
    design = study.pairs
    if design is None:
        return None

    def grow(side: str, pairs: list, nets: dict) -> tuple | None:
        deeps = design.deep_nets() + [n.blocks for n in nets.values()
                                      if n.blocks is not None and n.k == 1]
        deep = next_deep(deeps, side)
        if deep is None:
            return None
        made = []
        factor = design.factors[0]
        for blocks, k in ((deep, 1), (matched_multi(deep, factor, width=design.width), factor)):
            arch = Architecture(blocks=tuple(blocks), k=k, width=design.width)
            params = parameter_count(arch)
            if study.budget.reason(params) or arch.name in nets:
                return None
            made.append(Net(arch.name, arch.total_depth, k, design.width, params,
                            float(summarize(arch)["flops"]), tuple(blocks)))
        return Pair(made[0].name, made[1].name, made[1].depth), made

    return grow


def continuation_plan(policy: N0Policy, earlier: dict) -> N0Plan:
    """`policy`'s plan as the continuation of the study part whose searcher state is `earlier`:
    the look at which that part stopped counts as one of the continuation's looks
    (`N0Policy.extension_plan`), so that the looks of all parts spend one alpha together."""
    saved: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in earlier["plan"].items()}
    plan = replace(policy.plan, **{k: v for k, v in saved.items() if hasattr(policy.plan, k)})
    old = N0Policy(dict(policy.nets), list(policy.pairs), plan, grow=policy.grow)
    old.replay(*saved_log(earlier))
    if old.stopped is None:
        old.suggest()  # a spent budget takes its end look here, as the sweep's verdict does
    return old.extension_plan(policy.plan)


def replayed(study: StudyConfig, rows: list[dict]) -> N0Policy:
    """The policy rebuilt from a study's trials (the sweep's summary rows)."""
    policy = n0_policy(study)
    policy.replay([Result(r["architecture"], r["seed"], r.get("fidelity", FULL), trial_error(r),
                          r.get("epochs") or policy.plan.epochs_at(r.get("fidelity", FULL)))
                   for r in rows])
    return policy


def search_verdict(policy: N0Policy) -> str | None:
    """Why an n0 search ended, from its policy replayed from the finished trials (`replayed`);
    None when it would have wanted more trials (it was interrupted)."""
    if policy.stopped is None:
        policy.suggest()
    verdict = policy.stopped
    return "; ".join([verdict, *search_notes(policy)]) if verdict else None


def search_notes(policy: N0Policy) -> list[str]:
    """What the report says beside n0: the pairs the ladder added and why (and whether they
    were trained), where the differences break a single crossing, whether a shape fits."""
    trained = {r.arch for r in policy.log}
    added = [a.why + ("" if {n.name for n in a.nets} & trained else
                      " (not trained before the search stopped)") for a in policy.added]
    return added + [n for n in (policy.monotone_report(), policy.shape_report()) if n]


def saved_log(data: dict) -> tuple[list[Result], list[Growth]]:
    """The log and the ladder's growth from a searcher's saved state (`N0Search.state`)."""
    return [Result.load(r) for r in data["log"]], [Growth.load(a) for a in data["added"]]


def trial_error(row: dict) -> float:
    ok = row["status"] == DONE and row["final_test_error"] is not None
    return 100 * row["final_test_error"] if ok else float("nan")


# The plan's settings that a searcher saved before they existed ran with.
SAVED_BEFORE = {"paired": False, "steer": "spread", "end_on_look": False}


class N0Search(JsonStateSearcher):
    """Suggests {arch, seed, fidelity}, reads each trial's final test error, ends the study
    (`Searcher.FINISHED`) when the policy stops. Its saved state: the plan and the policy's
    log (replayed on restore) plus the trials still running, as JSON."""

    def __init__(self, policy: N0Policy, fixed: dict | None = None):
        super().__init__(metric="test_error", mode="min")
        self.policy, self.fixed = policy, dict(fixed or {})
        self.trials: dict[str, Trial] = {}  # trial id -> running trial

    def suggest(self, trial_id: str):
        item = self.policy.suggest()
        if item is None:
            return Searcher.FINISHED if self.policy.stopped else WAIT
        self.trials[trial_id] = item
        fidelity = {} if item.fidelity == FULL else {"fidelity": item.fidelity}
        net = self.policy.nets[item.arch]
        added = {} if net.blocks is None else {"blocks": list(net.blocks), "k": net.k,
                                               "width": net.width}
        return {**self.fixed, "arch": item.arch, "seed": item.seed, **fidelity, **added}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.trials:
            return
        ok = result and not error and DIVERGED not in result and "test_error" in result
        name, seed, fidelity = self.trials.pop(trial_id)
        epochs = (result or {}).get("epoch") or self.policy.plan.epochs_at(fidelity)
        self.policy.observe(name, seed, fidelity,
                            100 * result["test_error"] if ok and result else float("nan"), epochs)

    def state(self) -> dict:
        return {"plan": asdict(self.policy.plan), "log": [r.saved() for r in self.policy.log],
                "added": [a.saved() for a in self.policy.added],
                "running": {k: list(t) for k, t in self.trials.items()}, "fixed": self.fixed}

    def load_state(self, data: dict) -> None:
        plan = {**SAVED_BEFORE, **{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in data["plan"].items()}}
        now = asdict(self.policy.plan)
        if plan != now:
            differ = ", ".join(f"{k} {plan.get(k, 'unset')} (now {now.get(k, 'unset')})"
                               for k in sorted(set(plan) | set(now)) if plan.get(k) != now.get(k))
            raise ValueError(f"the saved n0 searcher has other settings than this study's: "
                             f"{differ}; resume with the version that started it, or start the "
                             f"study afresh under another name")
        self.policy.replay(*saved_log(data))
        self.trials = {k: Trial(*v) for k, v in data["running"].items()}
        self.policy.running = list(self.trials.values())
        self.fixed = data["fixed"]


def simulated_studies(study: StudyConfig, studies: int = 10, noise: float = 0.2,
                      rho: float = 0.7, then: StudyConfig | None = None) -> list[dict]:
    """Per simulated study: the epochs the search trains (`spent`), the width of its final
    interval (inf: open-ended), whether it holds the true `n0` (`covers`) and the pairs the ladder
    added (`added`); with `then`, a study that ends open is extended to `then`'s
    settings (its policy replays the log) on the same truth: `extra` epochs, `width_after`.
    n0 uniform over the pairs' depths, the difference a (n0/depth - 1) with a = 0.85, seed
    noise `noise` points, short schedules correlated `rho` with the full ones
    (bench/n0_search.py's model); trials finish in the order they start, `concurrency` at a
    time."""

    out = []
    for i in range(studies):
        rng = np.random.default_rng(i)
        policy = n0_policy(study)
        policy.plan = replace(policy.plan, draws=300)
        depths = [p.depth for p in policy.pairs]
        n0 = rng.uniform(min(depths), max(depths))
        other = {d: rng.normal(0, 0.5) for d in depths}
        error = _simulated_error(n0, other, rng, noise, rho)
        _play(policy, study.concurrency, error)
        found = policy.estimate()  # the interval it reports: the deciding look's, or the end's
        row = {"n0": n0, "spent": sum(r.cost for r in policy.log), "width": found.width,
               "covers": found.low is not None and found.high is not None and
               found.low <= n0 <= found.high,
               "added": len(policy.added)}
        if then is not None and not math.isfinite(row["width"]):
            more = n0_policy(then)
            more.plan = policy.extension_plan(replace(more.plan, draws=300))
            more.replay(policy.log, policy.added)
            _play(more, then.concurrency, error)
            row.update(extra=sum(r.cost for r in more.log) - row["spent"],
                       width_after=_width(more))
        out.append(row)
    return out


def _simulated_error(n0: float, other: dict, rng, noise: float, rho: float):
    """A simulated study's results: (net, fidelity) -> its error difference from the deep net.
    A multi-residual net (k > 1) differs by the curve at its depth, pairs the ladder added
    included (their short schedules' own curve drawn when first asked)."""
    def error(net: Net, fidelity: float) -> float:
        gap = 0.0
        if net.k > 1:
            gap = 0.85 * (n0 / net.depth - 1)
            if fidelity != FULL:
                if net.depth not in other:
                    other[net.depth] = rng.normal(0, 0.5)
                gap = rho * gap + (1 - rho ** 2) ** 0.5 * other[net.depth]
        return gap + rng.normal(0, noise)
    return error


def _width(policy: N0Policy) -> float:
    return policy.estimate().width  # the interval it reports: the deciding look's, or the end's


def _play(policy: N0Policy, concurrency: int, error) -> None:
    """Run a policy to its stop on simulated results (`error(net, fidelity)`)."""
    running: list[Trial] = []
    while True:
        while len(running) < concurrency and (trial := policy.suggest()):
            running.append(trial)
        if not running:
            break
        name, seed, fidelity = running.pop(0)
        policy.observe(name, seed, fidelity, error(policy.nets[name], fidelity))
