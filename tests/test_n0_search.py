"""The n0 searcher's policy without Ray: its interval under its own stopping rule, decisions
that do not wait for a round, the short schedule (and turning it off), the ladder growing past an
end, JSON state replayed on restore, and a non-monotone study saying so."""
from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.analysis.n0 import single_crossings
from orchestrator.analysis.n0_policy import (FULL, SCREEN_SHARE, Growth, N0Plan, N0Policy,
                                             Net, Result, bisection_order)
from orchestrator.analysis.pairs import Pair

DEPTHS = [8, 14, 20, 26, 32, 38, 44]
SEEDS = (0, 1, 2, 3, 4)


def pair_of(d: int) -> tuple[Pair, list[Net]]:
    deep, multi = f"d{4 * d - 6}-k1", f"d{d}-k4"
    return Pair(deep, multi, d), [Net(deep, 4 * d - 6, 1, 1, 1000 * d, 1000.0 * d),
                                  Net(multi, d, 4, 1, 1000 * d, 1000.0 * d)]


def ladder(depths=DEPTHS):
    made = [pair_of(d) for d in depths]
    return {n.name: n for _, nets in made for n in nets}, [p for p, _ in made]


def grow(side, pairs, _nets=None):
    d = pairs[0].depth - 6 if side == "shallower" else pairs[-1].depth + 6
    return pair_of(d) if d >= 8 else None


class Oracle:
    """Full schedule: multi - deep = a (n0/depth - 1) plus seed noise; the short schedule: a
    curve of its own (rho with the full one) with more noise."""

    def __init__(self, seed: int, n0: float | None = None, rho: float = 0.7, curve=None):
        rng = self.rng = np.random.default_rng(seed)
        self.n0 = rng.uniform(14, 40) if n0 is None else n0
        self.a, self.sd = rng.uniform(0.6, 1.2), rng.uniform(0.1, 0.3)
        self.curve = curve or (lambda d: self.a * (self.n0 / d - 1))
        self.other = {d: rng.normal(0.3, 0.8) for d in range(2, 200)}
        self.rho = rho

    def error(self, net: Net, seed: int, fidelity: float) -> float:
        d = net.depth if net.k > 1 else (net.depth + 6) // 4
        gap = 0.0
        if net.k > 1:
            gap = self.curve(d) if fidelity == FULL else (
                self.rho * self.curve(d) + np.sqrt(1 - self.rho ** 2) * self.other[d])
        sd = self.sd if fidelity == FULL else 1.5 * self.sd
        return 6.0 + 8.0 / d + gap + self.rng.normal(0, sd)


def run(policy: N0Policy, oracle: Oracle, concurrency: int = 4):
    """Workers take a trial as soon as they are free; results come back oldest first."""
    running = []
    while True:
        while len(running) < concurrency:
            trial = policy.suggest()
            if trial is None:
                break
            running.append(trial)
        if not running:
            return
        name, seed, fidelity = running.pop(0)
        policy.observe(name, seed, fidelity, oracle.error(policy.nets[name], seed, fidelity))


def plan(**changes) -> N0Plan:
    return N0Plan(**{"target_width": 8.0, "seeds": SEEDS, "min_seeds": 2,
                     "fidelities": (0.125, FULL), "epochs": 200, "draws": 400, **changes})


def test_interval_covers_under_its_own_stopping_rule():
    """60 simulated studies, the searcher stopping when its interval looks narrow enough (or its
    budget is spent): the true n0 lies in the final interval in at least 90% of them (nominal
    95%; a fixed-sample interval read after every result, or a straight line across a gap with
    untrained pairs, falls well below)."""
    hits = []
    for study in range(60):
        nets, pairs = ladder()
        policy = N0Policy(nets, pairs, plan(budget_epochs=30 * 200, seed=study))
        oracle = Oracle(study)
        run(policy, oracle)
        n0 = policy.estimate()
        assert policy.stopped
        hits.append(n0.low is not None and n0.low <= oracle.n0 <= n0.high)
    assert np.mean(hits) >= 0.9, np.mean(hits)


