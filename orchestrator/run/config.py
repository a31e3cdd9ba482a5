"""The one schema for a training run: data, recipe, architecture, execution.

Every entry point (the `orchestrator.train` flags, YAML files, sweep trials) builds a `TrainConfig`;
defaults live here and nowhere else. The recipe defaults are the paper's: SGD with Nesterov momentum
0.9, lr 0.1, weight decay 1e-4, batch 128, lr x0.1 at 50% and 75% of training. The ImageNet recipe
(`recipe: imagenet`, fb.resnet.torch's) changes the defaults in `RECIPES` and the augmentation.
Only the two functions that ask the device import torch: run files validate without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.architecture import Architecture
from orchestrator.errors import ConfigError, short
from orchestrator.storage import check_regular
from orchestrator.parallel.degrees import ParallelConfig  # the mesh's own schema, part of a run's
from orchestrator.run.batches import check_split
from orchestrator.run.datasets import DATASETS

# Bounds on what input may ask for, checked at load (one line, before anything is allocated).
MAX_SEED = 2**31 - 1        # seeds are mixed into 64-bit generator seeds (seed * 1_000_003 + i)
MAX_YAML_BYTES = 1 << 20    # a study or run file
MAX_YAML_VALUES = 100_000   # scalars, lists and mappings after aliases are expanded
MAX_GENERATED_IMAGES = 1_000_000  # per split of a dataset made in memory (3 GB)

# The fused form (the k functions of a block as grouped convolutions) pays on a GPU only where
# each function is too narrow to fill it. Measured by bench/models_bench.py (bench/RESULTS.md,
# H200): fused 1.19-1.38x for multi-resnet-20 k=4 and multi-resnet-200 k=5 bottleneck (w=1), but
# 0.91x, and 3,653 against 4,858 images/s in bf16, for the wide multi-resnet-26 k=2 w=10. No width
# between 1 and 10 was measured: the threshold is the middle (in channels, 64 = 16 x 4 in the
# first stage), to move when bench/gpu_check.sh measures one. On CPUs grouped convolutions are
# slow (0.58-0.61x): reference everywhere.
FUSED_BELOW_WIDTH = 4


def fastest_form(architecture: Architecture, device: str) -> str:
    """The execution form `auto` resolves to for this net on this device type."""
    if device != "cuda" or architecture.k == 1:  # one function: nothing to fuse
        return "reference"
    return "fused" if architecture.width < FUSED_BELOW_WIDTH else "reference"


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AMX or AVX512-BF16): there, bf16 training steps ran
    1.5-1.8x as fast as fp32 (bench/RESULTS.md); elsewhere bf16 is emulated, and slower. Read from
    the kernel's x86 flags on Linux: each trial's driver resolves its run here, and torch costs
    it about 3 CPU-s to import; torch's own check elsewhere."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags"))
        return bool({"amx_tile", "avx512_bf16"} & set(flags.partition(":")[2].split()))
    except (OSError, StopIteration):  # not Linux, or not x86 (no such flags line)
        pass
    import torch

    try:
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # private helpers of torch.cpu: assume the plain case if they go
        return False


def auto_precision(device: str) -> str:
    """`precision: auto` for a float32 run: bf16 where the device computes it natively (CUDA
    capability 8.0 on; a CPU with bf16 arithmetic), fp16 on older GPUs (V100, T4: bf16 is
    emulated there, slower than fp32; fp16 runs on their tensor cores, with a loss scaler),
    else fp32. A driver that sees no GPU (a study's head node) assumes a recent one."""
    if device == "cuda":
        import torch

        old = torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0)
        return "fp16" if old else "bf16"
    return "bf16" if cpu_computes_bf16() else "fp32"


# What a recipe changes from the defaults below, unless the run sets it. ImageNet (fb.resnet.torch):
# 90 epochs, batch 256, lr x0.1 at epochs 30 and 60; lr 0.1 per 256 images (scaled by batch_size).
RECIPES = {"cifar": {},
           "imagenet": {"epochs": 90, "batch_size": 256, "lr_milestones": (1 / 3, 2 / 3)}}
