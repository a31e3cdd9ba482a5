"""`python -m orchestrator.report`: deeper or wider? n0 and its uncertainty, tables and figures.

    python -m orchestrator.report --experiment paper_table2          # from MLflow (the default)
    python -m orchestrator.report --from-csv published.csv           # depth,k,width,params,seed,test_error

Writes report.md and PNG figures to --out (default report-<name>/), prints the tables and n0 on a
line of its own, and, from MLflow, logs the report to the study's parent run.
Heavy imports wait inside the functions, after the flags are read (commands/cli.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.commands.cli import add_common_flags, command, invoked_as
from orchestrator.errors import ConfigError
from orchestrator.storage import check_writable


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=invoked_as("report"),
                                description=__doc__.split("\n")[0].split(": ", 1)[1])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--experiment", help="MLflow experiment (the study name)")
    source.add_argument("--from-csv", help="CSV with depth,k,width,params,seed,test_error (%%)")
    p.add_argument("--tracking-uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    p.add_argument("--run-id", help="the study's parent run (default: the latest)")
    p.add_argument("--out", help="output folder (default report-<name>)")
    p.add_argument("--draws", type=int, default=2000,
                   help="random draws behind the 95%% intervals")
    p.add_argument("--pair-tolerance", type=float, default=0.1,
                   help="largest relative parameter gap within a pair")
    add_common_flags(p)
    return p


def report_command(args: argparse.Namespace) -> None:
    from orchestrator.analysis.report_builder import build_report, show

    if not args.experiment and not args.from_csv:
        raise ConfigError("give --experiment NAME (MLflow) or --from-csv FILE")
    if not 100 <= args.draws <= 1_000_000:
        raise ConfigError(f"--draws {args.draws}: intervals need 100 to 1,000,000 draws "
                          f"(default 2000)")
    if not 0 < args.pair_tolerance < 1:
        raise ConfigError(f"--pair-tolerance {args.pair_tolerance:g}: a relative parameter gap "
                          f"above 0 and below 1 (default 0.1)")
    name = Path(args.from_csv).stem if args.from_csv else args.experiment
    out = Path(args.out or f"report-{name}")
    check_writable(out, "--out")  # before anything is read or computed
    if args.from_csv:
        from orchestrator.analysis.n0 import read_csv

        runs, histories, parent = read_csv(args.from_csv), None, None
    else:
        from orchestrator.study.tracking import finished_trials

        runs, histories, parent = finished_trials(args.tracking_uri, args.experiment,
                                                  args.run_id)
    n0, path = build_report(runs, out, f"Deeper or wider: {name}", histories, args.draws,
                            args.pair_tolerance)
    show(path, n0)
    if parent is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(args.tracking_uri).log_artifacts(parent, str(out), "report")
        print(f"report logged to run {parent}")
    print(f"report: {path}")


main = command(parser, report_command,
               preload=lambda args: ["orchestrator.analysis.report_builder"] + (
                   [] if args.from_csv else ["orchestrator.study.tracking"]))


if __name__ == "__main__":
    sys.exit(main())
