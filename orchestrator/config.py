"""The one schema for a training run: data, recipe, architecture, execution.

Every entry point (the `orchestrator.train` flags, YAML files, sweep trials) builds a `TrainConfig`;
defaults live here and nowhere else. The recipe defaults are the paper's: SGD with Nesterov momentum
0.9, lr 0.1, weight decay 1e-4, batch 128, lr x0.1 at 50% and 75% of training.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from models.multi_resnet import Architecture

# The faster execution form per device type, measured by bench/models_bench.py (bench/RESULTS.md).
FASTEST_FORM = {"cpu": "reference", "cuda": "fused"}


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AMX or AVX512-BF16): there, bf16 training steps ran
    1.5-1.8x as fast as fp32 (bench/RESULTS.md); elsewhere bf16 is emulated, and slower."""
    import torch

    try:
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # private helpers of torch.cpu: assume the plain case if they go
        return False
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
    train_size: int | None = Field(None, ge=1, le=10**9, description="use the first N "
                                   "training images")
    test_size: int | None = Field(None, ge=1, le=10**9, description="use the first N test images")

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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype of forward and backward (parameters, optimizer and "
        "BatchNorm statistics stay fp32); fp16 adds a gradient scaler. auto: bf16 on CUDA and "
        "on CPUs with bf16 arithmetic (AMX, AVX512-BF16), else fp32 (bench/RESULTS.md)")
    compile: Literal["auto", "none", "default", "cudagraphs"] = Field(
        "auto", description="torch.compile of the model: default (inductor) or cudagraphs "
        "(inductor + CUDA graphs, mode reduce-overhead). auto: cudagraphs on CUDA where the "
        "mesh allows it (pp=1, bp=1), none on CPU")
    grad_clip_norm: float | None = Field(None, gt=0, description="clip the global gradient "
                                         "norm to this value")
    log_every: int = Field(50, ge=1, description="steps between step-log lines; each reads the "
                           "loss from the device, the steps between run without waiting")
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
        if self.dtype == "float64" and self.precision not in ("auto", "fp32"):
            raise ValueError(f"precision {self.precision} needs dtype float32; float64 runs "
                             f"without autocast: use precision fp32")
        if self.compile not in ("auto", "none") and (p.pp > 1 or p.bp > 1):
            raise ValueError(f"compile {self.compile} works on meshes without pipeline or branch "
                             f"parallelism (pp=1, bp=1); use compile: none (or auto)")
        if self.compile == "cudagraphs" and self.device == "cpu":
            raise ValueError("compile cudagraphs needs device cuda; on CPU use compile: none or "
                             "default")
        return self

    def resolved(self, cuda_available: bool) -> "TrainConfig":
        """The same run with every `auto` replaced by what runs where CUDA is (not) available:
        device, execution form, precision and compile mode. This is what a run records."""
        if self.device == "cuda" and not cuda_available:
            raise ConfigError("device: cuda requested but no GPU is visible; use device cpu")
        device = "cuda" if self.device == "auto" and cuda_available else \
            ("cpu" if self.device == "auto" else self.device)
        cuda, plain_mesh = device == "cuda", self.parallel.pp == self.parallel.bp == 1
        update = {"device": device}
        if self.execution == "auto":
            update["execution"] = FASTEST_FORM[device]
        if self.precision == "auto":
            fast_bf16 = cuda or cpu_computes_bf16()
            update["precision"] = "bf16" if fast_bf16 and self.dtype == "float32" else "fp32"
        if self.compile == "auto":
            update["compile"] = "cudagraphs" if cuda and plain_mesh else "none"
        if self.compile == "cudagraphs" and not cuda:
            raise ConfigError("compile: cudagraphs needs a GPU; use compile none or default")
        return self.model_copy(update=update)


class ConfigError(ValueError):
    """Bad user input; the message is one line naming the key and the fix."""


def describe(err: ValidationError, prefix: str = "") -> str:
    """Pydantic errors as one line: `key.path: problem` for each."""
    parts = []
    errors = err.errors()
    # A mapping with `type:` failed as that member of a union: its error is the one to show, not
    # the other alternatives' ("Input should be a valid integer", ...).
    unions = {e["loc"][:i] for e in errors for i, part in enumerate(e["loc"])
              if str(part).startswith("tagged-union[")}
    for e in errors:
        cut = next((i for i, part in enumerate(e["loc"])
                    if str(part).startswith("tagged-union[")), None)
        if cut is not None:
            e = {**e, "loc": e["loc"][:cut] + e["loc"][cut + 2:]}
        elif e["loc"][:-1] in unions:
            continue
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
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give the YAML file in it") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; give a YAML file") from None
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
RECIPE_KEYS = {"lr", "weight_decay", "momentum", "batch_size", "epochs", "nesterov"}
METRICS = ("test_error", "best_test_error", "train_loss", "train_gflops", "time_total_s")


