"""`python -m orchestrator.sweep STUDY.yaml`: a study as Ray Tune trials of Ray Train runs.

    python -m orchestrator.sweep search_spaces/smoke.yaml
    python -m orchestrator.sweep search_spaces/depth_vs_k.yaml --dry-run
    python -m orchestrator.sweep search_spaces/cifar_cpu.yaml --set trials=4 --data-dir ./data

The study machinery is `orchestrator.study` (sweep.py runs it). Running the same command again
after Ctrl-C (or with --resume) continues the study.
Heavy imports wait inside the functions, after the flags are read (commands/cli.py).
"""
from __future__ import annotations

import argparse
import sys

from orchestrator.commands.cli import add_common_flags, command, invoked_as
from orchestrator.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=invoked_as("sweep"),
                                description="Run a study: Ray Tune + Optuna over Ray Train trials, "
                                            "tracked in MLflow.")
    p.add_argument("study", help="study file (search_spaces/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key, dotted (e.g. --set train.epochs=3)")
    p.add_argument("--data-dir", help="same as --set train.data_dir=DIR")
    p.add_argument("--tracking-uri", help="same as --set mlflow.tracking_uri=URI")
    p.add_argument("--storage-path", help="same as --set storage_path=DIR")
    p.add_argument("--dry-run", action="store_true", help="print the first trials, train nothing")
    p.add_argument("--dry-run-trials", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue the study (the default when "
                   "its results folder exists); fail if there is nothing to resume")
    p.add_argument("--trust-results", action="store_true", help="sign the state Ray left in "
                   "the results folder before resuming (a folder from before signing, or from "
                   "another machine's key); only for a folder nobody else can write")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output (its logs, "
                   "Tune's tables, the workers' lines) instead of writing it to ray.log in the "
                   "results folder")
    add_common_flags(p)
    return p


def load_checked_study(args: argparse.Namespace) -> tuple[str, ...]:
    """The study, loaded and validated before torch, Ray and MLflow load (its schema imports
    none of them), so that bad input is answered at once; then the modules the command needs."""
    from orchestrator.study.config import load_study

    overrides = list(args.set)
    for flag, key in (("data_dir", "train.data_dir"), ("tracking_uri", "mlflow.tracking_uri"),
                      ("storage_path", "storage_path")):
        if getattr(args, flag):
            overrides.append(f"{key}={getattr(args, flag)}")
    if not 1 <= args.dry_run_trials <= 1000:
        raise ConfigError(f"--dry-run-trials {args.dry_run_trials}: give 1 to 1000")
    args.loaded_study = load_study(args.study, overrides)
    return DRY_RUN_MODULES if args.dry_run else SWEEP_MODULES


DRY_RUN_MODULES = ("orchestrator.study.preview",)
SWEEP_MODULES = ("orchestrator.study.runner",)  # and what it imports


def sweep_command(args: argparse.Namespace) -> int:
    study = args.loaded_study
    if args.dry_run:
        from orchestrator.study.preview import dry_run

        dry_run(study, args.dry_run_trials)
        return 0
    from orchestrator.study.runner import run

    return run(study, args.study, args.resume, args.verbose, args.trust_results)


main = command(parser, sweep_command,
               interrupted="interrupted; run the same command again to resume",
               preload=load_checked_study)


if __name__ == "__main__":
    sys.exit(main())
