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

from orchestrator.config import ConfigError, StudyConfig, load_study

STATE_FILE = "multires_study.json"


# ----------------------------------------------------------------------------- searching

def planned_trials(study: StudyConfig) -> int:
    """Trials the study trains at most: the grid, or `trials` within the space's size."""
    if study.searcher.sampler == "grid":
        return int(study.space_size())
    if study.searcher.sampler == "n0":
        return study.trials
    return int(min(study.trials, study.space_size()))


def build_scheduler(study: StudyConfig):
    if study.scheduler.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    objective = study.searcher.objectives[0]
    return ASHAScheduler(time_attr="epoch", metric=objective.metric, mode=objective.mode,
                         max_t=study.train.epochs, grace_period=study.scheduler.grace_period,
                         reduction_factor=study.scheduler.reduction_factor)


# ----------------------------------------------------------------------------- one trial

def trial_driver(config: dict, study_data: dict) -> None:
    """Runs inside a Tune trial: builds the trial's TrainConfig and fits a TorchTrainer."""
    import ray.tune

    from orchestrator.worker import TuneReport, build_trainer

    study = StudyConfig(**study_data)
    cfg = study.trial_config(config)
    res = study.resources
    # Same (storage_path, name) on a restarted trial: Ray Train restores its checkpoint.
    trainer = build_trainer(cfg, name=f"train-{ray.tune.get_context().get_trial_id()}",
                            storage_path=str(study.storage_dir() / study.name), echo=False,
                            cpus_per_worker=res.cpus_per_worker,
                            gpus_per_worker=res.gpus_per_worker, max_failures=res.max_failures,
                            callbacks=[TuneReport(worst_objectives(study))])
    trainer.fit()


def worst_objectives(study: StudyConfig) -> dict[str, float]:
    """What a diverged trial tells the searcher: the worst error (or 0 when maximised)."""
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
    """What the searcher would start first, before any result comes back."""
    from orchestrator.searchers import build_searcher

    searcher = build_searcher(study)
    out = []
    for i in range(count):
        suggestion = searcher.suggest(f"dry{i}")
        if not isinstance(suggestion, dict):
            break
        out.append(suggestion)
    return out


def dry_run(study: StudyConfig, count: int) -> None:
    from models.summary import summarize

    feasible, excluded = study.feasible(), study.excluded()
    print(f"study {study.name}: {len(feasible)} architectures in the budget, "
          f"{len(excluded)} outside it (never sampled)")
    if excluded:
        print_table([{"outside the budget": c.name, "why": c.excluded} for c in excluded])
    rows = []
    trials = first_trials(study, count)
    for sampled in trials:
        cfg = study.trial_config(sampled)
        info = summarize(cfg.architecture)
        rows.append({"architecture": cfg.architecture.name, "seed": cfg.seed,
                     **{k: v for k, v in sampled.items() if k not in ("arch", "seed")},
                     "params": f"{info['params']:,}",
                     "GFLOPs/img": f"{info['flops'] / 1e9:.3f}",
                     "train PFLOPs": f"{estimated_cost(study, info['flops']) / 1e15:.2f}"})
    if study.searcher.sampler == "n0":
        pairs = ", ".join(f"{p.deep} / {p.multi}" for p in study.pairs_to_train())
        print(f"matched pairs (k=1 / k>1): {pairs}")
    waits = len(trials) < count and study.searcher.sampler == "n0"
    print(f"\nat most {planned_trials(study)} trials, sampler {study.searcher.sampler} (seed "
          f"{study.searcher.seed}), seeds {study.seeds}; the first {len(rows)}"
          f"{' (then it waits for their results)' if waits else ''}:")
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
        if result.config is None:
            continue  # a trial that never started (interrupted)
        m = result.metrics or {}
        cfg = study.trial_config(result.config)
        info = summarize(cfg.architecture)
        status = ("error" if result.error or m.get("diverged") else
                  "stopped" if m.get("epoch", 0) < m.get("epochs_total", 0) else "done")
        rows.append({
            "trial": m.get("trial_id", "?"), "architecture": study.candidate(result.config).name,
            "seed": cfg.seed, "depth": cfg.architecture.total_depth, "k": cfg.architecture.k,
            "width": cfg.architecture.width, "params": info["params"], "flops": info["flops"],
            "epochs": m.get("epoch", 0), "best_test_error": m.get("best_test_error"),
            "final_test_error": m.get("test_error"),
            "time_s": round(m.get("time_total_s", 0.0), 1), "status": status,
            "history": epoch_history(result.metrics_dataframe)})
    return rows


