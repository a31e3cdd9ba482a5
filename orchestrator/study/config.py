"""The study file: what to train (`train`), what to vary (`space`), how to search, where results
go. `load_study` reads, overrides and validates one; `StudyConfig.trial_config` gives each trial's
run config. (Over 300 lines: one schema class whose validators and space enumeration read the
same fields, kept whole; its parts live in settings.py and pairs.py.) MLflow's name rules and
pandas load inside the checks that use them, so a bad key is answered before they load."""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from models.architecture import Architecture, parameter_count
from orchestrator.compat import VALIDATE_EXPERIMENT_NAME, VALIDATE_MODEL_NAME, resolve
from orchestrator.errors import ConfigError, short
from orchestrator.run.config import (MAX_SEED, ParallelConfig, Strict, TrainConfig, describe,
                                     load_yaml, parse_yaml, yaml_problem)
from orchestrator.storage import REMOTE_SCHEMES, join, storage_uri, uri_problem
from orchestrator.analysis.pairs import Pair, PairDesign
from orchestrator.study.settings import (ARCH_KEYS, RECIPE_KEYS, Budget, Choice, Distribution,
                                         FloatRange, IntRange, MlflowSettings, N0Settings,
                                         Resources, SearcherSettings, TrialSchedulerSettings)


MAX_SEEDS = 10_000  # replicates of one configuration


