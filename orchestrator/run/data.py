"""Datasets: CIFAR-10/100 from their standard python layouts, synthetic CIFAR-shaped data, and
image folders (a user's own, and ImageNet: orchestrator.run.images, which holds their loaders),
each an entry of `DATASETS` (datasets.py) naming its loader.

CIFAR is held whole as one uint8 tensor on the training device and augmented a whole epoch at a
time there, batches being slices (the airbench approach): normalise with the per-channel means and
stds of the original Torch code, random horizontal flip, 4-pixel zero pad and random 32x32 crop.
All randomness comes from a generator seeded by (seed, epoch), so an epoch's batches are a pure
function of the seed: a resumed run sees the same data, and every rank of a data-parallel replica
sees the same batch.
"""
from __future__ import annotations

import hashlib
import io
import logging
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from orchestrator.errors import DataError, short
from orchestrator.storage import check_regular
from orchestrator.run.batches import check_split, share, share_size
from orchestrator.run.datasets import DATASETS

log = logging.getLogger(__name__)

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
# md5 sums of the official python-version files; other copies load with a warning.
OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}
# The largest official file is CIFAR-100's train (about 155 MB); a bigger one is not a batch.
MAX_BATCH_BYTES = 512 << 20


@dataclass
class Split:
    images: torch.Tensor  # uint8, (N, 3, 32, 32)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, size: int | None) -> "Split":
        if size is None or size >= len(self):
            return self
        return Split(self.images[:size], self.labels[:size])


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles: allow only the numpy types they contain, never code."""

    # An empty array's buffer is pickled (protocol 2) as a call of bytes().
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("__builtin__", "bytes"), ("builtins", "bytes")} | {
        (f"numpy{core}.{mod}", fn) for core in (".core", "._core")
        for mod, fn in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Images, labels, and whether the file is the official release (by md5)."""
    check_regular(path, error=DataError, limit=MAX_BATCH_BYTES,
                  fix="delete it and download again, or replace it with an intact copy")
    raw = path.read_bytes()
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
        # Keys are str in the official (Python 2) files read with latin1, bytes in some copies.
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        pixels, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
        # Cast as they are, floats or values past a byte would silently become other images.
        for what, values, high in (("pixel values", pixels, 255), ("labels", labels, None)):
            if values.size and (values.dtype.kind not in "iu" or values.min() < 0 or
                                high is not None and values.max() > high):
                raise DataError(f"{path}: {what} of {values.dtype} from {values.min()} to "
                                f"{values.max()}, not whole numbers from 0"
                                f"{f' to {high}' if high else ''}; replace the file")
        data = pixels.astype(np.uint8).reshape(-1, 3, 32, 32)
        labels = labels.astype(np.int64).reshape(-1)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path} is not a readable CIFAR batch ({short(str(exc), 200)}); delete "
                        f"it and download again, or replace it with an intact copy") from None
    if len(data) != len(labels):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels; replace the file")
    if not len(data):
        raise DataError(f"{path} holds no images; delete it and download again, or replace it "
                        f"with an intact copy")
    return data, labels, hashlib.md5(raw).hexdigest() == OFFICIAL_MD5.get(path.name)


def _download(name: str, data_dir: Path) -> None:
    # Here only: torchvision imports torch's compiler (seconds in every process that loads this
    # module, a Ray Train worker on synthetic data among them).
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    created = [p for p in (data_dir, *data_dir.parents) if not p.exists()]  # deepest first
    try:
        cls(str(data_dir), train=True, download=True)
    except Exception as exc:
        for path in created:  # leave no folder behind that only the failed download made
            shutil.rmtree(path, ignore_errors=True)
        folder = data_dir / LAYOUT[name][0]
        raise DataError(
            f"{name} is not in {folder} and could not be downloaded ({type(exc).__name__}); "
            f"put the python-version files ({LAYOUT[name][0]}/ from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html) under {data_dir}, or pass --data-dir "
            f"pointing at the folder that contains {LAYOUT[name][0]}/") from None


def load_cifar(name: str, data_dir: str | Path, download: bool = True) -> tuple[Split, Split]:
    """(train, test) of CIFAR-10 or CIFAR-100 from `data_dir/<standard folder>/`."""
    folder_name, train_files, test_files, label_key = LAYOUT[name]
    classes = DATASETS[name].classes
    assert classes is not None, "the CIFAR entries name their classes"
    data_dir = Path(data_dir).expanduser().resolve()
    folder = data_dir / folder_name
    if not folder.is_dir():
        if not download:
            raise DataError(f"{name} not found: expected {folder}/ (the python-version files)")
        _download(name, data_dir)
    splits, unofficial = [], []
    for files in (train_files, test_files):
        missing = [f for f in files if not (folder / f).exists()]  # else checked when read
        if missing:
            raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}; "
                            f"download {name} again into {data_dir}")
        parts = [_read_batch(folder / f, label_key) for f in files]
        for f, (_, batch_labels, _) in zip(files, parts):
            if len(batch_labels) and not 0 <= batch_labels.min() <= batch_labels.max() < classes:
                raise DataError(f"{folder / f}: labels from {batch_labels.min()} to "
                                f"{batch_labels.max()}, not 0..{classes - 1}; "
                                f"download {name} again into {data_dir}")
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        splits.append(Split(images, labels))
        unofficial += [f for f, p in zip(files, parts) if not p[2]]
    if unofficial:
        log.warning(f"{folder}: {', '.join(unofficial)} differ from the official release (md5); "
                    f"errors may not match published numbers")
    return splits[0], splits[1]


