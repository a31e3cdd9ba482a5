"""The parallel degrees as one DeviceMesh.

Dimensions ("pp", "dp", "bp"): pipeline outermost, branch innermost. Ray Train orders ranks by
node, so consecutive ranks (a branch-parallel group, which all-reduces inside every block) share a
node, and the pipeline's point-to-point traffic is what crosses nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from orchestrator.parallel.degrees import ParallelConfig

DIMS = ("pp", "dp", "bp")


@dataclass
class Mesh:
    cfg: ParallelConfig
    device_mesh: DeviceMesh | None = None
    pp_rank: int = 0
    dp_rank: int = 0
    bp_rank: int = 0

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group along `dim`, or None when that degree is 1."""
        if self.device_mesh is None or getattr(self.cfg, dim) == 1:
            return None
        return self.device_mesh.get_group(dim)

    def required_group(self, dim: str) -> dist.ProcessGroup:
        """The process group along `dim`, whose degree is above 1 (so the mesh is built)."""
        group = self.group(dim)
        assert group is not None, f"parallel.{dim} is 1: no process group along it"
        return group

    @property
    def world_rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.cfg.pp - 1


def build_mesh(cfg: ParallelConfig, device: torch.device) -> Mesh:
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != cfg.world_size:
        raise ValueError(f"parallel: dp x pp x bp = {cfg.world_size} but {world} processes run; "
                         f"start {cfg.world_size} workers or change the degrees")
    if world == 1:
        return Mesh(cfg)
    mesh = init_device_mesh(device.type, (cfg.pp, cfg.dp, cfg.bp), mesh_dim_names=DIMS)
    coordinate = mesh.get_coordinate()
    assert coordinate is not None, "every process is in the mesh: its size is the world's"
    pp_rank, dp_rank, bp_rank = coordinate
    return Mesh(cfg, mesh, pp_rank, dp_rank, bp_rank)
