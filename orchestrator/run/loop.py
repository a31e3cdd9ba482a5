"""The training loop: one process, or one rank of a mesh (a Ray Train worker or a local process).

`train_loop(config, session)` knows nothing about where it runs. The session decides where
metrics, step logs and checkpoints go: `LocalSession` (files, a progress bar) for
`python -m orchestrator.train`; `orchestrator.cluster.worker.RaySession` reports through
`ray.train.report`.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Protocol

import torch
from tqdm import tqdm

from models.complexity import summarize
from orchestrator.errors import CheckpointError, ConfigError, TrainingDiverged, short
from orchestrator.parallel.engine import RankEngine
from orchestrator.run.checkpoint import SMALL_CHECKPOINT_BYTES, check_same_run, checkpoint_due
from orchestrator.run.config import TrainConfig
from orchestrator.run.batches import EpochBatches
from orchestrator.run.data import DATASETS, load_dataset
from orchestrator.run.step import TrainingStep


# Evaluation batch size outside pipelines: large enough that an eager forward fills the device.
EVAL_BATCH = {"cpu": 256, "cuda": 1024}


def out_of_memory(cfg: TrainConfig, share: float | None = None) -> str:
    held = f"its {share:g} share of a GPU" if share else "the GPU"
    more = ", or raise resources.gpus_per_worker" if share else ""
    return (f"out of GPU memory: {cfg.architecture.name} at batch_size {cfg.batch_size} does not "
            f"fit in {held}; lower batch_size, use precision bf16 (or fp16){more}")


class Session(Protocol):
    interactive: bool  # show a progress bar

    def restore(self) -> dict | None: ...
    def log_step(self, record: dict) -> None: ...
    # Every epoch; `state` on world rank 0 of checkpoint epochs only (None otherwise).
    def report(self, metrics: dict, state: dict | None) -> None: ...


def rng_state() -> dict:
    # This process's own GPU only: a state per visible GPU could not be restored where fewer
    # are visible (a resume under Ray, or on another layout).
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU visible then
        device = torch.cuda.current_device()
        cuda = cuda[device] if device < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def timed(batches, waited: list[float]):
    """The batches, adding the time spent waiting for each to `waited[0]` (input-bound
    training shows as data time close to the epoch's training time)."""
    batches = iter(batches)
    while True:
        started = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - started
        yield batch


def checkpoint_bytes(cfg: TrainConfig) -> int:
    """About the size of a checkpoint: weights and momentum (BN statistics are small)."""

    return summarize(cfg.architecture)["params"] * 2 * DTYPE_BYTES[cfg.dtype]


def due_for_checkpoint(cfg: TrainConfig, engine: RankEngine, epoch: int, last_epoch: int,
                       size: int, since_s: float, write_s: float | None) -> bool:
    """`checkpoint_due`, decided alike on every rank (state_dict is a collective): with auto and
    a large checkpoint, from the largest elapsed and write times over the world (rank 0 writes)."""
    if cfg.checkpoint_every == "auto" and engine.world > 1 and write_s is not None and \
            size > SMALL_CHECKPOINT_BYTES:
        times = torch.tensor([since_s, write_s], dtype=torch.float64, device=engine.device)
        since_s, write_s = engine.reduce(times, op=torch.distributed.ReduceOp.MAX).tolist()
    return checkpoint_due(cfg.checkpoint_every, epoch, last_epoch, size, since_s, write_s)


DTYPE_BYTES = {"float32": 4, "float64": 8}


def train_loop(cfg: TrainConfig, session: Session) -> dict:
    """Train `cfg` to the end (or from the session's checkpoint); returns the final metrics.

    Runs as one process, or as one rank of the mesh that `cfg.parallel` describes (every rank
    calls it; the collectives inside keep them in step)."""
    cfg = cfg.resolved(torch.cuda.is_available())
    device = torch.device(cfg.device)
    train_split, test_split = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_size,
                                           cfg.test_size, cfg.seed)
    cfg = with_data_classes(cfg, train_split)
    engine = RankEngine(cfg, device)
    train_batches, test_batches = make_batches(cfg, engine, train_split, test_split)
    per_epoch = len(train_batches)
    total_steps = int(min(cfg.steps or math.inf, cfg.epochs * per_epoch))  # finite: epochs bound it
    epochs = math.ceil(total_steps / per_epoch)
    train_step = TrainingStep(cfg, engine, total_steps)
    start_epoch, best, metrics = restore(cfg, session, train_step)

    size = checkpoint_bytes(cfg)
    saved_at, write_s = time.perf_counter(), None  # the last checkpoint: when, and its cost
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        steps = min(per_epoch, total_steps - epoch * per_epoch)
        seen, loss_sum, wrong, waited = train_epoch(cfg, session, engine, train_step,
                                                    train_batches, epoch, epochs, steps)
        train_time = time.perf_counter() - started
        engine.check_replicas()
        test_error, test_error_top5 = engine.evaluate(test_batches,
                                                      train_step.evaluation_context)
        best = min(best, test_error)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_error": wrong / seen,
            "test_error": test_error,
            "test_error_top5": test_error_top5,
            "best_test_error": best,
            "lr": train_step.lr,
            "images_per_s": seen / train_time,
            "epoch_time_s": time.perf_counter() - started,
            "data_time_s": waited,
            "step_time_s": train_time - waited,
            "step": train_step.steps_done,
            "epochs_total": epochs,
        } | skipped_images(cfg, engine, train_batches)
        reporting = time.perf_counter()
        if due_for_checkpoint(cfg, engine, epoch + 1, epochs, size, reporting - saved_at,
                              write_s):
            state = train_step.state_dict()  # a collective; the full state on rank 0
            if state is not None:
                state.update({
                    "epoch": epoch + 1, "best_test_error": best, "rng": rng_state(),
                    "metrics": metrics, "architecture": cfg.architecture.model_dump(mode="json"),
                    "config": cfg.model_dump(mode="json")})
            session.report(metrics, state)
            saved_at = time.perf_counter()
            write_s = saved_at - reporting
        else:  # metrics every epoch, a checkpoint only on checkpoint epochs (Ray's convention)
            session.report(metrics, None)
    return metrics


