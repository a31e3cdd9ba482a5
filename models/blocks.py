"""Pre-activation residual functions and the multi-residual block.

A multi-residual block computes  x_{l+1} = shortcut(x_l) + f^1(x_l) + ... + f^k(x_l).

Every function is a chain of pre-activation units (BN -> ReLU -> conv). The k functions live in a
`ResidualFunctions` container (a ModuleDict keyed "0".."k-1") whose forward returns their sum, in
one of two execution forms that share the same parameters and state_dict:

* reference: a Python loop over the functions, exactly as the original Torch code;
* fused: the k functions as wide tensor operations. The first unit normalises the shared input once
  and applies k affine transforms (or, after a shared pre-activation, one dense conv with the k
  weights stacked); middle units are one BatchNorm over k*C channels and one grouped conv; the last
  conv takes the k outputs stacked on the channel axis, so one dense conv computes the sum.

Keys survive deletion, so parallel code can drop functions a rank does not own (branch
parallelism) and checkpoints keep one naming. Nothing here knows about devices or processes.
"""
from __future__ import annotations

from typing import NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BatchNorm (cudnn>=4 Torch code dropped conv biases too).
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)


class ResidualFunction(nn.Module):
    """One residual function: a chain of (BN -> ReLU -> conv) units.

    `bn1` is absent when the block applies a shared pre-activation (or none) before its functions.
    """

    conv_names: tuple[str, ...] = ()

    def units(self) -> list[tuple[nn.BatchNorm2d | None, nn.Conv2d]]:
        out = []
        for i, name in enumerate(self.conv_names, start=1):
            out.append((getattr(self, f"bn{i}", None), getattr(self, name)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for bn, layer in self.units():
            if bn is not None:
                x = F.relu(bn(x))
            x = layer(x)
        return x


class BasicFunction(ResidualFunction):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, stride on the first conv."""

    conv_names = ("conv1", "conv2")

    def __init__(self, in_channels: int, out_channels: int, stride: int, preact: bool):
        super().__init__()
        if preact:
            self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3)


class BottleneckFunction(ResidualFunction):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 at a quarter of the output width.

    `stride_on` says which conv is strided: the first 1x1 in the CIFAR code, the 3x3 in the
    ImageNet code (fb.resnet.torch), as the original implementations do.
    """

    conv_names = ("conv1", "conv2", "conv3")

    def __init__(self, in_channels: int, out_channels: int, stride: int, preact: bool,
                 stride_on: str = "conv1"):
        super().__init__()
        mid = out_channels // 4
        if preact:
            self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv(in_channels, mid, 1, stride if stride_on == "conv1" else 1)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = conv(mid, mid, 3, stride if stride_on == "conv2" else 1)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = conv(mid, out_channels, 1)


class ResidualFunctions(nn.ModuleDict):
    """The k residual functions of a block; forward returns their sum.

    `fused` selects the execution form; both read the same parameters. An empty container (a
    branch-parallel rank may own no function of a block) returns None.
    """

    def __init__(self, functions: list[ResidualFunction]):
        super().__init__({str(i): f for i, f in enumerate(functions)})
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        functions = cast(list[ResidualFunction], list(self.values()))  # the only kind it is built with
        if not functions:
            return None
        if self.fused and len(functions) > 1:
            return fused_sum(functions, x)
        out = functions[0](x)
        for f in functions[1:]:
            out = out + f(x)
        return out


class TypeAShortcut(nn.Module):
    """Subsample, then zero-pad the channels: the parameter-free CIFAR shortcut (option A)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


def shortcut(kind: str, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    if kind == "A":
        return TypeAShortcut(in_channels, out_channels, stride)
    return conv(in_channels, out_channels, 1, stride)  # option B: projection shared by all k


class PreActivation(nn.Sequential):
    """The BN-ReLU that the first block of a stage shares between its functions and shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=False)


class MultiResidualBlock(nn.Module):
    """x -> shortcut(a) + sum_i f^i(a), with a = preact(x) (identity when not shared)."""

    def __init__(self, functions: list[ResidualFunction], shortcut: nn.Module,
                 preact: nn.Module | None):
        super().__init__()
        self.preact = preact if preact is not None else nn.Identity()
        self.functions = ResidualFunctions(functions)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preact(x)
        residual = self.functions(x)
        out = self.shortcut(x)
        return out if residual is None else out + residual


# ----------------------------------------------------------------------------- fused form

def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


class _RunningStats(NamedTuple):
    mean: torch.Tensor
    var: torch.Tensor
    batches: torch.Tensor


def _running_stats(bn: nn.BatchNorm2d) -> _RunningStats:
    """bn's running buffers, read only where bn.track_running_stats says they exist."""
    mean, var, batches = bn.running_mean, bn.running_var, bn.num_batches_tracked
    assert mean is not None and var is not None and batches is not None, "BatchNorm tracks no statistics"
    return _RunningStats(mean, var, batches)


def _momentum(bn: nn.BatchNorm2d) -> float:
    if bn.momentum is None:  # F.batch_norm and lerp_ take a number only
        raise TypeError("the fused form needs BatchNorm momentum as a number, not None (cumulative average)")
    return bn.momentum


def _batch_norm_stacked(bns: list[nn.BatchNorm2d], h: torch.Tensor) -> torch.Tensor:
    """k BatchNorms over k channel groups of h, as one normalisation.

    The running statistics live in each function's own buffers; they are updated exactly as k
    separate BatchNorm2d calls would update them.
    """
    bn0 = bns[0]
    use_batch_stats = bn0.training or bn0.running_mean is None
    stats = [_running_stats(b) for b in bns] if bn0.track_running_stats else None
    running_mean = _stack([s.mean for s in stats]) if stats is not None else None
    running_var = _stack([s.var for s in stats]) if stats is not None else None
    out = F.batch_norm(h, running_mean, running_var, _stack([b.weight for b in bns]),
                       _stack([b.bias for b in bns]), use_batch_stats, _momentum(bn0), bn0.eps)
    if bn0.training and stats is not None and running_mean is not None and running_var is not None:
        with torch.no_grad():
            for s, m, v in zip(stats, running_mean.chunk(len(bns)), running_var.chunk(len(bns))):
                s.mean.copy_(m)
                s.var.copy_(v)
                s.batches.add_(1)
    return out


def _batch_norm_shared_input(bns: list[nn.BatchNorm2d], x: torch.Tensor) -> torch.Tensor:
    """k BatchNorms that all read the same x: normalise once, then k affine transforms.

    Returns the k results stacked on the channel axis (N, k*C, H, W), in x's dtype. Statistics
    are computed and kept in the parameters' precision (fp32 under autocast), as nn.BatchNorm2d
    does with a bf16 or fp16 input.
    """
    k, bn0 = len(bns), bns[0]
    out_dtype, x = x.dtype, x.to(bn0.weight.dtype)
    weight = _stack([b.weight for b in bns])[None, :, None, None]
    bias = _stack([b.bias for b in bns])[None, :, None, None]
    if bn0.training or not bn0.track_running_stats:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        x_hat = (x - mean[None, :, None, None]) * torch.rsqrt(var + bn0.eps)[None, :, None, None]
        if bn0.training and bn0.track_running_stats:
            n = x.numel() // x.size(1)
            with torch.no_grad():
                unbiased = var * (n / max(n - 1, 1))
                for s in map(_running_stats, bns):
                    s.mean.lerp_(mean, _momentum(bn0))
                    s.var.lerp_(unbiased, _momentum(bn0))
                    s.batches.add_(1)
        return (x_hat.repeat(1, k, 1, 1) * weight + bias).to(out_dtype)
    # Evaluation: each function has its own running statistics, so each gets its own affine map.
    stats = [_running_stats(b) for b in bns]
    inv_std = torch.rsqrt(_stack([s.var for s in stats]) + bn0.eps)[None, :, None, None]
    mean = _stack([s.mean for s in stats])[None, :, None, None]
    return ((x.repeat(1, k, 1, 1) - mean) * (inv_std * weight) + bias).to(out_dtype)


def _conv(layer: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, groups)


def fused_sum(functions: list[ResidualFunction], x: torch.Tensor) -> torch.Tensor:
    """sum_i f_i(x) for structurally identical functions, as stacked wide operations."""
    k = len(functions)
    units = [f.units() for f in functions]  # units[i][j] = (bn, conv) of unit j of function i
    depth = len(units[0])
    h = x
    for j in range(depth):
        bns = [bn for bn, _ in (u[j] for u in units) if bn is not None]  # all or none: alike functions
        convs = [u[j][1] for u in units]
        first, last = j == 0, j == depth - 1
        if bns:
            h = _batch_norm_shared_input(bns, h) if first else _batch_norm_stacked(bns, h)
            h = F.relu(h)
        if last:
            # Weights side by side on the input axis: one dense conv sums the k functions.
            weight = torch.cat([c.weight for c in convs], dim=1)
            h = _conv(convs[0], h, weight, groups=1)
        else:
            weight = _stack([c.weight for c in convs])
            # A first unit without BN reads the one shared input: a dense conv to k*C channels.
            groups = 1 if first and not bns else k
            h = _conv(convs[0], h, weight, groups)
    return h


M = TypeVar("M", bound=nn.Module)


def set_fused(model: M, fused: bool) -> M:
    """Switch every multi-residual block of `model` to the fused (True) or reference form."""
    for module in model.modules():
        if isinstance(module, ResidualFunctions):
            module.fused = fused
    return model
