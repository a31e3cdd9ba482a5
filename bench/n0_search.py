"""How much GPU time the n0 searcher needs to locate n0, and whether its interval holds, on
simulated studies (no Ray, no training).

    python bench/n0_search.py                          # 200 studies per row
    python bench/n0_search.py --studies 50 --rho 0.7 --concurrency 8 --shape steep

A synthetic oracle stands in for training: a ladder of matched pairs (a k=1 net against a k=4
net of the same parameters) at multi-residual depths 8..56; the k=4 net's full-schedule test
error minus the k=1 net's is a true difference curve (`--shape`, zero at n0) plus seed noise of
sd 0.1-0.3 points (Table II's spread). Each study draws its own n0 (12-50, or beyond the ladder
with `--outside`), a and sd. The seed noise grows with depth (x0.6 at depth 8 to x1.5 at 56),
half its variance is shared by the two nets of a seed, and 3% of runs diverge (no result);
`--easy`: none of these (the simulation before issue 30).

Fidelity model: a short complete schedule (`--short` of the epochs) has its own pair differences,
correlated `rho` with the full ones across the ladder (rho x the full difference + sqrt(1 - rho^2)
x an independent curve of the same spread) and its own seed noise (`--short-noise` x the full
one's). rho 0: short runs say nothing about the full ones.

Trials take FLOPs x epochs (FLOPs proportional to parameters); `concurrency` workers; a finished
trial frees its worker at once (the searcher is asked again). When the searcher stops, the
trials still running finish (as in Ray Tune) and stay in its log. The grid trains every net
with every seed. n0 and its interval: the searcher's reported one (`N0Policy.estimate`: the
look that decided, or the end look), the grid's from `orchestrator.analysis.n0.estimate_n0`.
`--extend 0.2 0.4 0.6`: also a row run at 20% of the grid, then extended to 40% and to 60% (a
new plan, `N0Policy.extension_plan`, replaying the same log; nothing is trained twice).

True shapes (`--shape`): `inverse` a(n0/d - 1) (the paper's; linear in 1/d, one of the shapes
`orchestrator.analysis.n0_shape` fits), `linear` a(n0 - d)/n0 and `tanh` a tanh(log(n0/d)),
these three with slope -a/n0 at n0, and `steep` a tanh((n0 - d)/w), w 2-15 layers per study
(in no fitted family). `--steer`: the trials steered by the fitted shapes; `--interval shapes`:
the kept shapes' interval reported (the rule before issue 30); `--interval isotonic` or
`isotonic-line`: each draw read through its monotone fit (`n0_policy.draw_ends`); `--unpaired`
and `--steer-seeds spread`: the difference of the nets' means and seeds spread over the crossing
draws: the searcher's defaults (paired differences steered to the ends, this bench's
defaults, closed intervals wrongly with n0 beyond the ladder: bench/RESULTS.md); `--end-on-look`:
the end look also where the budget ends on a scheduled look (off in the searcher, as above).

Reported per row: epochs vs the grid's full-schedule epochs (mean and 90th percentile), coverage
(an open-ended interval covers when the true n0 lies beyond its finite end) overall and per stop
reason (`stops (coverage)`; `worst stop coverage`: the lowest over the reasons that end a tenth
of the studies or more), the median width (inf when open-ended), the share of closed intervals
and their median width, `closed wrongly` (a closed interval where n0 lies beyond the deepest
pair trained on the full schedule: where the ladder grew past n0, a closed interval that misses
it counts against coverage only), the share of worker time idle (until the last trial ends) and
of it before the search stopped, and the simulated wall clock vs the grid's at the same
concurrency. `--bound`: instead, what no searcher beats at those shares of the grid
(`bound_row`: the Cramer-Rao bound, one look) and the honest one-look yardstick
(`yardstick_row`: an exact interval at the best design for the true shape, the noise
estimated), and the floor of any interval that reads the pairs' signs alone (`sign_floor_row`).
"""
from __future__ import annotations

import argparse
import heapq
import math
import time
from functools import partial

import numpy as np
import pandas as pd

