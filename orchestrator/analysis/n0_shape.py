"""The single-crossing shape pooled across pairs: the pair differences (multi - deep) fitted as
diff = b0 + b1 / depth by least squares weighted by each pair's seeds, n0 where the fit crosses
zero (depth = -b1 / b0), its interval from draws of the coefficients (the seed noise pooled over
nets and drawn from its chi-square distribution, the coefficients given it normal: the same
model as `n0_policy.fit_differences`, with a shape between pairs).

A pair's difference is as noisy as a whole pair's seed noise, so the pairs next to n0 differ by
less than their noise; a shape with two parameters pools every pair into the two numbers that
place the crossing. It is not assumed silently: a lack-of-fit test (the weighted residuals of
the pairs' mean differences against the pooled seed noise, an F test) rejects the shape when
the pairs do not follow it, and the searcher then falls back to the interval without a shape
and says so. The fit never extrapolates: a crossing beyond the trained pairs is an open end
beyond the end pair, as without a shape."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from orchestrator.analysis.n0 import N0
from orchestrator.analysis.pairs import Pair

BASIS = "b0 + b1/depth"
LACK_OF_FIT = 0.10  # the shape is rejected when the lack-of-fit test's p value is below this


@dataclass
class ShapeFit:
    depths: np.ndarray     # the trained pairs' depths, ascending
    means: np.ndarray      # their mean differences (multi - deep)
    seeds: np.ndarray      # their effective seeds: 1 / (1/runs(deep) + 1/runs(multi))
    coef: np.ndarray       # (b0, b1)
    unit_cov: np.ndarray   # (X'WX)^-1: the coefficients' covariance over the seed variance
    sd: float              # the pooled seed noise and its degrees of freedom
    dof: int
    lack_of_fit: float | None  # its p value; None with fewer than three pairs (no test)
    crossing: np.ndarray   # draws of n0 (+-inf: beyond the deepest / shallowest trained pair)

    @property
    def accepted(self) -> bool:
        return self.lack_of_fit is not None and self.lack_of_fit >= LACK_OF_FIT

    def value(self) -> float:
        return float(crossing_of(self.coef[None, :], self.depths)[0])

    def n0(self, level: float) -> N0:
        """n0 where the fit crosses zero, with the central `level` interval of the draws (an
        end beyond the trained pairs infinite)."""
        tail = (1 - level) / 2
        lows, highs = open_ends(self.crossing, self.depths)
        low = float(np.quantile(lows, tail, method="lower"))
        high = float(np.quantile(highs, 1 - tail, method="higher"))
        value = self.value()
        if not math.isfinite(value):
            side = "deeper" if value > 0 else "shallower"
            return N0(None, low, high, message=f"no crossing: n0 lies {side} than the trained "
                      f"pairs (fit {BASIS})")
        i = int(np.clip(np.searchsorted(self.depths, value) - 1, 0, len(self.depths) - 2))
        bracket = (int(self.depths[i]), int(self.depths[i + 1]))
        return N0(value, low, high, bracket, f"between depths {bracket[0]} and {bracket[1]}, "
                  f"fit {BASIS} over {len(self.depths)} pairs, level {level:.4g} per look")

    def report(self) -> str:
        if self.lack_of_fit is None:
            return f"too few pairs to test the shape {BASIS}; interval from the pairs' signs"
        if self.accepted:
            return (f"the differences follow a single smooth crossing ({BASIS}, lack of fit "
                    f"p = {self.lack_of_fit:.2f})")
        return (f"the differences do not follow a single smooth crossing ({BASIS}, lack of fit "
                f"p = {self.lack_of_fit:.3f}); interval from the pairs' signs")


def crossing_of(coef: np.ndarray, depths: np.ndarray) -> np.ndarray:
    """Per row (b0, b1): the depth where b0 + b1/depth goes from > 0 to <= 0 between the
    shallowest and the deepest trained pair; -inf when it is <= 0 at the shallowest (n0 lies
    shallower), +inf when still > 0 at the deepest (n0 lies deeper). The fit is monotone in
    depth, so a crossing inside is the only one."""
    b0, b1 = coef[:, 0], coef[:, 1]
    first, last = b0 + b1 / depths[0], b0 + b1 / depths[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = -b1 / b0
    return np.where(first <= 0, -np.inf, np.where(last > 0, np.inf, inside))


def open_ends(x: np.ndarray, depths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per draw, its interval contribution: the crossing itself, or from the end pair on."""
    low = np.where(x == np.inf, depths[-1], x)
    high = np.where(x == -np.inf, depths[0], x)
    return low, high


def design(depths: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(depths, dtype=float), 1.0 / np.asarray(depths, float)], axis=1)


def fit_shape(errors: dict[str, list[float]], pairs: list[Pair], draws: int,
              seed: int) -> ShapeFit | None:
    """The shape fitted to the trained pairs (pairs sorted by depth); None without two of them
    or without a repeated seed (no noise to weigh the fit against)."""
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
    X = design(depths)
    unit_cov = np.linalg.inv(information(depths, seeds))
    coef = unit_cov @ X.T @ (seeds * means)
    rng = np.random.default_rng(seed)
    chi = rng.chisquare(dof, draws)
    lack = None
    if len(trained) > 2 and sd > 0:  # F test: residual mean square against the seed noise
        m = len(trained) - 2
        f = float(np.sum(seeds * (means - X @ coef) ** 2)) / m / sd ** 2
        null = rng.chisquare(m, draws) / m / (chi / dof)
        lack = float(np.mean(null >= f))
    sigma = sd * np.sqrt(dof / chi)
    z = rng.standard_normal((draws, 2)) @ np.linalg.cholesky(unit_cov).T
    coefs = coef[None, :] + sigma[:, None] * z
    return ShapeFit(depths, means, seeds, coef, unit_cov, sd, dof, lack,
                    crossing_of(coefs, depths))


def information(depths: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """X'WX of the fit for pairs at `depths` with these effective seeds."""
    X = design(np.asarray(depths, float))
    return X.T @ (np.asarray(seeds, float)[:, None] * X)


def variance_after(M: np.ndarray, candidates: np.ndarray,
                   at: np.ndarray) -> tuple[float, np.ndarray]:
    """The variance of n0 now and, per candidate depth, after one more seed of that pair, each
    averaged over the crossing draws `at`, given the fit's information M (in units of the seed variance over b1^2: the fit's
    variance at 1/n0 times n0^4, to read it in layers); what a seed there buys."""
    x_at = design(at)

    def spread(cov):
        return float(np.mean(at ** 4 * np.einsum("ij,jk,ik->i", x_at, cov, x_at)))

    after = [spread(np.linalg.inv(M + 0.5 * np.outer(x, x)))  # one more seed on both nets
             for x in design(np.asarray(candidates, float))]
    return spread(np.linalg.inv(M)), np.array(after)
