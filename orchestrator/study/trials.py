"""How many trials a study trains and the trial scheduler that stops them early (what runs in
each trial: trainable.py)."""
from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler

from orchestrator.study.config import StudyConfig
from orchestrator.study.n0_search import n0_plan


def planned_trials(study: StudyConfig) -> int:
    """Trials the study trains at most: the grid, or `trials` within the space's size."""
    if study.searcher.sampler == "grid":
        return int(study.space_size())
    if study.searcher.sampler == "n0":  # and the short schedules: at most two seeds a net
        nets = {n for p in study.pairs_to_train() for n in (p.deep, p.multi)}
        return study.trials + (2 * len(nets) if n0_plan(study).screen is not None else 0)
    return int(min(study.trials, study.space_size()))


def build_scheduler(study: StudyConfig) -> ASHAScheduler | None:
    if study.scheduler.type != "asha":
        return None
    objective = study.searcher.objectives[0]
    return ASHAScheduler(time_attr="epoch", metric=objective.metric, mode=objective.mode,
                         max_t=study.train.epochs, grace_period=study.scheduler.grace_period,
                         reduction_factor=study.scheduler.reduction_factor)
