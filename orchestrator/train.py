"""`python -m orchestrator.train`: train one Multi-ResNet in this process.

    python -m orchestrator.train --depth 20 --k 4 --data-dir ./data --epochs 200
    python -m orchestrator.train --config run.yaml --epochs 2        # flags override the file

Without --data-dir, CIFAR is looked for (and downloaded when online) under ./data.
"""
from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from models.summary import add_architecture_flags, architecture_fields
from orchestrator.config import ConfigError, TrainConfig, describe, load_yaml
from orchestrator.data import DataError
from orchestrator.loop import CheckpointError, LocalSession, TrainingDiverged, train_loop

# Flag name -> TrainConfig field, for the flags that map one to one.
RUN_FLAGS = ("dataset", "data_dir", "train_size", "test_size", "epochs", "steps", "batch_size",
             "lr", "momentum", "weight_decay", "seed", "device", "execution", "log_json",
             "checkpoint_dir")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.train",
                                description="Train one Multi-ResNet.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML file with TrainConfig keys (flags override it)")
    arch = p.add_argument_group("architecture")
    add_architecture_flags(arch)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=["cifar10", "cifar100", "synthetic"])
    data.add_argument("--data-dir", help="folder that holds cifar-10-batches-py/ (default ./data)")
    data.add_argument("--train-size", type=int, help="train on the first N images")
    data.add_argument("--test-size", type=int, help="test on the first N images")
    recipe = p.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=int)
    recipe.add_argument("--steps", type=int, help="stop after N steps in total")
    recipe.add_argument("--batch-size", type=int)
    recipe.add_argument("--lr", type=float)
    recipe.add_argument("--momentum", type=float)
    recipe.add_argument("--weight-decay", type=float)
    recipe.add_argument("--seed", type=int)
    run = p.add_argument_group("execution and output")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument("--execution", choices=["auto", "reference", "fused"])
    run.add_argument("--log-json", help="write one JSON line per step and per epoch here")
    run.add_argument("--checkpoint-dir", help="save a checkpoint here after every epoch")
    run.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_config(args: argparse.Namespace) -> TrainConfig:
    fields = load_yaml(args.config) if getattr(args, "config", None) else {}
    for name in RUN_FLAGS:
        if hasattr(args, name):
            fields[name] = getattr(args, name)
    if getattr(args, "resume", False):
        fields["resume"] = True
    arch_flags = architecture_fields(args)
    if arch_flags:
        fields["architecture"] = {**fields.get("architecture", {}), **arch_flags}
    fields.setdefault("data_dir", "data")
    try:
        return TrainConfig(**fields)
    except ValidationError as err:
        raise ConfigError(describe(err)) from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        cfg = build_config(args)
        session = LocalSession(cfg)
        try:
            final = train_loop(cfg, session)
        finally:
            session.close()
    except KeyboardInterrupt:
        print("interrupted; continue with the same command plus --resume "
              "(checkpoints are written at the end of each epoch)", file=sys.stderr)
        return 130
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, ValueError,
            RuntimeError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done: final test error {100 * final['test_error']:.2f}%, "
          f"best {100 * final['best_test_error']:.2f}% after {final['epoch']} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
