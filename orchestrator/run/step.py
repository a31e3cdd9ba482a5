"""The training step: one object owns everything between two batches.

    zero_grad -> forward/backward of this rank's share (RankEngine) under the precision
    policy -> gradients averaged over data-parallel replicas -> loss scale undone (fp16) ->
    optional clipping -> optimizer and LR step -> BatchNorm statistics averaged over replicas

Losses, error counts and the first step whose loss was not finite stay on the device: nothing in
a step waits for the GPU. `read()` brings them to the host (the loop calls it every `log_every`
steps and at the end of an epoch). `state_dict()` is everything a checkpoint holds about training:
the model and momentum in the canonical single-device layout, the LR schedule, the loss scaler and
the step count; it loads under any mesh.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from models.blocks import MultiResidualBlock
from models.complexity import input_size
from orchestrator.parallel.engine import RankEngine
from orchestrator.run.config import TrainConfig

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = {"default": "default", "cudagraphs": "reduce-overhead"}
NOT_SEEN = 2**62  # "no non-finite loss yet", larger than any step number


@dataclass
class Window:
    """What the steps since the last read did, over the whole mesh."""
    steps: int
    images: int
    loss_sum: float
    wrong: float
    first_nonfinite: int | None  # the step number, counted from the start of training

    @property
    def loss(self) -> float:
        return self.loss_sum / self.images


def compile_blocks(model: torch.nn.Module, **options) -> int:
    """Regional compilation (torch's recipe for repeated layers): each multi-residual block is
    compiled on its own, in place; blocks of the same shapes share one compiled graph, so the
    compile time grows with the number of distinct blocks (about six in a CIFAR net), not with
    the depth. Stem and head stay eager. Static shapes (dynamic=False): dynamo's automatic
    dynamic pass would otherwise turn the later stages' graphs into dynamic-shape ones once a
    second input size appears. All blocks share one code object, so its recompile limit must
    cover every distinct block (a 4-stage ImageNet net has 8). Returns the number compiled."""

    blocks = [m for m in model.modules() if isinstance(m, MultiResidualBlock)]
    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, len(blocks))  # recompile_limit
    for block in blocks:
        block.compile(dynamic=False, **options)
    return len(blocks)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, total_steps: int):
    # Weight decay on every parameter, BN included, as in the original Torch SGD. On CUDA the
    # fused kernel updates every parameter in a few launches.
    fused = next(model.parameters()).is_cuda or None
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, fused=fused)
    milestones = sorted({max(1, round(m * total_steps)) for m in cfg.lr_milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, cfg.lr_gamma)
    return optimizer, scheduler


def build_scaler(device: torch.device, world: int):
    """fp16's dynamic loss scaler; across processes, every rank skips the same steps."""
    if world == 1:
        scaler = torch.amp.GradScaler(device.type)
    else:
        scaler = ShardedGradScaler(device.type)  # all-reduces "found inf" over the world
    # A pipeline stage without the loss never calls scale(); this creates the scale it unscales by.
    scaler.scale(torch.zeros((), device=device))
    return scaler


class TrainingStep:
    def __init__(self, cfg: TrainConfig, engine: RankEngine, total_steps: int):
        if "auto" in (cfg.device, cfg.precision, cfg.compile, cfg.execution):
            raise ValueError("TrainingStep needs a resolved config (TrainConfig.resolved)")
        self.cfg, self.engine, device = cfg, engine, engine.device
        self.batch_size = cfg.batch_size
        dtype = AUTOCAST_DTYPES[cfg.precision]
        self._autocast = functools.partial(torch.autocast, device.type, dtype=dtype) if dtype \
            else contextlib.nullcontext
        if device.type == "cuda":
            # Every shape is fixed (whole training batches, padded evaluation batches): let
            # cuDNN time its algorithms once per shape and keep the fastest.
            torch.backends.cudnn.benchmark = True
        self.optimizer, self.scheduler = build_optimizer(cfg, engine.model, total_steps)
        self.scaler = build_scaler(device, engine.world) if cfg.precision == "fp16" else None
        if cfg.compile != "none":
            # In place: parameter names, and so checkpoints, stay those of the plain model.
            if cfg.compile_scope == "blocks":
                compile_blocks(engine.model, mode=COMPILE_MODES[cfg.compile])
            else:
                engine.model.compile(mode=COMPILE_MODES[cfg.compile])
        self.graphs = cfg.compile == "cudagraphs"
        self.steps_done = 0
        self._since_read = 0
        self._totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, wrong
        self._first_nonfinite = torch.full((), NOT_SEEN, device=device, dtype=torch.int64)
        self._step_number = torch.zeros((), device=device, dtype=torch.int64)

    def forward_context(self):
        """Where every forward runs: autocast to the precision's dtype. With CUDA graphs, each
        forward starts a new replay (whose outputs overwrite the previous ones: callers read a
        forward's results before the next)."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._autocast()

    def evaluation_context(self) -> contextlib.ExitStack:
        """Where evaluation forwards run: autocast, and a compiled model run eagerly (no second
        graph to compile and capture for eval mode; the caller uses large batches instead)."""
        stack = contextlib.ExitStack()
        if self.cfg.compile != "none":
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(self._autocast())
        return stack

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return self.optimizer.param_groups[0]["lr"]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step on this rank's share of the global batch (x, y)."""
        engine, optimizer = self.engine, self.optimizer
        optimizer.zero_grad(set_to_none=True)
        stats = engine.forward_backward(x, y, self.forward_context,
                                         self.scaler.scale if self.scaler else None)
        engine.average_gradients()
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.cfg.grad_clip_norm is not None:
            engine.clip_gradients(self.cfg.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped (on every rank) when a gradient overflowed
            self.scaler.update()
        else:
            optimizer.step()
        engine.sync_batchnorm_statistics()
        self.scheduler.step()
        self._track(stats)
        self.steps_done += 1
        self._since_read += 1

    def _track(self, stats: torch.Tensor) -> None:
        self._totals += stats
        self._step_number += 1
        # stats[0] is zero on ranks that do not report, so it is their "finite" too.
        seen = torch.where(torch.isfinite(stats[0]), NOT_SEEN, self._step_number)
        torch.minimum(self._first_nonfinite, seen, out=self._first_nonfinite)

    def read(self) -> Window:
        """The steps since the last read, summed over the mesh; waits for the device."""
        totals, first = self._totals.clone(), self._first_nonfinite.clone()
        self.engine.reduce(totals)
        self.engine.reduce(first, op=torch.distributed.ReduceOp.MIN)
        (loss_sum, wrong), first_step = totals.tolist(), int(first)
        window = Window(self._since_read, self._since_read * self.batch_size, loss_sum, wrong,
                        None if first_step == NOT_SEEN else first_step)
        self._totals.zero_()
        self._since_read = 0
        return window

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict | None:
        """Everything about training a checkpoint holds, on world rank 0 (a collective)."""
        state = self.engine.canonical_state(self.optimizer)
        if state is not None:
            state.update({"scheduler": self.scheduler.state_dict(), "step": self.steps_done,
                          "precision": self.cfg.precision})
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_canonical(state, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.scheduler.get_last_lr()[0]
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.steps_done = state["step"]
        self._step_number.fill_(self.steps_done)


def seconds_per_step(cfg: TrainConfig, steps: int = 2) -> float:
    """A short measurement: seconds per training step of `cfg` (one process, this machine's
    device, random images), after one warm-up step."""

    cfg = cfg.resolved(torch.cuda.is_available())
    device = torch.device(cfg.device)
    engine = RankEngine(cfg, device)
    step = TrainingStep(cfg, engine, total_steps=steps + 1)
    size = input_size(cfg.architecture)
    x = torch.randn(cfg.batch_size, 3, size, size, device=device)
    y = torch.randint(0, cfg.architecture.num_classes, (cfg.batch_size,), device=device)
    step(x, y)
    step.read()  # waits for the warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    step.read()
    return (time.perf_counter() - started) / steps