class Range(Strict):
    """low..high (a log scale needs low > 0), checked where Optuna would check it: at load."""

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}; swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low}); raise low or drop log")
        return self


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
        return self


class FloatRange(Range):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False


class Choice(Strict):
    type: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1)


Distribution = Annotated[IntRange | FloatRange | Choice, Field(discriminator="type")]


class Budget(Strict):
    """Architectures whose parameter count falls outside [min_params, max_params] are not part
    of the study's space: never sampled, listed in the dry run and the parent run."""
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
    sampler: Literal["n0", "tpe", "random", "grid"] = Field(
        "tpe", description="n0: matched pairs chosen to narrow n0 (orchestrator.n0_search); "
        "tpe, random, grid: Optuna's samplers over the feasible architectures")
    seed: int = 0
    objectives: list[Objective] = Field(default_factory=lambda: [Objective()], min_length=1)


class N0Settings(Strict):
    """How the n0 searcher decides (searcher.sampler: n0)."""
    target_width: float = Field(6.0, gt=0, description="stop once the 95% interval of n0 is "
                                "narrower than this many layers")
    min_seeds: int = Field(2, ge=1, description="seeds each configuration of a pair gets when "
                           "the pair is first trained")
    pair_tolerance: float = Field(0.1, gt=0, lt=1, description="largest relative parameter gap "
                                  "between the two nets of a pair")


class Scheduler(Strict):
    type: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(3, gt=1)


class Resources(Strict):
    workers: int | None = Field(None, ge=1, description="Ray Train workers per trial; default "
                                "and only valid value: parallel.dp x pp x bp")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0, description="a fraction (e.g. 0.25) packs trials "
                                   "on a GPU, each held to that share of its memory")
    driver_cpus: float = Field(0.1, gt=0, description="the trial driver only waits on workers")

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_or_fraction(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"{gpus} GPUs: give a fraction up to 1 (trials share a GPU) or a "
                             f"whole number")
        return gpus
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


@dataclass
class Candidate:
    """One architecture the study's keys can produce."""
    name: str                  # unique within the study: the value the searcher chooses
    fields: dict[str, Any]     # its architecture keys
    architecture: Architecture
    params: int
    excluded: str | None       # why it is outside the budget; None: feasible


@dataclass(frozen=True)
class Pair:
    """A k=1 net and the k>1 net of about the same parameters; `depth` is the latter's."""
    deep: str
    multi: str
    depth: int