@pytest.mark.parametrize("fidelities", [(0.125, FULL), (FULL,)])
def test_a_finished_trial_frees_a_worker_at_once_and_decisions_replay(fidelities):
    """No waiting for a round: with trials running, each result is followed by a suggestion;
    and two policies given the same results in the same order choose the same trials (full
    schedules only: the smooth crossing's acquisition decides most of them)."""
    chosen = []
    for _ in range(2):
        oracle = Oracle(3)  # the same results, in the same order
        nets, pairs = ladder()
        policy, trials, running = N0Policy(nets, pairs, plan(seed=1, fidelities=fidelities)), \
            [], []
        running = [policy.suggest() for _ in range(6)]
        assert all(running) and len(set(running)) == 6
        for _ in range(30):
            done = running.pop(0)
            policy.observe(*done, oracle.error(policy.nets[done[0]], *done[1:]))
            nxt = policy.suggest()
            if nxt is None:
                break
            assert nxt not in running and nxt not in trials
            running.append(nxt)
            trials.append(nxt)
        assert len(trials) >= 20
        chosen.append(trials)
    assert chosen[0] == chosen[1]


def test_short_schedules_place_the_bracket_only_and_can_be_turned_off():
    """The short schedule comes first (a seed of every pair, then a second); n0 comes from
    full schedules only (absurd short results leave it unchanged); fidelities [1.0] trains no
    short run."""
    nets, pairs = ladder()
    policy = N0Policy(nets, pairs, plan())
    first = [policy.suggest() for _ in range(4 * len(pairs))]
    assert {t.fidelity for t in first} == {0.125}
    assert {t.arch for t in first} == set(nets) and len(set(first)) == len(first)
    assert {t.seed for t in first[:2 * len(pairs)]} == {SEEDS[0]}
    oracle = Oracle(5)
    run(policy, oracle)
    before = policy.estimate()
    for name in nets:  # short runs that would put n0 anywhere
        policy.log.append(Result(name, 9, 0.125, 50.0, 25))
    policy.log.append(policy.log[-1])  # keep the log length (the model's draw seed)
    policy.log.pop()
    assert policy.estimate().line() == before.line()

    nets, pairs = ladder()
    full_only = N0Policy(nets, pairs, plan(fidelities=(FULL,)))
    run(full_only, Oracle(5))
    assert {r.fidelity for r in full_only.log} == {FULL}


def test_short_schedules_take_about_their_share_of_a_budget():
    """Under budget.epochs short schedules take about SCREEN_SHARE of it, so that the rest is
    whole full-schedule pairs: a first seed of every pair (the ends and the middle first),
    then a second; the rest goes to full schedules, none to a net whose pair has no run of
    the other."""
    nets, pairs = ladder()  # 7 pairs: a seed of each at 25 epochs is 350 epochs
    for budget, screened in ((2400, 400), (6000, 700), (1200, 0)):  # 700: two seeds of all
        policy = N0Policy(nets, pairs, plan(budget_epochs=budget, target_width=0.1))
        run(policy, Oracle(7))
        short = [(r.arch, r.seed) for r in policy.log if r.fidelity == 0.125]
        assert len(short) * 25 == screened, budget
        assert abs(screened - SCREEN_SHARE * budget) <= 200  # half a full pair-seed
        order = [(n, seed) for seed in SEEDS[:2] for i in bisection_order(len(pairs))
                 for n in (pairs[i].deep, pairs[i].multi)]
        assert sorted(short) == sorted(order[:len(short)])
        full = policy.errors(FULL)
        assert sum(map(len, full.values())) * 200 == (budget - screened) // 200 * 200
        assert all(bool(full.get(p.deep)) == bool(full.get(p.multi)) for p in pairs)


