"""MLflow tracking for sweeps: one parent run per study, one nested child run per trial.

Everything is written from the sweep's driver process through `MlflowClient` with explicit run
ids (workers never talk to MLflow), so a resumed sweep reopens the same parent and the same
children: the parent's id is kept in the study's results folder, children are found by their
`trial_id` tag, and epochs already logged are not logged twice. `finished_trials` reads a study
back for the report. (Over 300 lines: the writer and the reader of one run layout, kept together
so that tags and parameter names change in one place.)
"""
from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pandas as pd
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from models.complexity import summarize
from orchestrator.study.mlflow_names import Tag
from orchestrator.analysis.n0 import check_runs
from orchestrator.errors import ReportError, StorageError, TrackingError, short
from orchestrator.results import DIVERGED, EPOCH_METRICS, STOPPED, SYSTEM_PREFIX, outcome
from orchestrator.run.config import TrainConfig
from orchestrator.study.config import StudyConfig
from orchestrator.storage import shown, writing
from orchestrator.study.mlflow_client import (all_runs, artifact_location, connect, outbox,
                                              sqlite_path)

log = logging.getLogger(__name__)
# The experiment's kind: model training, not GenAI (MLflow 3's UI may use it to choose the view;
# 3.17's opens the view its sidebar switch selects, tests/test_mlflow_ui.py).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


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


def check_parent(study: StudyConfig, state: dict, results: str) -> tuple[MlflowClient, Run]:
    """Before Ray starts, for a results folder that holds a study: (client, parent run), the
    parent run found where it was made. A moved database is not created again empty, and a
    deleted parent run is not silently replaced."""
    uri, run_id = study.tracking_uri(), state["parent_run_id"]
    made_with = state.get("tracking_uri")
    hint = (f"pass --tracking-uri {short(made_with)} (where the study began)"
            if made_with and made_with != uri else "pass the tracking URI that holds it")
    database = sqlite_path(uri)
    if database is not None and not database.exists():
        raise TrackingError(f"no MLflow database at {short(database)}, but {shown(results)} "
                            f"holds a study begun there (parent run {run_id}); {hint}, or use "
                            f"another --storage-path")
    client = connect(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        state_ = "deleted in" if run is not None else "not in"
        fix = (f"restore it (mlflow runs restore --run-id {run_id})" if run is not None
               else hint)
        raise TrackingError(f"the study's parent run {run_id} is {state_} MLflow at "
                            f"{short(uri)}; {fix}, or use another --storage-path")
    return client, run


class StudyRun:
    """The parent run of a study."""

    def __init__(self, client: MlflowClient, study: StudyConfig):
        self.client, self.study = client, study
        experiment = client.get_experiment_by_name(study.experiment_name)
        if experiment is None:
            self.experiment_id = client.create_experiment(
                study.experiment_name, artifact_location=artifact_location(study.tracking_uri()),
                tags=dict([EXPERIMENT_KIND]))
        else:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            self.experiment_id = experiment.experiment_id
            if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        self.run_id: str | None = None
        self.results_dir: Path | None = None

    def open(self, run_id: str | None, results_dir: Path, study_text: str) -> str:
        self.results_dir = results_dir
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=self.study.name, tags={
            Tag.STUDY: self.study.name, Tag.RESULTS_DIR: shown(self.study.results_place()),
            Tag.GIT_COMMIT: git_commit(), **package_versions()})
        self.run_id = run.info.run_id
        self.client.log_text(self.run_id, study_text, "study.yaml")
        resolved = {**self.study.model_dump(mode="json"),  # no storage credentials
                    "storage_path": shown(self.study.storage_path)}
        self.client.log_dict(self.run_id, resolved, "resolved_study.json")
        # The space the searcher chooses from, and what the budget left out (never sampled).
        space = "architecture,params,budget\n" + "".join(
            f"{c.name},{c.params},{c.excluded or 'in budget'}\n"
            for c in self.study.feasible() + self.study.excluded())
        self.client.log_text(self.run_id, space, "architectures.csv")
        self.client.log_param(self.run_id, "architectures_in_budget", len(self.study.feasible()))
        return self.run_id

    def close(self, status: str, wait_s: float) -> None:
        """End the parent; children still RUNNING (an interrupted sweep) end as KILLED. Updates
        held back by an outage are delivered, waiting up to `wait_s`; what MLflow still did not
        get is listed in the study's results folder."""
        if self.run_id is None or self.results_dir is None:  # never opened: both are set by open
            return
        client, experiment_id, run_id = self.client, self.experiment_id, self.run_id

        def end():
            for run in all_runs(client, [experiment_id],
                                f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}' "
                                f"and attributes.status = 'RUNNING'"):
                client.set_terminated(run.info.run_id, "KILLED")
            client.set_terminated(run_id, status)
        uri = self.study.tracking_uri()
        outbox(uri).put(f"end of parent run ({status})", end)
        lost = outbox(uri).drain(wait_s)
        path = self.results_dir / "mlflow_undelivered.txt"
        if not lost:  # a list left by an earlier sweep: delivered now
            path.unlink(missing_ok=True)
        else:
            try:
                with writing(path, "storage_path"):
                    path.write_text("".join(f"{what}\n" for what in lost))
            except StorageError:  # a full disk: the list goes to the log, then the error
                log.warning(f"MLflow at {short(uri)} did not answer; {len(lost)} updates were not "
                            f"delivered: {short('; '.join(lost), 500)}")
                raise
            log.warning(f"MLflow at {short(uri)} did not answer; {len(lost)} updates were not "
                        f"delivered (listed in {path}); every trial's results are in "
                        f"{self.results_dir}")


