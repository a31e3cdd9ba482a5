"""`python -m orchestrator.sweep STUDY.yaml`: a study as Ray Tune trials of Ray Train runs.

    python -m orchestrator.sweep search_spaces/smoke.yaml
    python -m orchestrator.sweep search_spaces/depth_vs_k.yaml --dry-run
    python -m orchestrator.sweep search_spaces/cifar_cpu.yaml --set trials=4 --data-dir ./data

Study file -> StudyConfig -> Tuner(OptunaSearch, ASHA) -> trial driver -> TorchTrainer -> workers
(`orchestrator.worker`) -> ray.train.report -> TuneReportCallback -> Tune -> MLflow (`tracking`).
Running the same command again after Ctrl-C (or with --resume) continues the study with
`Tuner.restore`: finished trials are kept, unfinished ones resume from their last checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from orchestrator.config import ConfigError, FloatRange, IntRange, StudyConfig, load_study

STATE_FILE = "multires_study.json"


# ----------------------------------------------------------------------------- searching

def optuna_space(study: StudyConfig) -> dict:
    import optuna.distributions as d

    space = {}
    for key, dist in study.searched().items():
        if isinstance(dist, IntRange):
            space[key] = d.IntDistribution(dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, FloatRange):
            space[key] = d.FloatDistribution(dist.low, dist.high, log=dist.log)
        else:
            space[key] = d.CategoricalDistribution([json_safe(c) for c in dist.choices])
    return space


def json_safe(value):
    return tuple(value) if isinstance(value, list) else value


def grid(study: StudyConfig) -> dict[str, list]:
    return {k: (v.values() if isinstance(v, IntRange) else [json_safe(c) for c in v.choices])
            for k, v in study.searched().items()}


def grid_size(study: StudyConfig) -> int:
    return math.prod(len(v) for v in grid(study).values())


def build_searcher(study: StudyConfig):
    """An Optuna sampler as the Ray Tune searcher (TPE by default), seeded."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    s = study.searcher
    if not study.searched():
        return None  # a fixed configuration: Tune's default generator repeats it `trials` times
    if s.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=s.seed)
    elif s.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    else:
        sampler = optuna.samplers.GridSampler(grid(study), seed=s.seed)
    metrics = [o.metric for o in s.objectives]
    modes = [o.mode for o in s.objectives]
    single = len(metrics) == 1
    return OptunaSearch(space=optuna_space(study), metric=metrics[0] if single else metrics,
                        mode=modes[0] if single else modes, sampler=sampler)


def build_scheduler(study: StudyConfig):
    if study.scheduler.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    objective = study.searcher.objectives[0]
    return ASHAScheduler(time_attr="epoch", metric=objective.metric, mode=objective.mode,
                         max_t=study.train.epochs, grace_period=study.scheduler.grace_period,
                         reduction_factor=study.scheduler.reduction_factor)


def planned_trials(study: StudyConfig) -> int:
    grid_search = study.searcher.sampler == "grid" and study.searched()
    return grid_size(study) if grid_search else study.trials


# ----------------------------------------------------------------------------- one trial

def trial_driver(config: dict, study_data: dict) -> None:
    """Runs inside a Tune trial: builds the trial's TrainConfig and fits a TorchTrainer."""
    import ray.tune

    from models.summary import summarize
    from orchestrator.worker import TuneReport, build_trainer

    study = StudyConfig(**study_data)
    cfg = study.trial_config({k: config[k] for k in study.searched()})
    params = summarize(cfg.architecture)["params"]
    reason = study.budget.reason(params)
    if reason is not None:  # outside the parameter budget: recorded, not trained
        ray.tune.report({"pruned": True, "pruned_reason": reason, "params": params, "epoch": 0,
                         **worst_objectives(study)})
        return
    res = study.resources
    # Same (storage_path, name) on a restarted trial: Ray Train restores its checkpoint.
    trainer = build_trainer(cfg, name=f"train-{ray.tune.get_context().get_trial_id()}",
                            storage_path=str(study.storage_dir() / study.name), echo=False,
                            cpus_per_worker=res.cpus_per_worker,
                            gpus_per_worker=res.gpus_per_worker, max_failures=res.max_failures,
                            callbacks=[TuneReport(worst_objectives(study))])
    trainer.fit()


