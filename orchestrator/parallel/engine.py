"""One rank's share of a Multi-ResNet under a data x pipeline x branch mesh.

`RankEngine` builds the plain model, shards it from outside (branch.py, pipeline.py) and runs
what depends on the sharding: forward and backward whose gradients equal those of one process
that splits the global batch the same way (dp replicas x micro-batches, each normalised by its own
BatchNorm statistics), the collectives that keep replicas identical, the global gradient norm,
evaluation, and checkpoints in the canonical single-device layout. The training step around it
(precision, optimizer, clipping, metrics) is `orchestrator.run.step.TrainingStep`. With every
degree 1 it is simply the model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.blocks import set_fused
from models.multi_resnet import create_model
from orchestrator.parallel.branch import apply_branch_parallel
from orchestrator.parallel.mesh import build_mesh
from orchestrator.parallel.pipeline import build_schedule, keep_stage

DTYPES = {"float32": torch.float32, "float64": torch.float64}
LossScale = Callable[[torch.Tensor], torch.Tensor]


def _unscaled(loss: torch.Tensor) -> torch.Tensor:
    return loss


def _average(tensors: list[torch.Tensor], group: dist.ProcessGroup | None, size: int) -> None:
    """All-reduce-average `tensors` in place over `group`: one flat buffer per dtype, one
    collective each (a CUDA collective costs about as much as a small step's kernel)."""
    if group is None:
        return
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        flat /= size
        torch._foreach_copy_(same, [f.view_as(t) for f, t in
                                    zip(flat.split([t.numel() for t in same]), same)])


class ReplicaMismatch(RuntimeError):
    """Parameters that should be identical across ranks are not."""


class RankEngine:
    def __init__(self, cfg, device: torch.device):
        """`cfg`: the run's `TrainConfig` (orchestrator.run.config, a layer above this one)."""
        self.cfg, self.device, p = cfg, device, cfg.parallel
        self.mesh = build_mesh(p, device)
        self.world = p.world_size
        torch.manual_seed(cfg.seed)  # every rank builds the same full model, then keeps its share
        model = create_model(cfg.architecture).to(device, DTYPES[cfg.dtype])
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        set_fused(model, cfg.execution == "fused")
        if p.bp > 1:
            apply_branch_parallel(model, self.mesh.required_group("bp"), p.bp, self.mesh.bp_rank)
        self.schedule = None
        self._scale_loss: LossScale = _unscaled
        self._stage_losses: list[torch.Tensor] = []
        if p.pp > 1:
            keep_stage(model, self.mesh.pp_rank, p.pp)
            self.schedule = build_schedule(model, self.mesh.pp_rank, p.pp, device,
                                           self.mesh.group("pp"), p.microbatches, p.schedule,
                                           cfg.channels_last, self._pipeline_loss)
        self.model = model
        self.names: dict[torch.Tensor, str] = {param: name for name, param in model.named_parameters()}
        # The ranks whose losses and predictions make the metrics: one per dp replica.
        self.reports_metrics = self.mesh.last_stage and self.mesh.bp_rank == 0

    # ------------------------------------------------------------------------- training
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, forward_context,
                         scale_loss: LossScale | None = None) -> torch.Tensor:
        """Forward (inside `forward_context()`, e.g. autocast) and backward on this replica's
        batch, gradients summed over micro-batches as a mean loss (`scale_loss` applied: a loss
        scaler's `scale`).
        Returns this rank's [loss sum, wrong predictions], zero where it does not report."""
        x = x.to(DTYPES[self.cfg.dtype])
        mb = self.cfg.parallel.microbatches
        stats = torch.zeros(2, device=self.device, dtype=torch.float64)
        scale_loss = scale_loss or _unscaled
        if self.schedule is not None:
            self._scale_loss, self._stage_losses = scale_loss, []
            with forward_context():
                if self.mesh.first_stage:
                    self.schedule.step(x)
                elif self.mesh.last_stage:
                    out = self.schedule.step(target=y)
                    # The last mb calls are this step's (the first step also computes a loss on a
                    # stand-in output to infer shapes).
                    losses = self._stage_losses[-mb:]
                    if self.reports_metrics:
                        stats += self._stats(torch.stack(losses).mean(), out, y)
                else:
                    self.schedule.step()
            return stats
        for xs, ys in zip(x.tensor_split(mb), y.tensor_split(mb)):
            with forward_context():
                out = self.model(xs)
                loss = F.cross_entropy(out, ys)
            scale_loss(loss / mb).backward()
            if self.reports_metrics:  # read now: a CUDA-graph output is reused by the next call
                stats += self._stats(loss.detach(), out.detach(), ys)
        return stats

    def _pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(output, target)
        self._stage_losses.append(loss.detach())
        return self._scale_loss(loss)

    @staticmethod
    def _stats(mean_loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([mean_loss.double() * len(y), (out.argmax(1) != y).sum().double()])

    def average_gradients(self) -> None:
        """Average gradients over the data-parallel replicas, and those of the parameters
        replicated in a branch-parallel group (stem, head, pre-activation BN, shortcuts) over
        that group: each bp rank computes them separately, and on CUDA (cudnn.benchmark picks
        its algorithm per rank, some with atomics) their bits differ."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        _average(grads, self.mesh.group("dp"), self.cfg.parallel.dp)
        _average([p.grad for p, name in self.names.items() if p.grad is not None
                  and ".functions." not in name], self.mesh.group("bp"), self.cfg.parallel.bp)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm of the whole model (every parameter counted once:
        shards summed over bp and pp, parameters replicated in a bp group taken from its rank
        0); returns that norm. No host sync."""
        owned = [p.grad for p, name in self.names.items() if p.grad is not None
                 and (self.mesh.bp_rank == 0 or ".functions." in name)]
        squares = torch.nn.utils.get_total_norm(owned).double().square() if owned else \
            torch.zeros((), device=self.device, dtype=torch.float64)
        for dim in ("bp", "pp"):
            if self.mesh.group(dim) is not None:
                dist.all_reduce(squares, group=self.mesh.group(dim))
        norm = squares.sqrt()
        torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), max_norm, norm)
        return norm

    def sync_batchnorm_statistics(self) -> None:
        """Keep data-parallel replicas identical: average their BatchNorm running statistics
        (one collective a step, not one per buffer)."""
        _average([b for b in self.model.buffers() if b.is_floating_point()],
                 self.mesh.group("dp"), self.cfg.parallel.dp)

    def reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=op)
        return tensor

    # ------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batches, forward_context=contextlib.nullcontext) -> tuple[float, float]:
        """Top-1 and top-5 error over the split. Each replica takes its share of every batch,
        padded to a fixed size (pipeline stages need fixed shapes); padded images do not
        count. Counts stay on the device: one wait, at the end."""
        self.model.eval()
        wrong = torch.zeros(3, device=self.device, dtype=torch.float64)  # top-1, top-5, images
        for x, y, valid in batches.padded_epoch((self.mesh.dp_rank, self.cfg.parallel.dp)):
            with forward_context():
                out = self._forward_eval(x.to(DTYPES[self.cfg.dtype]), y)
            if self.reports_metrics and out is not None and valid:
                top = out[:valid].topk(min(5, out.shape[1]), dim=1).indices
                wrong[0] += (top[:, 0] != y[:valid]).sum()
                wrong[1] += (top != y[:valid, None]).all(1).sum()
                wrong[2] += valid
        self.reduce(wrong)
        top1, top5 = (wrong[:2] / wrong[2].clamp(min=1)).tolist()
        return top1, top5

    def _forward_eval(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if self.schedule is None:
            return self.model(x)
        if self.mesh.first_stage:
            self.schedule.eval(x)
            return None
        if self.mesh.last_stage:
            return self.schedule.eval(target=y)
        self.schedule.eval()
        return None

    # ------------------------------------------------------------------------- checkpoints
    def canonical_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The single-device state_dict (and momentum by parameter name), on world rank 0."""
        local = {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                 "momentum": {self.names[p]: s["momentum_buffer"].cpu()
                              for p, s in optimizer.state.items() if "momentum_buffer" in s}}
        if self.world == 1:
            return local
        gathered: list[Any] | None = [None] * self.world if self.mesh.world_rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if gathered is None:
            return None
        merged: dict[str, dict] = {"model": {}, "momentum": {}}
        for part in gathered:  # replicated entries are identical on every rank holding them
            merged["model"].update(part["model"])
            merged["momentum"].update(part["momentum"])
        return merged

    def load_canonical(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        """Load this rank's share of a canonical state (saved under any mesh)."""
        own = self.model.state_dict()
        missing = [k for k in own if k not in state["model"]]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} entries, e.g. {missing[0]}")
        self.model.load_state_dict({k: state["model"][k] for k in own})
        for param, name in self.names.items():
            if name in state["momentum"]:
                buf = state["momentum"][name].to(param.device, param.dtype)
                optimizer.state[param]["momentum_buffer"] = buf.contiguous(
                    memory_format=torch.channels_last if param.dim() == 4 and
                    self.cfg.channels_last else torch.contiguous_format)

    def check_replicas(self) -> None:
        """Parameters replicated across a branch- or data-parallel group must be identical."""
        for dim, replicated in (("bp", lambda n: ".functions." not in n), ("dp", lambda n: True)):
            group = self.mesh.group(dim)
            if group is None:
                continue
            names = sorted(n for n in self.names.values() if replicated(n))
            params = dict(self.model.named_parameters())
            sums = torch.stack([params[n].detach().double().abs().sum() for n in names]
                               + [params[n].detach().double().sum() for n in names])
            high, low = sums.clone(), sums.clone()
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
            diverged = [names[i % len(names)] for i in torch.nonzero(high != low).flatten()]
            if diverged:
                raise ReplicaMismatch(f"{dim} replicas of {diverged[0]} differ; "
                                      f"{len(set(diverged))} replicated parameters diverged")