def epoch_history(frame):
    """(epoch, test error) per epoch of a trial, or None when it reported none."""
    if frame is None or not {"epoch", "test_error"} <= set(frame.columns):
        return None
    return frame[["epoch", "test_error"]].dropna()


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
    rows = summarize_results(results, study)
    verdict = None
    if ended < len(rows):  # trials that never ended: interrupted
        interrupted = True
    elif study.searcher.sampler == "n0":
        from orchestrator.searchers import search_verdict

        verdict = search_verdict(study, rows)  # None: the search wanted more trials
        interrupted = verdict is None
    else:
        interrupted = ended < planned_trials(study)
    if interrupted:
        parent.close("KILLED", study.mlflow.outage_wait_s)
        print(f"\nsweep interrupted after {ended} trials; run the same command again (or add "
              f"--resume) to continue", file=sys.stderr)
        return 130
    report_summary(rows, study, parent, results_dir)
    report_n0(rows, study, parent, results_dir, verdict)
    parent.close("FINISHED", study.mlflow.outage_wait_s)
    return 0 if any(r["status"] in ("done", "stopped") for r in rows) else 1


def fit(study: StudyConfig, results_dir: Path, restoring: bool, parent, digest: str,
        concurrency: int):
    import ray.tune
    from ray.tune import Tuner

    from orchestrator.searchers import build_searcher
    from orchestrator.tracking import TrialTracker

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial_driver,
                                 study_data=study.model_dump(mode="json", exclude_unset=True)),
        {"cpu": study.resources.driver_cpus})
    if restoring:
        print(f"resuming study {study.name} from {results_dir}")
        # The MLflow tracker and the searcher's state come back with the experiment (see
        # TrialTracker.__reduce__ and orchestrator.searchers).
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

    table = pd.DataFrame(rows).drop(columns=["history"]).sort_values("best_test_error",
                                                                      na_position="last")
    print("\n" + table.to_string(index=False))
    trained = table[table["status"].isin(["done", "stopped"])]
    client, run_id, send = parent.client, parent.run_id, outbox(study.tracking_uri()).put
    summary_csv = table.to_csv(index=False)
    send("summary.csv", lambda: client.log_text(run_id, summary_csv, "summary.csv"))
    counts = {"trials_trained": len(trained)}
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


def report_n0(rows: list[dict], study: StudyConfig, parent, results_dir: Path,
              verdict: str | None) -> None:
    """Where the trials pair up: n0 as `orchestrator.report` gives it, printed, written to
    results/STUDY/report/ and logged to the parent run (report.md, figures, n0 metrics)."""
    import pandas as pd
    from mlflow.entities import Metric, RunTag

    from orchestrator.analysis import find_pairs
    from orchestrator.report import build_report, show
    from orchestrator.tracking import outbox

    done = [r for r in rows if r["status"] == "done" and r["final_test_error"] is not None]
    keys = ["depth", "k", "width", "params", "seed", "flops"]
    runs = pd.DataFrame([{**{k: r[k] for k in keys}, "name": r["architecture"],
                          "test_error": 100 * r["final_test_error"]} for r in done])
    if runs.empty or not find_pairs(runs, study.n0.pair_tolerance):
        return
    histories = {r["trial"]: ({k: r[k] for k in keys},
                              [(int(e), 100 * v) for e, v in r["history"].itertuples(index=False)])
                 for r in done if r["history"] is not None}
    n0, path = build_report(runs, results_dir / "report", f"Deeper or wider: {study.name}",
                            histories, tolerance=study.n0.pair_tolerance)
    print()
    show(path, n0)
    if verdict:
        print(f"n0 search: {verdict}")
    client, run_id, send = parent.client, parent.run_id, outbox(study.tracking_uri()).put
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in
               (("n0", n0.value), ("n0_low", n0.low), ("n0_high", n0.high))
               if v is not None and math.isfinite(v)]
    folder = str(path.parent)
    send("report", lambda: client.log_artifacts(run_id, folder, "report"))
    send("n0 metrics", lambda: client.log_batch(run_id, metrics=metrics, tags=[
        RunTag("n0", n0.line())] + ([RunTag("n0_search", verdict)] if verdict else [])))


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
