"""`python -m orchestrator.summary`: parameter count and forward FLOPs per image of a Multi-ResNet.

    python -m orchestrator.summary --depth 110 --k 1
    python -m orchestrator.summary --depth 26 --k 2 --width 10 --json

Heavy imports wait inside the functions, after the flags are read (commands/cli.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from orchestrator.commands.cli import (add_architecture_flags, add_common_flags, architecture_fields,
                                       command, invoked_as)
from orchestrator.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=invoked_as("summary"),
                                description=__doc__.split("\n")[0].split(": ", 1)[1])
    add_architecture_flags(p)
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "imagenet"], default="cifar10")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_common_flags(p)
    return p


def summary_command(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from models.multi_resnet import Architecture
    from models.complexity import summarize
    from orchestrator.run.config import describe

    try:
        arch = Architecture(dataset=args.dataset, **architecture_fields(args))
    except ValidationError as err:
        raise ConfigError(describe(err)) from None
    info = summarize(arch)
    if args.json:
        print(json.dumps(info))
        return
    print(f"multi-resnet {info['name']} ({info['dataset']}, {info['block']} blocks "
          f"{tuple(info['blocks'])}, shortcut {info['shortcut']})")
    print(f"parameters: {info['params']:,}")
    print(f"forward FLOPs per image: {info['flops']:,} ({info['flops'] / 1e9:.3f} GFLOPs)")


main = command(parser, summary_command, preload=("models.complexity", "orchestrator.run.config"))


if __name__ == "__main__":
    sys.exit(main())
