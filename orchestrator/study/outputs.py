"""What a study shows at its end: the summary table, the best run and its registered model,
and the n0 report (printed, written to the results folder, logged to the parent run)."""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import mlflow.pytorch
import pandas as pd
import pyarrow.fs
import ray.train
import torch
from mlflow.entities import Metric, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from models.complexity import input_size, summarize
from models.multi_resnet import Architecture, create_model
from orchestrator.analysis.n0 import find_pairs
from orchestrator.analysis.report_builder import build_report, show
from orchestrator.errors import TrackingError, UserError, short
from orchestrator.results import CHECKPOINT_FILE, DONE, FAILED, outcome, trained
from orchestrator.run.checkpoint import load_checkpoint
from orchestrator.study.config import StudyConfig
from orchestrator.study.mlflow_client import all_runs, outbox
from orchestrator.study.mlflow_names import Tag
from orchestrator.study.n0_search import search_notes

log = logging.getLogger(__name__)


def summarize_results(results, study: StudyConfig) -> list[dict]:
    rows = []
    for result in results:
        if result.config is None:
            continue  # a trial that never started (interrupted)
        m = result.metrics or {}
        cfg = study.trial_config(result.config)
        info = summarize(cfg.architecture)
        status = outcome(m, errored=bool(result.error))
        rows.append({
            "trial": m.get("trial_id", "?"), "architecture": study.candidate(result.config).name,
            "seed": cfg.seed, "fidelity": result.config.get("fidelity", 1.0),
            "depth": cfg.architecture.total_depth, "k": cfg.architecture.k,
            "width": cfg.architecture.width, "params": info["params"], "flops": info["flops"],
            "epochs": m.get("epoch", 0), "best_test_error": m.get("best_test_error"),
            "final_test_error": m.get("test_error"),
            "time_s": round(m.get("time_total_s", 0.0), 1), "status": status,
            "history": epoch_history(result.metrics_dataframe)})
    return rows


def failed_trials(results, study: StudyConfig) -> dict[str, str]:
    """The trials that ended without training (raised, or never reported an epoch), by name,
    with the last line of what they raised."""
    failed = {}
    for result in results:
        if result.config is None or outcome(result.metrics, bool(result.error)) != FAILED:
            continue
        lines = [line.strip() for line in str(result.error or "").splitlines() if line.strip()]
        failed[study.trial_name(result.config)] = short(
            lines[-1] if lines else "it ended without reporting an epoch", 300)
    return failed


def epoch_history(frame):
    """(epoch, test error) per epoch of a trial, or None when it reported none. Read back from
    Tune's result files (which are not signed): a value no epoch or error can be is no point."""
    if frame is None or not {"epoch", "test_error"} <= set(frame.columns):
        return None
    frame = frame[["epoch", "test_error"]].apply(pd.to_numeric, errors="coerce")
    return frame[frame.test_error.between(0, 1) & frame.epoch.between(0, 1e9)]


def report_summary(rows: list[dict], study: StudyConfig, parent, results: str) -> str | None:
    """The summary table, printed and logged to the parent run; returns the best trial's id."""
    table = pd.DataFrame(rows).drop(columns=["history"]).sort_values("best_test_error",
                                                                      na_position="last")
    print("\n" + table.to_string(index=False))
    finished = table[table["status"].map(trained)]
    client, run_id, send = parent.client, parent.run_id, outbox(study.tracking_uri()).put
    summary_csv = table.to_csv(index=False)
    send("summary.csv", lambda: client.log_text(run_id, summary_csv, "summary.csv"))
    study_metrics: dict[str, float] = {"trials_trained": len(finished)}
    if len(finished):
        best = finished.iloc[0]
        study_metrics["best_test_error"] = float(best["best_test_error"])
        best_json = json.loads(best.to_json())
        send("best.json", lambda: client.log_dict(run_id, best_json, "best.json"))
        print(f"\nbest: {best['architecture']} seed {best['seed']} ({best['params']:,} params): "
              f"test error {100 * best['best_test_error']:.2f}%")
    now = int(time.time() * 1000)
    send("study metrics", lambda: client.log_batch(
        run_id, metrics=[Metric(k, v, now, 0) for k, v in study_metrics.items()]))
    print(f"results: {results}\nMLflow: {study.tracking_uri()} experiment "
          f"'{study.experiment_name}', parent run {run_id} (compare with `mlflow ui "
          f"--backend-store-uri {study.tracking_uri()}`)")
    return best["trial"] if len(finished) else None


def show_finished(parent, study: StudyConfig, results: str) -> None:
    """A finished study's command run again: its result, as the parent run holds it; nothing
    is trained, logged or registered again."""
    tags = parent.data.tags
    best = read_metric(parent, "best_test_error", 0, 1)
    trials = read_metric(parent, "trials_trained", 0, 1e9, whole=True) or 0
    lines = [f"study {study.name} is finished (parent run {parent.info.run_id}): "
             f"{int(trials)} trials trained"
             + (f", best test error {100 * best:.2f}%" if best is not None else "")]
    if Tag.N0 in tags:
        lines.append(tags[Tag.N0])
    lines.append(f"results: {results}\nMLflow: {study.tracking_uri()} experiment "
                 f"'{study.experiment_name}'\nnothing changed; to train it again, use another "
                 f"--storage-path or remove that folder")
    print("\n".join(lines))