@dataclass
class Candidate:
    """One architecture the study's keys can produce."""
    name: str                  # unique within the study: the value the searcher chooses
    fields: dict[str, Any]     # its architecture keys
    architecture: Architecture
    params: int
    excluded: str | None       # why it is outside the budget; None: feasible


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
        default_factory=list, max_length=20_000, description="explicit architectures (architecture keys)")
    pairs: PairDesign | None = Field(None, description="matched pairs, added to configurations")
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS,
                             description="the replicate seeds a configuration may be trained "
                             "with; a number N means 0..N-1")
    budget: Budget = Field(default_factory=Budget)
    searcher: SearcherSettings = Field(default_factory=SearcherSettings)
    n0: N0Settings = Field(default_factory=N0Settings)
    scheduler: TrialSchedulerSettings = Field(default_factory=TrialSchedulerSettings)
    trials: int = Field(1, ge=1, le=1_000_000, description="the most trials the study may train")
    concurrency: int = Field(1, ge=1, le=10_000)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    resources: Resources = Field(default_factory=Resources)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    storage_path: str = "results"

    _candidates: list[Candidate] = PrivateAttr(default_factory=list)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, seeds: Any) -> Any:
        if isinstance(seeds, bool):
            raise ValueError("give a count (seeds: 3) or a list (seeds: [0, 1, 2]), not "
                             f"{str(seeds).lower()}")
        if isinstance(seeds, int) and seeds > MAX_SEEDS:
            raise ValueError(f"{seeds:,} seeds; at most {MAX_SEEDS:,} replicates")
        return list(range(seeds)) if isinstance(seeds, int) and seeds > 0 else seeds

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError("seeds must be distinct and >= 0, e.g. [0, 1, 2] or a count: 3")
        return seeds

    @field_validator("storage_path")
    @classmethod
    def _supported_storage(cls, value: str) -> str:
        scheme = value.partition("://")[0] if "://" in value else ""
        if scheme not in ("", "file", *REMOTE_SCHEMES):
            raise ValueError(f"scheme {short(repr(scheme), 60)} is not supported; give a "
                             f"folder, file://PATH or a URI starting with "
                             f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
        problem = uri_problem(value)
        if problem:
            raise ValueError(f"{short(repr(value), 80)}: {problem}")
        return value

    @field_validator("space")
    @classmethod
    def _known_keys(cls, space: dict) -> dict:
        for key in space:
            if key == "seed":
                raise ValueError("seed: seeds are replicates, not searched; list them as the "
                                 "top-level key seeds: [0, 1, 2] (or a count: seeds: 3)")
            if key not in ARCH_KEYS | RECIPE_KEYS:
                raise ValueError(f"unknown key {short(repr(key), 60)}; use one of "
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
        if self.train.device == "cuda" and self.resources.gpus_per_worker == 0:
            raise ValueError("train.device cuda needs GPUs: set resources.gpus_per_worker to "
                             "auto, 1, or 0.25 to pack four trials on a GPU")
        world = self.parallel.world_size
        gpus = self.resources.gpus_per_worker
        if world > 1 and gpus != "auto" and 0 < gpus < 1:  # Ray would pack ranks on one GPU
            raise ValueError(f"resources.gpus_per_worker: {gpus:g} with {world} ranks per trial; "
                             f"NCCL needs a whole GPU per rank: set it to 1 or auto")
        if self.resources.workers is None:
            self.resources.workers = world
        elif self.resources.workers != world:
            raise ValueError(f"resources.workers={self.resources.workers} but parallel dp x pp x "
                             f"bp = {world}; drop resources.workers or match it")
        self._check_schedule()
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
        self._check_mlflow_name()
        return self

    def _check_schedule(self) -> None:
        """What the trial scheduler and the epoch budget need of train.epochs (Tune's ASHA and
        the n0 searcher would otherwise fail once Ray has started)."""
        epochs = self.train.epochs
        if self.scheduler.type == "asha":
            if len(self.searcher.objectives) > 1:
                raise ValueError("scheduler.type asha needs a single objective; use one "
                                 "objective or scheduler.type none")
            if self.scheduler.grace_period > epochs:
                raise ValueError(f"scheduler.grace_period {self.scheduler.grace_period} is "
                                 f"above train.epochs {epochs}; lower it to at most {epochs}")
        budget = self.budget.epochs  # the n0 searcher's cap (other samplers: trials)
        if self.searcher.sampler == "n0" and budget is not None and budget < 2 * epochs:
            # a pair of full schedules: the least an n0 is read from
            raise ValueError(f"budget.epochs {budget:g} is below one pair of trials (2 x "
                             f"train.epochs = {2 * epochs}); raise it or drop it")

    def _check_mlflow_name(self) -> None:
        """The experiment's name is also the best model's registered name: MLflow's own rules
        for both, checked now rather than when the study ends."""
        from mlflow.exceptions import MlflowException

        key = "mlflow.experiment" if self.mlflow.experiment else "name"
        try:
            resolve(VALIDATE_EXPERIMENT_NAME)(self.experiment_name)
            resolve(VALIDATE_MODEL_NAME)(self.experiment_name)
        except MlflowException as exc:
            rule = exc.message.split(". ")[-1].rstrip(".")
            raise ValueError(f"{key}: MLflow refuses it ({rule}); choose another") from None

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
                    keys = ", ".join(f"{k}={v}" for k, v in chosen.items()) or \
                        "train.architecture"  # no key in space or configurations
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

        from orchestrator.analysis.n0 import find_pairs

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

    def trial_name(self, sampled: dict) -> str:
        """A trial's readable name: its architecture, seed and searched recipe values, e.g.
        `d20-k4-w1-s0` or `d8-k2-w1-s1-lr0.053`."""
        cfg = self.trial_config(sampled)
        searched = sorted(k for k in self.searched() if k in RECIPE_KEYS)
        values = "".join(f"-{k}{getattr(cfg, k):.3g}" if isinstance(getattr(cfg, k), float)
                         else f"-{k}{getattr(cfg, k)}" for k in searched)
        short = f"-f{sampled['fidelity']:g}" if "fidelity" in sampled else ""
        return f"{cfg.architecture.name}-s{cfg.seed}{values}{short}"

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
        found = next((c for c in feasible if c.name == sampled["arch"]), None)
        if found is None and "blocks" in sampled:  # a pair the n0 searcher's ladder added
            fields = {k: sampled[k] for k in ("blocks", "k", "width") if k in sampled}
            arch = self._run_config(fields, {}).architecture
            return Candidate(sampled["arch"], fields, arch, parameter_count(arch), None)
        if found is None:
            raise KeyError(f"architecture {sampled['arch']!r} is not in study {self.name}")
        return found

    def trial_config(self, sampled: dict) -> TrainConfig:
        """The full run config of one trial: `train`, then fixed space values, then what was
        chosen (`arch`: a feasible architecture's name, `seed`, recipe keys)."""
        recipe = {**self.fixed(), **{k: v for k, v in sampled.items() if k in RECIPE_KEYS}}
        recipe["seed"] = sampled.get("seed", self.seeds[0])
        if "fidelity" in sampled:  # a short complete schedule: LR milestones are fractions
            recipe["epochs"] = max(1, round(sampled["fidelity"] * self.train.epochs))
        run = self._run_config(self.candidate(sampled).fields, recipe)
        return run.resolved(cuda_available=self.resources.uses_gpus(self.train.device))

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

    def storage(self) -> str:
        """Where Tune writes: an absolute folder, or an s3://, gs:// or hdfs:// URI."""
        return storage_uri(self.storage_path)

    def results_place(self) -> str:
        """The study's results folder (or URI) in its storage."""
        return join(self.storage(), self.name)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """`--set train.epochs=3` style override into a nested dict."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a mapping")
    node[keys[-1]] = value


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """Read, override (`key=value`, values parsed as YAML) and validate a study file."""
    data = load_yaml(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value, e.g. --set train.epochs=3")
        key, raw = item.split("=", 1)
        where = f"--set {item if len(item) <= 60 else short(repr(item), 60)}"
        try:
            value = parse_yaml(raw, where)
        except yaml.YAMLError as exc:
            if isinstance(exc, yaml.constructor.ConstructorError):  # valid YAML, refused
                raise ConfigError(yaml_problem(exc, where)) from None
            raise ConfigError(f"{where}: the value is not valid YAML; quote it or close its "
                              f"brackets") from None
        set_dotted(data, key.strip(), value)
    try:
        return StudyConfig(**data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {describe(err)}") from None
