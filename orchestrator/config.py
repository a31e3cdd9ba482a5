"""The one schema for a training run: data, recipe, architecture, execution.

Every entry point (the `orchestrator.train` flags, YAML files, sweep trials) builds a `TrainConfig`;
defaults live here and nowhere else. The recipe defaults are the paper's: SGD with Nesterov momentum
0.9, lr 0.1, weight decay 1e-4, batch 128, lr x0.1 at 50% and 75% of training.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.multi_resnet import Architecture

# Which dataset family the network is built for (stem, head and number of classes).
ARCH_DATASET = {"cifar10": "cifar10", "cifar100": "cifar100", "synthetic": "cifar10"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParallelConfig(Strict):
    """Degrees of the mesh: data x pipeline x branch parallelism (one process each)."""

    dp: int = Field(1, ge=1, description="data-parallel replicas")
    pp: int = Field(1, ge=1, description="pipeline stages (consecutive blocks, balanced by FLOPs)")
    bp: int = Field(1, ge=1, description="branch-parallel ranks sharing each block's k functions")
    microbatches: int = Field(1, ge=1, description="pipeline micro-batches per replica batch")
    schedule: Literal["gpipe", "1f1b"] = "gpipe"

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.bp

    @property
    def layout(self) -> str:
        return f"dp={self.dp},pp={self.pp},bp={self.bp},mb={self.microbatches},{self.schedule}"

    @classmethod
    def parse(cls, text: str) -> "ParallelConfig":
        """'dp=2,pp=1,bp=2' (also microbatches=4, schedule=1f1b)."""
        fields = {}
        for part in filter(None, text.split(",")):
            key, _, value = part.partition("=")
            fields[key.strip()] = value.strip()
        return cls(**fields)


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

    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    dtype: Literal["float32", "float64"] = Field("float32", description="float64 for exactness "
                                                  "checks of parallel layouts")

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
        p, arch = self.parallel, self.architecture
        if p.bp > arch.k:
            raise ValueError(f"parallel.bp={p.bp} exceeds k={arch.k}: each branch-parallel rank "
                             f"needs at least one function; use bp <= k")
        if p.pp > sum(arch.stage_blocks):
            raise ValueError(f"parallel.pp={p.pp} exceeds the {sum(arch.stage_blocks)} blocks; "
                             f"use pp <= number of blocks")
        if self.batch_size % (p.dp * p.microbatches):
            raise ValueError(f"batch_size {self.batch_size} does not split into dp={p.dp} x "
                             f"microbatches={p.microbatches}; make it a multiple of "
                             f"{p.dp * p.microbatches}")
        if p.schedule == "1f1b" and p.pp > 1 and p.microbatches < p.pp:
            raise ValueError(f"parallel.schedule 1f1b needs microbatches >= pp ({p.pp})")
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


# ----------------------------------------------------------------------------- studies

ARCH_KEYS = set(Architecture.model_fields) - {"dataset"}
RECIPE_KEYS = {"lr", "weight_decay", "momentum", "batch_size", "seed", "epochs", "nesterov"}
METRICS = ("test_error", "best_test_error", "train_loss", "train_gflops", "time_total_s")


class IntRange(Strict):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


class FloatRange(Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False


class Choice(Strict):
    type: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1)


Distribution = Annotated[IntRange | FloatRange | Choice, Field(discriminator="type")]


class Budget(Strict):
    """Trials whose parameter count falls outside [min_params, max_params] are not trained."""
    min_params: int | None = Field(None, ge=0)
    max_params: int | None = Field(None, ge=1)

    def reason(self, params: int) -> str | None:
        if self.min_params is not None and params < self.min_params:
            return f"{params:,} parameters < min_params {self.min_params:,}"
        if self.max_params is not None and params > self.max_params:
            return f"{params:,} parameters > max_params {self.max_params:,}"
        return None


class Objective(Strict):
    metric: Literal[METRICS] = "test_error"
    mode: Literal["min", "max"] = "min"


class Searcher(Strict):
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = 0
    objectives: list[Objective] = Field(default_factory=lambda: [Objective()], min_length=1)


class Scheduler(Strict):
    type: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(3, gt=1)


class Resources(Strict):
    workers: int | None = Field(None, ge=1, description="Ray Train workers per trial; default "
                                "and only valid value: parallel.dp x pp x bp")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    driver_cpus: float = Field(0.1, gt=0, description="the trial driver only waits on workers")
    max_failures: int = Field(0, ge=-1, description="restarts per trial from its last "
                              "checkpoint: of its workers (Ray Train) and of the trial (Tune, "
                              "when its driver's node is lost); -1: no limit")


class Tracking(Strict):
    experiment: str | None = Field(None, description="default: the study name")
    tracking_uri: str | None = Field(None, description="default: sqlite:///<cwd>/mlflow.db")
    log_checkpoint: bool = Field(False, description="log each trial's final checkpoint")
    outage_wait_s: float = Field(300, ge=0, description="at the end of a sweep, how long to wait "
                                 "for an unreachable MLflow before listing what it did not get")


class PairDesign(Strict):
    """Matched pairs as in the paper: a k=1 net and the net with k=factor functions and about
    the same parameters (orchestrator.analysis.matched_multi). Give the deep nets' per-stage
    blocks, or parameter budgets to pick them."""
    deep: list[tuple[int, int, int]] | None = None
    budgets: list[float] | None = None
    factors: list[int] = Field(default_factory=lambda: [4], min_length=1)
    width: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "PairDesign":
        if (self.deep is None) == (self.budgets is None):
            raise ValueError("pairs: give either deep (per-stage blocks) or budgets (parameters)")
        if any(c < 2 for c in self.factors):
            raise ValueError("pairs.factors: each factor must be at least 2")
        return self

    def configurations(self) -> list[dict]:
        from orchestrator.analysis import deep_for_budget, matched_multi

        deeps = self.deep or [deep_for_budget(b, self.width) for b in self.budgets]
        out = []
        for deep in deeps:
            out.append({"blocks": list(deep), "k": 1, "width": self.width})
            for c in self.factors:
                out.append({"blocks": list(matched_multi(tuple(deep), c, width=self.width)),
                            "k": c, "width": self.width})
        return out


class StudyConfig(Strict):
    """A study file: what to train (`train`), what to vary (`space`), how to search and where
    results go. Keys in `space` are architecture keys or recipe keys; a plain value fixes it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    train: TrainConfig = Field(default_factory=TrainConfig)
    space: dict[str, Distribution | int | float | str | bool | list[int]] = Field(
        default_factory=dict)
    configurations: list[dict[str, Any]] = Field(
        default_factory=list, description="explicit architectures, searched as one choice")
    pairs: PairDesign | None = Field(None, description="matched pairs, added to configurations")
    budget: Budget = Field(default_factory=Budget)
    searcher: Searcher = Field(default_factory=Searcher)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    trials: int = Field(1, ge=1)
    concurrency: int = Field(1, ge=1)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    resources: Resources = Field(default_factory=Resources)
    mlflow: Tracking = Field(default_factory=Tracking)
    storage_path: str = "results"

    @field_validator("space")
    @classmethod
    def _known_keys(cls, space: dict) -> dict:
        for key in space:
            if key not in ARCH_KEYS | RECIPE_KEYS:
                raise ValueError(f"unknown key {key!r}; use one of "
                                 f"{', '.join(sorted(ARCH_KEYS | RECIPE_KEYS))}")
        return space

    @model_validator(mode="after")
    def _check(self) -> "StudyConfig":
        if self.pairs is not None:
            for design in self.pairs.configurations():
                if design not in self.configurations:
                    self.configurations.append(design)
        for i, design in enumerate(self.configurations):
            for key in design:
                if key not in ARCH_KEYS | RECIPE_KEYS or key in self.space:
                    raise ValueError(f"configurations[{i}].{key}: not an architecture or recipe "
                                     f"key, or also in space; remove it")
        for key in ("log_json", "checkpoint_dir"):
            if getattr(self.train, key):
                raise ValueError(f"train.{key} is managed by the sweep; remove it")
        if self.train.parallel not in (ParallelConfig(), self.parallel):
            raise ValueError("train.parallel: give the mesh as the top-level parallel: key")
        world = self.parallel.world_size
        if self.resources.workers is None:
            self.resources.workers = world
        elif self.resources.workers != world:
            raise ValueError(f"resources.workers={self.resources.workers} but parallel dp x pp x "
                             f"bp = {world}; drop resources.workers or match it")
        if len(self.searcher.objectives) > 1 and self.scheduler.type == "asha":
            raise ValueError("scheduler.type asha needs a single objective; use one objective "
                             "or scheduler.type none")
        if self.searcher.sampler == "grid":
            for key, dist in self.searched().items():
                if not isinstance(dist, (Choice, IntRange)):
                    raise ValueError(f"space.{key}: the grid sampler needs categorical or int "
                                     f"values")
        for key, dist in self.searched().items():
            if key in ARCH_KEYS and isinstance(dist, FloatRange):
                raise ValueError(f"space.{key}: architecture keys take int or categorical values")
        self.architectures()  # building each one validates it
        return self

    def searched(self) -> dict:
        found = {k: v for k, v in self.space.items() if isinstance(v, (IntRange, FloatRange, Choice))}
        if self.configurations:
            found["config"] = Choice(choices=list(range(len(self.configurations))))
        return found

    def fixed(self) -> dict:
        return {k: v for k, v in self.space.items() if k not in self.searched()}

    def sampled_values(self, sampled: dict) -> dict:
        """Sampled keys, with a sampled configuration index expanded into its keys."""
        values = {k: v for k, v in sampled.items() if k != "config"}
        if "config" in sampled:
            values = {**self.configurations[sampled["config"]], **values}
        return values

    def trial_config(self, sampled: dict) -> TrainConfig:
        """The full run config of one trial: `train`, then fixed space values, then samples."""
        fields = self.train.model_dump(exclude_unset=True)
        arch = (self.train.architecture.model_dump(exclude_unset=True)
                if "architecture" in self.train.model_fields_set else {})
        for key, value in {**self.fixed(), **self.sampled_values(sampled)}.items():
            if key in ARCH_KEYS:
                arch[key] = tuple(value) if key == "blocks" else value
            else:
                fields[key] = value
        fields["architecture"] = arch
        fields["parallel"] = self.parallel
        return TrainConfig(**fields)

    def architectures(self, limit: int = 20_000) -> list[Architecture]:
        """Every architecture the space can produce; raises naming the key of an invalid one."""
        options = {"config": list(range(len(self.configurations)))} if self.configurations else {}
        for key, value in self.space.items():
            if key not in ARCH_KEYS:
                continue
            if isinstance(value, Choice):
                options[key] = value.choices
            elif isinstance(value, IntRange):
                options[key] = value.values()
            else:
                options[key] = [value]
        count = 1
        for values in options.values():
            count *= len(values)
        if count > limit:
            raise ValueError(f"space: {count} architectures; narrow the ranges (at most {limit})")
        archs = []
        for combo in itertools.product(*options.values()):
            sampled = dict(zip(options, combo))
            try:
                archs.append(self.trial_config(sampled).architecture)
            except ValidationError as err:
                keys = ", ".join(f"{k}={v}" for k, v in self.sampled_values(sampled).items())
                raise ValueError(f"space: {keys} is no valid architecture: "
                                 f"{describe(err).removeprefix('architecture: ')}") from None
        return archs

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or self.name

    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"

    def storage_dir(self) -> Path:
        return Path(self.storage_path).expanduser().resolve()


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """`--set train.epochs=3` style override into a nested dict."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a mapping")
    node[keys[-1]] = value


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read, override (`key=value`, values parsed as YAML) and validate a study file."""
    data = load_yaml(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value, e.g. --set train.epochs=3")
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    try:
        return StudyConfig(**data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {describe(err)}") from None