from orchestrator.analysis.n0 import estimate_n0, find_pairs
from orchestrator.analysis.n0_policy import FULL, READINGS, N0Plan, N0Policy, Net
from orchestrator.analysis.pairs import Pair

DEPTHS = [8, 14, 20, 26, 32, 38, 44, 50, 56]
SEEDS = (0, 1, 2, 3, 4)  # Table II: five runs per net
EPOCHS = 200


def ladder(depths):
    """Pair i = (k=1 net of 4x the depth, k=4 net), parameters matched within 1%."""
    nets, pairs = {}, []
    for d in depths:
        nets.update(pair_nets(d))
        pairs.append(Pair(f"d{4 * (d - 2) + 2}-k1", f"d{d}-k4", d))
    return nets, pairs


def pair_nets(d: int) -> dict[str, Net]:
    deep = 4 * (d - 2) + 2
    return {f"d{deep}-k1": Net(f"d{deep}-k1", deep, 1, 1, 10_000 * d, 10_000.0 * d),
            f"d{d}-k4": Net(f"d{d}-k4", d, 4, 1, 10_000 * d + 50 * d, 10_000.0 * d)}


def grow(side: str, pairs: list[Pair], _nets=None):
    """The next pair beyond an end, 6 layers on (none shallower than depth 8)."""
    d = pairs[0].depth - 6 if side == "shallower" else pairs[-1].depth + 6
    if d < 8:
        return None
    nets = pair_nets(d)
    return Pair(f"d{4 * (d - 2) + 2}-k1", f"d{d}-k4", d), list(nets.values())


class Oracle:
    """Final test error (%) of (net, seed, fidelity) for one simulated study."""

    def __init__(self, rng: np.random.Generator, rho: float, short_noise: float,
                 outside: bool = False, shape: str = "inverse", hard: bool = True):
        self.n0 = rng.uniform(58, 75) if outside else rng.uniform(12, 50)
        self.scale = rng.uniform(0.6, 1.2)
        self.sd = rng.uniform(0.1, 0.3)
        self.steep = rng.uniform(2.0, 15.0)  # the steep curve's width in layers
        # The hard simulation: seed noise growing with depth (x0.6 at depth 8 to x1.5 at 56),
        # half its variance shared by the two nets of a seed, 3% of runs diverged (nan).
        self.growth, self.shared, self.diverged = (1.0, 0.5, 0.03) if hard else (0.0, 0.0, 0.0)
        self.rho, self.short_sd = rho, short_noise * self.sd
        self.rng = rng
        self.curve = SHAPES[shape]
        depths = np.arange(2, 200, 6)
        full = self.gap(depths)
        on = (depths >= 8) & (depths <= 80)  # an unrelated curve of the ladder's spread
        other = full[on].mean() + full[on].std() * rng.standard_normal(len(depths))
        self.short_gap = dict(zip(depths, rho * full + np.sqrt(1 - rho ** 2) * other))
        self.cache: dict = {}
        self.seed_draws: dict = {}

    def error(self, net: Net, seed: int, fidelity: float) -> float:
        key = (net.name, seed, fidelity)
        if key not in self.cache:
            d = net.depth if net.k > 1 else (net.depth - 2) // 4 + 2
            base = 5.5 + 8.0 / d
            if fidelity == FULL:
                gap = self.gap(d) if net.k > 1 else 0.0
                sd = self.sd
            else:
                base += 3.0
                gap = self.short_gap[d] if net.k > 1 else 0.0
                sd = self.short_sd
            sd *= 1 + self.growth * (0.9 * (d - 8) / 48 - 0.4)
            shared = self.seed_draws.setdefault((d, seed, fidelity), self.rng.normal())
            noise = np.sqrt(self.shared) * shared + np.sqrt(1 - self.shared) * self.rng.normal()
            diverged = self.rng.random() < self.diverged
            self.cache[key] = math.nan if diverged else base + gap + sd * noise
        return self.cache[key]

    def gap(self, d):
        """The full schedule's true difference (multi - deep) at multi-residual depth d."""
        return self.curve(self.scale, self.n0, np.asarray(d, float), self.steep)


