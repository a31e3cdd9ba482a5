"""`python -m orchestrator.lesion CHECKPOINT`: delete one block, or one function of a block, from a
trained network at test time and report the test error of each deletion (Veit et al., 2016; the
ensemble evidence of the paper's Section III).

    python -m orchestrator.lesion results/study/train-xyz/checkpoint_.../checkpoint.pt --out lesion/

Deleting a block removes all of its residual functions and keeps its shortcut (and shared
pre-activation), so the data flow stays intact; in a downsampling block the shortcut is then the
only path, which is why those deletions hurt more.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from models.multi_resnet import Architecture, MultiResNet, create_model  # noqa: E402
from orchestrator.data import Batches, DataError, load_dataset  # noqa: E402
from orchestrator.loop import CheckpointError, load_checkpoint  # noqa: E402


@torch.no_grad()
def test_error(model: MultiResNet, batches: Batches) -> float:
    model.eval()
    wrong = total = 0
    for x, y in batches.epoch(0):
        wrong += (model(x).argmax(1) != y).sum().item()
        total += len(y)
    return wrong / total


def without(model: MultiResNet, block: str, function: str | None = None) -> MultiResNet:
    """A copy of `model` without one function of `block`, or without all of them."""
    lesioned = copy.deepcopy(model)
    functions = lesioned.blocks[block].functions
    for key in ([function] if function is not None else list(functions)):
        del functions[key]
    return lesioned


def lesion_study(model: MultiResNet, batches: Batches) -> pd.DataFrame:
    rows = [{"deleted": "nothing", "block": None, "function": None, "downsampling": False,
             "test_error": test_error(model, batches)}]
    for key, block in model.blocks.items():
        downsampling = not isinstance(block.shortcut, torch.nn.Identity)
        rows.append({"deleted": f"block {key}", "block": int(key), "function": None,
                     "downsampling": downsampling,
                     "test_error": test_error(without(model, key), batches)})
        if len(block.functions) > 1:
            for f in block.functions:
                rows.append({"deleted": f"block {key} function {f}", "block": int(key),
                             "function": int(f), "downsampling": downsampling,
                             "test_error": test_error(without(model, key, f), batches)})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    full = table.test_error.iloc[0]
    blocks = table[table.function.isna() & table.block.notna()]
    functions = table[table.function.notna()]
    ax.axhline(100 * full, color="grey", lw=1, label="nothing deleted")
    ax.plot(blocks.block, 100 * blocks.test_error, "o-", label="one block deleted")
    if len(functions):
        ax.scatter(functions.block, 100 * functions.test_error, s=12, color="C1",
                   label="one function deleted")
    down = blocks[blocks.downsampling]
    ax.scatter(down.block, 100 * down.test_error, marker="x", color="C3", s=60,
               label="downsampling block")
    ax.set_xlabel("block")
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.lesion",
                                description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint.pt written by orchestrator.train or a sweep")
    p.add_argument("--dataset", help="default: the checkpoint's")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p.add_argument("--test-size", type=int, help="evaluate on the first N test images")
    p.add_argument("--out", default="lesion", help="folder for lesion.csv and lesion.png")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        state = load_checkpoint(Path(args.checkpoint))
        config = state.get("config", {})
        model = create_model(Architecture(**state["architecture"]))
        model.load_state_dict(state["model"])
        dataset = args.dataset or config.get("dataset", "cifar10")
        _, test = load_dataset(dataset, args.data_dir or config.get("data_dir"), 1,
                               args.test_size or config.get("test_size"))
        table = lesion_study(model, Batches(test, dataset, 500, "cpu", train=False))
    except (CheckpointError, DataError, KeyError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "lesion.csv", index=False)
    plot(table, out / "lesion.png")
    shown = table.assign(test_error=(100 * table.test_error).round(2))
    print(shown[["deleted", "downsampling", "test_error"]].to_string(index=False))
    print(f"written: {out / 'lesion.csv'}, {out / 'lesion.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