def worst_objectives(study: StudyConfig) -> dict[str, float]:
    """What a pruned or diverged trial tells the searcher: the worst error (or 0 when maximised)."""
    return {o.metric: (1.0 if o.mode == "min" else 0.0) for o in study.searcher.objectives}


# ----------------------------------------------------------------------------- dry run

def estimated_cost(study: StudyConfig, flops: int) -> float:
    """Training FLOPs: forward + backward (about 3x forward) over every image of every epoch."""
    train_size = study.train.train_size or {"synthetic": 2048}.get(study.train.dataset, 50_000)
    steps = study.train.epochs * (train_size // study.train.batch_size)
    if study.train.steps:
        steps = min(steps, study.train.steps)
    return 3.0 * flops * steps * study.train.batch_size


def first_trials(study: StudyConfig, count: int) -> list[dict]:
    """What the searcher would start first (all of it for a grid or a fixed space)."""
    searcher = build_searcher(study)
    if searcher is None:
        return [{}] * min(count, study.trials)
    out = []
    for i in range(count):
        suggestion = searcher.suggest(f"dry{i}")
        if suggestion is None:
            break
        out.append(dict(suggestion))
    return out


def dry_run(study: StudyConfig, count: int) -> None:
    from models.summary import summarize

    if study.searcher.sampler == "grid" and study.searched():
        count = grid_size(study)
    rows = []
    for sampled in first_trials(study, count):
        cfg = study.trial_config(sampled)
        info = summarize(cfg.architecture)
        reason = study.budget.reason(info["params"])
        rows.append({"sampled": ", ".join(f"{k}={v}" for k, v in sampled.items()) or "-",
                     "architecture": cfg.architecture.name, "params": f"{info['params']:,}",
                     "GFLOPs/img": f"{info['flops'] / 1e9:.3f}",
                     "train PFLOPs": f"{estimated_cost(study, info['flops']) / 1e15:.2f}",
                     "budget": "pruned: " + reason if reason else "ok"})
    print(f"study {study.name}: {planned_trials(study)} trials planned, "
          f"sampler {study.searcher.sampler} (seed {study.searcher.seed}); first {len(rows)}:")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    import pandas as pd

    if rows:
        print(pd.DataFrame(rows).to_string(index=False))


# ----------------------------------------------------------------------------- running

def start_ray(study: StudyConfig) -> int:
    """Connect to RAY_ADDRESS or start a local Ray; return how many trials fit at once."""
    import ray

    from orchestrator.worker import init_ray

    init_ray()
    total = ray.cluster_resources()
    res = study.resources
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    if res.workers * res.cpus_per_worker + res.driver_cpus > cpus:
        raise ConfigError(f"resources.workers: {res.workers} workers x {res.cpus_per_worker} CPUs "
                          f"(+{res.driver_cpus} for the trial driver) exceed the cluster's "
                          f"{cpus:g} CPUs; lower resources.workers or resources.cpus_per_worker")
    if res.workers * res.gpus_per_worker > gpus:
        raise ConfigError(f"resources.gpus_per_worker: {res.workers} x {res.gpus_per_worker} GPUs "
                          f"exceed the cluster's {gpus:g}; lower it or add GPU nodes")
    fit = int(cpus // (res.workers * res.cpus_per_worker + res.driver_cpus))
    if res.gpus_per_worker:
        fit = min(fit, int(gpus // (res.workers * res.gpus_per_worker)))
    return max(1, min(study.concurrency, fit))


def resolve_paths(study: StudyConfig) -> StudyConfig:
    """Make every path absolute (trials run in other folders, or on other machines) and fetch
    the dataset once, before any trial starts."""
    from orchestrator.data import load_cifar

    train = study.train
    if train.dataset != "synthetic":
        data_dir = str(Path(train.data_dir or "data").expanduser().resolve())
        load_cifar(train.dataset, data_dir)  # downloads when absent and online; checks files
        train = train.model_copy(update={"data_dir": data_dir})
    mlflow = study.mlflow.model_copy(update={"tracking_uri": study.tracking_uri()})
    return study.model_copy(update={"train": train, "mlflow": mlflow,
                                    "storage_path": str(study.storage_dir())})


def config_hash(study: StudyConfig) -> str:
    return hashlib.sha256(json.dumps(study.model_dump(mode="json"), sort_keys=True).encode()
                          ).hexdigest()[:16]


def read_state(results_dir: Path) -> dict | None:
    path = results_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def summarize_results(results, study: StudyConfig) -> list[dict]:
    from models.summary import summarize

    rows = []
    for result in results:
        m = result.metrics or {}
        sampled = {k: result.config[k] for k in study.searched() if k in result.config}
        cfg = study.trial_config(sampled)
        info = summarize(cfg.architecture)
        status = ("pruned" if m.get("pruned") else
                  "error" if result.error or m.get("diverged") else
                  "stopped" if m.get("epoch", 0) < m.get("epochs_total", 0) else "done")
        rows.append({
            "trial": m.get("trial_id", "?"), "architecture": cfg.architecture.name,
            "seed": cfg.seed, "params": info["params"], "GFLOPs": round(info["flops"] / 1e9, 3),
            "epochs": m.get("epoch", 0),
            "best_test_error": m.get("best_test_error") if not m.get("pruned") else None,
            "final_test_error": m.get("test_error") if not m.get("pruned") else None,
            "time_s": round(m.get("time_total_s", 0.0), 1), "status": status})
    return rows


def run(study: StudyConfig, study_text: str, resume: bool) -> int:
    from ray.tune import Tuner

    from orchestrator.tracking import StudyRun, check_scheme, connect

    check_scheme(study.tracking_uri())
    study = resolve_paths(study)  # the data checked before anything is started
    concurrency = start_ray(study)
    results_dir = study.storage_dir() / study.name
    state = read_state(results_dir)
    digest = config_hash(study)
    restoring = state is not None and Tuner.can_restore(str(results_dir))
    if resume and not restoring:
        raise ConfigError(f"nothing to resume in {results_dir}; run without --resume")
    if state is not None and state["config_hash"] != digest:
        raise ConfigError(f"{results_dir} holds study {study.name} with a different "
                          f"configuration; use another --storage-path or remove that folder")

    parent = StudyRun(connect(study.tracking_uri()), study)
    # A driver killed before Tune first saved its state leaves a parent run and nothing to
    # restore: the fresh start continues that parent run instead of leaving it RUNNING.
    parent.open(state and state["parent_run_id"], results_dir, study_text)
    try:
        results = fit(study, results_dir, restoring, parent, digest, concurrency)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        parent.close("KILLED" if interrupted else "FAILED",
                     0 if interrupted else study.mlflow.outage_wait_s)
        raise
    ended = results.num_terminated + results.num_errors
    if ended < planned_trials(study):
        parent.close("KILLED", study.mlflow.outage_wait_s)
        print(f"\nsweep interrupted after {ended} of {planned_trials(study)} trials; run the same "
              f"command again (or add --resume) to continue", file=sys.stderr)
        return 130
    rows = summarize_results(results, study)
    report_summary(rows, study, parent, results_dir)
    parent.close("FINISHED", study.mlflow.outage_wait_s)
    return 0 if any(r["status"] in ("done", "stopped") for r in rows) else 1


def fit(study: StudyConfig, results_dir: Path, restoring: bool, parent, digest: str,
        concurrency: int):
    import ray.tune
    from ray.tune import Tuner

    from orchestrator.tracking import TrialTracker

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial_driver,
                                 study_data=study.model_dump(mode="json", exclude_unset=True)),
        {"cpu": study.resources.driver_cpus})
    if restoring:
        print(f"resuming study {study.name} from {results_dir}")
        # The MLflow tracker comes back with the experiment (see TrialTracker.__reduce__).
        tuner = Tuner.restore(str(results_dir), trainable=trainable, resume_unfinished=True,
                              resume_errored=False, restart_errored=False)
    else:
        results_dir.mkdir(parents=True, exist_ok=True)
        staged = results_dir / f".{STATE_FILE}.tmp"
        staged.write_text(json.dumps(
            {"parent_run_id": parent.run_id, "config_hash": digest,
             "tracking_uri": study.tracking_uri(), "experiment": study.experiment_name}))
        staged.replace(results_dir / STATE_FILE)  # whole or absent, even if killed here
        tracker = TrialTracker(study.tracking_uri(), study, parent.experiment_id, parent.run_id,
                                      layout=study.parallel.layout)
        tuner = Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                search_alg=build_searcher(study), scheduler=build_scheduler(study),
                num_samples=planned_trials(study), max_concurrent_trials=concurrency),
            run_config=ray.tune.RunConfig(
                name=study.name, storage_path=str(study.storage_dir()), callbacks=[tracker],
                # A trial whose driver's node was lost restarts from its last checkpoint too.
                failure_config=ray.tune.FailureConfig(
                    max_failures=study.resources.max_failures)),
        )
    return tuner.fit()


