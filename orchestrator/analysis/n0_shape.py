"""The single-crossing shape pooled across pairs: the pair differences (multi - deep) fitted as
diff = b0 + b1 g(depth) by least squares weighted by each pair's seeds, for a few monotone
g (`POWERS`: 1/depth, log depth, depth: convex, between, concave), n0 where a fit crosses zero,
its interval from draws of the coefficients (the seed noise pooled over nets and drawn from its
chi-square distribution, the coefficients given it normal: the same model as
`n0_policy.fit_differences`, with a shape between pairs).

A pair's difference is as noisy as a whole pair's seed noise, so the pairs next to n0 differ by
less than their noise; a shape with two parameters pools every pair into the two numbers that
place the crossing. It is not assumed silently: a lack-of-fit test per shape (the weighted
residuals of the pairs' mean differences against the pooled seed noise, an F test) drops the
shapes the pairs do not follow; the interval is the union of the kept shapes' intervals, and
with none kept the searcher falls back to the interval without a shape and says so. Its level:
alpha (one look's) is split between the test and the intervals, alpha/2 each, so that when
the true shape is one of the family the interval misses n0 with probability at most alpha (the
true shape dropped by its test, or kept and its interval missing: the union bound). A fit never
extrapolates: a crossing beyond the trained pairs is an open end beyond the end pair, as without
a shape."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from orchestrator.analysis.n0 import N0
from orchestrator.analysis.pairs import Pair

POWERS = (-1.0, 0.0, 1.0)  # g(depth) = depth^power, log depth for 0


def basis(depths, power: float) -> np.ndarray:
    d = np.asarray(depths, float)
    return np.log(d) if power == 0 else d ** power


def unbasis(g: np.ndarray, power: float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.exp(g) if power == 0 else g ** (1 / power)


def name(power: float) -> str:
    return {-1.0: "1/depth", 0.0: "log depth", 1.0: "depth"}.get(power, f"depth^{power:g}")


def design(depths, power: float) -> np.ndarray:
    return np.stack([np.ones(len(np.atleast_1d(depths))), basis(depths, power)], axis=1)


def information(depths, seeds, power: float) -> np.ndarray:
    """X'WX of a fit for pairs at `depths` with these effective seeds."""
    X = design(depths, power)
    return X.T @ (np.asarray(seeds, float)[:, None] * X)


