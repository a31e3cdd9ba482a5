"""The smoke study run N times in a row, each a fresh command with its own local Ray, on a
machine kept busy by CPU burners: how many of its trials each run trained, and whether a run
that lost some said so (exit status and the trials it names).

    python bench/smoke_under_load.py [--runs 20] [--burners 2]

A run passes when it trains every planned trial, or exits non-zero naming the missing ones;
a run that exits 0 with fewer trials trained is a silent loss (the script then exits 1).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "search_spaces" / "smoke.yaml"
PLANNED = 4  # the smoke study's trials
MISSING = re.compile(r"error: (\d+) of (\d+) trials did not train \(([^)]*)\)")


def burners(count: int) -> list[subprocess.Popen]:
    """Processes that keep `count` cores busy, each in a process group of its own."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(count)]


def trained_trials(uri: str) -> int:
    """The study's trials that trained: their MLflow runs finished, or were ended by the trial
    scheduler (ASHA) after an epoch (KILLED, tagged stopped_early)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("smoke")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id])
    return sum(1 for r in runs if "mlflow.parentRunId" in r.data.tags
               and (r.info.status == "FINISHED" or "stopped_early" in r.data.tags))


def one_run(folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.sweep", str(SMOKE),
                           "--storage-path", str(folder / "results"), "--tracking-uri", uri],
                          cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    named = MISSING.search(done.stderr)
    return {"exit": done.returncode, "trained": trained_trials(uri), "seconds": seconds,
            "named": named.group(3) if named else "",
            "last_error": next((line for line in reversed(done.stderr.splitlines())
                                if "error" in line), "")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 2,
                        help="busy processes beside the study (default: one per core)")
    args = parser.parse_args()
    busy = burners(args.burners)
    silent = 0
    try:
        with tempfile.TemporaryDirectory(prefix="multires-load-") as tmp:
            print(f"{args.runs} runs of {SMOKE.name}, {args.burners} CPU burners, "
                  f"{os.cpu_count()} cores")
            for i in range(args.runs):
                row = one_run(Path(tmp, f"run-{i}"))
                lost = row["exit"] == 0 and row["trained"] < PLANNED
                silent += lost
                print(f"run {i + 1}: exit {row['exit']}, trained {row['trained']} of {PLANNED}, "
                      f"{row['seconds']:.0f} s" + (f", named missing: {row['named']}"
                                                   if row["named"] else "")
                      + (" SILENT LOSS" if lost else "")
                      + (f" ({row['last_error'][:200]})" if row["exit"] and not row["named"]
                         else ""), flush=True)
    finally:
        for proc in busy:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"silent losses: {silent} of {args.runs} runs")
    return 1 if silent else 0


if __name__ == "__main__":
    sys.exit(main())
