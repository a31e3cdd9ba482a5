"""Image folders written for tests: ImageNet-like JPEGs (and a few PNG, grayscale and CMYK files),
or CIFAR-10 written out as PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Each class is a flat colour plus noise: the class is readable back from an image's mean.
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200))


def write_image_folder(root: Path, classes: int = 3, train: int = 12, val: int = 4,
                       size: tuple[int, int] = (96, 80), seed: int = 0, noise: int = 30,
                       exact_size: bool = False) -> Path:
    """`root/train/cXX/` and `root/val/cXX/`, `train`/`val` images per class, sizes around
    `size` (exactly `size` with `exact_size`), mostly RGB JPEG (quality 90); every 5th a PNG, every
    4th a CMYK JPEG, every 7th (with at most three classes, whose luminances differ) a grayscale
    JPEG."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = size if exact_size else (int(size[0] * rng.uniform(0.8, 1.2)),
                                                int(size[1] * rng.uniform(0.8, 1.2)))
                pixels = np.asarray(COLOURS[c % len(COLOURS)]) + rng.integers(
                    -noise, noise + 1, (h, w, 3))
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                if i % 5 == 4:
                    image.save(folder / f"{i}.png")
                elif i % 4 == 3:
                    image.convert("CMYK").save(folder / f"{i}.jpg", quality=90)
                elif i % 7 == 6 and classes <= 3:  # three classes stay apart in luminance
                    image.convert("L").save(folder / f"{i}.JPEG", quality=90)
                else:
                    image.save(folder / f"{i}.JPEG", quality=90)
    return root


def write_cifar_as_png(cifar_dir: Path, root: Path, train: int, test: int) -> Path:
    """The first `train` training and `test` test images of CIFAR-10 (python layout) as an image
    folder of PNG files, one folder per class (named by index, so sorting keeps the labels)."""
    from orchestrator.run.data import load_cifar

    splits = load_cifar("cifar10", cifar_dir)
    for split, data, count in zip(("train", "val"), splits, (train, test)):
        for i in range(count):
            folder = root / split / f"{int(data.labels[i]):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return root
