"""`python -m orchestrator.train`: train one Multi-ResNet in this process.

    python -m orchestrator.train --depth 20 --k 4 --data-dir ./data --epochs 200
    python -m orchestrator.train --config run.yaml --epochs 2        # flags override the file

Without --data-dir, CIFAR is looked for (and downloaded when online) under ./data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

from models.summary import add_architecture_flags, architecture_fields
from orchestrator.config import ConfigError, TrainConfig, describe, load_yaml
from orchestrator.data import DataError
from orchestrator.loop import (CHECKPOINT_FILE, CheckpointError, LocalSession, OutOfMemory,
                               TrainingDiverged, check_outputs, out_of_memory, train_loop)

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingDiverged)

# Flag name -> TrainConfig field, for the flags that map one to one.
RUN_FLAGS = ("dataset", "data_dir", "train_size", "test_size", "epochs", "steps", "batch_size",
             "lr", "momentum", "weight_decay", "grad_clip_norm", "seed", "device", "execution",
             "precision", "compile", "dtype", "log_json", "log_every", "checkpoint_dir")
# Exit statuses: bad input the user can fix, out of GPU memory, anything else (a bug).
EXIT_USER_ERROR, EXIT_OUT_OF_MEMORY, EXIT_INTERNAL = 2, 3, 1


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
    recipe.add_argument("--grad-clip-norm", type=float, help="clip the global gradient norm")
    recipe.add_argument("--seed", type=int)
    run = p.add_argument_group("execution and output")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument("--execution", choices=["auto", "reference", "fused"])
    run.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                     help="autocast dtype (auto: bf16 on CUDA and bf16-capable CPUs)")
    run.add_argument("--compile", choices=["auto", "none", "default", "cudagraphs"],
                     help="torch.compile mode (auto: cudagraphs on CUDA, none on CPU)")
    run.add_argument("--dtype", choices=["float32", "float64"])
    run.add_argument("--parallel", metavar="dp=2,pp=1,bp=2", help="mesh degrees (also "
                     "microbatches=M, schedule=gpipe|1f1b); more than one rank runs as a local "
                     "Ray Train job with one worker per rank")
    run.add_argument("--log-json", help="write JSON lines here: one per epoch and one every "
                     "--log-every steps")
    run.add_argument("--log-every", type=int, help="steps between step lines (default 50)")
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
    if getattr(args, "parallel", None):
        fields["parallel"] = {**fields.get("parallel", {}), **parse_pairs(args.parallel)}
    arch_flags = architecture_fields(args)
    if arch_flags:
        fields["architecture"] = {**fields.get("architecture", {}), **arch_flags}
    fields.setdefault("data_dir", "data")
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


def run_on_ray(cfg: TrainConfig) -> dict:
    """More than one rank: a local Ray Train run (or on RAY_ADDRESS), one worker per rank."""
    import tempfile

    import ray

    from orchestrator.worker import build_trainer, init_ray

    world = cfg.parallel.world_size
    init_ray()
    # One CPU per rank where the machine has them; ranks share CPUs on a smaller machine.
    cpus_per_worker = min(1.0, ray.cluster_resources().get("CPU", 1) / world)
    gpus = ray.cluster_resources().get("GPU", 0) if cfg.device != "cpu" else 0
    gpus_per_worker = 1 if gpus >= world else 0
    if cfg.data_dir:
        cfg = cfg.model_copy(update={"data_dir": str(Path(cfg.data_dir).resolve())})
    if cfg.log_json:
        cfg = cfg.model_copy(update={"log_json": str(Path(cfg.log_json).resolve())})
    storage = Path(cfg.checkpoint_dir).resolve() if cfg.checkpoint_dir else \
        Path(tempfile.mkdtemp(prefix="multires-"))
    if (storage / "train").exists() and cfg.checkpoint_dir and not cfg.resume:
        raise ConfigError(f"{storage / 'train'} exists; pass --resume to continue it or choose "
                          f"another --checkpoint-dir")
    if cfg.resume and not (storage / "train").exists():
        raise ConfigError(f"no run to resume in {storage}; run without --resume")
    check_outputs(cfg, checkpoint_dir=False)  # Ray Train keeps the checkpoints in storage/train
    trainer = build_trainer(cfg, name="train", storage_path=str(storage), echo=True,
                            cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as exc:
        raise worker_cause(exc) from None
    if "diverged" in result.metrics:
        raise TrainingDiverged(result.metrics["diverged"])
    return result.metrics


def worker_cause(exc: Exception) -> Exception:
    """The first worker's own exception when it is one we explain, else Ray's."""
    for failure in exc.worker_failures.values():
        cause = getattr(failure, "cause", None) or failure  # a RayTaskError wraps it
        if isinstance(cause, USER_ERRORS + (OutOfMemory,)):
            return cause
    return exc


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    cfg = None
    try:
        cfg = build_config(args)
        if cfg.parallel.world_size > 1:
            final = run_on_ray(cfg)
        else:
            session = LocalSession(cfg)
            try:
                final = train_loop(cfg, session)
            finally:
                session.close()
    except KeyboardInterrupt:
        saved = cfg is not None and cfg.checkpoint_dir and \
            (Path(cfg.checkpoint_dir) / CHECKPOINT_FILE).is_file()
        print("interrupted; " + ("continue with the same command plus --resume" if saved else
              "no checkpoint was written yet (one is written at the end of each epoch with "
              "--checkpoint-dir): run the command again to start over"), file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (OutOfMemory, torch.OutOfMemoryError) as exc:
        if debug:
            raise
        print(f"error: {exc if isinstance(exc, OutOfMemory) else out_of_memory(cfg)}",
              file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except Exception as exc:
        if debug:
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"internal error: {type(exc).__name__}: {first_line}\n(a bug, not your input: "
              f"rerun with --debug for the traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL
    print(f"done: final test error {100 * final['test_error']:.2f}%, "
          f"best {100 * final['best_test_error']:.2f}% after {final['epoch']} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
