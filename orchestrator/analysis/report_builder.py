"""The deeper-or-wider report of a runs table: n0 with its interval, the tables, and figures
(error difference against depth, Pareto front of error against FLOPs, error against epoch),
written as report.md and PNGs to a folder."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator.analysis.n0 import (  # noqa: E402
    CONFIG,
    N0,
    configuration_table,
    estimate_n0,
    find_pairs,
    pair_differences,
    pareto_front,
)

# ----------------------------------------------------------------------------- figures

def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_differences(diffs: pd.DataFrame, n0: N0, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(0, color="grey", lw=1)
    err = [(diffs["diff"] - diffs.diff_low).fillna(0),  # no interval: no bar
           (diffs.diff_high - diffs["diff"]).fillna(0)]
    ax.errorbar(diffs.multi_depth, diffs["diff"], yerr=err, fmt="o-", capsize=4,
                label="error(multi-resnet) - error(resnet), 95% CI")
    if n0.value is not None:
        ax.axvline(n0.value, color="C3", ls="--", label=f"n0 = {n0.value:.1f}")
        if n0.low is not None:  # an open end is drawn to the studied depths' edge
            edges = diffs.multi_depth.min(), diffs.multi_depth.max()
            ax.axvspan(max(n0.low, edges[0]), min(n0.high, edges[1]), color="C3", alpha=0.15)
    ax.set_xlabel("depth of the multi-residual network")
    ax.set_ylabel("test error difference (points)")
    ax.set_title("Deeper or wider: matched pairs")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_pareto(runs: pd.DataFrame, path: Path) -> None:
    points = configuration_table(runs).rename(columns={"mean": "test_error"})
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, group in points.groupby("k"):
        ax.scatter(group.flops / 1e9, group.test_error, label=f"k={k}")
    front = pareto_front(points)
    ax.plot(front.flops / 1e9, front.test_error, "k--", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("forward GFLOPs per image")
    ax.set_ylabel("test error (%), mean over seeds")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_curves(histories: dict, pairs, path: Path) -> None:
    """Test error against epoch for each pair, mean over seeds (the paper's Fig. 3)."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 3.6), squeeze=False)
    for ax, (deep, multi) in zip(axes[0], pairs):
        for key, style in ((deep, "-"), (multi, "--")):
            curves = [dict(h) for row, h in histories.values()
                      if (row["depth"], row["k"], row["width"], row["params"]) == key]
            epochs = sorted(set().union(*curves)) if curves else []
            mean = [sum(c[e] for c in curves if e in c) / sum(e in c for c in curves)
                    for e in epochs]
            ax.plot(epochs, mean, style, label=f"depth {key[0]}, k={key[1]} ({len(curves)} runs)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error (%)")
        ax.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- the report

def markdown_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def build_report(runs: pd.DataFrame, out: Path, title: str, histories: dict | None = None,
                 draws: int = 2000, tolerance: float = 0.1, n0: N0 | None = None,
                 notes: Sequence[str] = (), short: pd.DataFrame | None = None) -> tuple[N0, Path]:
    """`n0`: a searcher's own (its interval kept under its stopping rule) instead of one
    estimated here; `notes`: lines under it (why the search stopped, pairs it added);
    `short`: short-schedule runs (a `fidelity` column), shown apart, never in n0."""
    out.mkdir(parents=True, exist_ok=True)
    table = configuration_table(runs)
    pairs = find_pairs(runs, tolerance)
    diffs = pair_differences(runs, pairs, draws)
    n0 = n0 if n0 is not None else estimate_n0(runs, pairs, draws)

    shown = table.assign(error=[f"{m:.2f} ({a:.2f}±{s:.2f})" for m, a, s in
                                zip(table["median"], table["mean"], table["std"])])
    top5 = "test_error_top5" in runs and runs.test_error_top5.notna().any()
    if top5:  # ImageNet-style runs: top-5 beside top-1 (n0 stays on top-1)
        means = runs.groupby(CONFIG, as_index=False)["test_error_top5"].mean()
        shown = shown.merge(means, on=CONFIG, how="left")
        shown["top-5 error"] = shown.test_error_top5.map(lambda v: f"{v:.2f}")
    shown = shown[["depth", "k", "width", "params", "runs", "error"] +
                  (["top-5 error"] if top5 else []) + (["flops"] if "flops" in table else [])]
    pair_rows = pd.DataFrame([{
        "resnet": f"depth {r.deep_depth} ({r.deep_params:,})",
        "multi-resnet": f"depth {r.multi_depth}, k={r.k} ({r.multi_params:,})",
        "difference": f"{r.diff:+.2f} [{r.diff_low:+.2f}, {r.diff_high:+.2f}]"}
        for r in diffs.itertuples()])
    figures = []
    if len(diffs):
        plot_differences(diffs, n0, out / "difference_vs_depth.png")
        figures.append("difference_vs_depth.png")
    if "flops" in runs:
        plot_pareto(runs, out / "pareto_error_vs_flops.png")
        figures.append("pareto_error_vs_flops.png")
    if histories and pairs:
        plot_curves(histories, pairs, out / "error_vs_epoch.png")
        figures.append("error_vs_epoch.png")

    text = [f"# {title}", "", n0.line(), "", *[f"- {note}" for note in notes],
            *([""] if notes else []),
            "Test error (%) per configuration: top-1 (which n0 uses) as median (mean ± std) "
            "over seeds; top-5 as the mean, where the runs logged it.", "",
            markdown_table(shown), ""]
    if short is not None and len(short):
        screened = short.groupby(["fidelity", "depth", "k", "width", "params"], as_index=False)[
            "test_error"].agg(mean="mean", runs="count")
        text += ["Short schedules (a fraction of the epochs, the LR milestones at the same "
                 "fractions): they placed the bracket only; n0 and its interval come from the "
                 "full schedules above.", "", markdown_table(screened.round(2)), ""]
    if len(pair_rows):
        text += ["Matched pairs: error(multi-resnet) - error(resnet) in points, with a 95% "
                 "interval from the seed noise pooled over configurations (negative: the wider "
                 "net wins).", "",
                 markdown_table(pair_rows), ""]
    text += [f"![{f}]({f})" for f in figures]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    return n0, path


def show(path: Path, n0: N0) -> None:
    """The report's tables, then n0 on a line of its own."""
    print(path.read_text().split("![")[0].replace(n0.line() + "\n", "").rstrip())
    print(n0.line())
