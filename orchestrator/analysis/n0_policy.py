"""The n0 searcher's policy, pure (no Ray): which (architecture, seed, fidelity) to train next so
that the interval of n0 narrows for the least GPU time, and when to stop. `N0Search`
(n0_search.py) drives it from Ray Tune; bench/n0_search.py from a simulation.

Its parts, in the shape of Optuna's GP sampler and SMAC (model, acquisition, stopping rules):

- **Model** (`fit_differences`): per fidelity, the difference of each pair's nets' means;
  draws of each pair's difference and where they first cross zero going deeper
  (`orchestrator.analysis.n0.crossings`). (`fit_paired`, with `plan.paired`: each seed's own
  difference, multi - deep of the same seed, the seed noise pooled over the pairs.) With
  `plan.shape`, also the
  **smooth single crossing** pooled across pairs (`n0_shape.fit_shapes`: diff = b0 + b1 g(depth)
  for a few monotone g, each kept only while a lack-of-fit test accepts it), to steer only.
- **Acquisition** (`N0Policy.next_trial`), asked whenever a worker is free, seeing the running
  trials as taken: first the lagging net of a half-trained pair; then a short complete schedule
  (the lowest fidelity) of every pair, in bisection order, a seed then a second, within about
  `SCREEN_SHARE` of what the study may train; then full-schedule seeds of the pair that most
  narrows n0 per unit of cost: the share of crossing draws the pair would settle
  (full-schedule draws, and short-schedule ones where those say more; each draw read as its
  best single split) times the variance a seed removes, over the pair's cost; an open end of
  the interval draws the pair that would close it. With `plan.steer` "ends",
  the share is instead how much the pair's sign holds an end of the interval where it is
  (`end_weights`: the pairs just inside the ends, or an untrained pair splitting an end's gap):
  the interval's width is its ends', and seeds spread over the crossing's draws left them
  unsure (bench/RESULTS.md). With `plan.shape` and a kept smooth
  crossing, instead: the seed that most lowers the variance of n0 under the closest kept shape
  (`shape_trial`; off by default: its best design, the ladder's ends, leaves the shape-free
  interval wide). Costs are epochs under `budget.epochs` (a seed costs the same epochs at
  every depth), else FLOPs.
- **Stopping** (`Converged`, `BudgetSpent`, `NothingLeft`): objects whose `is_met` gives a reason;
  the budget never starts a pair whose other net it cannot hold (room for one net goes to a
  seed of a trained pair, `room_for`).
- **Interval** (`interval`): from full-schedule runs only and without a shape between pairs
  (`n0_from`: each draw's first crossing read as the whole gap between the trained pairs around
  it, `draw_ends`), so it holds whatever the difference curve (a monotone fit of each draw,
  `plan.interval` "isotonic", closed fewer intervals; its crossing interpolated inside the gap,
  "isotonic-line", missed n0 in converged studies: the bench's comparisons); a shape kept by its
  lack-of-fit test with few pairs gave narrow intervals wholly on one side of n0, and their
  narrowness stopped the search. The stopping rule looks at fixed counts of finished
  full-schedule trials (`looks`: set before any result, by nothing an extension changes) and
  once at the end, after the trials still running have finished. Scheduled looks and ends each
  spend alpha/2 over an open-ended sequence (`look_level`), so by the union bound the reported
  interval holds the true n0 with probability at least 1 - alpha whatever the reason the search
  stopped, and across extensions (`extension_plan`). The reported interval (`estimate`) is the
  one that decided: a converged look's (trials finishing after it stay in the log for an
  extension), or the end look's (where the budget ends on a scheduled look, that look's:
  `N0Plan.end_on_look`).

Its state is the settings plus an append-only log of `Result`s ((architecture, seed,
fidelity) -> (error, cost)) and the pairs the ladder added (`Growth`); `replay` rebuilds every
decision from it, so the same order of results gives the same trials."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, NamedTuple

import numpy as np

from orchestrator.analysis.n0 import N0, crossings, single_crossings
from orchestrator.analysis.n0_shape import Shapes, fit_shapes, information, variance_after
from orchestrator.analysis.pairs import Pair
from orchestrator.costs import most_epochs, most_full_trials

FULL = 1.0
# Short schedules only place the bracket (n0 comes from full ones); in simulation they did not
# pay even when free, and two seeds of every pair took a quarter of a budget of a fifth of the
# grid: they get about this share of what a study may train (N0Plan.screen_epochs).
SCREEN_SHARE = 1 / 8


class Trial(NamedTuple):
    """One run the searcher asks for (a tuple: saved state lists it as [arch, seed, fidelity])."""
    arch: str
    seed: int
    fidelity: float


class Result(NamedTuple):
    """A finished trial in the log: its final test error in percent (nan: failed or diverged)
    and what it cost in epochs."""
    arch: str
    seed: int
    fidelity: float
    error: float
    cost: float

    @property
    def trial(self) -> Trial:
        return Trial(self.arch, self.seed, self.fidelity)

    def saved(self) -> dict:
        """As saved state holds it (strict JSON: a failed trial's nan as null)."""
        return {**self._asdict(), "error": self.error if math.isfinite(self.error) else None}

    @classmethod
    def load(cls, row: dict) -> "Result":
        error = float("nan") if row["error"] is None else row["error"]
        return cls(row["arch"], row["seed"], row["fidelity"], error, row["cost"])


@dataclass(frozen=True)
class Net:
    name: str
    depth: int
    k: int
    width: int
    params: int
    flops: float  # per image, forward: what one epoch costs, relatively
    blocks: tuple[int, ...] | None = None  # for a net the ladder added (not in the study's space)


@dataclass(frozen=True)
class Growth:
    """A pair the ladder added beyond an end, its nets, and why."""
    pair: Pair
    nets: tuple[Net, ...]
    why: str

    def saved(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, row: dict) -> "Growth":
        nets = tuple(Net(**{**n, "blocks": n["blocks"] and tuple(n["blocks"])})
                     for n in row["nets"])
        return cls(Pair(**row["pair"]), nets, row["why"])


@dataclass(frozen=True)
class N0Plan:
    """The searcher's settings (from the study's `n0`, `budget`, `seeds`, `trials`)."""
    target_width: float
    seeds: tuple[int, ...]
    min_seeds: int = 2
    fidelities: tuple[float, ...] = (FULL,)   # ascending, the last is the full schedule
    epochs: int = 200                          # the full schedule's epochs
    budget_epochs: float | None = None         # cap, in epochs summed over trials
    max_trials: int = 10_000                  # full-schedule trials (short ones: the budget)
    level: float = 0.95
    draws: int = 1000
    seed: int = 0
    # Steer by a single smooth crossing across pairs (n0_shape.py): off, as its best design (the
    # ends of the ladder) leaves the shape-free interval wide (bench/RESULTS.md).
    shape: bool = False
    # The interval: "pairs" (the pairs' own signs, no shape between them: valid whatever the
    # curve) or "shapes" (the union of the kept smooth crossings': narrow and biased when a kept
    # shape is wrong; for the bench's comparison only).
    interval: str = "pairs"
    # Each seed's own pair difference (what a seed's two nets share cancels) rather than the
    # difference of the nets' means: narrower, but its seed noise pooled over the pairs
    # understates the deepest pairs' when noise grows with depth, and with n0 beyond the ladder
    # it closed 2 of 300 intervals wrongly where the means' difference closed none
    # (bench/RESULTS.md): off by default, as is steering to the ends that it pairs with.
    paired: bool = False
    # Where full-schedule seeds go: "spread" (by the share of crossing draws a pair would
    # settle) or "ends" (the pairs that decide the interval's ends first).
    steer: str = "spread"
    # Take the end look also where the budget ends on a scheduled look (the same trials, at
    # the ends' larger share of alpha: level 0.9875, not the third look's 0.9979): narrower at
    # 40% of the bench's grid, but with n0 beyond the ladder it closed 1 of 300 intervals wrongly
    # where the scheduled look's closed none (bench/RESULTS.md): off by default.
    end_on_look: bool = False
    # Counts of finished full-schedule trials at which earlier parts of this study stopped
    # (looks already taken); `N0Policy.extension_plan` sets them.
    ends: tuple[int, ...] = ()

    @property
    def screen(self) -> float | None:
        """The short schedule's fidelity, or None when the study trains full schedules only."""
        return self.fidelities[0] if self.fidelities[0] < FULL else None

    def epochs_at(self, fidelity: float) -> int:
        return max(1, round(fidelity * self.epochs))

    def looks(self) -> list[int]:
        """Finished full-schedule trials after which the stopping rule looks at the interval,
        fixed before any result and by nothing a study may extend (budget, trials, target):
        4 x min_seeds (two pairs), then doubling, up to what the study may train."""
        out, n = [], 4 * self.min_seeds
        while n <= self.most_trials():
            out.append(n)
            n *= 2
        return out

    def most_trials(self) -> int:
        """The full-schedule trials the study may train (max_trials, or what the budget holds)."""
        return most_full_trials(self.epochs, self.max_trials, self.budget_epochs)

    def most_epochs(self, pairs: list[Pair]) -> float:
        """The most epochs a study of these pairs may train (`orchestrator.costs`)."""
        nets, screen = len({n for p in pairs for n in (p.deep, p.multi)}), self.screen
        return most_epochs(self.epochs, self.max_trials, self.budget_epochs, nets, len(pairs),
                           len(self.seeds), None if screen is None else self.epochs_at(screen),
                           self.screen_epochs())

    def screen_epochs(self) -> float:
        """What short schedules may take: about SCREEN_SHARE of what the study may train, so
        that the rest holds whole full-schedule pair-seeds."""
        most: float = self.max_trials * self.epochs
        if self.budget_epochs is not None:
            most = min(most, self.budget_epochs)
        pair = 2 * self.epochs
        return max(0.0, most - pair * round((1 - SCREEN_SHARE) * most / pair))

    def look_level(self, look: int) -> float:
        """The level of the interval at the look-th scheduled look, or at the look-th end
        (1, 2, ...: in order, across the parts of an extended study): each of the two
        sequences spends alpha/2 as alpha/2 / (j (j + 1)), which sums to alpha/2 over an
        open-ended sequence, so that by the union bound the interval at whichever look the
        study stops at, or is extended from, holds the true n0 with probability at least
        1 - alpha. Ends get their own half: most studies end on their budget, and no number
        of scheduled looks before then lowers its level. (Ends given 0.8 of alpha instead
        closed no more intervals in simulation.)"""
        return 1 - (1 - self.level) / 2 / (look * (look + 1))


@dataclass
class Fit:
    """The model at one fidelity: the pairs trained there (by depth) and draws of where their
    difference crosses zero (+-inf: beyond the deepest / shallowest of them). Two readings of
    each draw: its first crossing (the interval, as `orchestrator.report` reads it) and its best
    single split (the acquisition: a noisy early sign flip does not pull it shallow)."""
    pairs: list[int]
    means: np.ndarray       # per pair: mean difference (multi - deep)
    diff_draws: np.ndarray  # draws x pairs
    crossing: np.ndarray    # draws: the first crossing (the interval's, as the report's)
    split: np.ndarray       # draws: the best single split (where to train next)
    precision: np.ndarray   # per pair: 1 / the variance of its mean difference, in seed units


def fit_differences(errors: dict[str, list[float]], pairs: list[Pair], draws: int,
                    seed: int) -> Fit | None:
    """Draws of each trained pair's true difference: every net's mean plus seed noise of the
    pooled size (itself drawn from its chi-square distribution), as
    `orchestrator.analysis.n0.difference_draws`; None without two trained pairs or any net
    with two runs."""
    trained = [i for i, p in enumerate(pairs) if errors.get(p.deep) and errors.get(p.multi)]
    names = sorted({n for i in trained for n in (pairs[i].deep, pairs[i].multi)})
    dof = sum(len(errors[n]) - 1 for n in names)
    if len(trained) < 2 or dof <= 0:
        return None
    ss = sum(float(np.sum((np.array(errors[n]) - np.mean(errors[n])) ** 2)) for n in names)
    sd = math.sqrt(ss / dof)
    rng = np.random.default_rng(seed)
    sigma = sd * np.sqrt(dof / rng.chisquare(dof, draws))
    z = rng.standard_normal((draws, len(names)))
    mean = np.array([np.mean(errors[n]) for n in names])
    count = np.array([len(errors[n]) for n in names])
    net = mean + sigma[:, None] * z / np.sqrt(count)
    col = {n: j for j, n in enumerate(names)}
    deep = [col[pairs[i].deep] for i in trained]
    multi = [col[pairs[i].multi] for i in trained]
    diff = net[:, multi] - net[:, deep]
    depths = np.array([pairs[i].depth for i in trained], dtype=float)
    return Fit(trained, mean[multi] - mean[deep], diff, crossings(depths, diff),
               single_crossings(depths, diff), 1 / (1 / count[multi] + 1 / count[deep]))


def fit_paired(runs: dict[str, dict[int, float]], pairs: list[Pair], draws: int,
               seed: int) -> Fit | None:
    """As `fit_differences`, from each seed's own difference (multi - deep of the same seed):
    what the two nets of a seed share (its data order) cancels, and the seed noise is pooled
    over the pairs' differences; a seed with one net's result only is left out. None without
    two pairs with a complete seed or any pair with two."""
    diffs = {}
    for i, p in enumerate(pairs):
        deep, multi = runs.get(p.deep, {}), runs.get(p.multi, {})
        got = [multi[s] - deep[s] for s in multi if s in deep]
        if got:
            diffs[i] = np.array(got)
    trained = sorted(diffs)
    dof = sum(len(diffs[i]) - 1 for i in trained)
    if len(trained) < 2 or dof <= 0:
        return None
    sd = math.sqrt(sum(float(np.sum((d - d.mean()) ** 2)) for d in diffs.values()) / dof)
    rng = np.random.default_rng(seed)
    sigma = sd * np.sqrt(dof / rng.chisquare(dof, draws))
    means = np.array([diffs[i].mean() for i in trained])
    count = np.array([len(diffs[i]) for i in trained], dtype=float)
    diff = means + sigma[:, None] * rng.standard_normal((draws, len(trained))) / np.sqrt(count)
    depths = np.array([pairs[i].depth for i in trained], dtype=float)
    return Fit(trained, means, diff, crossings(depths, diff), single_crossings(depths, diff),
               count)


def nonincreasing(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The weighted least-squares nonincreasing fit of each row of y (draws x k), by the
    min-max formula of isotonic regression: at i, the least over a <= i of the largest over
    b >= i of the weighted mean of a..b (vectorised over the draws, which scipy's
    `isotonic_regression` is not)."""
    k = y.shape[1]
    c = np.concatenate([np.zeros((len(y), 1)), np.cumsum(y * w, axis=1)], axis=1)
    cw = np.concatenate([[0.0], np.cumsum(w)])
    out = np.empty_like(y)
    for i in range(k):
        best = np.full(len(y), np.inf)
        for a in range(i + 1):
            b = np.arange(i, k)
            mean = (c[:, b + 1] - c[:, [a]]) / (cw[b + 1] - cw[a])
            best = np.minimum(best, mean.max(axis=1))
        out[:, i] = best
    return out


def gap_ends(x: np.ndarray, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per draw's crossing x, what it says about n0 without a shape: the whole gap between the
    trained pairs (at depths `trained`) around it (with no shape between two pairs, any depth
    in the gap is as likely: an interpolated crossing assumed a straight line there, and a
    convex or steep curve made such intervals narrow and wrong); a draw beyond the trained
    pairs: from the end pair on."""
    i = np.clip(np.searchsorted(trained, x, side="right") - 1, 0, len(trained) - 2)
    low = np.where(x == np.inf, trained[-1], np.where(x == -np.inf, -np.inf, trained[i]))
    high = np.where(x == -np.inf, trained[0], np.where(x == np.inf, np.inf, trained[i + 1]))
    return low, high


# How a draw of the pairs' differences is read as a range of n0 (N0Plan.interval).
READINGS = ("pairs", "isotonic", "isotonic-line")


def draw_ends(fit: Fit, pairs: list[Pair], reading: str) -> tuple[np.ndarray, np.ndarray]:
    """Per draw, the range of n0 it says: "pairs", the gap around its first crossing;
    "isotonic", the gap around the crossing of its nonincreasing fit (a single crossing: noise
    that flips a pair's sign is pooled with its neighbours); "isotonic-line", that crossing
    interpolated linearly inside its gap (a straight line between pairs; the gap beyond the end
    pairs)."""
    trained = np.array([pairs[i].depth for i in fit.pairs], dtype=float)
    if reading == "pairs":
        return gap_ends(fit.crossing, trained)
    x = crossings(trained, nonincreasing(fit.diff_draws, fit.precision))
    low, high = gap_ends(x, trained)
    if reading == "isotonic-line":
        inside = np.isfinite(x)
        low, high = np.where(inside, x, low), np.where(inside, x, high)
    return low, high


def n0_from(fit: Fit | None, pairs: list[Pair], level: float, reading: str = "pairs") -> N0:
    """n0 (where the mean differences first cross zero, as `orchestrator.report`) with the
    central `level` interval of what the draws say (`draw_ends`); ends beyond the trained pairs
    are infinite."""
    if fit is None:
        return N0(None, message="fewer than two pairs trained with a repeated seed")
    depths = np.array([pairs[i].depth for i in fit.pairs], dtype=float)
    value = crossings(depths, fit.means[None, :])[0]
    tail = (1 - level) / 2
    lows, highs = draw_ends(fit, pairs, reading)
    low = float(np.quantile(lows, tail, method="lower"))
    high = float(np.quantile(highs, 1 - tail, method="higher"))
    if not math.isfinite(value):
        side = "deeper" if value > 0 else "shallower"
        return N0(None, low, high,
                  message=f"no crossing: n0 lies {side} than the trained pairs")
    i = int(np.clip(np.searchsorted(depths, value) - 1, 0, len(depths) - 2))
    bracket = (int(depths[i]), int(depths[i + 1]))
    return N0(float(value), low, high, bracket,
              f"between depths {bracket[0]} and {bracket[1]}, level {level:.4g} per look")


# ------------------------------------------------------------------------------ stopping rules

@dataclass(frozen=True)
class Converged:
    """At a look: the interval lies inside the studied depths and is narrower than the target."""
    def is_met(self, policy: "N0Policy") -> str | None:
        n0 = policy.last_look
        if n0 is None or n0.value is None or not n0.width <= policy.plan.target_width:
            return None
        return (f"converged: the interval of n0 ({n0.width:.1f} layers, level "
                f"{policy.last_level:.4g} at {policy.look_at} full-schedule trials) is narrower "
                f"than "
                f"n0.target_width {policy.plan.target_width:g}")


@dataclass(frozen=True)
class BudgetSpent:
    """The next trial would pass `budget.epochs`, or `trials` full-schedule trials; the first
    run of a pair counts its other net too (one net of a pair alone tells nothing)."""
    def is_met(self, policy: "N0Policy", trial: Trial) -> str | None:
        plan = policy.plan
        nets = 2 if policy.starts_pair(trial) else 1
        if policy.fits(nets, trial.fidelity):
            return None
        if plan.budget_epochs is not None and not policy.fits(nets, trial.fidelity, trials=False):
            return f"budget spent ({policy.spent():g} of budget.epochs {plan.budget_epochs:g})"
        return f"trial budget spent ({plan.max_trials} full-schedule trials)"


@dataclass(frozen=True)
class NothingLeft:
    """No trial left that could narrow the interval (every seed of the pairs that decide it)."""
    def is_met(self, policy: "N0Policy", trial: Trial | None) -> str | None:
        if trial is not None or policy.running:
            return None
        n0 = policy.interval(policy.plan.level)
        return ("no trial left that narrows it: every seed of the pairs that decide n0 is used"
                if n0.value is not None else f"n0 not found ({n0.message})")


# ------------------------------------------------------------------------------------ policy

@dataclass
class N0Policy:
    nets: dict[str, Net]
    pairs: list[Pair]
    plan: N0Plan
    # (side, pairs, nets) -> a pair beyond that end and its nets, or None
    grow: Callable[[str, list[Pair], dict], tuple[Pair, list[Net]] | None] | None = None
    log: list[Result] = field(default_factory=list)      # finished trials, in order
    running: list[Trial] = field(default_factory=list)
    looks_done: int = 0          # scheduled looks taken
    ends_done: int = 0           # end looks taken (this part's and earlier parts')
    last_look: N0 | None = None
    last_level: float | None = None
    look_at: int | None = None   # finished full-schedule trials at the last look
    end_at: int | None = None    # ... at the last end look
    end_due: bool = False        # stopped by budget or nothing left: the end look once all finish
    stopped: str | None = None
    added: list[Growth] = field(default_factory=list)    # ladder growth
    max_growth: int = 3
    _fits: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.pairs = sorted(self.pairs, key=lambda p: p.depth)
        plan = self.plan
        # No more full-schedule trials than every seed of every pair the ladder may hold (its
        # looks are planned within them).
        pairs = len(self.pairs) + (2 * self.max_growth if self.grow is not None else 0)
        self.plan = N0Plan(**{**asdict(plan), "min_seeds": min(plan.min_seeds, len(plan.seeds)),
                              "max_trials": min(plan.max_trials, 2 * len(plan.seeds) * pairs)})

    # -- what the searcher calls
    def suggest(self) -> Trial | None:
        """The next trial, or None: wait for a result, or stopped (`stopped` says why)."""
        if self.stopped:
            return None
        trial = self.next_trial()
        reason = (BudgetSpent().is_met(self, trial) if trial else None) or \
            NothingLeft().is_met(self, trial)
        if reason:
            self.finish(reason)
            return None
        if trial is not None:
            self.running.append(trial)
        return trial

    def observe(self, name: str, seed: int, fidelity: float, error: float,
                cost: float | None = None) -> None:
        """A finished trial's final test error in percent (nan: failed or diverged) and its cost
        in epochs (default: its schedule's epochs)."""
        trial = Trial(name, seed, fidelity)
        if trial in self.running:
            self.running.remove(trial)
        cost = self.plan.epochs_at(fidelity) if cost is None else cost
        self.log.append(Result(name, seed, fidelity, error, cost))
        done = self.full_done()
        # (a scheduled look is taken while a budget stop waits for its running trials, so that
        # a replay of the log, which stops later, takes the same looks)
        open_ = self.stopped is None or self.end_due
        if fidelity == FULL and open_ and done in self.plan.looks():
            self.look(end=False)
            self.stopped = self.stopped or Converged().is_met(self)
        if fidelity == FULL and self.stopped is None and done in self.plan.ends:
            self.look(end=True)  # where an earlier part stopped: its interval, its alpha
            self.stopped = Converged().is_met(self)
        if self.end_due and not self.running:
            self.end_look()

    def finish(self, reason: str) -> None:
        """Stop: the interval reported is the deciding look's (a converged stop's), or, for a
        stop that did not look at the interval (the budget, nothing left), the end look once the
        trials still running have finished (an extra look: its own share of alpha)."""
        self.stopped = reason
        self.end_due = True
        if not self.running:
            self.end_look()

    def end_look(self) -> None:
        """The end look, unless a look at this count was taken (the same data): an end look
        (an extension that trained nothing more), or, without `plan.end_on_look`, a scheduled
        one (then its interval is reported)."""
        self.end_due = False
        done = self.full_done()
        if self.end_at != done and (self.plan.end_on_look or self.look_at != done):
            self.look(end=True)

    def look(self, end: bool) -> None:
        if end:
            self.ends_done += 1
            self.end_at = self.full_done()
        else:
            self.looks_done += 1
        self.look_at = self.full_done()
        self.last_level = self.plan.look_level(self.ends_done if end else self.looks_done)
        self.last_look = self.interval(self.last_level)

    def full_done(self) -> int:
        return sum(1 for r in self.log if r.fidelity == FULL)

    def extension_plan(self, plan: N0Plan) -> N0Plan:
        """`plan` (the study's new settings: a larger budget, more trials, seeds, depths or
        pairs, a smaller target) as the continuation of this study: the end look this part
        took is one of its ends, so that the looks of every part share one alpha
        (`N0Plan.look_level`). Replay this policy's log (and `added`) into a policy with the
        returned plan. An unstopped study (killed) adds no look: resume it as it was; nor does
        one whose end look waits for running trials (replay the finished log instead)."""
        ended = self.stopped and not self.end_due and self.end_at is not None
        ends = tuple(sorted({*self.plan.ends, self.end_at})) if ended and self.end_at is not None \
            else self.plan.ends
        return replace(plan, ends=ends)

    def replay(self, log: Sequence[Result], added: Sequence[Growth] = ()) -> None:
        """Rebuild the state from a log (and the pairs the ladder added; saved state:
        `Result.load`, `Growth.load`): observe the finished trials in their order, so every
        look and stop comes back."""
        for growth in added:
            self.add_pair(growth)
        for r in log:
            self.observe(r.arch, r.seed, r.fidelity, r.error, r.cost)

    def add_pair(self, growth: Growth) -> None:
        self.nets.update({n.name: n for n in growth.nets})
        self.pairs = sorted([*self.pairs, growth.pair], key=lambda p: p.depth)
        self.added.append(growth)

    # -- the model
    def errors(self, fidelity: float) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for r in self.log:
            if r.fidelity == fidelity and math.isfinite(r.error):
                out.setdefault(r.arch, []).append(r.error)
        return out

    def runs(self, fidelity: float) -> dict[str, dict[int, float]]:
        """Per net, its seeds' finite errors at one fidelity."""
        out: dict[str, dict[int, float]] = {}
        for r in self.log:
            if r.fidelity == fidelity and math.isfinite(r.error):
                out.setdefault(r.arch, {})[r.seed] = r.error
        return out

    def fit(self, fidelity: float) -> Fit | None:
        """The model at one fidelity; its draws are seeded by the count of results there, so
        the same results give the same fit (cached until one more comes)."""
        count = sum(1 for r in self.log if r.fidelity == fidelity)
        key = (fidelity, count, len(self.pairs))
        if key not in self._fits:
            fit = fit_paired(self.runs(fidelity), self.pairs, self.plan.draws,
                             self.plan.seed + count) if self.plan.paired else \
                fit_differences(self.errors(fidelity), self.pairs, self.plan.draws,
                                self.plan.seed + count)
            self._fits = {k: v for k, v in self._fits.items() if k[0] != fidelity}
            self._fits[key] = fit
        return self._fits[key]

    def shape_fit(self) -> Shapes | None:
        """The single-crossing shape over the full-schedule pairs (n0_shape.py), cached as
        `fit`; None when the plan does not use it or the pairs are too few."""
        if not self.plan.shape:
            return None
        count = self.full_done()
        key = ("shape", count, len(self.pairs))
        if key not in self._fits:
            # (4x the draws: its interval's tails lie at alpha/4 of a look)
            fit = fit_shapes(self.errors(FULL), self.pairs, 4 * self.plan.draws,
                             self.plan.seed + count, self.plan.level)  # (steering only)
            self._fits = {k: v for k, v in self._fits.items() if k[0] != "shape"}
            self._fits[key] = fit
        return self._fits[key]

    def estimate(self) -> N0:
        """The n0 the study reports: once stopped, the last look's (the deciding one, or the
        end look); before, what an end now would say."""
        if self.stopped and not self.end_due and self.last_look is not None:
            return self.last_look
        return self.interval(self.plan.look_level(self.ends_done + 1))

    def interval(self, level: float) -> N0:
        """n0 from the full-schedule runs with its interval at `level`: the pairs' signs
        without a shape between pairs (`n0_from`: valid whatever the curve; a kept wrong shape
        gave narrow, biased intervals that stopped the search), or with plan.interval
        "shapes" the kept shapes' union (n0_shape.py)."""
        if self.plan.interval == "shapes":
            shape = self.shape_fit()
            n0 = shape.n0(level) if shape is not None else None
            return n0 or n0_from(self.fit(FULL), self.pairs, level)
        return n0_from(self.fit(FULL), self.pairs, level, self.plan.interval)

    def shape_report(self) -> str | None:
        """Whether the full-schedule differences follow the shape (None: not used)."""
        shape = self.shape_fit()
        return shape.report() if shape is not None else None

    def spent(self, fidelity: float | None = None) -> float:
        """Epochs trained and running, at one fidelity or at all."""
        return sum(r.cost for r in self.log if fidelity in (None, r.fidelity)) + \
            sum(self.cost(t) for t in self.running if fidelity in (None, t.fidelity))

    def cost(self, trial: Trial) -> float:
        return self.plan.epochs_at(trial.fidelity)

    def fits(self, nets: int, fidelity: float, trials: bool = True) -> bool:
        """Whether `nets` more trials at `fidelity` fit budget.epochs (and `trials`)."""
        plan = self.plan
        if plan.budget_epochs is not None and \
                self.spent() + nets * plan.epochs_at(fidelity) > plan.budget_epochs + 1e-9:
            return False
        full = self.full_done() + sum(1 for t in self.running if t.fidelity == FULL)
        return not trials or fidelity != FULL or full + nets <= plan.max_trials

    def starts_pair(self, trial: Trial) -> bool:
        """Whether no pair of the trial's net has a run of its other net at this fidelity."""
        name, fidelity = trial.arch, trial.fidelity
        return not any(self.seeds_of(p.multi if name == p.deep else p.deep, fidelity)
                       for p in self.pairs if name in (p.deep, p.multi))

    def seeds_of(self, name: str, fidelity: float) -> list[int]:
        return [s for n, s, f in self.running if n == name and f == fidelity] + \
            [r.seed for r in self.log if r.arch == name and r.fidelity == fidelity]

    def monotone_report(self) -> str | None:
        """Where the full-schedule differences break the single crossing: a pair whose
        difference is surely negative (functions win) shallower than one surely positive."""
        fit = self.fit(FULL)
        if fit is None:
            return None
        tail = (1 - (self.last_level or self.plan.level)) / 2
        low, high = np.quantile(fit.diff_draws, [tail, 1 - tail], axis=0)
        depths = [self.pairs[i].depth for i in fit.pairs]
        neg = [d for d, h in zip(depths, high) if h < 0]
        pos = [d for d, lo in zip(depths, low) if lo > 0]
        if neg and pos and min(neg) < max(pos):
            return (f"not monotone: functions win at depth {min(neg)} but depth wins again at "
                    f"depth {max(pos)}; n0 as the first crossing")
        return None

    # -- the acquisition
    def weights(self, fit: Fit | None) -> np.ndarray | None:
        """Per pair of the ladder: the share of crossing draws it would settle. A trained pair:
        draws in the gaps on either side of it. An untrained pair: draws in its gap (between
        the trained pairs around it; a draw beyond them counts at that end) to which it is the
        nearest untrained pair."""
        if fit is None:
            return None
        depths = np.array([p.depth for p in self.pairs], dtype=float)
        trained = depths[fit.pairs]
        untrained = np.setdiff1d(depths, trained)
        x = fit.split
        w = np.zeros(len(self.pairs))
        for i, d in enumerate(depths):
            lo = trained[trained < d].max(initial=-np.inf)
            hi = trained[trained > d].min(initial=np.inf)
            # (a draw beyond the end pair belongs to it when no untrained pair lies beyond)
            first, last = not (untrained < d).any(), not (untrained > d).any()
            near = ((x > lo) | (first & (x == -np.inf))) & ((x < hi) | (last & (x == np.inf))) \
                if d in trained else (x >= lo) & (x <= hi)
            if d not in trained:  # the nearest untrained pair of its gap takes the draw
                gap = untrained[(untrained > lo) & (untrained < hi)]
                at = np.clip(x, gap.min(), gap.max())[:, None]
                near &= gap[np.abs(gap[None, :] - at).argmin(axis=1)] == d
            w[i] = near.mean()
        return w

    def next_trial(self) -> Trial | None:
        self.grow_ladder()
        trial = self.lagging_trial() or self.screen_trial()
        if trial is not None:
            return trial
        shape = self.shape_fit()
        if shape is not None and shape.kept:
            return self.shape_trial(shape)
        return self.full_trial()

    def lagging_trial(self) -> Trial | None:
        """The lagging net of a pair that has one more seed on the other (at any fidelity)."""
        for fidelity in (self.plan.screen, FULL):
            for p in self.pairs:
                if fidelity is None:
                    continue
                a, b = self.seeds_of(p.deep, fidelity), self.seeds_of(p.multi, fidelity)
                if len(a) != len(b):
                    name, have = (p.deep, a) if len(a) < len(b) else (p.multi, b)
                    seed = next((s for s in self.plan.seeds if s not in have), None)
                    if seed is not None:
                        return Trial(name, seed, fidelity)
        return None

    def screen_trial(self) -> Trial | None:
        """The short schedule: a seed of every pair, ends and middle first, then a second (the
        model needs a repeated seed), while both nets of a pair fit in the screen's share; per
        net, as a deep net may serve two pairs."""
        plan = self.plan
        if plan.screen is None or self.spent(plan.screen) + 2 * plan.epochs_at(
                plan.screen) > plan.screen_epochs() + 1e-9:
            return None
        for want in range(1, min(2, len(plan.seeds)) + 1):
            for i in bisection_order(len(self.pairs)):
                for name in (self.pairs[i].deep, self.pairs[i].multi):
                    have = self.seeds_of(name, plan.screen)
                    if len(have) < want:
                        return Trial(name, next(s for s in plan.seeds if s not in have),
                                plan.screen)
        return None

    def full_trial(self) -> Trial | None:
        """A full-schedule seed of the pair that narrows n0 most per unit of cost."""
        w = self.full_weights()
        best, score = None, 0.0
        for i, p in enumerate(self.pairs):
            n = len(self.seeds_of(p.deep, FULL))
            if n >= len(self.plan.seeds) or w[i] < 0.02:
                continue
            # an opened pair first gets min_seeds; opening one is worth a first seed
            gain = 1.0 if n == 0 else 10.0 if n < self.plan.min_seeds else 1 / n - 1 / (n + 1)
            value = w[i] * gain / self.pair_cost(p) * self.room_for(p)
            if value > score:
                best, score = p, value
        return self.seed_for(best, FULL) if best is not None else None

    def full_weights(self) -> np.ndarray:
        """Per pair, how much a full-schedule seed of it would settle where n0 lies."""
        plan = self.plan
        w_full = self.weights(self.fit(FULL))  # (fits are cached per log length)
        w_low = self.weights(self.fit(plan.screen)) if plan.screen is not None else None
        ws = [w for w in (w_full, w_low) if w is not None]
        ends = self.end_weights(self.fit(FULL), w_full) if plan.steer == "ends" else None
        if ends is not None and ends.max() > 0:
            w = ends
        elif ws and np.max(ws) > 0:
            w = np.max(ws, axis=0)
        else:  # nothing to go on: the ends and the middle
            w = np.zeros(len(self.pairs))
            w[list(bisection_order(len(self.pairs)))[:3]] = 1.0
        full = self.fit(FULL)
        if full is not None:  # an open end of the interval: the pair that would close it
            n0 = n0_from(full, self.pairs, plan.level, self.reading)  # (nominal: where next)
            for open_end, end, step in ((n0.low == -np.inf, full.pairs[0], -1),
                                        (n0.high == np.inf, full.pairs[-1], 1)):
                if open_end:
                    j = end + step if 0 <= end + step < len(self.pairs) else end
                    w[j] = max(w[j], 0.5)
        opened = [i for i, p in enumerate(self.pairs) if self.seeds_of(p.deep, FULL)]
        if len(opened) == 1:  # the model needs a second pair: the likeliest other one
            others = np.where(np.arange(len(w)) == opened[0], 0.0, w)
            if others.max() == 0:  # the ends and the middle
                others[bisection_order(len(w))[:3]] = 1.0
                others[opened[0]] = 0.0
            j = int(others.argmax())
            w[j] = max(w[j], 1.0)
        return w

    def end_weights(self, fit: Fit | None, spread: np.ndarray | None) -> np.ndarray | None:
        """Per pair of the ladder, how much its sign holds each end of the interval where it
        is (at the next end look's level): of the draws that reach past the trained pair just
        inside an end, the share whose crossing that pair's sign places there (the deep edge
        of a draw's range at the shallow end, the shallow edge at the deep end), each end's
        shares summing to 1; an untrained pair inside an end's gap would split it: its
        `spread` weight (the crossing draws it would settle)."""
        if fit is None or spread is None:
            return None
        level = self.plan.look_level(self.ends_done + 1)
        gaps = "isotonic" if self.reading == "isotonic-line" else self.reading  # (pairs' edges)
        n0 = n0_from(fit, self.pairs, level, gaps)
        if n0.low is None or n0.high is None:  # too few pairs for an interval: nothing to steer
            return None
        lows, highs = draw_ends(fit, self.pairs, gaps)
        trained = np.array([self.pairs[i].depth for i in fit.pairs], dtype=float)
        index = {p.depth: i for i, p in enumerate(self.pairs)}
        w = np.zeros(len(self.pairs))
        for end, edge, inner in ((n0.low, highs, trained[trained > n0.low].min(initial=np.inf)),
                                 (n0.high, lows, trained[trained < n0.high].max(
                                     initial=-np.inf))):
            if not math.isfinite(end) or not math.isfinite(inner):
                continue
            past = edge <= inner if end == n0.low else edge >= inner
            depths, counts = np.unique(edge[past & np.isfinite(edge)], return_counts=True)
            for d, c in zip(depths, counts):
                w[index[int(d)]] += c / counts.sum()
            for i, p in enumerate(self.pairs):
                if min(end, inner) < p.depth < max(end, inner) and i not in fit.pairs:
                    w[i] = max(w[i], spread[i])
        return w

    @property
    def reading(self) -> str:
        """How the interval reads a draw (`draw_ends`); the shapes' interval steers as "pairs"."""
        return self.plan.interval if self.plan.interval in READINGS else "pairs"

    def shape_trial(self, shapes: Shapes) -> Trial | None:
        """Under the closest kept shape: a full-schedule seed of the pair that most lowers the
        variance of n0 per unit of cost, averaged over where the crossing may lie (draws beyond
        the ladder count at its end pair)."""
        ladder = np.array([p.depth for p in self.pairs], dtype=float)
        open_ = [i for i, p in enumerate(self.pairs)
                 if len(self.seeds_of(p.deep, FULL)) < len(self.plan.seeds)]
        if not open_:
            return None
        shape = shapes.best()
        at = np.clip(shape.crossing, ladder[0], ladder[-1])
        runs = [(len(self.seeds_of(p.deep, FULL)), len(self.seeds_of(p.multi, FULL)))
                for p in self.pairs]  # the running trials as taken
        seeds = [1 / (1 / a + 1 / b) if a and b else 0.0 for a, b in runs]
        now, after = variance_after(information(ladder, seeds, shape.power), shape.power,
                                    ladder[open_], at)
        cost = np.array([self.pair_cost(self.pairs[i]) / self.room_for(self.pairs[i])
                         for i in open_])
        best = open_[int(np.argmax((now - after) / cost))]
        return self.seed_for(self.pairs[best], FULL)

    def pair_cost(self, pair: Pair) -> float:
        """What a full-schedule seed of the pair costs in what is capped: epochs under
        budget.epochs (the same at every depth), else GPU time (FLOPs)."""
        if self.plan.budget_epochs is not None:
            return 1.0
        return self.nets[pair.deep].flops + self.nets[pair.multi].flops

    def room_for(self, pair: Pair) -> float:
        """1, or almost 0 for an untrained pair when the budget holds one more full-schedule
        net only: then a seed of a trained pair, and the untrained one (which the budget stops)
        only when none is left."""
        started = self.seeds_of(pair.deep, FULL) and self.seeds_of(pair.multi, FULL)
        return 1.0 if started or self.fits(2, FULL) else 1e-9

    def seed_for(self, pair: Pair, fidelity: float) -> Trial | None:
        have = self.seeds_of(pair.deep, fidelity)
        seed = next((s for s in self.plan.seeds if s not in have), None)
        return Trial(pair.deep, seed, fidelity) if seed is not None else None

    def grow_ladder(self) -> None:
        """A pair beyond the shallowest or deepest when the full schedules' nominal interval of
        n0 (a design choice, not a claim: no level correction) reaches past that end pair and
        the end pair has min_seeds seeds."""
        if self.grow is None or len(self.added) >= 2 * self.max_growth:
            return
        fit = self.fit(FULL)
        if fit is None:
            return
        tail = (1 - self.plan.level) / 2
        lows, highs = draw_ends(fit, self.pairs, self.reading)
        for side, beyond, end in (("shallower", lows == -np.inf, 0),
                                  ("deeper", highs == np.inf, len(self.pairs) - 1)):
            pair = self.pairs[end]
            ready = fit.pairs[0 if end == 0 else -1] == end and min(
                len(self.seeds_of(pair.deep, FULL)), len(self.seeds_of(pair.multi, FULL))
            ) >= self.plan.min_seeds
            if ready and beyond.mean() > tail:
                made = self.grow(side, self.pairs, self.nets)
                if made is not None:
                    new, nets = made
                    why = (f"added pair {new.deep} / {new.multi} (depth {new.depth}): the "
                           f"interval of n0 reaches {side} than depth {pair.depth}")
                    self.add_pair(Growth(new, tuple(nets), why))
                    return


def bisection_order(n: int) -> list[int]:
    """0, n-1, the middle, then the middles of the halves, ...: indices 0..n-1 once each."""
    order, spans = [0, n - 1], [(0, n - 1)]
    while spans:
        lo, hi = spans.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        order.append(mid)
        spans += [(lo, mid), (mid, hi)]
    return list(dict.fromkeys(i for i in order if 0 <= i < n))