def test_budget_in_epochs_is_never_passed():
    nets, pairs = ladder()
    policy = N0Policy(nets, pairs, plan(budget_epochs=12 * 200, target_width=0.1))
    run(policy, Oracle(7))
    assert policy.stopped.startswith("budget spent")
    assert sum(r.cost for r in policy.log) <= 12 * 200
    assert sum(r.cost for r in policy.log) > 10 * 200
    # room for one full-schedule net only: a seed of a trained pair, never a net whose pair
    # has no run of the other (alone it tells nothing)
    for cap in ({"budget_epochs": 13 * 200}, {"max_trials": 13}):
        policy = N0Policy(nets, pairs, plan(fidelities=(FULL,), target_width=0.1, **cap))
        run(policy, Oracle(7))
        full = policy.errors(FULL)
        assert sum(map(len, full.values())) == 13, cap
        assert all(bool(full.get(p.deep)) == bool(full.get(p.multi)) for p in pairs)
        assert sum(len(full.get(p.deep, [])) != len(full.get(p.multi, [])) for p in pairs) == 1


@pytest.mark.parametrize("caps, tight", [
    ({"fidelities": (FULL,), "budget_epochs": 1100}, True),  # 5 trials of 200: 1,000, not 1,100
    ({"fidelities": (FULL,), "max_trials": 7}, True),
    ({"budget_epochs": 2300}, True),
    ({"max_trials": 9}, True),
    ({"fidelities": (0.3, FULL), "budget_epochs": 5000}, True),
    ({"budget_epochs": 6150}, False),  # short schedules leave 50 epochs no trial fits
    ({"fidelities": (FULL,), "seeds": (0, 1)}, False),  # stops when no seed is left to narrow it
    ({"max_trials": 12, "fidelities": (0.3, FULL), "shared": True}, False),
])
def test_the_dry_runs_worst_case_is_what_the_searcher_spends_at_most(caps, tight):
    """The dry run and the placement advice price an n0 study at `N0Plan.most_epochs`
    (`orchestrator.costs`); the searcher, never stopped by its interval, spends no more, and
    all of it when the caps bind in whole trials. A deep net shared by two pairs too."""
    nets, pairs = ladder()
    caps = dict(caps)
    if caps.pop("shared", False):
        pairs = pairs + [Pair(pairs[0].deep, pairs[1].multi, pairs[1].depth)]
    policy = N0Policy(nets, pairs, plan(target_width=0.1, **caps))
    run(policy, Oracle(7))
    spent, most = sum(r.cost for r in policy.log), policy.plan.most_epochs(pairs)
    assert spent == most if tight else spent <= most, (spent, most, policy.stopped)


def test_the_ladder_grows_past_the_deepest_pair_and_says_why():
    """n0 = 60, beyond the deepest pair (44): the searcher adds deeper pairs (with why) and its
    interval holds n0; without a generator the interval stays open past depth 44."""
    nets, pairs = ladder()
    policy = N0Policy(nets, pairs, plan(seed=2), grow=grow)
    run(policy, Oracle(11, n0=60.0))
    assert policy.added and "reaches deeper than depth 44" in policy.added[0].why
    assert max(p.depth for p in policy.pairs) > 44
    n0 = policy.estimate()
    assert n0.low <= 60 <= n0.high

    nets, pairs = ladder()
    fixed = N0Policy(nets, pairs, plan(seed=2))
    run(fixed, Oracle(11, n0=60.0))
    n0 = fixed.estimate()
    assert not fixed.added and n0.high == np.inf and n0.low <= 60


def test_a_non_monotone_difference_is_reported():
    """Functions win clearly at depth 14 and depth wins clearly again at 38: the report says
    the difference is not monotone; a monotone study says nothing."""
    for curve, expected in (({8: 1.5, 14: -1.5, 20: -1.5, 26: -1.5, 32: 1.5, 38: 1.5,
                              44: 1.5}.get, True), (None, False)):
        nets, pairs = ladder()
        policy = N0Policy(nets, pairs, plan(fidelities=(FULL,)))
        oracle = Oracle(1, n0=25, curve=curve)
        for name, net in nets.items():
            for seed in SEEDS[:3]:
                policy.observe(name, seed, FULL, oracle.error(net, seed, FULL))
        report = policy.monotone_report()
        assert (report is not None and "not monotone" in report) == expected, report


