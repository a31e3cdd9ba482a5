"""How much GPU time the n0 searcher needs to locate n0, and whether its interval holds, on
simulated studies (no Ray, no training).

    python bench/n0_search.py                          # 200 studies per row
    python bench/n0_search.py --studies 50 --rho 0.7 --concurrency 8

A synthetic oracle stands in for training: a ladder of matched pairs (a k=1 net against a k=4
net of the same parameters) at multi-residual depths 8..56; the k=4 net's full-schedule test
error minus the k=1 net's is a(n0/depth - 1) points (positive below n0, as the paper's Table II:
+1.5 at depth 8, ~0 at 20, -0.1 at 30 for a ~ 0.85), plus seed noise of sd 0.1-0.3 points
(Table II's spread). Each study draws its own n0 (12-50, or beyond the ladder with
`--outside`), a and sd.

Fidelity model: a short complete schedule (`--short` of the epochs) has its own pair differences,
correlated `rho` with the full ones across the ladder (rho x the full difference + sqrt(1 - rho^2)
x an independent curve of the same spread) and its own seed noise (`--short-noise` x the full
one's). rho 0: short runs say nothing about the full ones.

Trials take FLOPs x epochs (FLOPs proportional to parameters); `concurrency` workers; a finished
trial frees its worker at once (the searcher is asked again). When the searcher stops, the
trials still running finish (as in Ray Tune) and count. The grid trains every net with every
seed. n0 and its interval: the searcher's own (full-schedule runs only, level 1 - alpha/looks);
the grid's from `orchestrator.analysis.n0.estimate_n0` (one look, 95%).

Other true shapes (`--shape`): the searcher fits a smooth single crossing across pairs
(`orchestrator.analysis.n0_shape`), and a(n0/d - 1) is linear in 1/d, one of its own shapes;
`linear` (a(n0 - d)/n0) and `tanh` (a tanh(log(n0/d)): flat far from n0, none of the fitted
shapes) have the same value and slope at n0 and the same noise. `--no-fit`: the searcher
without the shapes (the pairs' signs only).

Reported per row: epochs vs the grid's full-schedule epochs (mean and 90th percentile), coverage
(an open-ended interval covers when the true n0 lies beyond its finite end), the median width
(inf when open-ended), the share of closed intervals and their median width, the share of
worker time idle (until the last trial ends) and of it before the search stopped (between
rounds, while the budget lasts), and the simulated wall clock vs the grid's at the same
concurrency. `--bound`: instead, what no searcher beats at those shares of the grid
(`bound_row`: the Cramer-Rao bound, one look).
"""
from __future__ import annotations

import argparse
import heapq
import math
import time

import numpy as np
import pandas as pd

from orchestrator.analysis.n0 import estimate_n0, find_pairs
from orchestrator.analysis.n0_policy import FULL, N0Plan, N0Policy, Net
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
                 outside: bool = False, shape: str = "inverse"):
        self.n0 = rng.uniform(58, 75) if outside else rng.uniform(12, 50)
        self.scale = rng.uniform(0.6, 1.2)
        self.sd = rng.uniform(0.1, 0.3)
        self.rho, self.short_sd = rho, short_noise * self.sd
        self.rng = rng
        self.curve = SHAPES[shape]
        depths = np.arange(2, 200, 6)
        full = self.gap(depths)
        on = (depths >= 8) & (depths <= 80)  # an unrelated curve of the ladder's spread
        other = full[on].mean() + full[on].std() * rng.standard_normal(len(depths))
        self.short_gap = dict(zip(depths, rho * full + np.sqrt(1 - rho ** 2) * other))
        self.cache: dict = {}

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
            self.cache[key] = base + gap + self.rng.normal(0, sd)
        return self.cache[key]

    def gap(self, d):
        """The full schedule's true difference (multi - deep) at multi-residual depth d."""
        return self.curve(self.scale, self.n0, np.asarray(d, float))


# True difference curves, each a at scale, zero at n0, slope -a/n0 there (the same local
# information about n0): the paper's a(n0/d - 1) (linear in 1/d: the searcher's own fitted
# shape), a straight line in d, and a tanh in log d (flat far from n0: bounded at +-a).
SHAPES = {"inverse": lambda a, n0, d: a * (n0 / d - 1),
          "linear": lambda a, n0, d: a * (n0 - d) / n0,
          "tanh": lambda a, n0, d: a * np.tanh(np.log(n0 / d))}


def simulate(policy: N0Policy, oracle: Oracle, concurrency: int):
    """Event-driven: fill free workers, advance to the next finish, observe, repeat."""
    now, busy, idle, events, order = 0.0, 0, 0.0, [], 0
    work, before = 0.0, None  # before: the idle share up to the stop (between rounds)
    while True:
        while busy < concurrency:
            trial = policy.suggest()
            if trial is None:
                break
            net = policy.nets[trial[0]]
            epochs = policy.plan.epochs_at(trial[2])
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
        policy.observe(trial[0], trial[1], trial[2],
                       oracle.error(policy.nets[trial[0]], trial[1], trial[2]), epochs)
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