def crossing_of(coef: np.ndarray, depths: np.ndarray, power: float) -> np.ndarray:
    """Per row (b0, b1): the depth where b0 + b1 g(depth) goes from > 0 to <= 0 between the
    shallowest and the deepest trained pair; -inf when it is <= 0 at the shallowest (n0 lies
    shallower), +inf when still > 0 at the deepest (n0 lies deeper). The fit is monotone in
    depth, so a crossing inside is the only one."""
    b0, b1 = coef[:, 0], coef[:, 1]
    ends = basis(depths[[0, -1]], power)
    first, last = b0 + b1 * ends[0], b0 + b1 * ends[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = unbasis(-b0 / b1, power)
    return np.where(first <= 0, -np.inf, np.where(last > 0, np.inf, inside))


def open_ends(x: np.ndarray, depths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per draw, its interval contribution: the crossing itself, or from the end pair on."""
    return np.where(x == np.inf, depths[-1], x), np.where(x == -np.inf, depths[0], x)


@dataclass
class ShapeFit:
    power: float
    depths: np.ndarray     # the trained pairs' depths, ascending
    seeds: np.ndarray      # their effective seeds: 1 / (1/runs(deep) + 1/runs(multi))
    coef: np.ndarray       # (b0, b1)
    residual: float        # the weighted residual sum of squares
    lack_of_fit: float | None  # its p value; None with fewer than three pairs (no test)
    crossing: np.ndarray   # draws of n0 (+-inf: beyond the deepest / shallowest trained pair)
    test_level: float      # the shape is dropped when lack_of_fit is below this

    @property
    def accepted(self) -> bool:
        return self.lack_of_fit is not None and self.lack_of_fit >= self.test_level

    def value(self) -> float:
        return float(crossing_of(self.coef[None, :], self.depths, self.power)[0])

    def interval(self, level: float) -> tuple[float, float]:
        tail = (1 - level) / 2
        lows, highs = open_ends(self.crossing, self.depths)
        return (float(np.quantile(lows, tail, method="lower")),
                float(np.quantile(highs, 1 - tail, method="higher")))


@dataclass
class Shapes:
    """The fits of every shape to the same pairs, for an interval of this level."""
    fits: list[ShapeFit]
    level: float

    @property
    def kept(self) -> list[ShapeFit]:
        return [f for f in self.fits if f.accepted]

    def best(self) -> ShapeFit:
        """The kept shape closest to the pairs (the point estimate and the acquisition's)."""
        return min(self.kept, key=lambda f: f.residual)

    def n0(self, level: float | None = None) -> N0 | None:
        """n0 from the closest kept shape, the interval the union of the kept shapes' central
        intervals at 1 - alpha/2 (alpha: of `level`, default the fit's; an end beyond the
        trained pairs infinite); None when none is kept."""
        if not self.kept:
            return None
        level = self.level if level is None else level
        ends = [f.interval(1 - (1 - level) / 2) for f in self.kept]
        low, high = min(e[0] for e in ends), max(e[1] for e in ends)
        best = self.best()
        value, depths = best.value(), best.depths
        shapes = ", ".join(name(f.power) for f in self.kept)
        if not math.isfinite(value):
            side = "deeper" if value > 0 else "shallower"
            return N0(None, low, high, message=f"no crossing: n0 lies {side} than the trained "
                      f"pairs (fits in {shapes})")
        i = int(np.clip(np.searchsorted(depths, value) - 1, 0, len(depths) - 2))
        bracket = (int(depths[i]), int(depths[i + 1]))
        return N0(value, low, high, bracket, f"between depths {bracket[0]} and {bracket[1]}, "
                  f"a smooth crossing in {shapes} over {len(depths)} pairs, level {level:.4g} "
                  "per look")

    def report(self) -> str:
        if self.fits[0].lack_of_fit is None:
            return "too few pairs to test a smooth crossing; interval from the pairs' signs"
        tests = ", ".join(f"{name(f.power)} p = {f.lack_of_fit:.3f}" for f in self.fits)
        if self.kept:
            return f"the differences follow a single smooth crossing (lack of fit: {tests})"
        return (f"the differences do not follow a single smooth crossing (lack of fit: {tests});"
                " interval from the pairs' signs")


def fit_shapes(errors: dict[str, list[float]], pairs: list[Pair], draws: int, seed: int,
               level: float = 0.95) -> Shapes | None:
    """Every shape fitted to the trained pairs (pairs sorted by depth), tested at (1 - level)/2;
    None without two of them or without a repeated seed (no noise to weigh a fit against)."""
    trained = [p for p in pairs if errors.get(p.deep) and errors.get(p.multi)]
    names = sorted({n for p in trained for n in (p.deep, p.multi)})
    dof = sum(len(errors[n]) - 1 for n in names)
    if len(trained) < 2 or dof <= 0:
        return None
    ss = sum(float(np.sum((np.array(errors[n]) - np.mean(errors[n])) ** 2)) for n in names)
    sd = math.sqrt(ss / dof)
    depths = np.array([p.depth for p in trained], dtype=float)
    means = np.array([np.mean(errors[p.multi]) - np.mean(errors[p.deep]) for p in trained])
    seeds = np.array([1 / (1 / len(errors[p.deep]) + 1 / len(errors[p.multi]))
                      for p in trained])
    rng = np.random.default_rng(seed)
    chi = rng.chisquare(dof, draws)  # shared by the shapes: one seed noise
    sigma = sd * np.sqrt(dof / chi)
    m = len(trained) - 2
    null = rng.chisquare(max(m, 1), draws) / max(m, 1) / (chi / dof)
    z = rng.standard_normal((draws, 2))
    fits = []
    for power in POWERS:
        X = design(depths, power)
        cov = np.linalg.inv(information(depths, seeds, power))
        coef = cov @ X.T @ (seeds * means)
        residual = float(np.sum(seeds * (means - X @ coef) ** 2))
        # F test: the residual mean square against the seed noise
        lack = float(np.mean(null >= residual / m / sd ** 2)) if m > 0 and sd > 0 else None
        coefs = coef[None, :] + sigma[:, None] * (z @ np.linalg.cholesky(cov).T)
        fits.append(ShapeFit(power, depths, seeds, coef, residual, lack,
                             crossing_of(coefs, depths, power), (1 - level) / 2))
    return Shapes(fits, level)


def variance_after(M: np.ndarray, power: float, candidates: np.ndarray,
                   at: np.ndarray) -> tuple[float, np.ndarray]:
    """The variance of n0 now and, per candidate depth, after one more seed of that pair, each
    averaged over the crossing draws `at`, given a fit's information M (in units of the seed
    variance over b1^2: the fit's variance at g(n0) times (d depth / d g)^2, to read it in
    layers); what a seed there buys."""
    x_at = design(at, power)
    scale = at ** 2 if power == 0 else at ** (2 - 2 * power) / power ** 2

    def spread(cov):
        return float(np.mean(scale * np.einsum("ij,jk,ik->i", x_at, cov, x_at)))

    after = [spread(np.linalg.inv(M + 0.5 * np.outer(x, x)))  # one more seed on both nets
             for x in design(np.asarray(candidates, float), power)]
    return spread(np.linalg.inv(M)), np.array(after)