def test_searcher_state_is_json_and_replays_without_repeating(tmp_path):
    """Save mid-study (trials running), restore into a fresh searcher: the file is plain JSON,
    the log and the running trials come back, the next suggestion is the one the saved searcher
    would have made, and no (architecture, seed, fidelity) is trained twice."""
    from orchestrator.study.n0_search import N0Search

    oracle = Oracle(4)
    nets, pairs = ladder()
    first = N0Search(N0Policy(nets, pairs, plan()))
    running = {f"t{i}": first.suggest(f"t{i}") for i in range(8)}
    for i in range(8, 30):
        tid = next(iter(running))
        config = running.pop(tid)
        net = first.policy.nets[config["arch"]]
        error = oracle.error(net, config["seed"], config.get("fidelity", FULL))
        first.on_trial_complete(tid, {"test_error": error / 100} if i != 12 else None,
                                error=i == 12)  # one failed trial: its error saved as null
        running[f"t{i}"] = first.suggest(f"t{i}")
    first.save(str(tmp_path / "searcher.json"))
    data = json.loads((tmp_path / "searcher.json").read_text())
    assert len(data["log"]) == 22 and len(data["running"]) == 8
    assert sum(row["error"] is None for row in data["log"]) == 1

    nets, pairs = ladder()
    again = N0Search(N0Policy(nets, pairs, plan()))
    again.restore(str(tmp_path / "searcher.json"))
    assert [r.error for r in again.policy.log if r.error == r.error] == [
        r.error for r in first.policy.log if r.error == r.error]  # nan != nan
    assert len(again.policy.log) == len(first.policy.log)
    assert sorted(again.policy.running) == sorted(first.policy.running)
    assert again.suggest("t30") == first.suggest("t30")
    taken = [r.trial for r in again.policy.log]
    taken += again.policy.running
    assert len(taken) == len(set(taken)) == 31

    nets, pairs = ladder()
    other = N0Search(N0Policy(nets, pairs, plan(min_seeds=1)))
    with pytest.raises(ValueError, match=r"other settings than this study's: min_seeds \d+ "
                       r"\(now 1\);"):
        other.restore(str(tmp_path / "searcher.json"))


@pytest.mark.parametrize("diffs, expected", [
    ([1.0, 0.5, -0.5, -1.0], 17.0),          # crosses between 14 and 20, halfway
    ([1.0, -0.1, 1.0, -1.0, -1.0], 23.0),    # a dip before the crossing: the best single split
    ([1.0, 0.5, 0.2], np.inf),               # depth wins everywhere: n0 deeper
    ([-1.0, -0.5, -0.2], -np.inf),           # functions win everywhere: n0 shallower
])
def test_single_crossing(diffs, expected):
    depths = np.array([8, 14, 20, 26, 32][:len(diffs)], dtype=float)
    got = single_crossings(depths, np.array([diffs]))[0]
    assert got == pytest.approx(expected, abs=0.5)


def test_looks_are_fixed_and_alpha_is_spent_over_an_open_ended_sequence():
    """The looks and their levels do not depend on what an extension may change (budget,
    trials, target): a larger budget only adds looks after the old ones; scheduled looks and
    ends each spend alpha/2 over an open-ended sequence, so any number of looks and of
    extensions spends at most alpha."""
    small, large = plan(budget_epochs=18 * 200), plan(budget_epochs=54 * 200)
    assert small.looks() == [8, 16] and large.looks() == [8, 16, 32]
    assert [small.look_level(j) for j in (1, 2, 3)] == [large.look_level(j) for j in (1, 2, 3)]
    j = np.arange(1, 1_000_001)
    spent = 2 * np.sum(1 - np.array([small.look_level(int(k)) for k in j[:1000]])) + \
        2 * np.sum((1 - small.level) / 2 / (j[1000:] * (j[1000:] + 1.0)))
    assert spent <= 1 - small.level + 1e-12
    assert small.look_level(1) == pytest.approx(1 - 0.05 / 4)  # the first end: alpha/4
    nets, pairs = ladder()
    # no budget: up to every seed of the 7 pairs (70 trials)
    assert N0Policy(nets, pairs, plan(max_trials=10_000)).plan.looks() == [8, 16, 32, 64]
    assert bisection_order(7) == [0, 6, 3, 1, 4, 2, 5]


