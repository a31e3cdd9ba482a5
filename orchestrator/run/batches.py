"""What every dataset's batches offer the training loop (`EpochBatches`), and the one rule for a
data-parallel replica's share of a global batch (`check_split`, `share_size`, `share`), which run
config validation and every dataset's batches ask.

No torch imported here, so that run files are validated without loading it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


def check_split(batch_size: int, dp: int, microbatches: int = 1) -> None:
    """Raise ValueError (one line: the field and the fix) unless a training batch splits into
    `dp` equal replica shares of `microbatches` equal micro-batches each (every rank of a mesh
    steps with the same shapes)."""
    if batch_size % (dp * microbatches):
        raise ValueError(f"batch_size {batch_size} does not split into dp={dp} x "
                         f"microbatches={microbatches}; make it a multiple of "
                         f"{dp * microbatches}")


def share_size(batch_size: int, replicas: int) -> int:
    """Images in each replica's share of a batch: the whole share of a training batch (which
    `check_split` makes exact), the padded size of an evaluation batch's."""
    return -(-batch_size // replicas)


def share(start: int, end: int, batch_size: int, index: int, replicas: int) -> range:
    """Positions of replica `index` of `replicas` in the batch of `batch_size` starting at
    position `start` (of the epoch's order), of which those before `end` exist (the last
    evaluation batch may be short): contiguous shares of `share_size` in replica order, so the
    last shares of a short or unevenly split batch are shorter, or empty."""
    first = start + index * share_size(batch_size, replicas)
    last = min(first + share_size(batch_size, replicas), start + batch_size, end)
    return range(min(first, last), last)


@runtime_checkable
class EpochBatches(Protocol):
    """One split's batches, as the loop, the evaluation and the lesion tool use them, built by
    a `DATASETS` entry's batcher (datasets.py) for one data-parallel replica. Epoch e's order and
    augmentation are a pure function of (seed, e); each replica's images are its `share` of
    every global batch."""

    batch_size: int  # the global batch
    # Undecodable files met in the latest epoch (replaced by others); None: the data is held
    # decoded, none can be.
    skipped: list[str] | None

    def __len__(self) -> int:
        """Steps an epoch: whole batches for training, every image for evaluation."""

    def epoch(self, epoch: int, start_step: int = 0
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of this replica, batch by batch, from step `start_step`."""

    def padded_epoch(self, shard: tuple[int, int] = (0, 1)
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Evaluation batches of replica `shard[0]` of `shard[1]`, padded to `share_size`
        (zeros, label 0): (images, labels, how many are real)."""
