"""Branch parallelism: the k functions of every block split across the ranks of the bp group.

The block input is replicated in the group. Each rank computes the sum of its own functions; the
block output is shortcut + all-reduce(partial sums). Two conjugate autograd operators do this
without touching the model: `copy_to_branches` (identity forward, all-reduce backward) on the
functions' input, and `reduce_from_branches` (all-reduce forward, identity backward) on their
sum. (torch.distributed.nn.functional.all_reduce is not used: its backward all-reduces again and
multiplies gradients by the group size.) Per-function BatchNorm stays local: every rank of the
group sees the same batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from models.blocks import ResidualFunctions


class _CopyToBranches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()  # dense strides kept (channels_last stays so), else contiguous
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromBranches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()  # as above: collectives take channels_last-dense tensors
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def owned_functions(k: int, size: int, rank: int) -> list[int]:
    """Contiguous shares, the first ranks taking one more when k does not divide: k=5, bp=2 ->
    [0, 1, 2] and [3, 4]."""
    base, extra = divmod(k, size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def apply_branch_parallel(model: nn.Module, group: dist.ProcessGroup, size: int,
                          rank: int) -> None:
    """Keep this rank's functions of every block and all-reduce their sums across the group."""
    for functions in model.modules():
        if not isinstance(functions, ResidualFunctions):
            continue
        keep = {str(i) for i in owned_functions(len(functions), size, rank)}
        for key in [key for key in functions if key not in keep]:
            del functions[key]
        functions.register_forward_pre_hook(
            lambda module, args: (_CopyToBranches.apply(args[0], group),))
        functions.register_forward_hook(
            lambda module, args, out: _ReduceFromBranches.apply(out, group))
