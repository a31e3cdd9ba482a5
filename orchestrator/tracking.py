"""MLflow tracking for sweeps: one parent run per study, one nested child run per trial.

Everything is written from the sweep's driver process through `MlflowClient` with explicit run
ids (workers never talk to MLflow), so a resumed sweep reopens the same parent and the same
children: the parent's id is kept in the study's results folder, children are found by their
`trial_id` tag, and epochs already logged are not logged twice.
"""
from __future__ import annotations

import math
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback

from models.summary import summarize
from orchestrator.config import StudyConfig, TrainConfig

EPOCH_METRICS = ("train_loss", "train_error", "test_error", "lr", "images_per_s", "epoch_time_s",
                 "train_gflops")


# For the reachability check only; later calls keep MLflow's patient retries.
QUICK_CHECK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message says what to check."""


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("multires", "torch", "ray", "mlflow", "optuna"):
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit(folder: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder or Path(__file__).parent,
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


SCHEMES = {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks"}


def check_scheme(tracking_uri: str) -> None:
    scheme = urlparse(tracking_uri).scheme
    if scheme not in SCHEMES:
        raise TrackingError(f"tracking URI {tracking_uri}: unknown scheme {scheme!r}; use "
                            f"sqlite:///PATH/mlflow.db or http://HOST:PORT of an mlflow server")


def connect(tracking_uri: str) -> MlflowClient:
    """A client for `tracking_uri`, checked to answer (quickly: one try, 10 s) before anything is
    trained."""
    check_scheme(tracking_uri)
    saved = {k: os.environ.get(k) for k in QUICK_CHECK}
    os.environ.update(QUICK_CHECK)
    try:
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"MLflow at {tracking_uri} cannot be used ({type(exc).__name__}); "
                            f"start the server or pass another --tracking-uri") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return client


def artifact_location(tracking_uri: str) -> str | None:
    """Beside a sqlite database, artifacts go to its folder (not to ./mlruns of whatever folder
    the sweep started in); servers and other stores keep their own default."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def run_name(cfg: TrainConfig) -> str:
    return f"{cfg.architecture.name}-s{cfg.seed}"


def flat_params(cfg: TrainConfig) -> dict[str, str]:
    data = cfg.model_dump(mode="json", exclude={"log_json", "checkpoint_dir", "resume"})
    arch = data.pop("architecture")
    arch["depth"] = cfg.architecture.total_depth
    arch["blocks"] = list(cfg.architecture.stage_blocks)
    arch["block"] = cfg.architecture.block_type
    arch["shortcut"] = cfg.architecture.shortcut_type
    flat = {f"arch.{k}": v for k, v in arch.items()}
    flat.update(data)
    return {k: str(v) for k, v in flat.items()}


class StudyRun:
    """The parent run of a study."""

    def __init__(self, client: MlflowClient, study: StudyConfig):
        self.client, self.study = client, study
        experiment = client.get_experiment_by_name(study.experiment_name)
        if experiment is None:
            self.experiment_id = client.create_experiment(
                study.experiment_name, artifact_location=artifact_location(study.tracking_uri()))
        else:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            self.experiment_id = experiment.experiment_id
        self.run_id: str | None = None

    def open(self, run_id: str | None, results_dir: Path, study_text: str) -> str:
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=self.study.name, tags={
            "study": self.study.name, "results_dir": str(results_dir),
            "git_commit": git_commit(), **package_versions()})
        self.run_id = run.info.run_id
        self.client.log_text(self.run_id, study_text, "study.yaml")
        self.client.log_dict(self.run_id, self.study.model_dump(mode="json"), "resolved_study.json")
        return self.run_id

    def close(self, status: str) -> None:
        """End the parent; children still RUNNING (an interrupted sweep) end as KILLED."""
        if self.run_id is None:
            return
        for run in self.client.search_runs(
                [self.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.run_id}' "
                                      f"and attributes.status = 'RUNNING'"):
            self.client.set_terminated(run.info.run_id, "KILLED")
        self.client.set_terminated(self.run_id, status)