# True difference curves, each a at scale, zero at n0: the paper's a(n0/d - 1) (linear in 1/d:
# the searcher's own fitted shape), a straight line in d and a tanh in log d (flat far from n0:
# bounded at +-a), these three with slope -a/n0 at n0 (the same local information about n0);
# and, outside every fitted family, a saturating crossing of its own width w (2-15 layers,
# drawn per study), steeper at n0 (slope -a/w) and flat at +-a a few widths away.
SHAPES = {"inverse": lambda a, n0, d, w: a * (n0 / d - 1),
          "linear": lambda a, n0, d, w: a * (n0 - d) / n0,
          "tanh": lambda a, n0, d, w: a * np.tanh(np.log(n0 / d)),
          "steep": lambda a, n0, d, w: a * np.tanh((n0 - d) / w)}


def simulate(policy: N0Policy, oracle: Oracle, concurrency: int):
    """Event-driven: fill free workers, advance to the next finish, observe, repeat."""
    now, busy, idle, events, order = 0.0, 0, 0.0, [], 0
    work, before = 0.0, None  # before: the idle share up to the stop (between rounds)
    while True:
        while busy < concurrency:
            trial = policy.suggest()
            if trial is None:
                break
            net = policy.nets[trial.arch]
            epochs = policy.plan.epochs_at(trial.fidelity)
            heapq.heappush(events, (now + net.flops * epochs / 1e6, order, trial, epochs))
            order += 1
            busy += 1
        if policy.stopped and before is None:
            before = idle / max(work + idle, 1e-9) if now > 0 else 0.0
        if not events:
            break
        end, _, trial, epochs = heapq.heappop(events)
        idle += (concurrency - busy) * (end - now)
        work += busy * (end - now)
        now = end
        busy -= 1
        policy.observe(*trial, oracle.error(policy.nets[trial.arch], trial.seed, trial.fidelity),
                       epochs)
    return now, idle / max(work + idle, 1e-9), before or 0.0


def grid_wall(nets, concurrency: int) -> float:
    """The grid's wall clock: every net x seed, longest first, on `concurrency` workers."""
    loads = np.zeros(concurrency)
    for t in sorted((n.flops * EPOCHS / 1e6 for n in nets.values() for _ in SEEDS),
                    reverse=True):
        loads[loads.argmin()] += t
    return float(loads.max())


def covers(low, high, truth) -> bool:
    return low is not None and low <= truth <= high


def one_study(args, study: int, rho: float, concurrency: int, fidelities, outside: bool,
              target: float, budgets: list[float | None]) -> dict:
    """One simulated study; with several budgets, run at the first, then extended to each next
    one: a new plan (`N0Policy.extension_plan`) replays the same log and goes on, retraining
    nothing (the trials of the earlier parts are in the log)."""
    nets0, _ = ladder(DEPTHS)
    rng = np.random.default_rng(10_000 * study + 7)
    oracle = Oracle(rng, rho, args.short_noise, outside, args.shape, not args.easy)
    policy, wall, idle, before = None, 0.0, 0.0, 0.0
    for budget in budgets:
        nets, pairs = ladder(DEPTHS)
        plan = N0Plan(target_width=target, seeds=SEEDS, min_seeds=args.min_seeds,
                      fidelities=fidelities, epochs=EPOCHS, budget_epochs=budget,
                      draws=args.draws, seed=study, shape=args.steer,
                      interval=args.interval, paired=not args.unpaired, steer=args.steer_seeds,
                      end_on_look=args.end_on_look)
        if policy is not None:
            plan = policy.extension_plan(plan)
        new = N0Policy(nets, pairs, plan, grow=grow)
        if policy is not None:
            new.replay(policy.log, policy.added)
        policy = new
        took, idle, before = simulate(policy, oracle, concurrency)
        wall += took
    keys = [r.trial for r in policy.log]
    assert len(keys) == len(set(keys)), "a trial was trained twice"
    n0 = policy.estimate()
    stop = (policy.stopped or "").split(":")[0].split(" (")[0]
    return {"epochs": sum(r.cost for r in policy.log) / (len(nets0) * len(SEEDS) * EPOCHS),
            "hit": covers(n0.low, n0.high, oracle.n0), "width": n0.width,
            "closed wrongly": outside and math.isfinite(n0.width) and oracle.n0 > deepest(policy),
            "idle": idle, "idle before stop": before,
            "wall": wall / grid_wall(nets0, concurrency),
            "stop": STOPS.get(stop, stop), "grown": len(policy.added)}