def report_summary(rows: list[dict], study: StudyConfig, parent, results_dir: Path) -> None:
    import pandas as pd
    from mlflow.entities import Metric

    from orchestrator.tracking import outbox

    table = pd.DataFrame(rows).sort_values("best_test_error", na_position="last")
    print("\n" + table.to_string(index=False))
    trained = table[table["status"].isin(["done", "stopped"])]
    client, run_id, send = parent.client, parent.run_id, outbox(study.tracking_uri()).put
    summary_csv = table.to_csv(index=False)
    send("summary.csv", lambda: client.log_text(run_id, summary_csv, "summary.csv"))
    counts = {"trials_trained": len(trained),
              "trials_pruned": int((table["status"] == "pruned").sum())}
    if len(trained):
        best = trained.iloc[0]
        counts["best_test_error"] = float(best["best_test_error"])
        best_json = json.loads(best.to_json())
        send("best.json", lambda: client.log_dict(run_id, best_json, "best.json"))
        print(f"\nbest: {best['architecture']} seed {best['seed']} ({best['params']:,} params): "
              f"test error {100 * best['best_test_error']:.2f}%")
    now = int(time.time() * 1000)
    send("study metrics", lambda: client.log_batch(
        run_id, metrics=[Metric(k, v, now, 0) for k, v in counts.items()]))
    print(f"results: {results_dir}\nMLflow: {study.tracking_uri()} experiment "
          f"'{study.experiment_name}', parent run {run_id} (compare with `mlflow ui "
          f"--backend-store-uri {study.tracking_uri()}`)")


