"""Data: the standard CIFAR layouts, clear errors, and the batched augmentation."""
import os
import pickle

import pytest
import torch

from orchestrator.errors import DataError
from orchestrator.run import data
from orchestrator.run.data import Batches, Split, augment, load_cifar, load_dataset
from tests.conftest import write_cifar_layout


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_reads_the_standard_layout(tmp_path, name, classes, caplog):
    folder = write_cifar_layout(tmp_path, name, train=250, test=60)
    train, test = load_cifar(name, tmp_path)
    assert "differ from the official release" in caplog.text
    assert train.images.shape == (250, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.labels.shape == (60,) and int(train.labels.max()) < classes
    # Pixels keep the R|G|B plane order of the files.
    first = next(folder.glob("data_batch_1" if name == "cifar10" else "train"))
    raw = pickle.loads(first.read_bytes(), encoding="bytes")[b"data"][0]
    assert torch.equal(train.images[0].flatten(), torch.from_numpy(raw))


def test_missing_data_offline_says_where_to_put_it(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*could not be downloaded.*put the"):
        load_cifar("cifar10", tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    folder = write_cifar_layout(tmp_path, "cifar10")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_cifar("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR batch"):
        load_cifar("cifar10", tmp_path)


def test_pickles_cannot_run_code(tmp_path):
    folder = write_cifar_layout(tmp_path, "cifar10")

    marker = tmp_path / "owned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": Exploit(), "labels": []}))
    with pytest.raises(DataError, match=r"unexpected object (posix|nt|os)\.system"):
        load_cifar("cifar10", tmp_path)
    assert not marker.exists()


def test_real_cifar10(cifar10_dir):
    train, test = load_dataset("cifar10", cifar10_dir)
    assert len(train) == 50_000 and len(test) == 10_000
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    batches = Batches(train.subset(5000), "cifar10", 500, "cpu", train=False)
    x = torch.cat([b for b, _ in batches.epoch(0)])
    # Normalised with the original code's statistics: about zero mean and unit std per channel.
    assert x.mean((0, 2, 3)).abs().max() < 0.05
    assert (x.std((0, 2, 3)) - 1).abs().max() < 0.05


def reference_augment(image: torch.Tensor, flip: bool, dy: int, dx: int) -> torch.Tensor:
    if flip:
        image = image.flip(2)
    padded = torch.zeros(image.shape[0], 40, 40)
    padded[:, 4:36, 4:36] = image
    return padded[:, dy:dy + 32, dx:dx + 32]


def test_batched_augmentation_matches_per_image_reference():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    flip = torch.rand(16) < 0.5
    shift = torch.randint(0, 9, (16, 2))
    out = augment(x, flip, shift)
    for i in range(16):
        expected = reference_augment(x[i], bool(flip[i]), int(shift[i, 0]), int(shift[i, 1]))
        assert torch.equal(out[i], expected)


def small_split(n: int = 96) -> Split:
    g = torch.Generator().manual_seed(3)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                 torch.arange(n))


def test_epochs_are_seeded_and_cover_the_data():
    split = small_split()
    a = Batches(split, "cifar10", 32, "cpu", train=True, seed=5)
    b = Batches(split, "cifar10", 32, "cpu", train=True, seed=5)
    c = Batches(split, "cifar10", 32, "cpu", train=True, seed=6)
    ea, eb, ec = list(a.epoch(0)), list(b.epoch(0)), list(c.epoch(0))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(ea, eb))
    assert not torch.equal(ea[0][1], ec[0][1])
    assert sorted(torch.cat([y for _, y in ea]).tolist()) == list(range(96))
    assert not torch.equal(torch.cat([y for _, y in a.epoch(1)]), torch.cat([y for _, y in ea]))
    # The augmentation is not the identity: some images are flipped or moved.
    plain = Batches(split, "cifar10", 96, "cpu", train=False)
    normalised = next(iter(plain.epoch(0)))[0]
    x0, y0 = ea[0]
    assert not torch.equal(x0, normalised[y0])


def test_shards_split_every_global_batch():
    split = small_split()
    whole = list(Batches(split, "cifar10", 32, "cpu", train=True, seed=1).epoch(2))
    shards = [list(Batches(split, "cifar10", 32, "cpu", train=True, seed=1,
                           shard=(i, 2)).epoch(2)) for i in range(2)]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([shards[0][step][0], shards[1][step][0]]), x)
        assert torch.equal(torch.cat([shards[0][step][1], shards[1][step][1]]), y)


def test_synthetic_data_is_deterministic_and_sized():
    a, _ = data.synthetic_cifar(64, 16, seed=1)
    b, _ = data.synthetic_cifar(64, 16, seed=1)
    assert torch.equal(a.images, b.images) and a.images.shape == (64, 3, 32, 32)
    train, test = load_dataset("synthetic", None, train_size=40, test_size=8)
    assert len(train) == 40 and len(test) == 8