def deepest(policy: N0Policy) -> float:
    """The depth of the deepest pair with full-schedule results of both its nets."""
    errors = policy.errors(FULL)
    return max((p.depth for p in policy.pairs if errors.get(p.deep) and errors.get(p.multi)),
               default=-math.inf)


STOPS = {"no trial left that narrows it": "nothing left", "n0 not found": "not found"}


def by_stop(frame: pd.DataFrame) -> tuple[str, float]:
    """Per stop reason: studies and coverage; the lowest coverage over the reasons that end
    at least a tenth of the studies (100 of 1,000)."""
    groups = frame.groupby("stop").hit.agg(["count", "mean"]).sort_values("count",
                                                                       ascending=False)
    text = ", ".join(f"{k} {int(r['count'])} ({r['mean']:.3f})" for k, r in groups.iterrows())
    big = groups[groups["count"] >= 0.1 * len(frame)]
    return text, float(big["mean"].min()) if len(big) else float("nan")


def run_row(args, rho: float, concurrency: int, fidelities, outside: bool, target: float,
            budgets: list[float | None]):
    grid_epochs = 18 * len(SEEDS) * EPOCHS
    frame = pd.DataFrame([one_study(args, study, rho, concurrency, fidelities, outside, target,
                                    budgets) for study in range(args.studies)])
    stops, worst = by_stop(frame)
    return {"shape": args.shape, "steer": "shapes" if args.steer else "signs",
            "interval": args.interval, "paired": not args.unpaired, "seeds to": args.steer_seeds,
            "end on look": args.end_on_look,
            "rho": rho, "concurrency": concurrency,
            "fidelities": "/".join(f"{f:g}" for f in fidelities),
            "n0": "outside" if outside else "12-50", "target": target,
            "budget": " -> ".join("-" if b is None else f"{b / grid_epochs:.0%}"
                                  for b in budgets),
            "epochs vs grid": frame.epochs.mean(), "p90": frame.epochs.quantile(0.9),
            "coverage": frame.hit.mean(), "worst stop coverage": worst,
            "median width": frame.width.median(),
            "closed": np.isfinite(frame.width).mean(),
            "closed width": frame.width[np.isfinite(frame.width)].median(),
            "closed wrongly": int(frame["closed wrongly"].sum()),
            "idle": frame.idle.mean(), "idle before stop": frame["idle before stop"].mean(),
            "wall vs grid": frame.wall.mean(),
            "grown": frame.grown.mean(), "stops (coverage)": stops}


def grid_row(args, concurrency: int):
    nets, pairs = ladder(DEPTHS)
    hits, widths = [], []
    for study in range(args.studies):
        oracle = Oracle(np.random.default_rng(10_000 * study + 7), 0.0, args.short_noise,
                        shape=args.shape, hard=not args.easy)
        rows = [(n.depth, n.k, n.width, n.params, s, oracle.error(n, s, FULL))
                for n in nets.values() for s in SEEDS]
        rows = [r for r in rows if math.isfinite(r[-1])]  # diverged runs: no result
        runs = pd.DataFrame(rows, columns=["depth", "k", "width", "params", "seed",
                                           "test_error"])
        n0 = estimate_n0(runs, find_pairs(runs), args.draws)
        hits.append(covers(n0.low, n0.high, oracle.n0))
        widths.append(n0.width)
    return {"shape": args.shape, "fit": "-", "rho": "-", "concurrency": concurrency,
            "fidelities": "grid", "n0": "12-50",
            "target": "-", "budget": "-", "epochs vs grid": 1.0, "p90": 1.0,
            "coverage": np.mean(hits), "median width": float(np.median(widths)),
            "closed": np.isfinite(widths).mean(),
            "closed width": float(np.median(np.array(widths)[np.isfinite(widths)])), "idle": 0.0,
            "idle before stop": 0.0,
            "wall vs grid": 1.0, "grown": 0.0, "stops (coverage)": "-"}


