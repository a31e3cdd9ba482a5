"""`python -m orchestrator.lesion CHECKPOINT`: delete one block, or one function of a block, from a
trained network at test time and report the test error of each deletion (Veit et al., 2016; the
ensemble evidence of the paper's Section III; `orchestrator.analysis.lesion_study`).

    python -m orchestrator.lesion results/study/train-xyz/checkpoint_.../checkpoint.pt --out lesion/

Heavy imports wait inside the functions, after the flags are read (commands/cli.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.commands.cli import add_common_flags, command, invoked_as
from orchestrator.storage import check_writable


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=invoked_as("lesion"),
                                description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("checkpoint", help="checkpoint.pt written by orchestrator.train or a sweep")
    p.add_argument("--data-dir", help="another copy of the checkpoint's dataset (default: the "
                   "checkpoint's data dir)")
    p.add_argument("--test-size", type=int, help="evaluate on the first N of the checkpoint's "
                   "test images")
    p.add_argument("--out", default="lesion", help="folder for lesion.csv and lesion.png")
    add_common_flags(p)
    return p


def lesion_command(args: argparse.Namespace) -> None:
    from orchestrator.analysis.lesion_study import lesion_study, load_model, plot, test_split
    from orchestrator.run.config import TrainConfig
    from orchestrator.run.data import DATASETS

    check_writable(args.out, "--out")  # before the lesion study, not after it
    model, config = load_model(Path(args.checkpoint))
    test, dataset = test_split(config, args.data_dir, args.test_size, args.checkpoint,
                               model.arch.num_classes)
    cfg = TrainConfig(**{**config, "dataset": dataset, "device": "cpu"})  # its recipe and size
    batches = DATASETS[dataset].batches(test, cfg, 500, "cpu", False, (0, 1))
    table = lesion_study(model, batches)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "lesion.csv", index=False)
    plot(table, out / "lesion.png")
    shown = table.assign(test_error=(100 * table.test_error).round(2))
    print(shown[["deleted", "downsampling", "test_error"]].to_string(index=False))
    print(f"written: {out / 'lesion.csv'}, {out / 'lesion.png'}")


main = command(parser, lesion_command, preload=("orchestrator.analysis.lesion_study",))


if __name__ == "__main__":
    sys.exit(main())
