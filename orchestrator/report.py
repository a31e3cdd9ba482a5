"""`python -m orchestrator.report`: deeper or wider? n0 and its uncertainty, tables and figures.

    python -m orchestrator.report --experiment paper_table2          # from MLflow (the default)
    python -m orchestrator.report --from-csv published.csv           # depth,k,width,params,seed,test_error

Writes report.md and PNG figures to --out (default report-<name>/), prints the tables and n0 on a
line of its own, and, from MLflow, logs the report to the study's parent run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator.analysis import (N0, configuration_table, estimate_n0, find_pairs,  # noqa: E402
                                   pair_differences, pareto_front, read_csv)

PARENT = "mlflow.parentRunId"


class ReportError(RuntimeError):
    pass


def runs_from_mlflow(tracking_uri: str, experiment: str, parent_id: str | None = None):
    """(runs table, per-epoch test error histories, parent run id) of a study's finished trials."""
    from orchestrator.tracking import all_runs, connect, sqlite_path

    database = sqlite_path(tracking_uri)
    if database is not None and not database.is_file():
        raise ReportError(f"no MLflow database at {database}; run the study there first or "
                          f"pass its --tracking-uri")
    client = connect(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no MLflow experiment {experiment!r} at {tracking_uri}; check "
                          f"--experiment and --tracking-uri")
    found = all_runs(client, [exp.experiment_id], order_by=["attributes.start_time DESC"])
    parents = [r for r in found if PARENT not in r.data.tags]
    if parent_id is None:
        if not parents:
            raise ReportError(f"experiment {experiment!r} has no study run")
        parent_id = parents[0].info.run_id
    rows, histories = [], {}
    for run in found:
        tags, params = run.data.tags, run.data.params
        if tags.get(PARENT) != parent_id or "final_test_error" not in run.data.metrics:
            continue  # other sweeps, pruned, failed or unfinished trials
        if "stopped_early" in tags:
            continue  # a trial stopped by ASHA is not a finished training
        rows.append({"depth": int(params["arch.depth"]), "k": int(params["arch.k"]),
                     "width": int(params["arch.width"]), "params": int(params["params"]),
                     "seed": int(params["seed"]), "flops": int(params["flops"]),
                     "test_error": 100 * run.data.metrics["final_test_error"],
                     "name": tags.get("architecture", "")})
        history = client.get_metric_history(run.info.run_id, "test_error")
        histories[run.info.run_id] = (rows[-1], sorted((m.step, 100 * m.value) for m in history))
    if not rows:
        raise ReportError(f"no finished trials under study run {parent_id}")
    return pd.DataFrame(rows), histories, parent_id


# ----------------------------------------------------------------------------- figures

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the report

def markdown_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def build_report(runs: pd.DataFrame, out: Path, title: str, histories: dict | None = None,
                 draws: int = 2000, tolerance: float = 0.1) -> tuple[N0, Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = configuration_table(runs)
    pairs = find_pairs(runs, tolerance)
    diffs = pair_differences(runs, pairs, draws)
    n0 = estimate_n0(runs, pairs, draws)

    shown = table.assign(error=[f"{m:.2f} ({a:.2f}±{s:.2f})" for m, a, s in
                                zip(table["median"], table["mean"], table["std"])])
    shown = shown[["depth", "k", "width", "params", "runs", "error"] +
                  (["flops"] if "flops" in table else [])]
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

    text = [f"# {title}", "", n0.line(), "",
            "Test error (%) per configuration: median (mean ± std) over seeds.", "",
            markdown_table(shown), ""]
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


def main(argv: list[str] | None = None) -> int:
    from orchestrator.tracking import TrackingError

    p = argparse.ArgumentParser(prog="python -m orchestrator.report",
                                description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--experiment", help="MLflow experiment (the study name)")
    source.add_argument("--from-csv", help="CSV with depth,k,width,params,seed,test_error (%)")
    p.add_argument("--tracking-uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    p.add_argument("--run-id", help="the study's parent run (default: the latest)")
    p.add_argument("--out", help="output folder (default report-<name>)")
    p.add_argument("--draws", type=int, default=2000,
                   help="random draws behind the 95%% intervals")
    p.add_argument("--pair-tolerance", type=float, default=0.1,
                   help="largest relative parameter gap within a pair")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if not args.experiment and not args.from_csv:
        p.error("give --experiment NAME (MLflow) or --from-csv FILE")
    if args.draws < 100:
        p.error(f"--draws {args.draws}: intervals need at least 100 draws (default 2000)")
    try:
        if args.from_csv:
            runs, histories, parent = read_csv(args.from_csv), None, None
            name = Path(args.from_csv).stem
        else:
            runs, histories, parent = runs_from_mlflow(args.tracking_uri, args.experiment,
                                                       args.run_id)
            name = args.experiment
        out = Path(args.out or f"report-{name}")
        if out.exists() and not out.is_dir():
            raise ReportError(f"--out {out} is a file; give a folder for the report")
        n0, path = build_report(runs, out, f"Deeper or wider: {name}", histories,
                                args.draws, args.pair_tolerance)
    except (ReportError, TrackingError, ValueError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    show(path, n0)
    if parent is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(args.tracking_uri).log_artifacts(parent, str(out), "report")
        print(f"report logged to run {parent}")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
