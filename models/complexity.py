"""Forward FLOPs per image of a Multi-ResNet (torch's FlopCounterMode on the meta device), with
its parameter count (models/architecture.py). The command is `python -m orchestrator.summary`."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.architecture import Architecture
from models.multi_resnet import count_parameters, create_model


def input_size(arch: Architecture) -> int:
    return 224 if arch.dataset == "imagenet" else 32


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
