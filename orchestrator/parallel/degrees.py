"""The parallel degrees of a run (its `parallel:` key): a schema only, with no torch, so that run
and study files are validated without loading it. mesh.py makes them a DeviceMesh."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ParallelConfig(BaseModel):
    """Degrees of the mesh: data x pipeline x branch parallelism (one process each). Part of
    a run's config (`TrainConfig.parallel`); defined in this layer, where it is used, so that
    the layer needs nothing from the run above it."""

    model_config = ConfigDict(extra="forbid")

    dp: int = Field(1, ge=1, le=4096, description="data-parallel replicas")
    pp: int = Field(1, ge=1, le=4096, description="pipeline stages (consecutive blocks, balanced "
                    "by FLOPs)")
    bp: int = Field(1, ge=1, le=4096, description="branch-parallel ranks sharing each block's k "
                    "functions")
    microbatches: int = Field(1, ge=1, le=4096, description="pipeline micro-batches per replica "
                              "batch")
    schedule: Literal["gpipe", "1f1b"] = "gpipe"

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.bp

    @property
    def layout(self) -> str:
        return f"dp={self.dp},pp={self.pp},bp={self.bp},mb={self.microbatches},{self.schedule}"