def bound_row(args, share: float, rho: float) -> dict:
    """What no searcher beats at this share of the grid, whatever its design and estimator: the
    Cramer-Rao bound on n0, given the true shape, the seed noise and the short schedule's
    model, and one look at 95%. A full-schedule pair-seed (both nets, one seed) at any depth
    tells about n0 at most (a/n0)^2 / (2 sd^2) with the scale a unknown (the mean difference
    is linear in g = 1/depth for `inverse`, in depth for `linear`: the information about the
    crossing is the same at every depth; `tanh` is flatter, so less). Short schedules, free
    here and with unlimited seeds: at a depth they see rho x the full difference plus an
    independent value of the ladder's spread, so each of the 15 depths the ladder may hold
    adds at most rho^2 (2 sd^2) / ((1 - rho^2) spread^2) pair-seeds. The width:
    2 x 1.96 x n0 x sqrt(2 sd^2 / pair-seeds) / a, its median over the studies."""
    pair_seeds = share * 18 * len(SEEDS) / 2
    widths = []
    for study in range(args.studies):
        oracle = Oracle(np.random.default_rng(10_000 * study + 7), 0.0, args.short_noise)
        depths = np.arange(8, 81, 6)  # the spread of the short schedule's own curve
        spread = float(np.std(oracle.gap(depths)))
        pair_var = 2 * oracle.sd ** 2
        short = 15 * rho ** 2 * pair_var / ((1 - rho ** 2) * spread ** 2) if rho < 1 else np.inf
        widths.append(2 * 1.96 * oracle.n0 * math.sqrt(pair_var / (pair_seeds + short))
                      / oracle.scale)
    return {"budget": f"{share:.0%}", "rho": rho, "pair-seeds": pair_seeds,
            "bound: median width": float(np.median(widths)),
            "share <= 10 layers": float(np.mean(np.array(widths) <= 10))}


def yardstick_row(args, share: float) -> dict:
    """The honest one-look yardstick at this share of the grid: an exact interval with the
    noise estimated, at the best design for the true shape, as a study that knew the shape
    (and the width w of `steep`) up to its scale and n0 would run it. Design: the two ladder
    depths and the split of the pair-seeds (two or more at each) that minimise the delta-method
    variance of n0 at the true values. Interval: every c for which the curve a h(d; c) (a fitted
    by weighted least squares) fits the two depths' means, by an F(1, N - 2) test of its
    residual against the seed noise estimated from the pairs' scatter at each depth
    (Fieller's interval for `inverse` and `linear`, where the curve is linear in its two
    parameters); 95%, c on a grid of 0.25 layers from 2 to 150 (an end on the grid's end:
    open)."""
    from scipy import stats

    pair_seeds = one_look_pair_seeds(share)
    grid = np.arange(2.0, 150.0, 0.25)
    ladder_d = np.array(DEPTHS, dtype=float)
    widths = []
    for study in range(args.studies):
        rng = np.random.default_rng(10_000 * study + 7)
        oracle = Oracle(rng, 0.0, args.short_noise, shape=args.shape, hard=not args.easy)
        curve = partial(shape_at, SHAPES[args.shape], oracle.steep)
        var = pair_seed_variance(oracle, ladder_d)
        eps = 1e-3
        grad_a = curve(ladder_d, oracle.n0)
        grad_n0 = oracle.scale * (curve(ladder_d, oracle.n0 + eps) - grad_a) / eps
        best = None
        for i in range(len(DEPTHS)):
            for j in range(i + 1, len(DEPTHS)):
                for n1 in range(2, pair_seeds - 1):
                    n = np.array([n1, pair_seeds - n1])
                    g = np.stack([grad_a[[i, j]], grad_n0[[i, j]]], axis=1)
                    info = g.T @ ((n / var[[i, j]])[:, None] * g)
                    det = np.linalg.det(info)
                    v = info[0, 0] / det if det > 1e-12 else np.inf
                    if best is None or v < best[0]:
                        best = (v, [i, j], n)
        _, at, n = best
        noise = [rng.normal(0, math.sqrt(var[k]), m) for k, m in zip(at, n)]
        ys = [oracle.gap(ladder_d[k]) + e for k, e in zip(at, noise)]
        means = np.array([y.mean() for y in ys])
        # the scale-free noise: each depth's scatter over its known share of the variance
        s2 = sum(float(np.sum((y - y.mean()) ** 2)) / var[k] for k, y in zip(at, ys)) / \
            (pair_seeds - 2)
        w = n / var[at]
        h = curve(ladder_d[at][None, :], grid[:, None])          # grid x 2
        a_hat = (h * w * means).sum(axis=1) / (h * h * w).sum(axis=1)
        rss = (w * (means - a_hat[:, None] * h) ** 2).sum(axis=1)
        ok = grid[rss / s2 <= stats.f.ppf(0.95, 1, pair_seeds - 2)]
        widths.append(np.inf if len(ok) == 0 or ok[0] == grid[0] or ok[-1] == grid[-1]
                      else ok[-1] - ok[0])
    widths = np.array(widths)
    return {"shape": args.shape, "budget": f"{share:.0%}", "pair-seeds": pair_seeds,
            "yardstick: median width": float(np.median(widths)),
            "closed": float(np.isfinite(widths).mean())}