IMAGENET_LR_PER_256 = 0.1


class Strict(BaseModel):
    """A schema read from user input: unknown keys, NaN and infinities refused (an inf learning
    rate or CPU count would pass `gt=0` and fail later, inside Ray), and true/false where a
    number goes (YAML's `true` would count as 1)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data):
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and _numeric_only(field.annotation):
                    raise ValueError(f"{name} takes a number, not {str(data[name]).lower()}")
        return data


def _numeric_only(annotation) -> bool:
    """Whether a field takes numbers but no bool (int, float | None, float | 'auto', ...)."""
    args = set(get_args(annotation)) or {annotation}
    return bool(args & {int, float}) and bool not in args


if TYPE_CHECKING:
    DatasetName = str  # pydantic checks the names; `DATASETS` is their one list
else:
    DatasetName = Literal[tuple(DATASETS)]


class TrainConfig(Strict):
    architecture: Architecture = Field(default_factory=lambda: Architecture(depth=20, k=4))
    dataset: DatasetName = "cifar10"
    data_dir: str | None = Field(None, description="folder holding cifar-10-batches-py/ etc.")
    train_size: int | None = Field(None, ge=1, le=10**9, description="use the first N "
                                   "training images")
    test_size: int | None = Field(None, ge=1, le=10**9, description="use the first N test images")

    epochs: int = Field(200, ge=1, le=1_000_000)
    steps: int | None = Field(None, ge=1, le=10**12, description="stop after this many steps in "
                              "total")
    batch_size: int = Field(128, ge=2, le=1 << 20)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    lr_milestones: tuple[float, ...] = Field((0.5, 0.75), max_length=100,
                                             description="fractions of training")
    lr_gamma: float = Field(0.1, gt=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    device: Literal["auto", "cpu", "cuda"] = "auto"
    execution: Literal["auto", "reference", "fused"] = Field(
        "auto", description="auto: the faster form for this net on this device: fused on CUDA "
        "for narrow nets with k > 1 (w < 4), else reference (bench/RESULTS.md)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype of forward and backward (parameters, optimizer and "
        "BatchNorm statistics stay fp32); fp16 adds a gradient scaler. auto: bf16 on CUDA and "
        "on CPUs with bf16 arithmetic (AMX, AVX512-BF16), else fp32 (bench/RESULTS.md)")
    compile: Literal["auto", "none", "default", "cudagraphs"] = Field(
        "auto", description="torch.compile of the model: default (inductor) or cudagraphs "
        "(inductor + CUDA graphs, mode reduce-overhead). auto: cudagraphs on CUDA where the "
        "mesh allows it (pp=1, bp=1), none on CPU")
    compile_scope: Literal["model", "blocks"] = Field(
        "model", description="what compile covers: the whole model as one graph, or each "
        "residual block on its own (regional compilation: blocks of one shape share a graph, "
        "so compile time no longer grows with depth; stem and head run eager)")
    grad_clip_norm: float | None = Field(None, gt=0, description="clip the global gradient "
                                         "norm to this value")
    log_every: int = Field(50, ge=1, le=10**9, description="steps between step-log lines; "
                           "each reads the loss from the device, the steps between run without "
                           "waiting")
    channels_last: bool = Field(True, description="NHWC memory format: faster on CPU and GPU "
                                "(bench/RESULTS.md)")

    recipe: Literal["auto", "cifar", "imagenet"] = Field(
        "auto", description="augmentation and schedule: cifar (flip, 4-pixel pad and crop; the "
        "defaults here) or imagenet (fb.resnet.torch: random-sized crop to 224, flip, colour "
        "jitter, PCA lighting; evaluation resize 256 + centre crop 224; 90 epochs, batch 256, "
        "lr 0.1 per 256 images, x0.1 at epochs 30 and 60). auto: imagenet for ImageNet-family "
        "nets, else cifar")
    data_workers: int | None = Field(None, ge=0, description="processes decoding images "
                                     "(image-folder datasets); default: this process's CPU "
                                     "cores less one; 0: decode in the training process")
    decode: Literal["workers", "device"] = Field(
        "workers", description="where image-folder JPEGs are decoded: workers (the "
        "data_workers processes decode, crop and resize; measured on CPU) or device (the "
        "workers read the files and draw the augmentation, the training process decodes and "
        "crops each batch on its device: nvJPEG on CUDA; not measured on a GPU yet)")
    bad_images: Literal["skip", "error"] = Field(
        "skip", description="an image file that cannot be decoded during training: skip (count "
        "it, log its name, use the next image of the split with its own label) or error (stop)")

    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    dtype: Literal["float32", "float64"] = Field("float32", description="float64 for exactness "
                                                  "checks of parallel layouts")

    log_json: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | Literal["auto"] = Field(
        "auto", description="epochs between checkpoints (the last epoch always has one). auto: "
        "every epoch for checkpoints up to 64 MiB; larger ones when the last cost at most 5% of "
        "the training since it, and at least every 2 minutes: a lost worker retrains at most "
        "about 2 minutes plus one epoch")
    resume: bool = False

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data):
        """Resolve `recipe: auto` by the net family and fill what the recipe changes and the
        run does not set."""
        if not isinstance(data, dict):
            return data
        entry = DATASETS.get(data.get("dataset", "cifar10"))
        if entry is None:
            return data  # the field's own error names the choices
        arch = data.get("architecture", {})
        family = arch.get("dataset") if isinstance(arch, dict) else arch.dataset
        if not (entry.any_architecture and family):
            family = entry.architecture
        recipe = data.get("recipe", "auto")
        if recipe == "auto":
            recipe = "imagenet" if family == "imagenet" else "cifar"
        data = {**RECIPES.get(recipe, {}), **data, "recipe": recipe}
        if arch and isinstance(arch, dict) and "dataset" not in arch:  # as this family's net
            data["architecture"] = {**arch, "dataset": family}
        elif not arch and family == "imagenet":  # the default net there: ResNet-50
            data["architecture"] = {"depth": 50, "dataset": family}
        if recipe == "imagenet" and "lr" not in data:
            data["lr"] = IMAGENET_LR_PER_256 * data["batch_size"] / 256
        return data

    @model_validator(mode="after")
    def _match_architecture_to_dataset(self) -> "TrainConfig":
        wanted = DATASETS[self.dataset].architecture
        if DATASETS[self.dataset].any_architecture and \
                "dataset" in self.architecture.model_fields_set:
            wanted = self.architecture.dataset
        if self.architecture.dataset != wanted:
            fields = self.architecture.model_dump(exclude_unset=True)
            fields["dataset"] = wanted
            self.architecture = Architecture(**fields)
        if self.recipe == "imagenet" and not DATASETS[self.dataset].image_files:
            raise ValueError(f"recipe imagenet augments image files; {self.dataset} is trained "
                             f"with recipe cifar (or use dataset imagefolder or imagenet)")
        if self.decode == "device" and not DATASETS[self.dataset].image_files:
            raise ValueError(f"decode device decodes image files; {self.dataset} is already "
                             f"decoded: use decode workers (or dataset imagefolder or imagenet)")
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError("lr_milestones must be fractions between 0 and 1, e.g. [0.5, 0.75]")
        generated = max(self.train_size or 0, self.test_size or 0)
        if not DATASETS[self.dataset].needs_files and generated > MAX_GENERATED_IMAGES:
            raise ValueError(f"{self.dataset} data is generated in memory (3 KB an image): at "
                             f"most {MAX_GENERATED_IMAGES:,} images per split; lower "
                             f"train_size or test_size")
        if isinstance(self.checkpoint_every, int) and self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be a number of epochs >= 1, or auto")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs checkpoint_dir: pass --checkpoint-dir DIR")
        p, arch = self.parallel, self.architecture
        if p.bp > arch.k:
            raise ValueError(f"parallel.bp={p.bp} exceeds k={arch.k}: each branch-parallel rank "
                             f"needs at least one function; use bp <= k")
        if p.pp > sum(arch.stage_blocks):
            raise ValueError(f"parallel.pp={p.pp} exceeds the {sum(arch.stage_blocks)} blocks; "
                             f"use pp <= number of blocks")
        check_split(self.batch_size, p.dp, p.microbatches)
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
        update: dict[str, str] = {"device": device}
        if self.execution == "auto":
            update["execution"] = fastest_form(self.architecture, device)
        if self.precision == "auto":
            update["precision"] = auto_precision(device) if self.dtype == "float32" else "fp32"
        if self.compile == "auto":
            update["compile"] = "cudagraphs" if cuda and plain_mesh else "none"
        if self.compile == "cudagraphs" and not cuda:
            raise ConfigError("compile: cudagraphs needs a GPU; use compile none or default")
        return self.model_copy(update=update)


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


class _Refused(yaml.constructor.ConstructorError):
    """What the loader refuses in valid YAML; its problem says what and how to fix it."""


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader that refuses a key given twice in one mapping (the later one
    would silently win), a key that is not text (every key of a study or run is a name) and
    a tag (`!!python/...`: never constructed, and said so rather than "fix the syntax")."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise _Refused(None, None, f"key {short(repr(key), 60)} is not a name; "
                                   f"quote it or remove it", key_node.start_mark)
                if key in seen:
                    raise _Refused(None, None, f"duplicate key {short(repr(key), 60)}; give "
                                   f"each key once", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_undefined(self, node):
        tag = short(node.tag.replace('tag:yaml.org,2002:', '!!'), 60)
        raise _Refused(None, None, f"the tag {tag} is not read; give plain values",
                       node.start_mark)


_Loader.add_constructor(None, _Loader.construct_undefined)  # SafeLoader's, replaced


def _expanded_size(node, sizes: dict) -> int:
    """Values in `node` with every alias expanded (each shared node counted once per use)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a node that holds itself counts once
        children = ([] if isinstance(node, yaml.ScalarNode) else
                    node.value if isinstance(node, yaml.SequenceNode) else
                    [part for pair in node.value for part in pair])
        sizes[id(node)] = 1 + sum(min(_expanded_size(c, sizes), MAX_YAML_VALUES + 1)
                                  for c in children)
    return sizes[id(node)]


