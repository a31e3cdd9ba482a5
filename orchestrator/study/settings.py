"""The parts of a study file below the study itself: search ranges, budget, searcher, n0 rules,
trial scheduler, resources and MLflow settings."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from models.architecture import Architecture
from orchestrator.errors import short
from orchestrator.results import ObjectiveMetric
from orchestrator.run.config import Strict
from orchestrator.study.samplers import OPTUNA_SAMPLERS

ARCH_KEYS = set(Architecture.model_fields) - {"dataset"}
RECIPE_KEYS = {"lr", "weight_decay", "momentum", "batch_size", "epochs", "nesterov"}
if TYPE_CHECKING:
    SamplerName = str  # pydantic checks the names; the registry is their one list
else:
    SamplerName = Literal[("n0", *OPTUNA_SAMPLERS)]


class Range(Strict):
    """low..high (a log scale needs low > 0), checked where Optuna would check it: at load."""

    if TYPE_CHECKING:  # each subclass declares them, as int or float
        low: float
        high: float
        log: bool

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}; swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low}); raise low or drop log")
        return self


MAX_VALUES = 100_000  # values an int range or a choice may hold


class IntRange(Range):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    def values(self) -> range:  # a range: its length is known without building the list
        return range(self.low, self.high + 1, self.step)

    @model_validator(mode="after")
    def _log_step(self) -> "IntRange":
        if self.log and self.step != 1:
            raise ValueError("log: true takes step 1 only; drop step or log")
        if len(self.values()) > MAX_VALUES:
            raise ValueError(f"{len(self.values()):,} values from {self.low} to {self.high}; at "
                             f"most {MAX_VALUES:,}: narrow the range or raise step")
        return self


class FloatRange(Range):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False


class Choice(Strict):
    type: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1, max_length=MAX_VALUES)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[Any]) -> list[Any]:
        seen = []  # not a set: a choice may be a list or a mapping
        for choice in choices:  # a grid would train a repeated value twice
            if choice in seen:
                raise ValueError(f"{short(repr(choice), 60)} is listed twice; give each choice "
                                 f"once")
            seen.append(choice)
        return choices


Distribution = Annotated[IntRange | FloatRange | Choice, Field(discriminator="type")]


class Budget(Strict):
    """Architectures whose parameter count falls outside [min_params, max_params] are not part
    of the study's space: never sampled, listed in the dry run and the parent run."""
    min_params: int | None = Field(None, ge=0)
    max_params: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0, description="the n0 searcher's cap on training: "
                                 "epochs summed over trials (a full-schedule trial counts "
                                 "train.epochs, a short one its own epochs)")

    def reason(self, params: int) -> str | None:
        if self.min_params is not None and params < self.min_params:
            return f"{params:,} parameters < min_params {self.min_params:,}"
        if self.max_params is not None and params > self.max_params:
            return f"{params:,} parameters > max_params {self.max_params:,}"
        return None


class Objective(Strict):
    metric: ObjectiveMetric = "test_error"
    mode: Literal["min", "max"] = "min"


class SearcherSettings(Strict):
    sampler: SamplerName = Field(
        "tpe", description="n0: matched pairs chosen to narrow n0 (orchestrator.study.n0_search); "
        "tpe, random, grid: Optuna's samplers over the feasible architectures")
    seed: int = Field(0, ge=0, le=2**31 - 1)  # Optuna's and NumPy's seeds
    objectives: list[Objective] = Field(default_factory=lambda: [Objective()], min_length=1)