def one_look_pair_seeds(share: float) -> int:
    """Whole pair-seeds (both nets, one seed, full schedule) in this share of the grid."""
    return round(share * 18 * len(SEEDS) / 2)


def pair_seed_variance(oracle: Oracle, depths: np.ndarray) -> np.ndarray:
    """The variance of one pair-seed's difference (multi - deep of one seed) at each depth."""
    growth = 1 + oracle.growth * (0.9 * (depths - 8) / 48 - 0.4)
    return 2 * (oracle.sd * growth) ** 2 * (1 - oracle.shared)


def sign_floor_row(args, share: float) -> dict:
    """The floor of every interval that reads the pairs' signs without a shape between them,
    at this share of the grid: a study that knew n0 and the seed noise, put all its pair-seeds
    on the two ladder pairs around n0 in the best split and looked once (each end's sign at
    97.5%, known noise). Per study, the narrowest such pair of depths that closes with
    probability 1/2 or more (inf: none); its median over the studies."""
    from scipy.stats import norm

    pair_seeds = one_look_pair_seeds(share)
    ladder_d, z = np.array(DEPTHS, dtype=float), norm.ppf(0.975)
    widths = []
    for study in range(args.studies):
        oracle = Oracle(np.random.default_rng(10_000 * study + 7), 0.0, args.short_noise,
                        shape=args.shape, hard=not args.easy)
        sd, gap = np.sqrt(pair_seed_variance(oracle, ladder_d)), oracle.gap(ladder_d)
        low, high = ladder_d < oracle.n0, ladder_d > oracle.n0
        closes = [ladder_d[j] - ladder_d[i] for i in np.flatnonzero(low)
                  for j in np.flatnonzero(high) for n in range(2, pair_seeds - 1)
                  if norm.cdf(gap[i] / sd[i] * math.sqrt(n) - z)
                  * norm.cdf(-gap[j] / sd[j] * math.sqrt(pair_seeds - n) - z) >= 0.5]
        widths.append(min(closes, default=np.inf))
    return {"shape": args.shape, "budget": f"{share:.0%}", "pair-seeds": pair_seeds,
            "pair-sign floor: median width": float(np.median(widths)),
            "closed": float(np.isfinite(widths).mean())}


def shape_at(curve, w: float, d, c):
    """The true curve's shape (scale 1) at depths d for a crossing at c."""
    return curve(1.0, c, d, w)


