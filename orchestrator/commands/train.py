"""`python -m orchestrator.train`: train one Multi-ResNet in this process.

    python -m orchestrator.train --depth 20 --k 4 --data-dir ./data --epochs 200
    python -m orchestrator.train --config run.yaml --epochs 2        # flags override the file
    python -m orchestrator.train --dataset imagenet --data-dir /data/ilsvrc2012 --depth 50

Without --data-dir, CIFAR is looked for (and downloaded when online) under ./data.
Heavy imports wait inside the functions, after the flags are read (commands/cli.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.commands.cli import (add_architecture_flags, add_common_flags, architecture_fields,
                                       command, invoked_as)
from orchestrator.errors import ConfigError, OutOfMemory, UserError
from orchestrator.results import CHECKPOINT_FILE
from orchestrator.storage import check_regular, resolve

# Flag name -> TrainConfig field, for the flags that map one to one.
RUN_FLAGS = ("dataset", "data_dir", "train_size", "test_size", "epochs", "steps", "batch_size",
             "lr", "momentum", "weight_decay", "grad_clip_norm", "seed", "device", "execution",
             "precision", "compile", "compile_scope", "dtype", "log_json", "log_every",
             "checkpoint_dir", "checkpoint_every", "recipe", "data_workers", "bad_images",
             "decode")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=invoked_as("train"),
                                description="Train one Multi-ResNet.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML file with TrainConfig keys (flags override it)")
    arch = p.add_argument_group("architecture")
    add_architecture_flags(arch)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", help="one of orchestrator.run.data.DATASETS: cifar10 "
                      "(default), cifar100, synthetic, imagefolder, imagenet; checked with the "
                      "other keys")
    data.add_argument("--data-dir", help="folder that holds cifar-10-batches-py/, or train/ and "
                      "val/ of an image folder (default ./data)")
    data.add_argument("--data-workers", type=int, help="image-decoding processes (image "
                      "folders; default: CPU cores less one)")
    data.add_argument("--decode", choices=["workers", "device"], help="where image-folder "
                      "JPEGs are decoded: workers (default) or the training device (nvJPEG on "
                      "CUDA)")
    data.add_argument("--bad-images", choices=["skip", "error"], help="an undecodable image "
                      "met in training: skip it (counted, logged; the default) or stop")
    data.add_argument("--train-size", type=int, help="train on the first N images")
    data.add_argument("--test-size", type=int, help="test on the first N images")
    recipe = p.add_argument_group("recipe")
    recipe.add_argument("--recipe", choices=["auto", "cifar", "imagenet"], help="augmentation "
                        "and schedule defaults (auto: imagenet for ImageNet-family nets)")
    recipe.add_argument("--epochs", type=int)
    recipe.add_argument("--steps", type=int, help="stop after N steps in total")
    recipe.add_argument("--batch-size", type=int)
    recipe.add_argument("--lr", type=float)
    recipe.add_argument("--momentum", type=float)
    recipe.add_argument("--weight-decay", type=float)
    recipe.add_argument("--grad-clip-norm", type=float, help="clip the global gradient norm")
    recipe.add_argument("--seed", type=int)
    run = p.add_argument_group("execution and output")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument("--execution", choices=["auto", "reference", "fused"])
    run.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                     help="autocast dtype (auto: bf16 on CUDA and bf16-capable CPUs)")
    run.add_argument("--compile", choices=["auto", "none", "default", "cudagraphs"],
                     help="torch.compile mode (auto: cudagraphs on CUDA, none on CPU)")
    run.add_argument("--compile-scope", choices=["model", "blocks"],
                     help="compile the whole model (default) or each block (regional)")
    run.add_argument("--dtype", choices=["float32", "float64"])
    run.add_argument("--parallel", metavar="dp=2,pp=1,bp=2", help="mesh degrees (also "
                     "microbatches=M, schedule=gpipe|1f1b); more than one rank runs as a local "
                     "Ray Train job with one worker per rank")
    run.add_argument("--log-json", help="write JSON lines here: one per epoch and one every "
                     "--log-every steps")
    run.add_argument("--log-every", type=int, help="steps between step lines (default 50)")
    run.add_argument("--checkpoint-dir", help="save checkpoints here (see --checkpoint-every)")
    run.add_argument("--checkpoint-every", metavar="N|auto", help="epochs between checkpoints "
                     "(default auto: every epoch up to 64 MiB, larger ones as often as costs "
                     "at most 5%% of training and at least every 2 minutes; the last always)")
    run.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    add_common_flags(run)
    return p


def build_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from orchestrator.run.config import TrainConfig, describe, load_yaml

    fields = load_yaml(args.config) if getattr(args, "config", None) else {}
    for name in RUN_FLAGS:
        if hasattr(args, name):
            fields[name] = getattr(args, name)
    if getattr(args, "resume", False):
        fields["resume"] = True
    if getattr(args, "parallel", None):
        fields["parallel"] = {**fields.get("parallel", {}), **parse_pairs(args.parallel)}
    arch_flags = architecture_fields(args)
    if arch_flags:
        fields["architecture"] = {**fields.get("architecture", {}), **arch_flags}
    if isinstance(fields.setdefault("data_dir", "data"), str):  # as the checkpoint records it
        fields["data_dir"] = str(resolve(fields["data_dir"], "--data-dir"))
    try:
        return TrainConfig(**fields)
    except ValidationError as err:
        raise ConfigError(describe(err)) from None


def parse_pairs(text: str) -> dict:
    pairs = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--parallel {text}: expected key=value pairs like dp=2,bp=2")
        pairs[key.strip()] = value.strip()
    return pairs


def train_command(args: argparse.Namespace) -> None:
    import torch

    from orchestrator.run.loop import out_of_memory, train_loop
    from orchestrator.run.session import LocalSession

    cfg = build_config(args)
    if cfg.parallel.world_size > 1:
        from orchestrator.cluster.driver import run_on_ray

        final = run_on_ray(cfg)
    else:
        session = LocalSession(cfg)
        try:
            final = train_loop(cfg, session)
        except torch.OutOfMemoryError:
            raise OutOfMemory(out_of_memory(cfg)) from None
        finally:
            session.close()
    print(f"done: final test error {100 * final['test_error']:.2f}%, "
          f"best {100 * final['best_test_error']:.2f}% after {final['epoch']} epochs")


def interrupted(args: argparse.Namespace) -> str:
    """The advice after Ctrl-C, which may come while torch is half imported: it reads only the
    flags and the --config file."""
    import yaml


    folder = getattr(args, "checkpoint_dir", None)
    if folder is None and getattr(args, "config", None):
        try:
            check_regular(args.config, limit=1 << 20)  # a pipe would block the advice
            folder = (yaml.safe_load(Path(args.config).read_text()) or {}).get("checkpoint_dir")
        except (OSError, ValueError, yaml.YAMLError, AttributeError, UserError):
            folder = None
    saved = folder and (Path(folder) / CHECKPOINT_FILE).is_file()
    return "interrupted; " + ("continue with the same command plus --resume" if saved else
                              "no checkpoint was written yet (one is written every "
                              "--checkpoint-every epochs with --checkpoint-dir): run the "
                              "command again to start over")


def preload(args: argparse.Namespace) -> list[str]:
    modules = ["orchestrator.run.loop", "orchestrator.run.session"]
    return modules + (["orchestrator.cluster.driver"] if getattr(args, "parallel", None) else [])


main = command(parser, train_command, interrupted=interrupted, preload=preload)


if __name__ == "__main__":
    sys.exit(main())