def parse_yaml(text: str, where: str):
    """YAML as yaml.safe_load reads it (plain data, no tags), with duplicate keys refused and
    the size bounded: at most MAX_YAML_VALUES values once aliases are expanded (an alias bomb
    of a few hundred bytes would otherwise expand to gigabytes)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: holds more than {MAX_YAML_VALUES:,} values once its "
                              f"aliases (*name) are expanded; write the values out")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where}: nests too deeply; flatten it") from None
    finally:
        loader.dispose()


def read_text(path: Path, limit: int = MAX_YAML_BYTES) -> str:
    """A text file of at most `limit` bytes (a pipe or a device is refused before it is
    opened: reading it could block for ever)."""
    if not Path(path).is_dir():  # a folder: the caller's IsADirectoryError says what to give
        check_regular(path, error=ConfigError, fix="give a YAML file")
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ConfigError(f"{path} is larger than {limit:,} bytes; give a study or run file")
    return raw.decode()


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = parse_yaml(read_text(path), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give the YAML file in it") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; give a YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_problem(exc, str(path))) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def yaml_problem(exc: yaml.YAMLError, where: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    line = f" (line {mark.line + 1})" if mark else ""
    problem = getattr(exc, "problem", "") or ""
    if isinstance(exc, _Refused):
        first, _, fix = problem.partition("; ")
        return f"{where}: {first}{line}; {fix}"
    if (getattr(exc, "context", "") or "").startswith("expected a single document"):
        return f"{where}: more than one YAML document{line}; give one (drop the ---)"
    return f"{where}: not valid YAML{line}; fix the syntax"