def searcher_rows(args) -> list[dict]:
    """The grid's and the searcher's rows for every combination the options ask for."""
    grid_epochs = 18 * len(SEEDS) * EPOCHS
    rows = []
    for concurrency in args.concurrency:
        if args.grid:
            rows.append(grid_row(args, concurrency))
        chains = [[b] for b in args.budget] + ([args.extend] if args.extend else [])
        for chain in chains:
            caps = [b * grid_epochs if b > 0 else None for b in chain]
            for target in args.target_width:
                for rho in [] if args.outside_only else args.rho:
                    rows.append(run_row(args, rho, concurrency, (args.short, FULL), False,
                                        target, caps))
                if args.full_only:
                    rows.append(run_row(args, 0.0, concurrency, (FULL,), False, target, caps))
                if args.outside or args.outside_only:
                    rows.append(run_row(args, args.rho[-1], concurrency, (args.short, FULL),
                                        True, target, caps))
                if args.outside and args.full_only:
                    rows.append(run_row(args, 0.0, concurrency, (FULL,), True, target, caps))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", type=int, default=200)
    p.add_argument("--rho", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--short", type=float, default=0.125, help="the short schedule's fraction")
    p.add_argument("--short-noise", type=float, default=1.5,
                   help="the short schedule's seed noise / the full one's")
    p.add_argument("--target-width", type=float, nargs="+", default=[10.0])
    p.add_argument("--budget", type=float, nargs="+", default=[0.2],
                   help="budget.epochs as a share of the grid's epochs (0: no cap)")
    p.add_argument("--extend", type=float, nargs="*",
                   help="also a row run at the first of these shares, then extended to each next "
                   "one on the same log")
    p.add_argument("--easy", action="store_true",
                   help="the simulation before issue 30: no growth of noise with depth, no noise "
                   "shared by a seed's two nets, no diverged runs")
    p.add_argument("--min-seeds", type=int, default=2)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--full-only", action="store_true", help="also rows with n0.fidelities [1]")
    p.add_argument("--outside", action="store_true", help="also rows with n0 beyond the ladder")
    p.add_argument("--outside-only", action="store_true", help="only rows with n0 beyond it")
    p.add_argument("--grid", action="store_true", help="also the grid's rows")
    p.add_argument("--shape", choices=sorted(SHAPES), default="inverse",
                   help="the true difference curve (inverse: the paper's a(n0/d - 1))")
    p.add_argument("--steer", action="store_true",
                   help="steer the trials by the single-crossing fit (default: by the pairs' "
                   "signs)")
    p.add_argument("--interval", choices=[*READINGS, "shapes"], default="pairs",
                   help="the reported interval: how a draw of the pairs' differences is read "
                   "(n0_policy.draw_ends), or the kept shapes' (before issue 30)")
    p.add_argument("--unpaired", action="store_true",
                   help="the difference of the nets' means, not each seed's own pair "
                   "difference (N0Plan.paired; the rule before)")
    p.add_argument("--steer-seeds", choices=["spread", "ends"], default="ends",
                   help="where full-schedule seeds go (N0Plan.steer)")
    p.add_argument("--end-on-look", action="store_true",
                   help="the end look also where the budget ends on a scheduled look "
                   "(N0Plan.end_on_look)")
    p.add_argument("--bound", type=float, nargs="*",
                   help="only the bound, the yardstick and the pair-sign floor at these shares of the "
                   "grid (bound_row, yardstick_row, sign_floor_row)")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    start = time.time()
    rows = ([bound_row(args, share, rho) for share in args.bound for rho in args.rho]
            + [yardstick_row(args, share) for share in args.bound]
            + [sign_floor_row(args, share) for share in args.bound]
            if args.bound else searcher_rows(args))
    table = pd.DataFrame(rows)
    print(f"{args.studies} simulated studies per row; grid = 18 nets x {len(SEEDS)} seeds x "
          f"{EPOCHS} epochs; short schedule {args.short:g} of the epochs, its noise "
          f"{args.short_noise:g}x; {time.time() - start:.0f} s")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.json:
        table.to_json(args.json, orient="records", indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