class StudyConfig(Strict):
    """A study file: what to train (`train`), what to vary (`space`), how to search and where
    results go. Keys in `space` are architecture keys or recipe keys; a plain value fixes it.

    The architectures the keys allow and the budget admits are the study's space (`feasible`):
    searchers choose among them by name (the `arch` key of a trial's config). Seeds are
    replicates: every trial takes one of `seeds`, and no (architecture, recipe, seed) is
    trained twice."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    train: TrainConfig = Field(default_factory=TrainConfig)
    space: dict[str, Distribution | int | float | str | bool | list[int]] = Field(
        default_factory=dict)
    configurations: list[dict[str, Any]] = Field(
        default_factory=list, description="explicit architectures (architecture keys)")
    pairs: PairDesign | None = Field(None, description="matched pairs, added to configurations")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="the replicate seeds a configuration may be trained "
                             "with; a number N means 0..N-1")
    budget: Budget = Field(default_factory=Budget)
    searcher: Searcher = Field(default_factory=Searcher)
    n0: N0Settings = Field(default_factory=N0Settings)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    trials: int = Field(1, ge=1, description="the most trials the study may train")
    concurrency: int = Field(1, ge=1)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    resources: Resources = Field(default_factory=Resources)
    mlflow: Tracking = Field(default_factory=Tracking)
    storage_path: str = "results"

    _candidates: list[Candidate] = PrivateAttr(default_factory=list)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, seeds: Any) -> Any:
        return list(range(seeds)) if isinstance(seeds, int) and seeds > 0 else seeds

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError("seeds must be distinct and >= 0, e.g. [0, 1, 2] or a count: 3")
        return seeds

    @field_validator("space")
    @classmethod
    def _known_keys(cls, space: dict) -> dict:
        for key in space:
            if key == "seed":
                raise ValueError("seed: seeds are replicates, not searched; list them as the "
                                 "top-level key seeds: [0, 1, 2] (or a count: seeds: 3)")
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
                if key not in ARCH_KEYS or key in self.space:
                    raise ValueError(f"configurations[{i}].{key}: not an architecture key, or "
                                     f"also in space; remove it")
        for key in ("log_json", "checkpoint_dir"):
            if getattr(self.train, key):
                raise ValueError(f"train.{key} is managed by the sweep; remove it")
        if self.train.parallel not in (ParallelConfig(), self.parallel):
            raise ValueError("train.parallel: give the mesh as the top-level parallel: key")
        if self.train.device == "cuda" and not self.resources.gpus_per_worker:
            raise ValueError("train.device cuda needs GPUs: set resources.gpus_per_worker (e.g. "
                             "1, or 0.25 to pack four trials on a GPU)")
        world = self.parallel.world_size
        if self.resources.workers is None:
            self.resources.workers = world
        elif self.resources.workers != world:
            raise ValueError(f"resources.workers={self.resources.workers} but parallel dp x pp x "
                             f"bp = {world}; drop resources.workers or match it")
        if len(self.searcher.objectives) > 1 and self.scheduler.type == "asha":
            raise ValueError("scheduler.type asha needs a single objective; use one objective "
                             "or scheduler.type none")
        for key, dist in self.space.items():
            if key in ARCH_KEYS and isinstance(dist, FloatRange):
                raise ValueError(f"space.{key}: architecture keys take int or categorical values")
            if key in RECIPE_KEYS:
                self._check_recipe_values(key, dist)
            if (self.searcher.sampler in ("grid", "n0") and key in RECIPE_KEYS
                    and isinstance(dist, (FloatRange, IntRange, Choice))):
                if self.searcher.sampler == "n0":
                    raise ValueError(f"space.{key}: the n0 searcher compares architectures at "
                                     f"one recipe; fix {key} to one value")
                if isinstance(dist, FloatRange):
                    raise ValueError(f"space.{key}: the grid sampler needs categorical or int "
                                     f"values")
        self._candidates = self._enumerate()
        if not self.feasible():
            params = sorted(c.params for c in self._candidates)
            raise ValueError(f"budget: none of the space's {len(params)} architectures "
                             f"({params[0]:,} to {params[-1]:,} parameters) is within "
                             f"min_params..max_params; widen the budget or the space's "
                             f"depth/k/width")
        if self.searcher.sampler == "n0":
            self._check_n0()
        return self

    def _check_recipe_values(self, key: str, dist: Any) -> None:
        """Every value a recipe key may take must make a valid run: the ends of a range, each
        choice, or the fixed value."""
        values = (dist.choices if isinstance(dist, Choice) else [dist.low, dist.high]
                  if isinstance(dist, (IntRange, FloatRange)) else [dist])
        base = self.train.model_dump(exclude_unset=True)
        for value in values:
            try:
                TrainConfig(**{**base, key: value})
            except ValidationError as err:
                problem = describe(err).removeprefix(f"{key}: ")
                raise ValueError(f"space.{key}: the value {value} is not a valid {key} "
                                 f"({problem}); narrow the range or the choices") from None

    def _check_n0(self) -> None:
        if self.scheduler.type != "none":
            raise ValueError("scheduler.type: the n0 searcher compares the two nets of a pair at "
                             "the same number of epochs; use scheduler.type none")
        if [(o.metric, o.mode) for o in self.searcher.objectives] != [("test_error", "min")]:
            raise ValueError("searcher.objectives: the n0 searcher reads the test error; drop "
                             "objectives")
        depths = {pair.depth for pair in self.pairs_to_train()}
        if len(depths) < 2:
            raise ValueError(f"space: the n0 searcher needs matched pairs (a k=1 and a k>1 net "
                             f"within {self.n0.pair_tolerance:.0%} in parameters) at two or more "
                             f"depths, found {len(depths)}; widen space.depth and space.k, the "
                             f"budget, or give pairs:")

    def _run_config(self, arch: dict, recipe: dict) -> TrainConfig:
        fields = self.train.model_dump(exclude_unset=True)
        fields.update(recipe)
        fields["architecture"] = {key: tuple(value) if key == "blocks" else value
                                  for key, value in arch.items()}
        fields["parallel"] = self.parallel
        return TrainConfig(**fields)

    def _enumerate(self, limit: int = 20_000) -> list[Candidate]:
        """Every architecture the keys can produce, once; raises naming the keys of an invalid
        one."""
        from models.summary import parameter_count

        options = {}
        for key, value in self.space.items():
            if key in ARCH_KEYS:
                options[key] = (value.choices if isinstance(value, Choice) else
                                value.values() if isinstance(value, IntRange) else [value])
        designs = self.configurations or [{}]
        count = len(designs) * math.prod(len(v) for v in options.values())
        if count > limit:
            raise ValueError(f"space: {count} architectures; narrow the ranges (at most {limit})")
        base = (self.train.architecture.model_dump(exclude_unset=True)
                if "architecture" in self.train.model_fields_set else {})
        found: dict[Architecture, Candidate] = {}
        names: set[str] = set()
        for design in designs:
            for combo in itertools.product(*options.values()):
                chosen = {**design, **dict(zip(options, combo))}
                try:
                    arch = self._run_config({**base, **chosen}, {}).architecture
                except ValidationError as err:
                    keys = ", ".join(f"{k}={v}" for k, v in chosen.items())
                    raise ValueError(f"space: {keys} is no valid architecture: "
                                     f"{describe(err).removeprefix('architecture: ')}") from None
                if arch in found:
                    continue
                name = arch.name if arch.name not in names else f"{arch.name}-{arch.shortcut_type}"
                names.add(name)
                params = parameter_count(arch)
                found[arch] = Candidate(name, {**base, **chosen}, arch, params,
                                        self.budget.reason(params))
        return list(found.values())

    def architectures(self) -> list[Architecture]:
        """Every architecture the keys produce, inside the budget or not."""
        return [c.architecture for c in self._candidates]

    def feasible(self) -> list[Candidate]:
        """The study's space: the architectures inside the budget."""
        return [c for c in self._candidates if c.excluded is None]

    def excluded(self) -> list[Candidate]:
        return [c for c in self._candidates if c.excluded is not None]

    def pairs_to_train(self) -> list[Pair]:
        """The matched pairs among the feasible architectures, by the multi-residual depth."""
        import pandas as pd

        from orchestrator.analysis import find_pairs

        feasible = self.feasible()
        table = pd.DataFrame([{"depth": c.architecture.total_depth, "k": c.architecture.k,
                               "width": c.architecture.width, "params": c.params}
                              for c in feasible])
        by_key = {tuple(row): c.name for row, c in zip(table.itertuples(index=False), feasible)}
        return [Pair(by_key[deep], by_key[multi], int(multi[0]))
                for deep, multi in find_pairs(table, self.n0.pair_tolerance)]

    def searched(self) -> dict:
        """What a searcher chooses per trial (the seed aside): `arch` among the feasible names,
        and the recipe keys given as distributions."""
        found = {k: v for k, v in self.space.items()
                 if k in RECIPE_KEYS and isinstance(v, (IntRange, FloatRange, Choice))}
        names = [c.name for c in self.feasible()]
        return {"arch": Choice(choices=names), **found} if len(names) > 1 else found

    def fixed(self) -> dict:
        return {k: v for k, v in self.space.items()
                if k in RECIPE_KEYS and k not in self.searched()}

    def space_size(self) -> float:
        """Distinct trials the space holds: configurations x seeds (inf with a float range)."""
        size = len(self.seeds)
        for dist in self.searched().values():
            if isinstance(dist, FloatRange):
                return math.inf
            size *= len(dist.choices if isinstance(dist, Choice) else dist.values())
        return size

    def candidate(self, sampled: dict) -> Candidate:
        feasible = self.feasible()
        if "arch" not in sampled:
            return feasible[0]
        return next(c for c in feasible if c.name == sampled["arch"])

    def trial_config(self, sampled: dict) -> TrainConfig:
        """The full run config of one trial: `train`, then fixed space values, then what was
        chosen (`arch`: a feasible architecture's name, `seed`, recipe keys)."""
        recipe = {**self.fixed(), **{k: v for k, v in sampled.items() if k in RECIPE_KEYS}}
        recipe["seed"] = sampled.get("seed", self.seeds[0])
        run = self._run_config(self.candidate(sampled).fields, recipe)
        return run.resolved(cuda_available=self.resources.gpus_per_worker > 0)

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or self.name

    def tracking_uri(self) -> str:
        uri = self.mlflow.tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        database = uri.removeprefix("sqlite:///")
        if uri.startswith("sqlite:///") and not Path(database).is_absolute():
            # Relative to the folder the sweep starts in, wherever Ray runs the trials.
            uri = f"sqlite:///{Path(database).resolve()}"
        return uri

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
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value is not valid YAML; quote it or close its "
                              f"brackets") from None
        set_dotted(data, key.strip(), value)
    try:
        return StudyConfig(**data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {describe(err)}") from None