# ----------------------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep",
                                description="Run a study: Ray Tune + Optuna over Ray Train trials, "
                                            "tracked in MLflow.")
    p.add_argument("study", help="study file (search_spaces/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key, dotted (e.g. --set train.epochs=3)")
    p.add_argument("--data-dir", help="same as --set train.data_dir=DIR")
    p.add_argument("--tracking-uri", help="same as --set mlflow.tracking_uri=URI")
    p.add_argument("--storage-path", help="same as --set storage_path=DIR")
    p.add_argument("--dry-run", action="store_true", help="print the first trials, train nothing")
    p.add_argument("--dry-run-trials", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue the study (the default when "
                   "its results folder exists); fail if there is nothing to resume")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    from orchestrator.data import DataError
    from orchestrator.tracking import TrackingError

    args = parser().parse_args(argv)
    overrides = list(args.set)
    for flag, key in (("data_dir", "train.data_dir"), ("tracking_uri", "mlflow.tracking_uri"),
                      ("storage_path", "storage_path")):
        if getattr(args, flag):
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        study = load_study(args.study, overrides)
        if args.dry_run:
            dry_run(study, args.dry_run_trials)
            return 0
        return run(study, Path(args.study).read_text(), args.resume)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ConfigError, DataError, TrackingError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
