"""Orchestration overhead: one trial under the sweep against the same training in
`python -m orchestrator.train`, both as fresh commands, run back to back.

    python bench/sweep_overhead.py [--epochs 3] [--repeats 2]

Reports wall time of each command, the trial's own time as Tune measured it, and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    run = dict(dataset="synthetic", train_size=4096, test_size=512, epochs=args.epochs,
               batch_size=128, device="cpu", architecture=dict(depth=14, k=2))
    rows = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "run.yaml").write_text(yaml.safe_dump(run))
            (tmp / "study.yaml").write_text(yaml.safe_dump({
                "name": "overhead", "train": run, "trials": 1,
                "resources": {"workers": 1, "cpus_per_worker": 1}}))
            # A 1-CPU Ray Train worker runs torch with one thread (OMP_NUM_THREADS=1): same here.
            train_s = timed([sys.executable, "-m", "orchestrator.train", "--config", "run.yaml"],
                            tmp, env={**os.environ, "OMP_NUM_THREADS": "1"})
            sweep_s = timed([sys.executable, "-m", "orchestrator.sweep", "study.yaml"], tmp)
            result = next((tmp / "results" / "overhead").glob("*/result.json"))
            trial_s = json.loads(result.read_text().splitlines()[-1])["time_total_s"]
        rows.append((train_s, sweep_s, trial_s))
        print(f"repeat {i + 1}: train {train_s:.1f} s, sweep {sweep_s:.1f} s "
              f"(trial {trial_s:.1f} s)", flush=True)
    train_s, sweep_s, trial_s = (statistics.median(c) for c in zip(*rows))
    print(f"median: orchestrator.train {train_s:.1f} s | orchestrator.sweep {sweep_s:.1f} s "
          f"({sweep_s / train_s:.2f}x) | trial inside the sweep {trial_s:.1f} s "
          f"({trial_s / train_s:.2f}x)")


if __name__ == "__main__":
    main()