def steep_errors(policy: N0Policy, n0: float, sd: float = 0.01, seeds: int = 3) -> None:
    """Every pair of the ladder trained with `seeds` seeds: a steep saturating difference
    tanh((n0 - depth) / 2) (in no fitted shape, convex on one side of n0), tiny seed noise."""
    rng = np.random.default_rng(0)
    for p in policy.pairs:
        for s in range(seeds):
            policy.observe(p.deep, s, FULL, 6.0 + rng.normal(0, sd))
            policy.observe(p.multi, s, FULL, 6.0 + np.tanh((n0 - p.depth) / 2)
                           + rng.normal(0, sd))


def test_no_straight_line_inside_a_gap_makes_the_interval_narrow_and_wrong():
    """n0 = 27 between the pairs at 26 and 32 of a steep curve: a straight line between the
    two (the interval before) crosses at 27.9 with almost no noise, an interval of a fraction
    of a layer that misses n0; without a shape between pairs the interval is the gap."""
    nets, pairs = ladder()
    policy = N0Policy(nets, pairs, plan(fidelities=(FULL,), max_trials=10_000))
    steep_errors(policy, 27.0)
    n0 = policy.interval(0.95)
    assert (n0.low, n0.high) == (26.0, 32.0)
    assert n0.value == pytest.approx(27.9, abs=0.1)  # the point estimate still interpolates


def test_a_wrong_shape_that_is_kept_does_not_decide():
    """Where a smooth shape kept by its lack-of-fit test gives a narrow interval that misses
    n0 (interval "shapes", the rule before), the reported interval (the pairs' signs) covers."""
    nets, pairs = ladder([8, 20, 32, 44])
    shapes = N0Policy(nets, pairs, plan(fidelities=(FULL,), interval="shapes", shape=True))
    signs = N0Policy(*ladder([8, 20, 32, 44]), plan(fidelities=(FULL,)))
    for policy in (shapes, signs):
        steep_errors(policy, 17.0, sd=0.3, seeds=2)
    wrong, right = shapes.interval(0.95), signs.interval(0.95)
    assert shapes.shape_fit().kept and wrong.high < 17.0, wrong  # wholly on the shallow side
    assert (right.low, right.high) == (8.0, 20.0)


def test_the_reported_interval_is_the_one_that_decided():
    """A converged stop with trials still running: the reported interval is the deciding
    look's, unchanged by the trials that finish after it; a budget stop looks once more, after
    the last running trial, at the end's own level."""
    for target, why in ((1000.0, "converged"), (0.0, "budget spent")):
        nets, pairs = ladder()
        policy = N0Policy(nets, pairs, plan(target_width=target, fidelities=(FULL,),
                                            budget_epochs=(40 if target else 14) * 200))
        oracle = Oracle(6, n0=24.0)  # (one whose interval closes at a look)
        running, seen = [], None
        while True:
            while len(running) < 6 and (trial := policy.suggest()) is not None:
                running.append(trial)
            if policy.stopped and seen is None:
                seen, in_flight = policy.last_look, len(running)
            if not running:
                break
            name, seed, fidelity = running.pop(0)
            policy.observe(name, seed, fidelity, oracle.error(nets[name], seed, fidelity))
        assert policy.stopped.startswith(why)
        if why == "converged":
            assert in_flight > 0 and policy.estimate() is seen
            assert policy.look_at < policy.full_done()
        else:
            assert policy.look_at == policy.full_done() == 14
            assert policy.last_level == policy.plan.look_level(1)
            assert policy.estimate() == policy.interval(policy.plan.look_level(1))


