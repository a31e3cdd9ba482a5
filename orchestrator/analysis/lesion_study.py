"""Lesion study: delete one block, or one function of a block, from a trained network at test time
and measure the test error of each deletion (Veit et al., 2016; the ensemble evidence of the
paper's Section III). The command is `python -m orchestrator.lesion`.

Deleting a block removes all of its residual functions and keeps its shortcut (and shared
pre-activation), so the data flow stays intact; in a downsampling block the shortcut is then the
only path, which is why those deletions hurt more.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from models.blocks import MultiResidualBlock  # noqa: E402
from models.multi_resnet import Architecture, MultiResNet, create_model  # noqa: E402
from orchestrator.analysis.report_builder import save_figure  # noqa: E402
from orchestrator.errors import CheckpointError, short  # noqa: E402
from orchestrator.run.checkpoint import load_checkpoint  # noqa: E402
from orchestrator.run.data import DATASETS, Batches, Split, load_dataset  # noqa: E402


def load_model(path: Path) -> tuple[MultiResNet, dict]:
    """The trained network of a checkpoint, and the run config it was trained with."""
    state = load_checkpoint(path)
    try:
        model = create_model(Architecture(**state["architecture"]))
        model.load_state_dict(state["model"])
    except (ValidationError, TypeError, RuntimeError) as exc:
        first_line = short((str(exc).strip().splitlines() or [""])[0], 200)
        raise CheckpointError(f"{path}: its model does not match its architecture "
                              f"({type(exc).__name__}: {first_line}); use an intact "
                              f"checkpoint") from None
    return model, state["config"]


def test_split(config: dict, data_dir: str | None, size: int | None,
               path, classes: int | None = None) -> tuple[Split, str]:
    """The test images the checkpoint was evaluated on (its dataset, subset and seed: synthetic
    data is generated from them), or the first `size` of them; and the dataset's name. An image
    folder must have the net's `classes` (a class folder added: other data)."""
    try:
        dataset, seed = str(config["dataset"]), int(config["seed"])
        train_size, test_size = config.get("train_size"), config.get("test_size")
        given, data_dir = data_dir, data_dir or config.get("data_dir")
        if not all(size is None or type(size) is int and size >= 1  # noqa: E721 (not bool)
                   for size in (train_size, test_size)) or \
                not isinstance(data_dir, (str, type(None))):
            raise ValueError("sizes")
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: its run config lacks the dataset or seed, or holds "
                              f"sizes or a data dir of the wrong kind; use a checkpoint written "
                              f"by orchestrator.train or a sweep") from None
    if given is None and data_dir is not None and not Path(data_dir).is_absolute() and \
            dataset in DATASETS and DATASETS[dataset].needs_files:
        raise CheckpointError(f"{path}: its data dir {short(repr(data_dir), 80)} is relative to "
                              f"the folder training ran in, not known here; pass --data-dir")
    _, test = load_dataset(dataset, data_dir, train_size, test_size, seed)
    found = len(getattr(test, "classes", ())) or None  # an image folder's class folders
    if None not in (found, classes) and found != classes:
        raise CheckpointError(f"{path}: {data_dir} has {found} class folders, the checkpoint's "
                              f"net {classes} classes: not the data it was trained on; pass "
                              f"--data-dir of that data")
    if size is not None and not 1 <= size <= len(test):
        raise CheckpointError(f"--test-size {size}: the checkpoint was tested on {len(test)} "
                              f"images; give 1 to {len(test)}")
    return test.subset(size), dataset


@torch.no_grad()
def test_error(model: MultiResNet, batches: Batches) -> float:
    model.eval()
    wrong = total = 0
    for x, y in batches.epoch(0):
        wrong += (model(x).argmax(1) != y).sum().item()
        total += len(y)
    return wrong / total


def _blocks(model: MultiResNet) -> dict[str, MultiResidualBlock]:
    return cast(dict[str, MultiResidualBlock], dict(model.blocks.items()))  # all it holds


def without(model: MultiResNet, block: str, function: str | None = None) -> MultiResNet:
    """A copy of `model` without one function of `block`, or without all of them."""
    lesioned = copy.deepcopy(model)
    functions = _blocks(lesioned)[block].functions
    for key in ([function] if function is not None else list(functions)):
        del functions[key]
    return lesioned


def lesion_study(model: MultiResNet, batches: Batches) -> pd.DataFrame:
    rows = [{"deleted": "nothing", "block": None, "function": None, "downsampling": False,
             "test_error": test_error(model, batches)}]
    for key, block in _blocks(model).items():
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
    save_figure(fig, path)
