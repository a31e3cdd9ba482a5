"""The dataset registry: one `DATASETS` entry per dataset a run can train on (adding a dataset is
one entry: classes, normalisation, the architecture family its nets are built for, and its loader).

No torch here, so that run and study files are validated without loading it: loaders are named
as "module:function" and imported when a run first reads data (data.py for CIFAR and synthetic
data, images.py for image folders)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

IMAGENET_CLASSES = 1000
# fb.resnet.torch (datasets/imagenet.lua), which the paper's ImageNet code followed.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _resolve(name: str) -> Callable:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Dataset:
    """One dataset a run can train on."""
    classes: int | None  # None: as many as the data has (an image folder's class folders)
    normalization: tuple[tuple[float, ...], tuple[float, ...]]  # per-channel mean, std (0-255)
    architecture: str   # the family its nets are built for (stem, head): Architecture.dataset
    # "module:function", (data_dir, train_size, test_size, seed) -> (train, test) `Split`s; may
    # download where allowed
    loader: str
    train_images: int  # in the whole training split (for cost estimates; 0: count the folder)
    needs_files: bool = True  # read from data_dir (checked, and fetched, before a study starts)
    # "module:function" building a split's batches, (split, cfg, batch_size, device, train,
    # shard) -> an `EpochBatches` (batches.py): the one way every dataset's batches are made.
    batcher: str = "orchestrator.run.data:held_batches"  # held whole as tensors on the device
    # Read as image files every epoch (a recipe's augmentation and `decode` apply); else held
    # decoded.
    image_files: bool = False
    any_architecture: bool = False  # the user may pick the net family (default: `architecture`)

    @property
    def load(self) -> Callable:
        return _resolve(self.loader)

    @property
    def batches(self) -> Callable:
        return _resolve(self.batcher)


# Means and stds of fb.resnet.torch's CIFAR loaders, which the paper's code used.
DATASETS: dict[str, Dataset] = {
    "cifar10": Dataset(10, ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)), "cifar10",
                       "orchestrator.run.data:load_cifar10", 50_000),
    "cifar100": Dataset(100, ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)), "cifar100",
                        "orchestrator.run.data:load_cifar100", 50_000),
    "synthetic": Dataset(10, ((127.5, 127.5, 127.5), (64.0, 64.0, 64.0)), "cifar10",
                         "orchestrator.run.data:load_synthetic", 2048, needs_files=False),
    # Image folders; the normalisation follows the recipe (see FOLDER_NORMALIZATION).
    "imagefolder": Dataset(None, (IMAGENET_MEAN, IMAGENET_STD), "imagenet",
                           "orchestrator.run.images:load_image_folder", 0,
                           batcher="orchestrator.run.images:image_folder_batches",
                           image_files=True, any_architecture=True),
    "imagenet": Dataset(IMAGENET_CLASSES, (IMAGENET_MEAN, IMAGENET_STD), "imagenet",
                        "orchestrator.run.images:load_imagenet", 1_281_167,
                        batcher="orchestrator.run.images:image_folder_batches",
                        image_files=True),
}
# An image folder trained with the CIFAR recipe is normalised as CIFAR-10 is.
FOLDER_NORMALIZATION = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                        "cifar": DATASETS["cifar10"].normalization}