class TrialTracker(Callback):
    """A Tune callback that mirrors every trial into a child run of the study's parent run.
    Updates go through the outbox, so an MLflow outage never stops the sweep."""

    def __init__(self, tracking_uri: str, study: StudyConfig, experiment_id: str,
                 parent_run_id: str, layout: str, kept: frozenset[str] = frozenset()):
        self.args = (tracking_uri, study, experiment_id, parent_run_id, layout, kept)
        self.kept = kept  # trials of the study's earlier parts (an extension): not this Tune's
        self.client, self.study, self.layout = MlflowClient(tracking_uri), study, layout
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.outbox = outbox(tracking_uri)
        self.runs: dict[str, str] = {}       # trial_id -> run_id, once created
        self.logged: dict[str, int] = {}     # trial_id -> last epoch logged (or queued)
        self.ended: set[str] = set()         # trials whose run has its final state
        self.started: set[str] = set()       # trials Tune started in this sweep
        self.failed: set[str] = set()        # trials whose run ended FAILED (Tune retries them)
        self.restored = False                # the restored study's trials compared with runs
        self.names: set[str] = set()         # run names given in this study
        self.commit = git_commit()
        for run in all_runs(self.client, [experiment_id],
                            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"):
            trial_id = run.data.tags.get(Tag.TRIAL_ID)
            self.names.add(run.info.run_name)
            if trial_id:
                self.runs[trial_id] = run.info.run_id
                history = self.client.get_metric_history(run.info.run_id, "test_error")
                self.logged[trial_id] = max((m.step for m in history), default=0)
                if run.info.status == "FINISHED" or {Tag.STOPPED_EARLY,
                                                     Tag.FAILURE} & set(run.data.tags):
                    self.ended.add(trial_id)
                if run.info.status == "FAILED":
                    self.failed.add(trial_id)

    def __reduce__(self):
        # Tune pickles its callbacks with the experiment; a restored tracker re-reads its state
        # (which trials have runs, which epochs are logged) from MLflow.
        return TrialTracker, self.args

    def trial_config(self, trial) -> TrainConfig:
        return self.study.trial_config(trial.config)

    def on_step_begin(self, iteration, trials, **info):
        if self.restored:
            return
        self.restored = True
        # A trial started after Tune last saved the study (it saves every 10 s or more) and
        # before the driver was killed is unknown to the restored study, which samples and
        # trains it again as a new trial: its run is ended and deleted (`mlflow runs restore`
        # brings it back), so that each trial of the study has one run.
        known = {trial.trial_id for trial in trials}
        for trial_id in [t for t in self.logged if t not in known | self.kept]:
            log.warning(f"trial {trial_id} started after the study was last saved; it runs "
                        f"again as a new trial and its MLflow run is deleted")
            self.put(trial_id, "forgotten", lambda run_id: self.client.set_tag(
                run_id, Tag.FORGOTTEN, "started after the study was last saved; trained again "
                                     "as a new trial of the restored study"))
            self.put(trial_id, "end", lambda run_id: self.client.set_terminated(run_id, "KILLED"))
            self.put(trial_id, "deletion", lambda run_id: self.client.delete_run(run_id))
            del self.logged[trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id = trial.trial_id
        self.started.add(trial_id)
        if trial_id in self.failed:  # a failed trial trained again: its run goes on
            self.failed.discard(trial_id)
            self.ended.discard(trial_id)
            self.put(trial_id, "retry", self.reopen)
            return
        if trial_id in self.ended:
            # Ended before the driver was killed, but after Tune last saved its state: Tune runs
            # it again, and it ends at once from its final checkpoint. Its run stays as it was.
            return
        if trial_id in self.logged:  # resumed: continue the same child run
            self.put(trial_id, "restart",
                     lambda run_id: self.client.update_run(run_id, status="RUNNING"))
            return
        cfg = self.trial_config(trial)
        name = self.study.trial_name(trial.config)
        if name in self.names:  # rounding made two searched values look alike
            name = f"{name}-{trial_id}"
        self.names.add(name)
        summary = summarize(cfg.architecture)
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: name,
                Tag.TRIAL_ID: trial_id, Tag.STUDY: self.study.name, Tag.SEED: str(cfg.seed),
                "params": str(summary["params"]), "flops": str(summary["flops"]),
                Tag.ARCHITECTURE: cfg.architecture.name, Tag.LAYOUT: self.layout,
                Tag.GIT_COMMIT: self.commit, **package_versions(),
                # a short complete schedule (the n0 searcher's low fidelity) or 1.0
                Tag.FIDELITY: str(trial.config.get("fidelity", 1.0))}
        params = [Param(k, v) for k, v in flat_params(cfg).items()]
        params += [Param("params", str(summary["params"])), Param("flops", str(summary["flops"]))]

        def create():
            self.runs[trial_id] = self.client.create_run(
                self.experiment_id, run_name=name, tags=tags).info.run_id
        self.logged[trial_id] = 0
        self.outbox.put(f"trial {trial_id} start", create)
        self.put(trial_id, "params", lambda run_id: self.client.log_batch(run_id, params=params))

    def reopen(self, run_id: str) -> None:
        if Tag.FAILURE in self.client.get_run(run_id).data.tags:  # idempotent: retried
            self.client.delete_tag(run_id, Tag.FAILURE)
        self.client.update_run(run_id, status="RUNNING")

    def tracked(self, trial_id: str) -> bool:
        """The trial has a run (created or queued) that has not reached its final state."""
        return trial_id in self.logged and trial_id not in self.ended

    def put(self, trial_id: str, what: str, update: Callable[[str], object]) -> None:
        """Queue one idempotent update of a trial's run (its id is known once it is created)."""
        self.outbox.put(f"trial {trial_id} {what}", lambda: update(self.runs[trial_id]))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        trial_id = trial.trial_id
        if not self.tracked(trial_id) or result.get(DIVERGED):
            return
        epoch = int(result.get("epoch", 0))
        if epoch <= self.logged[trial_id]:
            return  # already logged before a restart
        now = int(time.time() * 1000)
        keys = [*EPOCH_METRICS, *(k for k in result if k.startswith(SYSTEM_PREFIX))]
        metrics = [Metric(k, float(result[k]), now, epoch) for k in keys
                   if k in result and math.isfinite(float(result[k]))]
        self.logged[trial_id] = epoch
        self.put(trial_id, f"epoch {epoch}",
                 lambda run_id: self.client.log_batch(run_id, metrics=metrics))

    def on_trial_complete(self, iteration, trials, trial, **info):
        trial_id = trial.trial_id
        if not self.tracked(trial_id):
            return
        self.ended.add(trial_id)
        last = trial.last_result or {}
        client = self.client
        if last.get(DIVERGED):
            self.fail(trial_id, last[DIVERGED])
            return
        final = {"final_test_error": last.get("test_error"),
                 "final_test_error_top5": last.get("test_error_top5"),
                 "best_test_error": last.get("best_test_error"),
                 "final_train_loss": last.get("train_loss"),
                 "time_total_s": last.get("time_total_s")}
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in final.items() if v is not None]
        self.put(trial_id, "final metrics", lambda run_id: client.log_batch(run_id,
                                                                            metrics=metrics))
        stopped_early = outcome(last) == STOPPED
        checkpoint = last.get(CHECKPOINT_PATH_KEY)
        if stopped_early:
            note = f"scheduler stopped it after epoch {last.get('epoch')}"
            self.put(trial_id, "stop", lambda run_id: client.set_tag(run_id, Tag.STOPPED_EARLY,
                                                                     note))
        elif self.study.mlflow.log_checkpoint and checkpoint:
            self.put(trial_id, "checkpoint",
                     lambda run_id: client.log_artifacts(run_id, checkpoint, "checkpoint"))
        status = "KILLED" if stopped_early else "FINISHED"
        self.put(trial_id, "end", lambda run_id: client.set_terminated(run_id, status))

    def on_trial_error(self, iteration, trials, trial, **info):
        trial_id = trial.trial_id
        if not self.tracked(trial_id):
            return
        self.ended.add(trial_id)
        self.fail(trial_id, failure_reason(trial))

    def on_experiment_end(self, trials, **info):
        # A trial that ended in an earlier sweep whose MLflow updates outlasted its outage
        # (listed in mlflow_undelivered.txt): Tune does not run it again, so its run is brought
        # up to date here from the results Tune stored for it.
        # Not one started in this sweep: Ctrl-C or SIGTERM ends those as TERMINATED too, and
        # they go on when the study is run again. (One that never reported is left as it is.)
        for trial in trials:
            if trial.status == "TERMINATED" and (trial.last_result or {}).get("epoch") and \
                    trial.trial_id not in self.ended | self.kept | self.started:
                log.warning(f"trial {trial.trial_id} ended while MLflow did not answer; its run "
                            f"is brought up to date from {shown(trial.path)}")
                if trial.trial_id not in self.logged:
                    self.on_trial_start(0, trials, trial)
                for result in stored_results(trial):
                    self.on_trial_result(0, trials, trial, result)
                self.on_trial_complete(0, trials, trial)

    def fail(self, trial_id: str, reason: str) -> None:
        self.put(trial_id, "failure", lambda run_id: self.client.set_tag(run_id, Tag.FAILURE,
                                                                         reason))
        self.put(trial_id, "end", lambda run_id: self.client.set_terminated(run_id, "FAILED"))


