"""The one schema for a training run: data, recipe, architecture, execution.

Every entry point (the `orchestrator.train` flags, YAML files, sweep trials) builds a `TrainConfig`;
defaults live here and nowhere else. The recipe defaults are the paper's: SGD with Nesterov momentum
0.9, lr 0.1, weight decay 1e-4, batch 128, lr x0.1 at 50% and 75% of training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.multi_resnet import Architecture

# Which dataset family the network is built for (stem, head and number of classes).
ARCH_DATASET = {"cifar10": "cifar10", "cifar100": "cifar100", "synthetic": "cifar10"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(Strict):
    architecture: Architecture = Field(default_factory=lambda: Architecture(depth=20, k=4))
    dataset: Literal["cifar10", "cifar100", "synthetic"] = "cifar10"
    data_dir: str | None = Field(None, description="folder holding cifar-10-batches-py/ etc.")
    train_size: int | None = Field(None, ge=1, description="use the first N training images")
    test_size: int | None = Field(None, ge=1, description="use the first N test images")

    epochs: int = Field(200, ge=1)
    steps: int | None = Field(None, ge=1, description="stop after this many steps in total")
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    lr_milestones: tuple[float, ...] = Field((0.5, 0.75), description="fractions of training")
    lr_gamma: float = Field(0.1, gt=0)
    seed: int = Field(0, ge=0)

    device: Literal["auto", "cpu", "cuda"] = "auto"
    execution: Literal["auto", "reference", "fused"] = Field(
        "auto", description="auto: the faster form on this device (bench/RESULTS.md)")
    channels_last: bool = Field(True, description="NHWC memory format: faster on CPU and GPU "
                                "(bench/RESULTS.md)")

    log_json: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False

    @model_validator(mode="after")
    def _match_architecture_to_dataset(self) -> "TrainConfig":
        wanted = ARCH_DATASET[self.dataset]
        if self.architecture.dataset != wanted:
            fields = self.architecture.model_dump(exclude_unset=True)
            fields["dataset"] = wanted
            self.architecture = Architecture(**fields)
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError("lr_milestones must be fractions between 0 and 1, e.g. [0.5, 0.75]")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs checkpoint_dir: pass --checkpoint-dir DIR")
        return self


class ConfigError(ValueError):
    """Bad user input; the message is one line naming the key and the fix."""


def describe(err: ValidationError, prefix: str = "") -> str:
    """Pydantic errors as one line: `key.path: problem` for each."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data
