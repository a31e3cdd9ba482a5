"""One trial of a study: Tune runs `trial_driver`, which fits a Ray Train run of the trial's
config; and the Tune pieces around it (trial scheduler, how many trials, what a diverged trial
tells the searcher)."""
from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.results import DIVERGED
from orchestrator.study.config import StudyConfig


def planned_trials(study: StudyConfig) -> int:
    """Trials the study trains at most: the grid, or `trials` within the space's size."""
    if study.searcher.sampler == "grid":
        return int(study.space_size())
    if study.searcher.sampler == "n0":  # and the short schedules: at most two seeds a net
        from orchestrator.study.n0_search import n0_plan

        nets = {n for p in study.pairs_to_train() for n in (p.deep, p.multi)}
        return study.trials + (2 * len(nets) if n0_plan(study).screen is not None else 0)
    return int(min(study.trials, study.space_size()))


def build_scheduler(study: StudyConfig):
    if study.scheduler.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    objective = study.searcher.objectives[0]
    return ASHAScheduler(time_attr="epoch", metric=objective.metric, mode=objective.mode,
                         max_t=study.train.epochs, grace_period=study.scheduler.grace_period,
                         reduction_factor=study.scheduler.reduction_factor)


def trial_driver(config: dict, study_data: dict) -> None:
    """Runs inside a Tune trial: builds the trial's TrainConfig and fits a TorchTrainer."""
    import ray.tune

    from orchestrator.cluster.driver import build_trainer

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
