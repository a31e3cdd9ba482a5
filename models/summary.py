"""Parameter count and forward FLOPs per image of a Multi-ResNet (torch's FlopCounterMode on the
meta device). The command is `python -m orchestrator.summary`."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.multi_resnet import Architecture, count_parameters, create_model


def input_size(arch: Architecture) -> int:
    return 224 if arch.dataset == "imagenet" else 32


@lru_cache(maxsize=4096)
def parameter_count(arch: Architecture) -> int:
    """Parameters only, without building the whole network (studies count hundreds): the blocks
    after the first of a stage are identical, so the count is that of the net with one block per
    stage plus, per stage, the extra blocks times what a second block adds there."""
    blocks = arch.stage_blocks
    if arch.dataset == "imagenet" or max(blocks) <= 2:
        with torch.device("meta"):
            return count_parameters(create_model(arch))
    fields = arch.model_dump(exclude={"depth", "blocks"})

    def with_blocks(counts) -> int:
        return parameter_count(Architecture(**fields, blocks=tuple(counts)))

    one = with_blocks([1] * len(blocks))
    second = [with_blocks([2 if i == s else 1 for i in range(len(blocks))]) - one
              for s in range(len(blocks))]
    return one + sum((n - 1) * extra for n, extra in zip(blocks, second))


@lru_cache(maxsize=256)
def summarize(arch: Architecture) -> dict:
    """Name, depth, parameters and forward FLOPs (multiply-add = 2 FLOPs) for one image."""
    size = input_size(arch)
    with torch.device("meta"):  # shapes only: no memory, no init cost, even for 100M+ params
        model = create_model(arch).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    return {
        "name": arch.name,
        "depth": arch.total_depth,
        "k": arch.k,
        "width": arch.width,
        "block": arch.block_type,
        "blocks": list(arch.stage_blocks),
        "shortcut": arch.shortcut_type,
        "dataset": arch.dataset,
        "params": count_parameters(model),
        "flops": int(counter.get_total_flops()),
    }