def stored_results(trial) -> list[dict]:
    """The results a trial reported, one per epoch, as Tune stored them (its result.json)."""

    path = f"{trial.path}/result.json"
    try:
        with trial.storage.storage_filesystem.open_input_stream(path) as f:
            lines = f.read().decode().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        log.warning(f"the results of trial {trial.trial_id} cannot be read ({short(exc)}); its "
                    f"MLflow run lacks the epochs they hold")
        return []
    return [json.loads(line) for line in lines if line.strip()]


def failure_reason(trial) -> str:
    path = getattr(trial, "error_file", None)
    text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "trial failed"


def finished_trials(tracking_uri: str, experiment: str, parent_id: str | None = None):
    """(runs table, per-epoch test error histories, parent run id) of a study's finished trials
    (the latest study of the experiment unless `parent_id`), for the report."""

    database = sqlite_path(tracking_uri)
    if database is not None and not database.exists():
        raise ReportError(f"no MLflow database at {database}; run the study there first or "
                          f"pass its --tracking-uri")
    client = connect(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no MLflow experiment {short(repr(experiment), 60)} at "
                          f"{short(tracking_uri)}; check --experiment and --tracking-uri")
    found = all_runs(client, [exp.experiment_id], order_by=["attributes.start_time DESC"])
    # A study's parent run: top-level and tagged with its study (not any other top-level run).
    parents = [r for r in found
               if MLFLOW_PARENT_RUN_ID not in r.data.tags and Tag.STUDY in r.data.tags]
    if parent_id is None:
        if not parents:
            raise ReportError(f"experiment {short(repr(experiment), 60)} has no study run")
        parent_id = parents[0].info.run_id
    rows, points = [], []
    for run in found:
        tags = run.data.tags
        if (tags.get(MLFLOW_PARENT_RUN_ID) != parent_id
                or "final_test_error" not in run.data.metrics):
            continue  # other sweeps, pruned, failed or unfinished trials
        if Tag.STOPPED_EARLY in tags:
            continue  # a trial stopped by ASHA is not a finished training
        if fidelity(run) != 1.0:
            continue  # a short schedule placed the n0 searcher's bracket; n0 is full schedules
        rows.append({"run_id": run.info.run_id, **{column: read_back(run, column)
                                                   for column in RUN_COLUMNS},
                     "name": tags.get(Tag.ARCHITECTURE, "")})
        points += [{"run_id": run.info.run_id, "step": m.step, "test_error": percent(m.value)}
                   for m in client.get_metric_history(run.info.run_id, "test_error")]
    if not rows:
        raise ReportError(f"no finished trials under study run {parent_id}")
    runs = checked(pd.DataFrame(rows), RUN_COLUMNS)
    history = checked(pd.DataFrame(points, columns=["run_id", "step", "test_error"]),
                      {"test_error": ("metric", "test_error")})
    curves = {run_id: list(zip(own.step, own.test_error))
              for run_id, own in history.sort_values("step").groupby("run_id")}
    histories = {}
    for row in runs.to_dict("records"):
        run_id = row.pop("run_id")
        histories[run_id] = (row, curves.get(run_id, []))
    return runs.drop(columns="run_id"), histories, parent_id


