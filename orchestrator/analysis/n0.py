"""Deeper or wider: matched pairs, the error difference against depth, and n0 with its uncertainty.

Input: one row per trained run with columns depth, k, width, params, seed, test_error (percent).
A pair is a k=1 network and a multi-residual network (k>1, same width) whose parameter counts
agree within `tolerance`. For each pair, diff = error(multi) - error(deep): positive where depth
wins. n0 is the multi-residual depth at which diff crosses zero from positive to negative (linear
interpolation between the bracketing pairs); its 95% interval comes from draws of every
configuration's mean error given its runs and the seed noise pooled over the study
(`difference_draws`), the crossing found in each draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from orchestrator.errors import ReportError, short
from orchestrator.storage import check_regular

COLUMNS = ["depth", "k", "width", "params", "seed", "test_error"]
CONFIG = ["depth", "k", "width", "params"]


def configuration_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: median, mean and std of test error over seeds (the paper's form)."""
    grouped = runs.groupby(CONFIG, as_index=False)["test_error"]
    table = grouped.agg(median="median", mean="mean", std="std", runs="count")
    table["std"] = table["std"].fillna(0.0)
    extra = [c for c in ("flops", "name") if c in runs]
    if extra:
        table = table.merge(runs.groupby(CONFIG, as_index=False)[extra].first(), on=CONFIG)
    return table.sort_values(["k", "depth"]).reset_index(drop=True)


def find_pairs(runs: pd.DataFrame, tolerance: float = 0.1) -> list[tuple[tuple, tuple]]:
    """(deep, multi) configuration keys: each multi-residual configuration with the k=1
    configuration of the same width closest in parameters, if within `tolerance`."""
    configs = runs[CONFIG].drop_duplicates()
    deep = configs[configs.k == 1]
    pairs = []
    for _, multi in configs[configs.k > 1].iterrows():
        same = deep[deep.width == multi.width]
        if same.empty:
            continue
        gap = (same.params - multi.params).abs() / multi.params
        best = same.loc[gap.idxmin()]
        if gap.min() <= tolerance:
            pairs.append((tuple(best[CONFIG]), tuple(multi[CONFIG])))
    return sorted(pairs, key=lambda p: p[1][0])


@dataclass
class N0:
    value: float | None           # None when the data do not bracket a crossing
    low: float | None = None      # 95% bootstrap interval
    high: float | None = None
    bracket: tuple[int, int] | None = None
    message: str = ""

    @property
    def width(self) -> float:
        """The interval's width in depth units (inf when unknown or open-ended)."""
        if self.low is None or self.high is None:  # (set together)
            return float("inf")
        return self.high - self.low

    def line(self) -> str:
        if self.value is None:
            return f"n0: not found ({self.message})"
        if self.low is None:
            return f"n0: {self.value:.1f} ({self.message})"
        low = "below the shallowest pair" if self.low == -np.inf else f"{self.low:.1f}"
        high = "beyond the deepest pair" if self.high == np.inf else f"{self.high:.1f}"
        return f"n0: {self.value:.1f} (95% CI {low} to {high}; {self.message})"


def crossing(depths: np.ndarray, diffs: np.ndarray) -> tuple[float, tuple[int, int]] | None:
    """The first depth where diff goes from > 0 (depth wins) to <= 0 (functions win)."""
    for i in range(len(depths) - 1):
        a, b = diffs[i], diffs[i + 1]
        if a > 0 >= b:
            x = depths[i] + (depths[i + 1] - depths[i]) * a / (a - b)
            return float(x), (int(depths[i]), int(depths[i + 1]))
    return None


def _errors(runs: pd.DataFrame) -> dict[tuple, np.ndarray]:
    return {key: group.test_error.to_numpy() for key, group in runs.groupby(CONFIG)}


def seed_noise(runs: pd.DataFrame) -> tuple[float, int]:
    """The standard deviation of a run's test error around its configuration's mean, pooled over
    configurations (seed noise is about the same for every net of a study), and its degrees of
    freedom (runs - configurations; 0 when each configuration has one run)."""
    mean = runs.groupby(CONFIG)["test_error"].transform("mean")
    dof = len(runs) - runs.groupby(CONFIG).ngroups
    if dof <= 0:
        return float("nan"), 0
    return float(np.sqrt(((runs.test_error - mean) ** 2).sum() / dof)), dof


def difference_draws(runs: pd.DataFrame, pairs, n: int = 2000, seed: int = 0) -> np.ndarray:
    """(n, pairs) draws of each pair's true difference (multi - deep) given the runs: each
    configuration's mean plus seed noise of the pooled size, itself drawn from its chi-square
    distribution (so a few runs give honest, t-like intervals). Pairs sharing a configuration
    share its draw."""
    rng = np.random.default_rng(seed)
    errors = _errors(runs)
    sd, dof = seed_noise(runs)
    keys = sorted({key for pair in pairs for key in pair})
    sigma = sd * np.sqrt(dof / rng.chisquare(dof, n))
    draws = {key: errors[key].mean() + sigma * rng.standard_normal(n) / np.sqrt(len(errors[key]))
             for key in keys}
    return np.stack([draws[m] - draws[d] for d, m in pairs], axis=1)


