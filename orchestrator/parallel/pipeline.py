"""Pipeline parallelism: consecutive blocks as stages, run by torch.distributed.pipelining.

Stages are cut where they balance forward FLOPs (the stem counts with the first block, the head
with the last). A stage is the same MultiResNet with the blocks it does not own deleted (and the
stem or head set to None off the first or last stage), so parameter names, and therefore
checkpoints, stay those of the whole model.

BatchNorm under pipelining: every micro-batch is normalised with its own batch statistics (as it
is under gradient accumulation), and the running statistics are updated once per micro-batch.

torch.distributed.pipelining is imported where a schedule is built: it takes 1.6 s, paid
otherwise by each of a run's Ray processes whether or not the run has pipeline stages.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.multi_resnet import Architecture, MultiResNet, create_model
from models.complexity import input_size


@lru_cache(maxsize=64)
def block_costs(arch: Architecture) -> tuple[float, ...]:
    """Forward FLOPs per block, stem and head folded into the first and last block."""
    with torch.device("meta"):
        model = create_model(arch)
    size = input_size(arch)
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    costs = [float(counts.get(f"MultiResNet.blocks.{key}", 0)) for key in model.blocks]
    costs[0] += counts.get("MultiResNet.stem", 0)
    costs[-1] += counts.get("MultiResNet.head", 0)
    return tuple(costs)


def partition(costs: list[float], parts: int) -> list[range]:
    """Cut `costs` into `parts` contiguous non-empty ranges minimising the largest sum."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[p][i]: the smallest maximum over splitting costs[:i] into p parts; cut[p][i]: last cut.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                value = max(best[p - 1][j], prefix[i] - prefix[j])
                if value < best[p][i]:
                    best[p][i], cut[p][i] = value, j
    bounds, i = [], n
    for p in range(parts, 0, -1):
        bounds.append(range(cut[p][i], i))
        i = cut[p][i]
    return bounds[::-1]


def stage_block_keys(model: MultiResNet, pp: int) -> list[list[str]]:
    keys = list(model.blocks.keys())
    return [[keys[i] for i in r] for r in partition(list(block_costs(model.arch)), pp)]


def keep_stage(model: MultiResNet, stage: int, stages: int) -> MultiResNet:
    """Delete what stage `stage` of `stages` does not own (in place)."""
    owned = set(stage_block_keys(model, stages)[stage])
    for key in [k for k in model.blocks if k not in owned]:
        del model.blocks[key]
    if stage != 0:
        model.stem = None
    if stage != stages - 1:
        model.head = None
    return model


class _ToChannelsLast(torch.autograd.Function):
    """NHWC forward; the gradient sent back to the previous stage stays contiguous (NCHW)."""

    @staticmethod
    def forward(ctx, x):
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def build_schedule(stage_model: MultiResNet, stage: int, stages: int, device: torch.device,
                   group, microbatches: int, schedule: str, channels_last: bool, loss_fn):
    """The pipeline schedule of this rank; `loss_fn(output, target)` on the last stage.
    Gradients are averaged over micro-batches (scale_grads), matching a mean loss over the
    replica's batch."""
    # Activations cross stages as contiguous tensors (what point-to-point sends need), and
    # go back to the model's memory format on arrival.
    if stage != stages - 1:
        stage_model.register_forward_hook(lambda module, args, out: out.contiguous())
    if stage != 0 and channels_last:
        stage_model.register_forward_pre_hook(lambda module, args: (_ToChannelsLast.apply(args[0]),))
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    pipe_stage = PipelineStage(stage_model, stage, stages, device, group=group)
    schedules = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    return schedules[schedule](pipe_stage, n_microbatches=microbatches,
                               loss_fn=loss_fn, scale_grads=True)
