"""One trial of a study: Tune runs `trial_driver` (with its resources: `trainable_of`), which
fits a Ray Train run of the trial's config; a diverged run tells the searcher the worst values."""
from __future__ import annotations

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.cluster.driver import build_trainer
from orchestrator.results import DIVERGED
from orchestrator.study.config import StudyConfig


def trainable_of(study: StudyConfig):
    """What Tune runs for each trial of the study (a fit, or a restore, takes it)."""
    return ray.tune.with_resources(
        ray.tune.with_parameters(trial_driver,
                                 study_data=study.model_dump(mode="json", exclude_unset=True)),
        {"cpu": study.resources.driver_cpus})


def trial_driver(config: dict, study_data: dict) -> None:
    """Runs inside a Tune trial: builds the trial's TrainConfig and fits its Ray Train run."""
    study = StudyConfig(**study_data)
    cfg = study.trial_config(config)
    res = study.resources
    cpus, gpus = res.cpus_per_worker, res.gpus_per_worker
    assert cpus != "auto" and gpus != "auto", "the sweep resolves auto resources before Tune starts"
    # Same (storage_path, name) on a restarted trial: Ray Train restores its checkpoint.
    trainer = build_trainer(cfg, name=f"train-{ray.tune.get_context().get_trial_id()}",
                            storage_path=study.results_place(), echo=False,
                            cpus_per_worker=cpus, gpus_per_worker=gpus, max_failures=res.max_failures,
                            callbacks=[TuneReport(worst_objectives(study))])
    trainer.fit()


def worst_objectives(study: StudyConfig) -> dict[str, float]:
    """What a diverged trial tells the searcher: the worst error (or 0 when maximised)."""
    return {o.metric: (1.0 if o.mode == "min" else 0.0) for o in study.searcher.objectives}


class TuneReport(TuneReportCallback):
    """Ray Train's reports to Tune (in a trial); a diverged run's report also carries the
    worst objective values, for the searcher and the scheduler."""

    def __init__(self, worst: dict[str, float]):
        super().__init__()
        self.worst = worst

    def after_report(self, run_context, metrics, checkpoint):
        if DIVERGED in metrics[0]:
            metrics = [{**self.worst, **metrics[0]}]
        super().after_report(run_context, metrics, checkpoint)