def with_data_classes(cfg: TrainConfig, train_split) -> TrainConfig:
    """The config with the classifier sized to the data (an image folder: its class folders)."""
    entry = DATASETS[cfg.dataset]
    classes = entry.classes or len(train_split.classes)
    if classes == cfg.architecture.num_classes:
        return cfg
    if entry.classes is not None or cfg.architecture.classes is not None:
        raise ConfigError(f"{cfg.dataset} has {classes} classes, the architecture "
                          f"{cfg.architecture.num_classes}; set architecture.classes: "
                          f"{classes} or leave it out")
    return cfg.model_copy(update={"architecture": cfg.architecture.model_copy(
        update={"classes": classes})})


def make_batches(cfg: TrainConfig, engine: RankEngine, train_split, test_split
                 ) -> tuple[EpochBatches, EpochBatches]:
    """This rank's training and evaluation batches: its data-parallel replica's share."""
    entry, device, p = DATASETS[cfg.dataset], engine.device, cfg.parallel
    # Pipeline stages keep the shapes of the first step: evaluate in batches of the training size
    # there. Elsewhere in large batches (a compiled model evaluates eagerly: see
    # TrainingStep.evaluation_context).
    test_size = cfg.batch_size if p.pp > 1 else max(cfg.batch_size, EVAL_BATCH[device.type])
    shard = (engine.mesh.dp_rank, p.dp)
    train_batches = entry.batches(train_split, cfg, cfg.batch_size, device, True, shard)
    test_batches = entry.batches(test_split, cfg, test_size, device, False, shard)
    if len(train_batches) == 0:
        raise ConfigError(f"train_size {len(train_split)} is smaller than one batch "
                          f"({cfg.batch_size}); raise train_size or lower batch_size")
    return train_batches, test_batches


def restore(cfg: TrainConfig, session: Session, train_step: TrainingStep
            ) -> tuple[int, float, dict]:
    """(first epoch, best test error, last metrics) from the session's checkpoint, if any."""
    state = session.restore()
    if state is None:
        return 0, math.inf, {}
    try:
        check_same_run(state, cfg)
        train_step.load_state_dict(state)
        set_rng_state(state["rng"])
        return int(state["epoch"]), float(state["best_test_error"]), state["metrics"]
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
        first_line = short((str(exc).strip().splitlines() or [""])[0], 200)
        raise CheckpointError(f"the checkpoint's state does not fit this run "
                              f"({type(exc).__name__}: {first_line}); delete it to start "
                              f"over") from None


def train_epoch(cfg: TrainConfig, session: Session, engine: RankEngine, train_step: TrainingStep,
                train_batches, epoch: int, epochs: int, steps: int
                ) -> tuple[float, float, float, float]:
    """One epoch's steps: (images seen, loss summed, wrong predictions, seconds waiting for
    input). Losses are read back only every `log_every` steps and at the epoch's end."""
    engine.model.train()
    seen = loss_sum = wrong = 0.0
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
               disable=not session.interactive, leave=False, file=sys.stderr)
    waited = [0.0]  # seconds spent waiting for input batches
    for i, (x, y) in enumerate(timed(train_batches.epoch(epoch), waited)):
        if i == steps:
            break
        lr = train_step.lr  # the rate this step uses
        train_step(x, y)
        bar.update()
        if (i + 1) % cfg.log_every and i + 1 < steps:
            continue  # the device runs ahead; nothing is read back until the next log line
        window = train_step.read()
        if window.first_nonfinite is not None:
            raise TrainingDiverged(
                f"loss became non-finite at step {window.first_nonfinite} (epoch "
                f"{(window.first_nonfinite - 1) // len(train_batches) + 1}); lower the "
                f"learning rate")
        seen, loss_sum, wrong = seen + window.images, loss_sum + window.loss_sum, \
            wrong + window.wrong
        session.log_step({"kind": "step", "step": train_step.steps_done, "epoch": epoch + 1,
                          "loss": window.loss, "lr": lr})
        bar.set_postfix(loss=f"{window.loss:.3f}", refresh=False)
    bar.close()
    return seen, loss_sum, wrong, waited[0]


def skipped_images(cfg: TrainConfig, engine: RankEngine, train_batches: EpochBatches) -> dict:
    """Undecodable images skipped this epoch, summed over the data-parallel replicas (every rank
    of a replica reads its images); {} for data held whole."""
    if train_batches.skipped is None:
        return {}
    skipped = engine.reduce(torch.tensor([len(train_batches.skipped)], dtype=torch.float64,
                                         device=engine.device))
    return {"skipped_images": round(skipped.item()) // (engine.world // cfg.parallel.dp)}
