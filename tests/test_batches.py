"""The batches interface and the shard rule (orchestrator.run.batches): every dataset's batches
are `EpochBatches`, built one way (its `DATASETS` batcher), and each data-parallel replica gets
the `share` of every global batch that the one rule gives, which config validation asks too."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from orchestrator.run.batches import EpochBatches, check_split, share, share_size
from orchestrator.run.config import TrainConfig
from orchestrator.run.data import synthetic_cifar
from orchestrator.run.datasets import DATASETS
from orchestrator.run.images import load_folder
from tests.images import write_image_folder

MESHES = (1, 2, 3, 4)  # data-parallel replicas
TRAIN_BATCH, EVAL_BATCH = 12, 8  # 12 splits into every mesh; 8 does not into 3


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict:
    """(train, test) of every dataset: 36 and 12 images (CIFAR's stand-in: generated images)."""
    folder = load_folder(write_image_folder(tmp_path_factory.mktemp("batches") / "images",
                                            size=(40, 36)))
    held = synthetic_cifar(36, 12, seed=1)
    return {name: folder if entry.image_files else held for name, entry in DATASETS.items()}


def config(name: str) -> TrainConfig:
    """A resolved CPU run of dataset `name` (for its batcher: recipe, input size, seed)."""
    entry = DATASETS[name]
    net = dict(depth=18) if entry.architecture == "imagenet" and not entry.any_architecture \
        else dict(depth=8, dataset="cifar10")
    return TrainConfig(dataset=name, architecture=net, device="cpu", seed=3, data_workers=0,
                       batch_size=TRAIN_BATCH).resolved(False)


def replicas(name: str, split, batch_size: int, train: bool, dp: int) -> list[EpochBatches]:
    cfg = config(name)
    return [DATASETS[name].batches(split, cfg, batch_size, "cpu", train, (r, dp))
            for r in range(dp)]


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_datasets_batches_give_each_replica_its_share(name, splits):
    """For every dataset and several meshes, training and evaluation: the batcher builds
    `EpochBatches`; each replica's batches hold exactly `share`'s images of every global batch
    (its sizes, the one-replica batch's rows in replica order), and `padded_epoch` pads each
    share to `share_size` with the real ones counted."""
    for split, batch_size, train in ((splits[name][0], TRAIN_BATCH, True),
                                     (splits[name][1], EVAL_BATCH, False)):
        whole = list(replicas(name, split, batch_size, train, 1)[0].epoch(2))
        for dp in MESHES:
            parts = replicas(name, split, batch_size, train, dp)
            assert all(isinstance(b, EpochBatches) for b in parts)
            epochs = [list(b.epoch(2)) for b in parts]
            for step, (x, y) in enumerate(whole):
                sizes = [len(share(step * batch_size, len(split), batch_size, r, dp))
                         for r in range(dp)]
                assert [len(e[step][1]) for e in epochs] == sizes, (dp, step)
                assert torch.equal(torch.cat([e[step][0] for e in epochs]), x)
                assert torch.equal(torch.cat([e[step][1] for e in epochs]), y)
            if train:
                continue
            for r, b in enumerate(parts):
                padded = list(b.padded_epoch((r, dp)))
                assert [valid for *_, valid in padded] == [len(e[1]) for e in epochs[r]]
                assert {len(y) for _, y, _ in padded} == {share_size(batch_size, dp)}


def test_the_shares_of_a_batch_are_contiguous_in_replica_order_and_cover_it():
    for batch_size in (1, 7, 8, 12, 30, 1024):
        for replicas_ in (1, 2, 3, 4, 16):
            for end in (batch_size, batch_size // 2, 1):  # whole, and short last batches
                shares = [share(100, 100 + end, batch_size, r, replicas_)
                          for r in range(replicas_)]
                assert [p for s in shares for p in s] == list(range(100, 100 + end))
                assert max(len(s) for s in shares) <= share_size(batch_size, replicas_)
                if end == batch_size and batch_size % replicas_ == 0:  # a training batch
                    assert {len(s) for s in shares} == {batch_size // replicas_}


@pytest.mark.parametrize("name", list(DATASETS))
def test_an_unsplit_batch_is_refused_alike_by_the_config_and_every_loader(name, splits):
    """One rule, one line: a training batch of 30 for 4 replicas is refused by run validation
    (before anything loads) and by each dataset's batches, in the same words."""
    message = "batch_size 30 does not split into dp=4 x microbatches=1; make it a multiple of 4"
    with pytest.raises(ValueError, match=message):
        check_split(30, 4)
    with pytest.raises(ValidationError, match=message):
        TrainConfig(dataset="synthetic", batch_size=30, parallel=dict(dp=4))
    with pytest.raises(ValueError, match=message):
        replicas(name, splits[name][0], 30, True, 4)
    replicas(name, splits[name][1], 30, False, 4)  # evaluation batches are padded instead