def test_an_extended_study_keeps_its_trials_and_counts_its_old_end_as_a_look():
    """Run at 16 full-schedule trials, then extended to 40 from the same log: nothing is
    trained twice, the old end is a look of the extension (the same interval at the same
    level), and the new end spends the next end's alpha."""
    nets, pairs = ladder()
    first = N0Policy(nets, pairs, plan(target_width=0.0, fidelities=(FULL,),
                                       budget_epochs=16 * 200))
    oracle = Oracle(5, n0=26.0)
    run(first, oracle)
    assert first.stopped.startswith("budget spent")
    bigger = first.extension_plan(plan(target_width=0.0, fidelities=(FULL,),
                                       budget_epochs=40 * 200))
    assert bigger.ends == (() if first.look_at in first.plan.looks() else (first.look_at,))
    second = N0Policy(*ladder(), bigger)
    second.replay(first.log)
    assert second.stopped is None and second.last_look == first.last_look
    old = {(r.arch, r.seed) for r in first.log}
    run(second, oracle)
    keys = [(r.arch, r.seed) for r in second.log]
    assert len(keys) == len(set(keys)) and old <= set(keys) and len(keys) > len(old)
    ends = 1 + len(bigger.ends)
    assert second.ends_done == ends and second.last_level == bigger.look_level(ends)


@pytest.mark.parametrize("end_on_look", [False, True])
def test_a_budget_that_ends_on_a_scheduled_look(end_on_look):
    """16 full-schedule trials: the budget ends on the second scheduled look (8, 16), at the
    looks' alpha/12. By default that look's interval is reported; with `end_on_look` the end
    look reads the same trials at its own share (alpha/4: level 0.9875) and is reported, and an
    extension counts it as an end. A replay (restore, the report) gives the same."""
    nets, pairs = ladder()
    policy = N0Policy(nets, pairs, plan(target_width=0.0, fidelities=(FULL,),
                                        budget_epochs=16 * 200, end_on_look=end_on_look))
    run(policy, Oracle(5, n0=26.0))
    assert policy.stopped.startswith("budget spent") and 16 in policy.plan.looks()
    level = policy.plan.look_level(1 if end_on_look else 2)
    assert (policy.looks_done, policy.ends_done) == (2, int(end_on_look))
    assert policy.last_level == level and policy.estimate() == policy.interval(level)
    assert policy.extension_plan(policy.plan).ends == ((16,) if end_on_look else ())
    again = N0Policy(*ladder(), policy.plan)
    again.replay(policy.log)
    again.suggest()
    assert again.estimate() == policy.estimate() and again.ends_done == policy.ends_done


def test_a_pairs_design_grows_its_own_ladder(tmp_path):
    """A study with `pairs:` makes the pair one step past its deepest (blocks (6,6,6) after
    (2,2,2), (4,4,4)), none shallower than one block per stage; the searcher's suggestion for
    an added net carries its blocks, and the study builds that trial's run config."""
    import yaml

    from orchestrator.study.config import load_study
    from orchestrator.study.n0_search import N0Search, n0_policy

    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump({
        "name": "pairs", "train": {"dataset": "synthetic", "epochs": 8, "device": "cpu"},
        "pairs": {"deep": [[2, 2, 2], [4, 4, 4]], "factors": [2]}, "seeds": 2,
        "searcher": {"sampler": "n0"}, "trials": 12, "n0": {"fidelities": [0.125, 1.0]}}))
    study = load_study(path)
    policy = n0_policy(study)
    assert policy.grow("shallower", policy.pairs, policy.nets) is None
    pair, nets = policy.grow("deeper", policy.pairs, policy.nets)
    assert nets[0].blocks == (6, 6, 6) and nets[0].name == pair.deep and pair.depth > 14
    policy.add_pair(Growth(pair, tuple(nets), "test"))
    searcher = N0Search(policy)
    policy.log = [Result(n, s, f, 5.0, 1)
                  for p in policy.pairs[:-1] for n in (p.deep, p.multi) for s in (0, 1)
                  for f in (0.125, 1.0)]
    suggestion = searcher.suggest("t0")
    assert suggestion["arch"] in (pair.deep, pair.multi) and suggestion["blocks"]
    cfg = study.trial_config(suggestion)
    assert cfg.architecture.name == suggestion["arch"]
    assert cfg.epochs == (8 if "fidelity" not in suggestion else 1)


