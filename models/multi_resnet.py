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

import torch
from torch import nn

from models.architecture import (IMAGENET_BLOCKS, MAX_DEPTH, MAX_FUNCTIONS,  # noqa: F401
                                 NUM_CLASSES, Architecture)
from models.blocks import (BasicFunction, BottleneckFunction, MultiResidualBlock, PreActivation,
                           ResidualFunction, set_fused, shortcut)


class MultiResNet(nn.Module):
    """Stem -> blocks (ModuleDict "0".."N-1") -> head. Any of them may be deleted by a pipeline
    stage; forward uses what is present."""

    stem: nn.Module | None  # None on a pipeline stage that does not hold it
    head: nn.Module | None

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        imagenet = arch.dataset == "imagenet"
        stem_width, widths = arch.stem_width, arch.stage_widths
        if imagenet:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                nn.MaxPool2d(3, 2, 1))
        else:
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
        stride_on = "conv2" if arch.dataset == "imagenet" else "conv1"

        def make() -> ResidualFunction:
            if arch.block_type == "basic":
                return BasicFunction(cin, cout, stride, per_function_preact)
            return BottleneckFunction(cin, cout, stride, per_function_preact, stride_on)

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