def pair_differences(runs: pd.DataFrame, pairs, draws: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """Per pair: mean error difference (multi - deep) and its 95% interval (without an interval
    when no configuration has two runs)."""
    errors = _errors(runs)
    sampled = difference_draws(runs, pairs, draws, seed) if seed_noise(runs)[1] else None
    rows = []
    for i, (deep, multi) in enumerate(pairs):
        d, m = errors[deep], errors[multi]
        low, high = (np.percentile(sampled[:, i], [2.5, 97.5]) if sampled is not None
                     else (np.nan, np.nan))
        rows.append({"deep_depth": deep[0], "multi_depth": multi[0], "k": multi[1],
                     "width": multi[2], "deep_params": deep[3], "multi_params": multi[3],
                     "deep_error": d.mean(), "multi_error": m.mean(), "deep_runs": len(d),
                     "multi_runs": len(m), "diff": m.mean() - d.mean(), "diff_low": low,
                     "diff_high": high})
    return pd.DataFrame(rows)


def crossings(depths: np.ndarray, diffs: np.ndarray) -> np.ndarray:
    """`crossing` for each row of diffs (draws x pairs); rows without one give +inf when depth
    wins at the deepest pair (n0 lies deeper) and -inf otherwise (n0 lies shallower)."""
    hit = (diffs[:, :-1] > 0) & (diffs[:, 1:] <= 0)
    found = hit.any(axis=1)
    i = hit.argmax(axis=1)
    rows = np.arange(len(diffs))
    a, b = diffs[rows, i], diffs[rows, i + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = depths[i] + (depths[i + 1] - depths[i]) * a / (a - b)
    beyond = np.where(diffs[:, -1] > 0, np.inf, -np.inf)
    return np.where(found, x, beyond)


def single_crossings(depths: np.ndarray, diffs: np.ndarray) -> np.ndarray:
    """Where a single crossing from positive to negative fits each row of diffs (draws x pairs,
    pairs by depth) best: the split with the most difference on the right side (the sum of the
    differences before it minus those after it), interpolated linearly between the two pairs
    around it; +inf when the best split leaves every pair positive (n0 lies deeper), -inf
    when it leaves every pair negative. Under the single-crossing shape this uses every pair,
    where `crossings` trusts the first sign change (which noise moves)."""
    n = diffs.shape[1]
    total = diffs.sum(axis=1, keepdims=True)
    before = np.concatenate([np.zeros((len(diffs), 1)), np.cumsum(diffs, axis=1)], axis=1)
    split = (2 * before - total).argmax(axis=1)  # 0..n: pairs before the split are positive
    rows = np.arange(len(diffs))
    i = np.clip(split - 1, 0, n - 2)
    a, b = diffs[rows, i], diffs[rows, i + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.clip(np.where(a - b > 0, a / (a - b), 0.5), 0.0, 1.0)
    x = depths[i] + (depths[i + 1] - depths[i]) * frac
    return np.where(split == n, np.inf, np.where(split == 0, -np.inf, x))


def crossing_draws(runs: pd.DataFrame, pairs, n: int = 2000, seed: int = 0) -> np.ndarray | None:
    """Where the difference crosses zero in each of n draws (`crossings`), pairs sorted by depth;
    None when no configuration has two runs."""
    if not pairs or not seed_noise(runs)[1]:
        return None
    pairs = sorted(pairs, key=lambda p: p[1][0])
    depths = np.array([multi[0] for _, multi in pairs], dtype=float)
    return crossings(depths, difference_draws(runs, pairs, n, seed))


def interval(samples: np.ndarray) -> tuple[float, float]:
    """The central 95% of crossing draws (ends may be infinite)."""
    return (float(np.quantile(samples, 0.025, method="lower")),
            float(np.quantile(samples, 0.975, method="higher")))


def estimate_n0(runs: pd.DataFrame, pairs, draws: int = 2000, seed: int = 0) -> N0:
    """n0 from the pair differences against the multi-residual depth, with a 95% interval from
    draws of the differences (`difference_draws`). An interval end beyond the studied depths is
    infinite: the data do not rule out that n0 lies outside them."""
    if len(pairs) < 2:
        return N0(None, message=f"{len(pairs)} matched pair(s); need pairs at two or more depths")
    errors = _errors(runs)
    pairs = sorted(pairs, key=lambda p: p[1][0])
    depths = np.array([multi[0] for _, multi in pairs], dtype=float)
    diffs = np.array([errors[m].mean() - errors[d].mean() for d, m in pairs])
    found = crossing(depths, diffs)
    if found is None:
        if (diffs > 0).all():
            hint = f"depth wins at every depth up to {int(depths[-1])}; add deeper pairs"
        elif (diffs <= 0).all():
            hint = f"functions win from depth {int(depths[0])} on; add shallower pairs"
        else:
            hint = "the difference does not change sign from positive to negative"
        return N0(None, message=f"no crossing: {hint}")
    value, bracket = found
    if not seed_noise(runs)[1]:
        return N0(value, bracket=bracket, message=f"between depths {bracket[0]} and "
                  f"{bracket[1]}; one run per configuration, no interval")
    samples = crossing_draws(runs, pairs, draws, seed)
    assert samples is not None, "pairs and runs with seed noise: checked above"
    low, high = interval(samples)
    seeds = min(len(errors[k]) for pair in pairs for k in pair)
    return N0(value, low, high, bracket,
              f"between depths {bracket[0]} and {bracket[1]}, {seeds}+ seeds per configuration")


def pareto_front(points: pd.DataFrame, x: str = "flops", y: str = "test_error") -> pd.DataFrame:
    """Rows not dominated in (lower x, lower y)."""
    ordered = points.sort_values([x, y])
    front, best = [], np.inf
    for _, row in ordered.iterrows():
        if row[y] < best:
            front.append(row)
            best = row[y]
    return pd.DataFrame(front)


# What each column of a runs table may hold (test_error in percent), from a CSV or read back from
# MLflow: one check for both. The integer columns hold whole numbers; where present, flops and
# the top-5 error are checked too (the top-5 error may be empty: not every dataset has one).
# Seeds as a run takes them (TrainConfig.seed); every bound fits a 64-bit integer.
RANGES = {"depth": (2, 10_000), "k": (1, 10_000), "width": (1, 10_000), "params": (1, 1e15),
          "seed": (0, 2**31 - 1), "test_error": (0, 100), "flops": (1, 1e18),
          "test_error_top5": (0, 100)}
WHOLE = ("depth", "k", "width", "params", "seed", "flops")
MAY_BE_EMPTY = ("test_error_top5",)


def check_runs(runs: pd.DataFrame, where, fix_empty: str, fix_range: str,
               empty: str = "is empty") -> pd.DataFrame:
    """The table with every cell of RANGES' columns a number in its range (an empty, non-numeric,
    infinite or out-of-range cell would give NaN intervals or silently unpaired rows); else a
    `ReportError` of one line: `where(row index, column)` names the cell (a CSV's row and
    column, a run's parameter or metric), then what it holds (`empty`: how a missing value is
    told) and the fix."""
    runs = runs.copy()
    for column in [c for c in RANGES if c in runs]:
        cells = runs[column]
        values = pd.to_numeric(cells, errors="coerce")
        for i in runs.index[values.isna()]:
            cell = cells[i]
            if pd.isna(cell) and column in MAY_BE_EMPTY:
                continue
            problem = empty if pd.isna(cell) or str(cell).strip() == "" else \
                f"holds {short(repr(str(cell)), 60)}, not a number"
            raise ReportError(f"{where(i, column)} {problem}; {fix_empty}")
        low, high = RANGES[column]
        given = values.notna()
        bad = runs.index[given & ~values.between(low, high)]
        if len(bad):
            raise ReportError(f"{where(bad[0], column)} holds {values[bad[0]]:g}, not {low:g} to "
                              f"{high:g}; {fix_range}")
        if column in WHOLE:
            bad = runs.index[given & (values != values.round())]
            if len(bad):
                raise ReportError(f"{where(bad[0], column)} holds {values[bad[0]]:g}, not a "
                                  f"whole number; {fix_range}")
            values = values.astype("int64")
        runs[column] = values
    return runs


def read_csv(path) -> pd.DataFrame:
    """Runs from a CSV with the COLUMNS (test_error in percent), every cell checked."""
    try:
        check_regular(path, "--from-csv", ReportError, MAX_CSV_BYTES)
    except FileNotFoundError:
        raise ReportError(f"--from-csv {short(path)}: no such file; give the CSV's path") \
            from None
    try:
        runs = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ReportError(f"{short(path)} is not a readable CSV ({type(exc).__name__}); give a "
                          f"CSV with columns {','.join(COLUMNS)}") from None
    missing = [c for c in COLUMNS if c not in runs]
    if missing:
        raise ReportError(f"{short(path)}: missing columns {', '.join(missing)}; expected "
                          f"{','.join(COLUMNS)} (test_error in percent)")
    return check_runs(runs, lambda i, column: f"{short(path)}: row {i + 2}, column {column}",
                      "give every cell a number", "fix the cell")


MAX_CSV_BYTES = 256 << 20  # a runs table of millions of rows; more is not a table of runs


PAPER_TABLE_II = pd.DataFrame([
    # depth, k, width, params, seed, test_error: the medians of Table II (five runs each).
    (24, 1, 1, 292_954, 0, 7.75), (68, 1, 1, 1_047_450, 0, 6.27), (110, 1, 1, 1_727_962, 0, 6.02),
    (8, 4, 1, 297_146, 0, 9.28), (20, 4, 1, 1_074_874, 0, 6.31), (30, 4, 1, 1_778_362, 0, 5.89),
], columns=COLUMNS)
