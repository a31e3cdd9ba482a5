"""Multi-ResNet networks (Abdi & Nahavandi, 2016) for CIFAR and ImageNet.

Follows the original Torch code (fb.resnet.torch's pre-activation ResNet with k functions per
block): CIFAR basic nets have depth 6n+2 (widths 16w/32w/64w), CIFAR bottleneck nets 9n+2 (stem 16,
then 64w/128w/256w), ImageNet nets depth 18/34 (basic) and 50/101/152/200 (bottleneck). The first
block of each stage shares one BN-ReLU between its functions and the shortcut; k=1 is the
pre-activation ResNet.

The network is a stem, a flat ModuleDict of blocks ("0".."N-1") and a head. Pipeline stages keep a
subset of the blocks (and the stem or head only on the first or last stage); forward skips what is
absent, so a stage is the same class with parts deleted.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.blocks import (BasicFunction, BottleneckFunction, MultiResidualBlock, PreActivation,
                           set_fused, shortcut)

IMAGENET_BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
MAX_DEPTH = 2000
MAX_FUNCTIONS = 4096  # residual functions in the whole net
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


class Architecture(BaseModel):
    """Everything that defines a Multi-ResNet; validated on construction.

    Give `depth`, or per-stage `blocks`, or both (they must agree). `dataset` picks the variant
    (CIFAR or ImageNet stem and head) and the number of classes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The bounds keep a net buildable in memory and a summary quick (the deepest published
    # CIFAR ResNet has 1202 layers; the paper's widest nets w=10).
    depth: int | None = Field(None, ge=2, le=MAX_DEPTH, description="layers along one function")
    blocks: tuple[int, ...] | None = Field(None, max_length=8, description="blocks per stage, "
                                           "e.g. (4, 4, 3)")
    k: int = Field(1, ge=1, le=64, description="residual functions per block")
    width: int = Field(1, ge=1, le=64, description="widening factor w")
    block: Literal["basic", "bottleneck"] | None = Field(
        None, description="default: basic on CIFAR; fixed by depth on ImageNet")
    shortcut: Literal["A", "B"] | None = Field(
        None, description="default: A for CIFAR basic w=1, otherwise B")
    dataset: Literal["cifar10", "cifar100", "imagenet"] = "cifar10"
    classes: int | None = Field(None, ge=2, description="outputs of the classifier; default: "
                                "the dataset family's (10, 100, 1000), e.g. an image folder's")

    @model_validator(mode="after")
    def _check(self) -> "Architecture":
        if self.depth is None and self.blocks is None:
            raise ValueError("give depth or blocks (e.g. depth=20 or blocks=4,4,3)")
        if self.dataset == "imagenet":
            if self.depth not in IMAGENET_BLOCKS:
                raise ValueError(f"depth must be one of {sorted(IMAGENET_BLOCKS)} for imagenet, "
                                 f"got {self.depth}")
            kind, blocks = IMAGENET_BLOCKS[self.depth]
            if self.block not in (None, kind):
                raise ValueError(f"imagenet depth {self.depth} uses {kind} blocks, not {self.block}")
            if self.blocks not in (None, blocks):
                raise ValueError(f"imagenet depth {self.depth} has blocks {blocks}; omit blocks")
            if self.shortcut == "A":
                raise ValueError("imagenet nets use shortcut B (projection)")
            return self
        per_block = self.layers_per_block
        if self.blocks is not None:
            if len(self.blocks) != 3 or min(self.blocks) < 1:
                raise ValueError(f"blocks must be three positive counts (one per CIFAR stage), "
                                 f"got {self.blocks}")
            depth = per_block * sum(self.blocks) + 2
            if depth > MAX_DEPTH:
                raise ValueError(f"blocks {self.blocks} give depth {depth}; at most {MAX_DEPTH}")
            if self.depth is not None and self.depth != depth:
                raise ValueError(f"depth {self.depth} disagrees with blocks {self.blocks} "
                                 f"(which give depth {depth}); give one of them")
        elif (self.depth - 2) % (3 * per_block) or self.depth < 3 * per_block + 2:
            raise ValueError(f"depth must be {3 * per_block}n+2 for {self.block_type} blocks "
                             f"(e.g. {3 * per_block * 3 + 2}), got {self.depth}")
        functions = sum(self.stage_blocks) * self.k
        if functions > MAX_FUNCTIONS:
            raise ValueError(f"{functions:,} residual functions (blocks x k); at most "
                             f"{MAX_FUNCTIONS:,}: lower depth or k")
        return self

    @property
    def block_type(self) -> str:
        if self.dataset == "imagenet":
            return IMAGENET_BLOCKS[self.depth][0]
        return self.block or "basic"

    @property
    def layers_per_block(self) -> int:
        return 2 if self.block_type == "basic" else 3

    @property
    def stage_blocks(self) -> tuple[int, ...]:
        if self.dataset == "imagenet":
            return IMAGENET_BLOCKS[self.depth][1]
        if self.blocks is not None:
            return tuple(self.blocks)
        n = (self.depth - 2) // (3 * self.layers_per_block)
        return (n, n, n)

    @property
    def total_depth(self) -> int:
        if self.dataset == "imagenet":
            return self.depth
        return self.layers_per_block * sum(self.stage_blocks) + 2

    @property
    def shortcut_type(self) -> str:
        if self.shortcut is not None:
            return self.shortcut
        cifar_basic = self.dataset != "imagenet" and self.block_type == "basic"
        return "A" if cifar_basic and self.width == 1 else "B"

    @property
    def num_classes(self) -> int:
        return self.classes or NUM_CLASSES[self.dataset]

    @property
    def name(self) -> str:
        """Short readable name, e.g. d20-k4-w1 (with the block pattern when given explicitly)."""
        parts = [f"d{self.total_depth}", f"k{self.k}", f"w{self.width}"]
        if self.block_type == "bottleneck" and self.dataset != "imagenet":
            parts.append("bn")
        if self.blocks is not None and self.dataset != "imagenet" and len(set(self.blocks)) > 1:
            parts.append("b" + ".".join(map(str, self.blocks)))
        return "-".join(parts)


class MultiResNet(nn.Module):
    """Stem -> blocks (ModuleDict "0".."N-1") -> head. Any of them may be deleted by a pipeline
    stage; forward uses what is present."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        imagenet = arch.dataset == "imagenet"
        basic = arch.block_type == "basic"
        w = arch.width
        if imagenet:
            stem_width = 64
            widths = [c * w * (1 if basic else 4) for c in (64, 128, 256, 512)]
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                nn.MaxPool2d(3, 2, 1))
        else:
            stem_width = 16
            widths = [16 * w, 32 * w, 64 * w] if basic else [64 * w, 128 * w, 256 * w]
            self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)

        blocks = []
        channels = stem_width
        for stage, (count, out) in enumerate(zip(arch.stage_blocks, widths)):
            stride = 1 if stage == 0 else 2
            for i in range(count):
                first = i == 0
                # First block of a stage: one BN-ReLU before all functions and the shortcut;
                # except the very first ImageNet block, whose input the stem already activated.
                shared = first and not (imagenet and stage == 0)
                blocks.append(self._block(arch, channels, out, stride if first else 1,
                                          first, shared))
                channels = out
        self.blocks = nn.ModuleDict({str(i): b for i, b in enumerate(blocks)})
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(channels, arch.num_classes))
        self.reset_parameters()

    @staticmethod
    def _block(arch: Architecture, cin: int, cout: int, stride: int, first: bool,
               shared: bool) -> MultiResidualBlock:
        per_function_preact = not first
        if arch.block_type == "basic":
            make = lambda: BasicFunction(cin, cout, stride, per_function_preact)
        else:
            stride_on = "conv2" if arch.dataset == "imagenet" else "conv1"
            make = lambda: BottleneckFunction(cin, cout, stride, per_function_preact, stride_on)
        return MultiResidualBlock([make() for _ in range(arch.k)],
                                  shortcut(arch.shortcut_type, cin, cout, stride),
                                  PreActivation(cin) if shared else None)

    def reset_parameters(self) -> None:
        """The original init: conv N(0, sqrt(2/(kh*kw*out))), BN weight 1 bias 0, linear bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)  # weight keeps torch's default, as nn.Linear in Torch7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        for block in self.blocks.values():
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x


def create_model(arch: Architecture | None = None, *, fused: bool = False,
                 **fields) -> MultiResNet:
    """Build a Multi-ResNet from an Architecture or its fields: create_model(depth=20, k=4)."""
    arch = arch if arch is not None else Architecture(**fields)
    return set_fused(MultiResNet(arch), fused)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
