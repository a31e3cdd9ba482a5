"""Where a study's trials fit: `auto` resources resolved against the cluster, how many trials run
at once, and, when they cannot fit, one message: what the study needs, what the cluster has, and
the ways on (the studies beside it that fit, or the overrides that run it here, with an estimate
of how long that takes from the study's training FLOPs and a short measured step)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from models.complexity import summarize
from orchestrator.errors import ConfigError
from orchestrator.results import training_flops
from orchestrator.run.step import seconds_per_step
from orchestrator.study.config import StudyConfig, load_study
from orchestrator.study.preview import estimated_cost, worst_epochs
from orchestrator.study.settings import Resources
from orchestrator.study.trials import planned_trials

IDLE_SHARE = 0.4  # explicit sizes that leave this share of the CPUs idle are refused


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float
    cpus_per_gpu: float = 0  # the fewest, over the nodes with GPUs
    node_cpus: float | None = None  # the smallest node's (None: one node)

    @classmethod
    def of_ray(cls) -> "Cluster":
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        per_gpu = [n.get("CPU", 0) / n["GPU"] for n in nodes if n.get("GPU")]
        return cls(sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes),
                   min(per_gpu, default=0), min(n.get("CPU", 0) for n in nodes))

    def __str__(self) -> str:
        gpus = f"{self.gpus:g} GPUs" if self.gpus else "no GPU"
        return f"{self.cpus:g} CPUs and {gpus}"


class DoesNotFit(Exception):
    """What the study needs that the cluster lacks (turned into the message by `check_place`)."""


def place(study: StudyConfig, cluster: Cluster) -> tuple[Resources, int]:
    """The study's resources with `auto` resolved, and how many trials run at once."""
    res, device = study.resources, study.train.device
    workers, driver = _workers(res), res.driver_cpus
    gpus = res.gpus_per_worker
    if gpus == "auto":
        gpus = 1 if device != "cpu" and cluster.gpus >= workers else 0
    if device == "cuda" and not gpus:
        raise DoesNotFit("a GPU per worker for train.device cuda")
    at_once = study.concurrency
    if gpus:
        if workers * gpus > cluster.gpus:
            raise DoesNotFit(f"{gpus:g} GPU{'s' * (gpus > 1)} per worker")
        at_once = min(at_once, int(cluster.gpus // (workers * gpus)))
    cpus = res.cpus_per_worker
    if cpus == "auto":
        if gpus:  # the CPUs that come with a worker's GPU (share), less its trial driver's
            cpus = float(max(1, math.floor(cluster.cpus_per_gpu * gpus - driver)))
        else:  # every worker about a core, the trials that run at once sharing the rest
            at_once = min(at_once, max(1, int(cluster.cpus // workers)))
            share = (cluster.cpus - at_once * driver) / (at_once * workers)
            # A worker and its trial's driver may land on the smallest node.
            share = min(share, (cluster.node_cpus or cluster.cpus) - driver)
            cpus = math.floor(100 * share) / 100
            if cpus <= 0:
                raise DoesNotFit(f"{workers} workers of a CPU each per trial")
    per_trial = workers * cpus + driver
    if per_trial > cluster.cpus:
        raise DoesNotFit(f"{workers} x {cpus:g} CPUs (+{driver:g} for the trial driver) per "
                         f"trial")
    wanted = at_once
    at_once = min(at_once, int(cluster.cpus // per_trial))
    idle = cluster.cpus - at_once * per_trial
    if at_once < wanted and idle >= IDLE_SHARE * cluster.cpus:
        raise ConfigError(
            f"resources.cpus_per_worker: {workers} x {cpus:g} CPUs (+{driver:g} for the trial "
            f"driver) fit {at_once} trial{'s' * (at_once > 1)} at a time into {cluster}, "
            f"leaving {idle:g} CPUs idle; set it to auto (or lower concurrency to {at_once})")
    return res.model_copy(update={"cpus_per_worker": float(cpus),
                                  "gpus_per_worker": float(gpus)}), at_once


def _workers(res: Resources) -> int:
    assert res.workers is not None, "StudyConfig sets resources.workers (parallel dp x pp x bp)"
    return res.workers


def check_place(study: StudyConfig, cluster: Cluster, study_file: str | None) -> tuple[
        StudyConfig, int]:
    """`place`, or a ConfigError with the message described above."""
    try:
        resources, at_once = place(study, cluster)
        return study.model_copy(update={"resources": resources}), at_once
    except DoesNotFit as need:
        raise ConfigError(no_fit_message(study, cluster, str(need), study_file)) from None


def no_fit_message(study: StudyConfig, cluster: Cluster, need: str,
                   study_file: str | None) -> str:
    res = study.resources
    lines = [f"study {study.name} does not fit this cluster: it needs {need}, {res.workers} "
             f"worker{'s' * (_workers(res) > 1)} per trial and up to {study.concurrency} trials "
             f"at once; the cluster has {cluster}. Ways on:"]
    if study_file is not None:
        here = Path(study_file)
        fitting = [p.name for p in sorted(here.parent.glob("*.y*ml"))
                   if p.resolve() != here.resolve() and fits(p, cluster)]
        if fitting:
            lines.append(f"  - a study that fits here, beside {here.name}: {', '.join(fitting)}")
    overrides = {"train.device": "cpu", "resources.gpus_per_worker": "auto",
                 "resources.cpus_per_worker": "auto"}
    given = {"train.device": study.train.device, "resources.gpus_per_worker":
             res.gpus_per_worker, "resources.cpus_per_worker": res.cpus_per_worker}
    # A copy, not a new validation: that would build every architecture of the space again.
    on_cpus = study.model_copy(update={
        "train": study.train.model_copy(update={"device": "cpu"}),
        "resources": res.model_copy(update={"gpus_per_worker": "auto",
                                            "cpus_per_worker": "auto"})})
    try:
        resources, at_once = place(on_cpus, cluster)
    except (DoesNotFit, ConfigError):
        pass
    else:
        flags = " ".join(f"--set {key}={value}" for key, value in overrides.items()
                         if given[key] not in (value, "auto"))
        lines.append(f"  - this study on these CPUs, {flags}: "
                     f"{estimate(on_cpus, resources, at_once)}")
    if len(lines) == 1:
        lines.append("  - add nodes to the cluster, or lower resources or parallel")
    return "\n".join(lines)


def fits(path: Path, cluster: Cluster) -> bool:
    try:
        place(load_study(str(path), []), cluster)
        return True
    except Exception:  # a study that does not load, or does not fit, is not offered
        return False


def estimate(study: StudyConfig, resources: Resources, at_once: int) -> str:
    """How long the study would at least train here: its training FLOPs over the rate that a
    short step of its median architecture reaches on this machine, `at_once` trials at a time."""

    configs = sorted((study.trial_config({"arch": c.name}) for c in study.feasible()),
                     key=lambda cfg: summarize(cfg.architecture)["flops"])
    forward = [summarize(cfg.architecture)["flops"] for cfg in configs]
    threads = torch.get_num_threads()
    assert resources.cpus_per_worker != "auto", "estimate takes the resources that fit resolved"
    torch.set_num_threads(max(1, round(resources.cpus_per_worker)))  # as one worker gets
    try:
        step_s = seconds_per_step(configs[len(configs) // 2])
    finally:
        torch.set_num_threads(threads)
    rate = training_flops(forward[len(configs) // 2], 1, study.train.batch_size) / step_s
    per_trial = estimated_cost(study, statistics.mean(forward))
    trials, total = f"{planned_trials(study)} trials", planned_trials(study) * per_trial
    if study.searcher.sampler == "n0":  # the n0 searcher's own caps, in epochs
        epochs = worst_epochs(study)[0]
        trials, total = f"{epochs:,.0f} epochs", epochs / study.train.epochs * per_trial
    hours = total / (rate * at_once) / 3600
    took = f"{hours:,.0f} hours" if hours >= 2 else f"{60 * hours:.0f} minutes"
    # A floor: evaluation, data loading and each trial's start-up come on top (on two cores,
    # CIFAR-sized trials took about twice as long).
    return (f"at least {took} ({trials}, {total / 1e15:,.2f} PFLOPs of training at "
            f"{rate / 1e9:.1f} GFLOP/s measured here in one step, {at_once} at a time)")