def test_it_brackets_then_bisects_towards_the_crossing_and_stops():
    """Full schedules only, a ladder of 9 pairs crossing at 29 with little noise: the ends and
    the middle first, then pairs towards 29 (26 and 32 trained, 14 not), never a trial twice, and
    it stops saying why with n0 between 26 and 32. (Without the smooth crossing: the acquisition
    it falls back to; with it, pairs are chosen for the fit, test_n0_shape.py.)"""
    depths = [8, 14, 20, 26, 32, 38, 44, 50, 56]
    nets, pairs = ladder(depths)
    oracle = Oracle(0, curve=lambda d: 0.1 * (29 - d))
    oracle.sd = 0.05
    policy = N0Policy(nets, pairs, plan(fidelities=(FULL,), target_width=2.0, draws=400,
                                        seeds=(0, 1, 2, 3), shape=False))
    first = [policy.suggest() for _ in range(4)]
    assert {t.arch for t in first} == {pairs[0].deep, pairs[0].multi}  # the shallowest, 2 seeds
    trials = list(first)
    policy.running = []
    for t in first:
        policy.observe(*t, oracle.error(nets[t.arch], t.seed, t.fidelity))
    while (t := policy.suggest()) is not None:
        trials.append(t)
        policy.observe(*t, oracle.error(nets[t.arch], t.seed, t.fidelity))
    assert len(trials) == len(set(trials))
    trained = {p.depth for p in pairs if policy.seeds_of(p.deep, FULL)}
    assert {8, 26, 32} <= trained and 14 not in trained
    n0 = policy.estimate()
    assert n0.bracket == (26, 32) and 26 < n0.value < 32 and n0.low <= 29 <= n0.high
    assert policy.stopped.startswith(("converged", "no trial left"))


def test_the_verdict_says_when_an_added_pair_was_not_trained(tmp_path):
    """A pair the ladder adds as the budget runs out is named in the verdict as not trained
    (the report must not read as if it had been)."""
    import yaml

    from orchestrator.results import DONE
    from orchestrator.study.config import load_study
    from orchestrator.study.n0_search import n0_policy, replayed, search_verdict

    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump({
        "name": "pairs", "train": {"dataset": "synthetic", "epochs": 8, "device": "cpu"},
        "pairs": {"deep": [[2, 2, 2], [4, 4, 4]], "factors": [2]}, "seeds": 2,
        "searcher": {"sampler": "n0"}, "trials": 8, "n0": {"min_seeds": 1}}))
    study = load_study(path)
    pairs = n0_policy(study).pairs
    # depth wins by far at both pairs: n0 lies deeper, and the ladder grows past the deepest
    rows = [{"architecture": n, "seed": s, "status": DONE,
             "final_test_error": (0.10 if n == p.deep else 0.20) + 0.001 * s}
            for p in pairs for n in (p.deep, p.multi) for s in (0, 1)]
    verdict = search_verdict(replayed(study, rows))
    assert "budget spent" in verdict and "added pair" in verdict
    assert "(not trained before the search stopped)" in verdict
    rows += [{"architecture": n, "seed": 0, "status": DONE, "final_test_error": 0.15}
             for n in verdict.split("added pair ")[1].split(" (depth")[0].split(" / ")]
    trained = search_verdict(replayed(study.model_copy(update={"trials": 10}), rows))
    assert "added pair" in trained and "not trained" not in trained