def read_metric(run, name: str, low: float, high: float, whole: bool = False) -> float | None:
    """A run's metric read back from MLflow: absent (None), or a number from low to high (NaN
    and inf are neither); else one line naming the run and the metric."""
    value = run.data.metrics.get(name)
    if value is None:
        return None
    if not low <= value <= high or (whole and value != int(value)):
        raise TrackingError(f"MLflow run {run.info.run_id}: metric {name} holds {value:g}, not "
                            f"{'a whole number ' if whole else ''}from {low:g} to {high:g}; log "
                            f"the right value to it (a later step replaces it), or use another "
                            f"--storage-path")
    return value


def register_best_model(results, trial_id: str, study: StudyConfig, parent) -> None:
    """The best trial's final network, logged to its run with `mlflow.pytorch` and registered
    under the study's name: `mlflow.pytorch.load_model("models:/<study>/<version>")` gives a
    plain nn.Module. Saved as an exported graph (torch.export, MLflow's pt2 format): loading it
    runs no pickled code and needs neither this project nor its classes."""
    result = next((r for r in results if (r.metrics or {}).get("trial_id") == trial_id), None)
    path = (result.metrics or {}).get(CHECKPOINT_PATH_KEY) if result is not None else None
    if path is None:
        return
    # The trial's last Ray Train checkpoint, on the study's storage (a folder or a URI).
    storage = study.storage_path
    filesystem = pyarrow.fs.FileSystem.from_uri(storage)[0] if "://" in storage else None
    try:  # read back from the storage, which is not signed: its integrity is not ours to vouch
        with ray.train.Checkpoint(path, filesystem=filesystem).as_directory() as folder:
            state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        arch = Architecture(**state["architecture"])  # the run's: an image folder's classes too
        model = create_model(arch)
        model.load_state_dict(state["model"])
    except (UserError, ValueError, TypeError, RuntimeError, OSError) as exc:
        # The study's results stand; only the model is left out (the parent run still ends).
        log.warning(f"best model not registered: the checkpoint at {short(path)} cannot be used "
                    f"({type(exc).__name__}: {short((str(exc).splitlines() or [''])[0], 200)})")
        return
    model.eval()
    size = input_size(arch)
    uri, client, name = study.tracking_uri(), parent.client, study.experiment_name

    def register():
        (run,) = all_runs(client, [parent.experiment_id],
                          f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.run_id}' and "
                          f"tags.trial_id = '{trial_id}'")
        version = registered_version(client, name, run.info.run_id)
        if version is not None:  # a driver killed after registering it: a rerun adds none
            print(f"best model: mlflow.pytorch.load_model(\"models:/{name}/{version}\") "
                  f"(registered before)")
            return
        mlflow.set_tracking_uri(uri)
        # Without an active experiment MLflow files the logged model under "Default" (its
        # artifacts in ./mlruns of the working folder), whatever run it comes from.
        mlflow.set_experiment(experiment_id=parent.experiment_id)
        info = mlflow.pytorch.log_model(
            model, name="model", run_id=run.info.run_id, registered_model_name=name,
            input_example=torch.zeros(2, 3, size, size).numpy(),
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}"])
        print(f"best model: mlflow.pytorch.load_model(\"models:/{name}/"
              f"{info.registered_model_version}\")")
    outbox(uri).put("best model", register)


def registered_version(client, name: str, run_id: str) -> str | None:
    """The version of registered model `name` made from run `run_id`, if there is one (whose
    registration did not fail)."""
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    return next((v.version for v in sorted(versions, key=lambda v: int(v.version))
                 if v.name == name and v.status != "FAILED_REGISTRATION"), None)


def report_n0(rows: list[dict], study: StudyConfig, parent, results_dir: Path,
              verdict: str | None, policy=None, extended: Sequence[str] = ()) -> None:
    """Where the trials pair up: n0 as `orchestrator.report` gives it, printed, written to
    results/STUDY/report/ and logged to the parent run (report.md, figures, n0 metrics). An n0
    study's interval is its searcher's: `policy`, replayed from the rows (None for others);
    `extended`: what the report says about the study's extensions."""
    finished = [r for r in rows if r["status"] == DONE and r["final_test_error"] is not None]
    done = [r for r in finished if r.get("fidelity", 1.0) == 1.0]  # n0: full schedules only
    keys = ["depth", "k", "width", "params", "seed", "flops"]
    runs = pd.DataFrame([{**{k: r[k] for k in keys}, "name": r["architecture"],
                          "test_error": 100 * r["final_test_error"]} for r in done])
    short_runs = pd.DataFrame([{**{k: r[k] for k in keys}, "fidelity": r["fidelity"],
                                "test_error": 100 * r["final_test_error"]}
                               for r in finished if r.get("fidelity", 1.0) != 1.0])
    if runs.empty or not find_pairs(runs, study.n0.pair_tolerance):
        return
    searched, notes = None, list(extended)
    if policy is not None:  # the searcher's own interval, valid under its stopping

        searched = policy.estimate()
        notes += search_notes(policy)
    histories = {r["trial"]: ({k: r[k] for k in keys},
                              [(int(e), 100 * v) for e, v in r["history"].itertuples(index=False)])
                 for r in done if r["history"] is not None}
    n0, path = build_report(runs, results_dir / "report", f"Deeper or wider: {study.name}",
                            histories, tolerance=study.n0.pair_tolerance, n0=searched,
                            notes=notes, short=short_runs)
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
        RunTag(Tag.N0, n0.line())] + ([RunTag(Tag.N0_SEARCH, verdict)] if verdict else [])))
