"""Whether a study's n0 search ends with a closed interval, on the dry run's own simulation
(`orchestrator.study.n0_search.simulated_studies`: n0 uniform over the study's pairs' depths,
the difference a (n0/depth - 1) with a = 0.85, seed noise 0.2 points a net) over more simulated
studies than the dry run's 10.

    python bench/n0_dry_run.py search_spaces/depth_vs_k.yaml --studies 300
    python bench/n0_dry_run.py search_spaces/depth_vs_k.yaml --studies 300 --set budget.epochs=6000

Reported: the share of studies whose interval has two ends (and within each fifth of the range
n0 is drawn from), coverage, epochs trained (mean, 90th percentile), the median width (inf:
open-ended in most) and that of the closed intervals, and the pairs the ladder added.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from orchestrator.study.config import load_study
from orchestrator.study.n0_search import simulated_studies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study")
    p.add_argument("--studies", type=int, default=300)
    p.add_argument("--noise", type=float, default=0.2, help="seed noise of a net, in points")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE, as the sweep's --set")
    args = p.parse_args(argv)
    start = time.time()
    runs = pd.DataFrame(simulated_studies(load_study(args.study, args.set), args.studies,
                                          args.noise))
    closed = np.isfinite(runs.width)
    fifth = pd.cut(runs.n0, 5)
    by_n0 = closed.groupby(fifth, observed=True).mean()
    print(f"{args.study} {' '.join(args.set)}: {args.studies} simulated studies, seed noise "
          f"{args.noise:g}, {time.time() - start:.0f} s")
    print(f"closed {closed.mean():.3f}, coverage {runs.covers.mean():.3f}, epochs mean "
          f"{runs.spent.mean():,.0f} (90th percentile {runs.spent.quantile(0.9):,.0f}), median "
          f"width {runs.width.median():g} (closed: {runs.width[closed].median():g}), pairs "
          f"added {runs.added.mean():.2f}")
    print("closed by where n0 lies: " + ", ".join(
        f"{i.left:.0f}-{i.right:.0f} {v:.2f}" for i, v in by_n0.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