class TrialTracker(Callback):
    """A Tune callback that mirrors every trial into a child run of the study's parent run."""

    def __init__(self, tracking_uri: str, study: StudyConfig, experiment_id: str,
                 parent_run_id: str, layout: str):
        self.args = (tracking_uri, study, experiment_id, parent_run_id, layout)
        self.client, self.study, self.layout = MlflowClient(tracking_uri), study, layout
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.runs: dict[str, str] = {}       # trial_id -> run_id
        self.logged: dict[str, int] = {}     # run_id -> last epoch logged
        self.commit = git_commit()
        for run in self.client.search_runs([experiment_id],
                                           f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"):
            trial_id = run.data.tags.get("trial_id")
            if trial_id:
                self.runs[trial_id] = run.info.run_id
                history = self.client.get_metric_history(run.info.run_id, "test_error")
                self.logged[run.info.run_id] = max((m.step for m in history), default=0)

    def __reduce__(self):
        # Tune pickles its callbacks with the experiment; a restored tracker re-reads its state
        # (which trials have runs, which epochs are logged) from MLflow.
        return TrialTracker, self.args

    def trial_config(self, trial) -> TrainConfig:
        return self.study.trial_config({k: trial.config[k] for k in self.study.searched()})

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.runs:  # resumed: continue the same child run
            self.client.update_run(self.runs[trial.trial_id], status="RUNNING")
            return
        cfg = self.trial_config(trial)
        summary = summarize(cfg.architecture)
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: run_name(cfg),
                "trial_id": trial.trial_id, "study": self.study.name, "seed": str(cfg.seed),
                "params": str(summary["params"]), "flops": str(summary["flops"]),
                "architecture": cfg.architecture.name, "parallel_layout": self.layout,
                "git_commit": self.commit, **package_versions()}
        run = self.client.create_run(self.experiment_id, run_name=run_name(cfg), tags=tags)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in flat_params(cfg).items()]
        params += [Param("params", str(summary["params"])), Param("flops", str(summary["flops"]))]
        self.client.log_batch(run_id, params=params)
        self.runs[trial.trial_id], self.logged[run_id] = run_id, 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None or result.get("pruned"):
            return
        epoch = int(result.get("epoch", 0))
        if epoch <= self.logged.get(run_id, 0):
            return  # already logged before a restart
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, epoch) for k in EPOCH_METRICS
                   if k in result and math.isfinite(float(result[k]))]
        self.client.log_batch(run_id, metrics=metrics)
        self.logged[run_id] = epoch

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        last = trial.last_result or {}
        if last.get("pruned"):
            self.client.set_tag(run_id, "pruned_reason", last.get("pruned_reason", ""))
            self.client.set_terminated(run_id, "KILLED")
            return
        final = {"final_test_error": last.get("test_error"),
                 "best_test_error": last.get("best_test_error"),
                 "final_train_loss": last.get("train_loss"),
                 "time_total_s": last.get("time_total_s")}
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0)
                                               for k, v in final.items() if v is not None])
        stopped_early = last.get("epoch", 0) < last.get("epochs_total", 0)
        if stopped_early:
            self.client.set_tag(run_id, "stopped_early", f"scheduler stopped it after epoch "
                                                         f"{last.get('epoch')}")
        elif self.study.mlflow.log_checkpoint and last.get("checkpoint_path"):
            self.client.log_artifacts(run_id, last["checkpoint_path"], "checkpoint")
        self.client.set_terminated(run_id, "KILLED" if stopped_early else "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, "failure", failure_reason(trial))
        self.client.set_terminated(run_id, "FAILED")



def failure_reason(trial) -> str:
    path = getattr(trial, "error_file", None)
    text = Path(path).read_text() if path and Path(path).is_file() else ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "trial failed"
