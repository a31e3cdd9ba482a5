"""`python -m models.summary`: parameter count and forward FLOPs per image of a Multi-ResNet.

    python -m models.summary --depth 110 --k 1
    python -m models.summary --depth 26 --k 2 --width 10 --json
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache

import torch
from pydantic import ValidationError
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


def add_architecture_flags(parser: argparse.ArgumentParser) -> None:
    """The architecture flags shared by models.summary and orchestrator.train."""
    parser.add_argument("--depth", type=int, help="layers along one function (6n+2 basic, 9n+2 "
                        "bottleneck on CIFAR; 18/34/50/101/152/200 on ImageNet)")
    parser.add_argument("--k", type=int, help="residual functions per block (default 1)")
    parser.add_argument("--width", type=int, help="widening factor w (default 1)")
    parser.add_argument("--block", choices=["basic", "bottleneck"])
    parser.add_argument("--blocks", type=parse_blocks, help="blocks per stage, e.g. 4,4,3")
    parser.add_argument("--shortcut", choices=["A", "B"])


def parse_blocks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 4,4,3, got {text!r}")


def architecture_fields(args: argparse.Namespace) -> dict:
    names = ("depth", "k", "width", "block", "blocks", "shortcut")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def validation_message(err: ValidationError) -> str:
    """One line per problem: the field and what is wrong with it."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.summary", description=__doc__.split("\n")[0])
    add_architecture_flags(parser)
    parser.add_argument("--dataset", choices=["cifar10", "cifar100", "imagenet"], default="cifar10")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        arch = Architecture(dataset=args.dataset, **architecture_fields(args))
    except ValidationError as err:
        if args.debug:
            raise
        parser.error(validation_message(err))
    info = summarize(arch)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"multi-resnet {info['name']} ({info['dataset']}, {info['block']} blocks "
              f"{tuple(info['blocks'])}, shortcut {info['shortcut']})")
        print(f"parameters: {info['params']:,}")
        print(f"forward FLOPs per image: {info['flops']:,} ({info['flops'] / 1e9:.3f} GFLOPs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