class N0Settings(Strict):
    """How the n0 searcher decides (searcher.sampler: n0)."""
    target_width: float = Field(6.0, gt=0, description="stop once the interval of n0 is "
                                "narrower than this many layers")
    level: float = Field(0.95, gt=0, lt=1, description="the interval's coverage, kept under the "
                         "searcher's own stopping (alpha shared over its looks)")
    fidelities: list[float] = Field(default_factory=lambda: [1.0], min_length=1,
                                    max_length=2, description="[1.0]: full schedules only (the "
                                    "default: in simulation short ones did not pay); [f, 1.0]: "
                                    "also a short complete schedule (this fraction of "
                                    "train.epochs, LR milestones at the same fractions) that "
                                    "places the bracket, e.g. [0.125, 1.0]")
    min_seeds: int = Field(2, ge=1, le=10_000, description="seeds each configuration of a pair gets when "
                           "the pair is first trained")
    pair_tolerance: float = Field(0.1, gt=0, lt=1, description="largest relative parameter gap "
                                  "between the two nets of a pair")

    @field_validator("fidelities")
    @classmethod
    def _ends_full(cls, fidelities: list[float]) -> list[float]:
        if fidelities[-1] != 1.0 or not all(0 < f < 1 for f in fidelities[:-1]):
            raise ValueError("n0.fidelities: a short schedule's fraction (0 < f < 1) then 1.0, "
                             "e.g. [0.125, 1.0], or [1.0] for full schedules only")
        return fidelities


class TrialSchedulerSettings(Strict):
    type: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(3, gt=1)


class Resources(Strict):
    """What each trial takes. `auto` follows the cluster when the sweep starts
    (`orchestrator.study.placement`): a GPU per worker where there are GPUs and train.device is not
    cpu; the CPUs shared among the trials that run at once (on GPUs: the CPUs each GPU has)."""
    workers: int | None = Field(None, ge=1, description="Ray Train workers per trial; default "
                                "and only valid value: parallel.dp x pp x bp")
    cpus_per_worker: float | Literal["auto"] = Field("auto", description="a number > 0, or auto")
    gpus_per_worker: float | Literal["auto"] = Field(
        "auto", description="a number, or auto; a fraction (e.g. 0.25) packs trials on a GPU, "
        "each held to that share of its memory")
    driver_cpus: float = Field(0.1, gt=0, description="the trial driver only waits on workers")
    max_failures: int = Field(0, ge=-1, le=1_000_000, description="restarts per trial from its last "
                              "checkpoint: of its workers (Ray Train) and of the trial (Tune, "
                              "when its driver's node is lost); -1: no limit")

    @field_validator("cpus_per_worker", "gpus_per_worker", mode="before")
    @classmethod
    def _number_or_auto(cls, value):
        if value == "auto" or isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            return value
        raise ValueError(f"{short(repr(value), 60)}: give a number, or auto")

    @field_validator("cpus_per_worker")
    @classmethod
    def _positive(cls, cpus: float | Literal["auto"]) -> float | Literal["auto"]:
        if cpus != "auto" and cpus <= 0:
            raise ValueError(f"{cpus:g} CPUs: give a number above 0, or auto")
        return cpus

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_or_fraction(cls, gpus: float | Literal["auto"]) -> float | Literal["auto"]:
        if gpus != "auto" and (gpus < 0 or gpus > 1 and gpus != int(gpus)):
            raise ValueError(f"{gpus:g} GPUs: give a fraction up to 1 (trials share a GPU), a "
                             f"whole number, or auto")
        return gpus

    def uses_gpus(self, device: str) -> bool:
        """Whether trials train on GPUs (before the cluster is seen, auto means: where
        train.device asks for cuda)."""
        if self.gpus_per_worker == "auto":
            return device == "cuda"
        return self.gpus_per_worker > 0


class MlflowSettings(Strict):
    experiment: str | None = Field(None, description="default: the study name")
    tracking_uri: str | None = Field(None, description="default: sqlite:///<cwd>/mlflow.db")
    log_checkpoint: bool = Field(False, description="log each trial's final checkpoint")
    outage_wait_s: float = Field(300, ge=0, le=7 * 24 * 3600,
                                 description="at the end of a sweep, how long to wait for an "
                                 "unreachable MLflow before listing what it did not get")