def synthetic_cifar(train_size: int = 2048, test_size: int = 512, num_classes: int = 10,
                    seed: int = 0) -> tuple[Split, Split]:
    """CIFAR-shaped data that a small net can learn: each class is a fixed smooth pattern plus
    noise, so tests can check that training lowers the loss."""
    g = torch.Generator().manual_seed(seed)
    # Smooth per-class colour patterns (a 4x4 grid upsampled): visible after global pooling.
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g) * 255
    templates = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")

    def make(n: int, stream: int) -> Split:  # one generator per split: sizes do not interact
        gs = torch.Generator().manual_seed(seed * 1_000_003 + stream)
        labels = torch.randint(0, num_classes, (n,), generator=gs)
        noise = torch.randint(0, 256, (n, 3, 32, 32), generator=gs).float()
        images = (0.5 * templates[labels] + 0.5 * noise).round().clamp(0, 255).to(torch.uint8)
        return Split(images, labels)

    return make(train_size, 1), make(test_size, 2)


def _cifar(name: str, data_dir: Path | None) -> tuple[Split, Split]:
    if data_dir is None:
        raise DataError(f"{name} needs a data dir: pass --data-dir DIR")
    return load_cifar(name, data_dir)


# The loaders that `DATASETS` (datasets.py) names: (data_dir, train_size, test_size, seed).
def load_cifar10(data_dir, train_size, test_size, seed) -> tuple[Split, Split]:
    return _cifar("cifar10", data_dir)


def load_cifar100(data_dir, train_size, test_size, seed) -> tuple[Split, Split]:
    return _cifar("cifar100", data_dir)


def load_synthetic(data_dir, train_size, test_size, seed) -> tuple[Split, Split]:
    return synthetic_cifar(train_size or 2048, test_size or 512, seed=seed)


# The batchers that `DATASETS` names: (split, cfg, batch_size, device, train, shard), cfg a
# resolved `TrainConfig`, shard (replica index, replicas) -> `EpochBatches` (batches.py).
def held_batches(split: Split, cfg, batch_size: int, device: torch.device | str, train: bool,
                 shard: tuple[int, int]) -> Batches:
    return Batches(split, cfg.dataset, batch_size, device, train, seed=cfg.seed, shard=shard,
                   channels_last=cfg.channels_last)