def run_row(args, rho: float, concurrency: int, fidelities, outside: bool, target: float,
            budget: float | None):
    nets0, pairs0 = ladder(DEPTHS)
    grid_epochs = len(nets0) * len(SEEDS) * EPOCHS
    rows = []
    for study in range(args.studies):
        rng = np.random.default_rng(10_000 * study + 7)
        oracle = Oracle(rng, rho, args.short_noise, outside, args.shape)
        nets, pairs = ladder(DEPTHS)
        plan = N0Plan(target_width=target, seeds=SEEDS, min_seeds=args.min_seeds,
                      fidelities=fidelities, epochs=EPOCHS, budget_epochs=budget,
                      draws=args.draws, seed=study, shape=not args.no_fit)
        policy = N0Policy(nets, pairs, plan, grow=grow)
        wall, idle, before = simulate(policy, oracle, concurrency)
        n0 = policy.estimate()
        rows.append({"epochs": sum(r["cost"] for r in policy.log) / grid_epochs,
                     "hit": covers(n0.low, n0.high, oracle.n0), "width": n0.width,
                     "idle": idle, "idle before stop": before,
                     "wall": wall / grid_wall(nets0, concurrency),
                     "stop": (policy.stopped or "").split(":")[0].split(" (")[0],
                     "grown": len(policy.added)})
    frame = pd.DataFrame(rows)
    return {"shape": args.shape, "fit": "-" if args.no_fit else "shapes", "rho": rho,
            "concurrency": concurrency,
            "fidelities": "/".join(f"{f:g}" for f in fidelities),
            "n0": "outside" if outside else "12-50", "target": target,
            "budget": "-" if budget is None else f"{budget / grid_epochs:.0%}",
            "epochs vs grid": frame.epochs.mean(), "p90": frame.epochs.quantile(0.9),
            "coverage": frame.hit.mean(), "median width": frame.width.median(),
            "closed": np.isfinite(frame.width).mean(),
            "closed width": frame.width[np.isfinite(frame.width)].median(),
            "idle": frame.idle.mean(), "idle before stop": frame["idle before stop"].mean(),
            "wall vs grid": frame.wall.mean(),
            "grown": frame.grown.mean(),
            "stops": ", ".join(f"{k} {v}" for k, v in frame.stop.value_counts().items())}


def grid_row(args, concurrency: int):
    nets, pairs = ladder(DEPTHS)
    hits, widths = [], []
    for study in range(args.studies):
        oracle = Oracle(np.random.default_rng(10_000 * study + 7), 0.0, args.short_noise,
                        shape=args.shape)
        rows = [(n.depth, n.k, n.width, n.params, s, oracle.error(n, s, FULL))
                for n in nets.values() for s in SEEDS]
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
            "wall vs grid": 1.0, "grown": 0.0, "stops": "-"}


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


def searcher_rows(args) -> list[dict]:
    """The grid's and the searcher's rows for every combination the options ask for."""
    grid_epochs = 18 * len(SEEDS) * EPOCHS
    rows = []
    for concurrency in args.concurrency:
        if args.grid:
            rows.append(grid_row(args, concurrency))
        for budget in args.budget:
            cap = budget * grid_epochs if budget > 0 else None
            for target in args.target_width:
                for rho in args.rho:
                    rows.append(run_row(args, rho, concurrency, (args.short, FULL), False,
                                        target, cap))
                if args.full_only:
                    rows.append(run_row(args, 0.0, concurrency, (FULL,), False, target, cap))
                if args.outside:
                    rows.append(run_row(args, args.rho[-1], concurrency, (args.short, FULL),
                                        True, target, cap))
                if args.outside and args.full_only:
                    rows.append(run_row(args, 0.0, concurrency, (FULL,), True, target, cap))
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
    p.add_argument("--min-seeds", type=int, default=2)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--full-only", action="store_true", help="also rows with n0.fidelities [1]")
    p.add_argument("--outside", action="store_true", help="also rows with n0 beyond the ladder")
    p.add_argument("--grid", action="store_true", help="also the grid's rows")
    p.add_argument("--shape", choices=sorted(SHAPES), default="inverse",
                   help="the true difference curve (inverse: the paper's a(n0/d - 1))")
    p.add_argument("--no-fit", action="store_true",
                   help="the searcher without the single-crossing fit (signs of pairs only)")
    p.add_argument("--bound", type=float, nargs="*",
                   help="only the bound at these shares of the grid (bound_row)")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    start = time.time()
    rows = ([bound_row(args, share, rho) for share in args.bound for rho in args.rho]
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