def test_the_dataset_registry_is_the_one_list_of_datasets():
    """The run schema's dataset choices come from the registry, and each entry's family
    builds nets with its number of classes."""
    from typing import get_args

    from models.multi_resnet import Architecture
    from orchestrator.run.config import TrainConfig
    from orchestrator.run.data import DATASETS

    assert set(get_args(TrainConfig.model_fields["dataset"].annotation)) == set(DATASETS)
    for name, entry in DATASETS.items():
        depth = 18 if entry.architecture == "imagenet" else 8
        cfg = TrainConfig(dataset=name, architecture=dict(depth=depth))
        assert cfg.architecture.dataset == entry.architecture
        if entry.classes is not None:  # else: an image folder's, counted when it is read
            assert cfg.architecture.num_classes == entry.classes
            assert Architecture(depth=depth, dataset=entry.architecture).num_classes == \
                entry.classes



class LegacyBatches:
    """The loader before the device-resident epoch (batch by batch, indices copied per batch),
    kept verbatim as the reference the new one must reproduce bit for bit."""

    def __init__(self, split, dataset, batch_size, device, train, seed=0, shard=(0, 1),
                 channels_last=False):
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.device = torch.device(device)
        self.shard_index, self.shard_count = shard
        mean, std = data.DATASETS[dataset].normalization
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self):
        n = len(self.split)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def epoch(self, epoch, start_step=0):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.split)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        if self.train:
            flips = torch.rand(n, generator=g) < 0.5
            shifts = torch.randint(0, 9, (n, 2), generator=g)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            per = len(idx) // self.shard_count if self.train else len(idx)
            if self.train:
                idx = idx[self.shard_index * per:(self.shard_index + 1) * per]
            dev_idx = idx.to(self.device)
            x = (self.images[dev_idx].float() - self.mean) / self.std
            if self.train:
                x = reference_augment_batch(x, flips[idx].to(self.device),
                                            shifts[idx].to(self.device))
            yield x.contiguous(memory_format=self.memory_format), self.labels[dev_idx]


def reference_augment_batch(x, flip, shift, pad=4):
    """The batched augmentation before the gathers (one advanced index over all four dims)."""
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (shift[:, 0:1] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (shift[:, 1:2] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed, epoch, n, batch, shards, channels_last", [
    (0, 0, 200, 32, 1, True),     # 6 whole batches, 8 images dropped
    (3, 1, 200, 32, 2, False),    # two data-parallel replicas
    (7, 4, 193, 48, 4, True),     # four replicas, odd split size
    (11, 2, 96, 32, 1, False),
])
def test_device_epoch_batches_equal_the_per_batch_loader(device, seed, epoch, n, batch, shards,
                                                         channels_last, monkeypatch):
    """Every batch of every replica, and from a mid-epoch step, bit-identical to the loader that
    drew and copied each batch separately; in the net's memory layout."""
    monkeypatch.setattr(data, "CHUNK", {"cpu": 40, "cuda": 40})  # chunks cut mid-batch
    split = small_split(n)
    for shard in range(shards):
        kw = dict(seed=seed, shard=(shard, shards), channels_last=channels_last)
        new = Batches(split, "cifar10", batch, device, train=True, **kw)
        old = LegacyBatches(split, "cifar10", batch, device, train=True, **kw)
        assert len(new) == len(old) == n // batch
        for start in (0, 2):
            got, want = list(new.epoch(epoch, start)), list(old.epoch(epoch, start))
            assert len(got) == len(want) == n // batch - start
            for (x, y), (x0, y0) in zip(got, want):
                assert x.dtype == x0.dtype and x.shape == x0.shape
                assert torch.equal(x, x0) and torch.equal(y, y0)
                assert x.is_contiguous(memory_format=torch.channels_last if channels_last
                                       else torch.contiguous_format)
    # Evaluation: the same normalised images in order, the last batch short.
    new = Batches(split, "cifar10", batch, device, train=False, channels_last=channels_last)
    old = LegacyBatches(split, "cifar10", batch, device, train=False, channels_last=channels_last)
    for (x, y), (x0, y0) in zip(new.epoch(0), old.epoch(0), strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize("n, batch, shards", [(100, 32, 1), (100, 32, 2), (100, 30, 4),
                                              (64, 32, 2), (5, 32, 4)])
def test_padded_evaluation_batches_cover_each_image_once(n, batch, shards):
    """Fixed-size evaluation batches: over all replicas, the real rows are exactly the split,
    normalised, and the padding is zeros."""
    split = small_split(n)
    plain = torch.cat([x for x, _ in Batches(split, "cifar10", n, "cpu", train=False).epoch(0)])
    b = Batches(split, "cifar10", batch, "cpu", train=False, channels_last=True)
    per = -(-batch // shards)
    real_x, real_y = [], []
    for shard in range(shards):
        for x, y, valid in b.padded_epoch((shard, shards)):
            assert len(x) == len(y) == per and 0 <= valid <= per
            assert not x[valid:].any() and not y[valid:].any()
            real_x.append(x[:valid]), real_y.append(y[:valid])
    order = torch.cat(real_y).argsort()
    assert torch.equal(torch.cat(real_y)[order], torch.arange(n))
    assert torch.equal(torch.cat(real_x)[order], plain)