def test_each_seeds_own_difference_cancels_what_its_two_nets_share():
    """Each seed moves both nets of a pair together (its data order) by far more than their own
    noise: the paired reading (each seed's multi - deep) places n0 in its gap, the difference
    of the nets' means (the rule before) cannot tell the pairs around it apart; a seed whose
    other net failed counts in neither."""
    rng = np.random.default_rng(3)
    shared = rng.normal(0, 1.0, 5)
    policies = {paired: N0Policy(*ladder(), plan(fidelities=(FULL,), paired=paired))
                for paired in (True, False)}
    for policy in policies.values():
        for p in policy.pairs:
            for s in SEEDS[:4]:
                policy.observe(p.deep, s, FULL, 6.0 + shared[s] + rng.normal(0, 0.02))
                policy.observe(p.multi, s, FULL, 6.0 + shared[s] + 0.05 * (29 - p.depth)
                               + rng.normal(0, 0.02))
        policy.observe(policy.pairs[0].multi, 4, FULL, 6.0 + shared[4])  # its deep net: none
    paired, means = policies[True].interval(0.95), policies[False].interval(0.95)
    assert (paired.low, paired.high) == (26.0, 32.0), paired
    assert means.high - means.low >= 18, means
    fit = policies[True].fit(FULL)
    assert list(fit.precision) == [4.0] * len(DEPTHS)


def test_the_nonincreasing_fit_is_isotonic_regression():
    from scipy.optimize import isotonic_regression

    from orchestrator.analysis.n0_policy import nonincreasing

    rng = np.random.default_rng(0)
    y, w = rng.normal(0, 1, (50, 7)), rng.uniform(0.5, 3, 7)
    fit = nonincreasing(y, w)
    for row, got in zip(y, fit):
        want = isotonic_regression(row, weights=w, increasing=False).x
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_seeds_go_to_the_pairs_that_hold_the_interval_s_ends():
    """Every pair trained with two seeds, n0 = 29: steered to the ends, the next full-schedule
    seed goes to the pair just inside an end of the interval (whose sign keeps the end where it
    is); spread over the crossing draws (the rule before), to a pair beside the crossing."""
    chosen = {}
    for steer in ("ends", "spread"):
        nets, pairs = ladder([8, 14, 20, 26, 32, 38, 44, 50, 56])
        policy = N0Policy(nets, pairs, plan(fidelities=(FULL,), steer=steer, max_trials=10_000))
        oracle = Oracle(2, n0=29.0)
        oracle.sd = 0.3
        for p in pairs:
            for s in SEEDS[:2]:
                for name in (p.deep, p.multi):
                    policy.observe(name, s, FULL, oracle.error(nets[name], s, FULL))
        n0 = policy.interval(policy.plan.look_level(1))
        trained = [p.depth for p in pairs]
        inner = {min(d for d in trained if d > n0.low), max(d for d in trained if d < n0.high)}
        arch = policy.suggest().arch
        chosen[steer] = (next(p.depth for p in pairs if arch in (p.deep, p.multi)), inner)
    depth, inner = chosen["ends"]
    assert depth in inner, chosen
    assert chosen["spread"][0] not in inner, chosen


def test_a_searcher_saved_before_paired_differences_restores_as_it_ran(tmp_path):
    """State saved before the plan had `paired` and `steer` ran with the means' difference,
    spread (still the defaults): it restores into them, and restoring it into a plan with
    paired differences steered to the ends is refused naming both settings."""
    from orchestrator.study.n0_search import N0Search

    saved = N0Search(N0Policy(*ladder(), plan()))
    data = saved.state()
    for key in ("paired", "steer"):
        del data["plan"][key]
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"paired False \(now True\), steer spread \(now ends\)"):
        N0Search(N0Policy(*ladder(), plan(paired=True, steer="ends"))).restore(
            str(tmp_path / "old.json"))
    old = N0Search(N0Policy(*ladder(), plan()))
    old.restore(str(tmp_path / "old.json"))
    assert old.policy.plan.paired is False and old.policy.plan.steer == "spread"