def load_dataset(name: str, data_dir: str | Path | None, train_size: int | None = None,
                 test_size: int | None = None, seed: int = 0) -> tuple[Split, Split]:
    """Train and test splits of a `DATASETS` entry, optionally the first N of each."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    train, test = DATASETS[name].load(data_dir, train_size, test_size, seed)
    for key, size, split in (("train_size", train_size, train), ("test_size", test_size, test)):
        if size is not None and size > len(split):  # never cut to what is there in silence
            raise DataError(f"{key} {size:,} is more than the {len(split):,} images {name} has "
                            f"there; lower {key} to at most {len(split):,} or leave it out")
    return train.subset(train_size), test.subset(test_size)


class Batches:
    """Batches of one split held whole as tensors (CIFAR, synthetic data): an `EpochBatches`,
    normalised and (for training) augmented on `device`.

    The split lives on the device in the net's memory layout. A training epoch's order, flips and
    crops are drawn at its start (from a generator seeded by (seed, epoch)) and applied, with the
    normalisation, to the whole epoch at once, so every batch is a slice and nothing waits for
    the host until the loop reads a loss (the airbench / hlb-CIFAR10 way); the split itself stays
    uint8 (a quarter of the memory of a normalised copy, for no measurable cost per epoch).
    `shard=(index, count)` gives one data-parallel replica its `share` of every global batch.
    Evaluation batches are slices of a normalised test tensor; `padded_epoch` gives any
    replica's share (the split is all here).
    """

    skipped = None  # decoded already: no file to skip

    def __init__(self, split: Split, dataset: str, batch_size: int, device: torch.device | str,
                 train: bool, seed: int = 0, shard: tuple[int, int] = (0, 1),
                 channels_last: bool = False):
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.device = torch.device(device)
        self.shard_index, self.shard_count = shard
        if train:
            check_split(batch_size, self.shard_count)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        mean, std = DATASETS[dataset].normalization
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.labels = split.labels.to(self.device)
        if train:
            # uint8 on the device (a quarter of float32); each epoch normalises what it draws.
            self.images = split.images.to(self.device).contiguous(
                memory_format=self.memory_format)
            return
        # Evaluation: normalised once.
        self.images = torch.empty(split.images.shape, device=self.device,
                                  memory_format=self.memory_format)
        chunk = CHUNK.get(self.device.type, CHUNK["cuda"])
        for start in range(0, len(split), chunk):  # bounded temporary float copies
            part = split.images[start:start + chunk].to(self.device)
            self.images[start:start + len(part)] = self.normalise(part)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def draw(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Epoch `epoch`'s order, flips and crop offsets (in the padded image) of every image,
        on the host: a pure function of (seed, epoch)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.split)
        order = torch.randperm(n, generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        shifts = torch.randint(0, 9, (n, 2), generator=g)
        return order, flips, shifts

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            for step in range(start_step, len(self)):
                mine = self.positions(step)
                yield self.images[mine.start:mine.stop], self.labels[mine.start:mine.stop]
            return
        steps = len(self) - start_step
        if steps <= 0:
            return
        order, flips, shifts = self.draw(epoch)
        # This replica's share of every global batch from start_step on, in step order.
        mine = self.positions(0)
        idx = order[start_step * self.batch_size:len(self) * self.batch_size]
        idx = idx.view(steps, self.batch_size)[:, mine.start:mine.stop].reshape(-1)
        # One asynchronous host-to-device copy of each per epoch.
        dev_idx, dev_flips, dev_shifts = (
            t.to(self.device, non_blocking=True)
            for t in _pinned(idx, flips[idx], shifts[idx], device=self.device))
        x = torch.empty((len(idx), *self.images.shape[1:]), device=self.device,
                        memory_format=self.memory_format)
        chunk = CHUNK.get(self.device.type, CHUNK["cuda"])
        for start in range(0, len(idx), chunk):  # bounded temporary copies
            end = start + chunk
            x[start:end] = augment(self.normalise(self.images[dev_idx[start:end]]),
                                   dev_flips[start:end], dev_shifts[start:end])
        y = self.labels[dev_idx]
        per = len(mine)
        for step in range(steps):
            yield x[step * per:(step + 1) * per], y[step * per:(step + 1) * per]

    def positions(self, step: int, shard: tuple[int, int] | None = None) -> range:
        """The positions (in the epoch's order) of a replica's share of batch `step`: this
        replica's, or `shard`'s."""
        index, count = shard or (self.shard_index, self.shard_count)
        start = step * self.batch_size
        return share(start, len(self.split), self.batch_size, index, count)

    def padded_epoch(self, shard: tuple[int, int] = (0, 1)
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Evaluation batches of one fixed size: (images, labels, how many are real) of replica
        `shard[0]` of `shard[1]`, each its `share` of every batch, padded."""
        per = share_size(self.batch_size, shard[1])
        for step in range(len(self)):
            mine = self.positions(step, shard)
            x, y = self.images[mine.start:mine.stop], self.labels[mine.start:mine.stop]
            yield *pad_share(x, y, per, self.memory_format), len(mine)


def pad_share(x: torch.Tensor, y: torch.Tensor, rows: int, memory_format: torch.memory_format
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A replica's share of an evaluation batch padded to `rows` images (zeros, label 0): the
    fixed shapes of evaluation steps (pipeline stages keep the shapes of their first step)."""
    if len(y) == rows:
        return x, y
    x = torch.cat([x, x.new_zeros((rows - len(y), *x.shape[1:]))]).contiguous(
        memory_format=memory_format)
    return x, torch.cat([y, y.new_zeros(rows - len(y))])


# Images normalised and augmented per chunk: bounds the temporary copies on a GPU, and keeps
# them in the caches of a CPU (256 images: 2x faster there than 8192; bench/RESULTS.md).
CHUNK = {"cpu": 256, "cuda": 8192}


def _pinned(*tensors: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Page-locked copies for an asynchronous copy to a GPU; unchanged for a CPU."""
    if device.type != "cuda":
        return tensors
    return tuple(t.pin_memory() for t in tensors)


def augment(x: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Flip where `flip`, then zero-pad by `pad` and crop back at offsets `shift` (rows, cols).
    Pure data movement (a select and two gathers along rows and columns), so it is exact."""
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (shift[:, 0:1] + torch.arange(h, device=x.device))[:, None, :, None]  # (n,1,h,1)
    x = padded.gather(2, rows.expand(n, c, h, w + 2 * pad))
    cols = (shift[:, 1:2] + torch.arange(w, device=x.device))[:, None, None, :]  # (n,1,1,w)
    return x.gather(3, cols.expand(n, c, h, w))
