"""Does a faster setting train as well? Final test errors of the same runs under two settings,
same seeds, against the seed noise.

    python bench/precision_accuracy.py --data-dir DIR                      # CPU: a CIFAR subset
    python bench/precision_accuracy.py --data-dir DIR --device cuda --train-size 50000 \\
        --test-size 10000 --depth 20 --k 4 --variants fp32:none,auto:auto   # the GPU default

Each variant is PRECISION:COMPILE (`auto` resolves per device). Every (variant, seed) is one
`python -m orchestrator.train` run on real CIFAR-10; the table gives each run's final test error,
each variant's mean and seed standard deviation, and the difference of the means in units of its
standard error (|z| < 2: within seed noise).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def final_error(args, precision: str, compile_mode: str, seed: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "log.jsonl"
        subprocess.run([sys.executable, "-m", "orchestrator.train", "--data-dir", args.data_dir,
                        "--device", args.device, "--depth", str(args.depth), "--k", str(args.k),
                        "--epochs", str(args.epochs), "--train-size", str(args.train_size),
                        "--test-size", str(args.test_size), "--seed", str(seed),
                        "--precision", precision, "--compile", compile_mode,
                        "--log-json", str(log)], check=True, stdout=subprocess.DEVNULL)
        epochs = [json.loads(line) for line in log.open() if '"kind": "epoch"' in line]
        return epochs[-1]["test_error"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, default=14)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default="fp32:none,bf16:none")
    p.add_argument("--json", help="also write the errors here")
    args = p.parse_args()
    variants = args.variants.split(",")
    errors = {v: [] for v in variants}
    for seed in range(args.seeds):  # interleaved: a noisy machine affects every variant alike
        for v in variants:
            errors[v].append(final_error(args, *v.split(":"), seed))
            print(f"seed {seed} {v}: test error {100 * errors[v][-1]:.2f}%", flush=True)
    print(f"\nd{args.depth}-k{args.k}, {args.epochs} epochs, {args.train_size} train / "
          f"{args.test_size} test images, seeds 0..{args.seeds - 1}, {args.device}")
    for v, errs in errors.items():
        print(f"{v:<16} mean {100 * statistics.mean(errs):.2f}%  seed sd "
              f"{100 * statistics.stdev(errs):.2f}  runs {[round(100 * e, 2) for e in errs]}")
    a, b = (errors[v] for v in variants[:2])
    diffs = [y - x for x, y in zip(a, b)]  # paired by seed
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    print(f"{variants[1]} - {variants[0]}: {100 * statistics.mean(diffs):+.2f} points, paired "
          f"standard error {100 * se:.2f}, z = {statistics.mean(diffs) / se:+.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "errors": errors}, indent=1))


if __name__ == "__main__":
    main()