# Where each column of the report's runs table comes from in a trial's MLflow run (errors are
# logged as fractions, the table holds percent).
RUN_COLUMNS = {"depth": ("param", "arch.depth"), "k": ("param", "arch.k"),
               "width": ("param", "arch.width"), "params": ("param", "params"),
               "seed": ("param", "seed"), "flops": ("param", "flops"),
               "test_error": ("metric", "final_test_error"),
               "test_error_top5": ("metric", "final_test_error_top5")}


def percent(value: float) -> object:
    """A fraction logged to MLflow in percent; NaN stays as text, to be refused as such."""
    return "nan" if math.isnan(value) else 100 * value


def read_back(run, column: str) -> object:
    """A trial's value for a column of the runs table as MLflow holds it (None when absent);
    checked with the CSV's cells (`analysis.n0.check_runs`)."""
    kind, key = RUN_COLUMNS[column]
    if kind == "param":
        return run.data.params.get(key)
    value = run.data.metrics.get(key)
    return None if value is None else percent(value)


def checked(table, columns: dict):
    """A table read back from MLflow, every value in its range, or one line naming the run and
    its parameter or metric."""
    def where(i, column):
        kind, key = columns[column]
        return f"MLflow run {table.run_id[i]}: {kind} {key}" + (
            " (in percent)" if kind == "metric" else "")
    fix = "delete that run (mlflow runs delete --run-id ...) to leave it out of the report"
    return check_runs(table, where, f"a trained trial has it as a number; {fix}", fix,
                      empty="is missing")


def fidelity(run) -> float:
    """The share of the full schedule a trial trained (tag `fidelity`, 1.0 when absent)."""
    text = run.data.tags.get(Tag.FIDELITY, "1.0")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise ReportError(f"MLflow run {run.info.run_id}: tag fidelity holds "
                          f"{short(repr(text), 60)}, not a share of the schedule above 0 and at "
                          f"most 1; fix the tag, or delete that run (mlflow runs delete "
                          f"--run-id ...) to leave it out of the report")
    return value
