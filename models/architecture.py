"""What defines a Multi-ResNet, without building it: `Architecture` (validated fields) and its
exact parameter count. No torch here, so that study and run files are validated without loading
it; `multi_resnet.py` builds the network, and `tests/test_models.py` checks that the count below is
that of the built network."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
        elif (self._depth - 2) % (3 * per_block) or self._depth < 3 * per_block + 2:
            raise ValueError(f"depth must be {3 * per_block}n+2 for {self.block_type} blocks "
                             f"(e.g. {3 * per_block * 3 + 2}), got {self.depth}")
        functions = sum(self.stage_blocks) * self.k
        if functions > MAX_FUNCTIONS:
            raise ValueError(f"{functions:,} residual functions (blocks x k); at most "
                             f"{MAX_FUNCTIONS:,}: lower depth or k")
        return self

    @property
    def _depth(self) -> int:
        # Read only where `_check` makes it present: ImageNet nets, and CIFAR nets without blocks.
        assert self.depth is not None, "depth read where blocks define the net"
        return self.depth

    @property
    def block_type(self) -> str:
        if self.dataset == "imagenet":
            return IMAGENET_BLOCKS[self._depth][0]
        return self.block or "basic"

    @property
    def layers_per_block(self) -> int:
        return 2 if self.block_type == "basic" else 3

    @property
    def stage_blocks(self) -> tuple[int, ...]:
        if self.dataset == "imagenet":
            return IMAGENET_BLOCKS[self._depth][1]
        if self.blocks is not None:
            return tuple(self.blocks)
        n = (self._depth - 2) // (3 * self.layers_per_block)
        return (n, n, n)

    @property
    def stem_width(self) -> int:
        return 64 if self.dataset == "imagenet" else 16

    @property
    def stage_widths(self) -> list[int]:
        """The output channels of each stage's blocks."""
        w, basic = self.width, self.block_type == "basic"
        if self.dataset == "imagenet":
            return [c * w * (1 if basic else 4) for c in (64, 128, 256, 512)]
        return [16 * w, 32 * w, 64 * w] if basic else [64 * w, 128 * w, 256 * w]

    @property
    def total_depth(self) -> int:
        if self.dataset == "imagenet":
            return self._depth
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


def _function_parameters(arch: Architecture, cin: int, cout: int, preact: bool) -> int:
    """One residual function: its convolutions (no bias) and BatchNorms (weight and bias)."""
    bn_in = 2 * cin if preact else 0
    if arch.block_type == "basic":
        return bn_in + 9 * cin * cout + 2 * cout + 9 * cout * cout
    mid = cout // 4
    return bn_in + cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * cout


def parameter_count(arch: Architecture) -> int:
    """The parameters of `create_model(arch)`, counted from the architecture alone."""
    imagenet = arch.dataset == "imagenet"
    channels = arch.stem_width
    total = 3 * 64 * 49 + 2 * 64 if imagenet else 3 * 16 * 9  # the stem's conv (and BatchNorm)
    for stage, (count, out) in enumerate(zip(arch.stage_blocks, arch.stage_widths)):
        for i in range(count):
            first = i == 0
            stride = 2 if first and stage > 0 else 1
            total += arch.k * _function_parameters(arch, channels, out, preact=not first)
            if (channels != out or stride != 1) and arch.shortcut_type == "B":
                total += channels * out  # the 1x1 projection shared by the k functions
            if first and not (imagenet and stage == 0):
                total += 2 * channels  # the BN-ReLU shared by the functions and the shortcut
            channels = out
    return total + 2 * channels + channels * arch.num_classes + arch.num_classes
