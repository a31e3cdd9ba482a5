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
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
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


# One quick try per request: the reachability check fails fast, and while a server is down the
# outbox holds updates back instead of blocking Tune's loop in MLflow's long retries.
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


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
    try:
        with quick_http():
            client = MlflowClient(tracking_uri)
            client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"MLflow at {tracking_uri} cannot be used ({type(exc).__name__}); "
                            f"start the server or pass another --tracking-uri") from None
    return client


@contextmanager
def quick_http():
    saved = {k: os.environ.get(k) for k in QUICK_HTTP}
    os.environ.update({k: v for k, v in QUICK_HTTP.items() if saved[k] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def retryable(exc: Exception) -> bool:
    """Unreachable, timed out or a server error: an outage, worth another try. A 4xx answer, or
    any other exception (a bug in the update), is not: retrying would hold back every later
    update."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, (requests.exceptions.RequestException, ConnectionError,
                            TimeoutError))


def all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str = "",
             order_by: list[str] | None = None) -> list:
    """Every matching run: search_runs answers in pages of at most 1,000."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


class Outbox:
    """The sweep's MLflow updates, delivered in order; held back while MLflow cannot be reached.

    Training never waits on MLflow: a failed update stays queued with everything after it and is
    retried with the next update (at most every `retry_s`), and at the end of the sweep
    (`drain`). One outbox per tracking URI in the sweep's driver process, shared by the parent
    run and the trial tracker (which Tune re-creates on restore), so their order is kept."""

    retry_s = 20.0

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.pending: deque[tuple[str, Callable[[], object]]] = deque()
        self.next_try = 0.0
        self.down_since: float | None = None

    def put(self, what: str, update: Callable[[], object]) -> None:
        self.pending.append((what, update))
        self.flush()

    def flush(self) -> bool:
        """Deliver what is queued (unless a recent try failed); True when nothing is left."""
        if time.time() < self.next_try:
            return False
        while self.pending:
            what, update = self.pending[0]
            try:
                with quick_http():
                    update()
            except Exception as exc:
                if not retryable(exc):  # reported at once; the updates after it go on
                    print(f"warning: MLflow update {what} failed ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                          f"skipped", file=sys.stderr)
                    self.pending.popleft()
                    continue
                if self.down_since is None:
                    self.down_since = time.time()
                    print(f"warning: MLflow at {self.tracking_uri} unreachable "
                          f"({type(exc).__name__}); training goes on, updates are held and "
                          f"delivered when it answers", file=sys.stderr)
                self.next_try = time.time() + self.retry_s
                return False
            self.pending.popleft()
        if self.down_since is not None:
            print(f"MLflow at {self.tracking_uri} answers again after "
                  f"{time.time() - self.down_since:.0f} s; held updates delivered", file=sys.stderr)
            self.down_since = None
        return True

    def drain(self, wait_s: float) -> list[str]:
        """Keep trying for up to `wait_s` seconds; return what could not be delivered."""
        deadline = time.time() + wait_s
        while True:
            self.next_try = 0.0
            if self.flush() or time.time() >= deadline:
                return [what for what, _ in self.pending]
            time.sleep(min(self.retry_s, deadline - time.time()))


OUTBOXES: dict[str, Outbox] = {}


def outbox(tracking_uri: str) -> Outbox:
    return OUTBOXES.setdefault(tracking_uri, Outbox(tracking_uri))


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///"))


def artifact_location(tracking_uri: str) -> str | None:
    """Beside a sqlite database, artifacts go to its folder (not to ./mlruns of whatever folder
    the sweep started in); servers and other stores keep their own default."""
    database = sqlite_path(tracking_uri)
    return None if database is None else (database.parent / "mlartifacts").as_uri()


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
        self.results_dir: Path | None = None

    def open(self, run_id: str | None, results_dir: Path, study_text: str) -> str:
        self.results_dir = results_dir
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
        if self.run_id is None:
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
        if lost:
            path = self.results_dir / "mlflow_undelivered.txt"
            path.write_text("".join(f"{what}\n" for what in lost))
            print(f"warning: MLflow at {uri} did not answer; {len(lost)} updates were not "
                  f"delivered (listed in {path}); every trial's results are in "
                  f"{self.results_dir}", file=sys.stderr)


class TrialTracker(Callback):
    """A Tune callback that mirrors every trial into a child run of the study's parent run.
    Updates go through the outbox, so an MLflow outage never stops the sweep."""

    def __init__(self, tracking_uri: str, study: StudyConfig, experiment_id: str,
                 parent_run_id: str, layout: str):
        self.args = (tracking_uri, study, experiment_id, parent_run_id, layout)
        self.client, self.study, self.layout = MlflowClient(tracking_uri), study, layout
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.outbox = outbox(tracking_uri)
        self.runs: dict[str, str] = {}       # trial_id -> run_id, once created
        self.logged: dict[str, int] = {}     # trial_id -> last epoch logged (or queued)
        self.ended: set[str] = set()         # trials whose run has its final state
        self.restored = False                # the restored study's trials compared with runs
        self.commit = git_commit()
        for run in all_runs(self.client, [experiment_id],
                            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"):
            trial_id = run.data.tags.get("trial_id")
            if trial_id:
                self.runs[trial_id] = run.info.run_id
                history = self.client.get_metric_history(run.info.run_id, "test_error")
                self.logged[trial_id] = max((m.step for m in history), default=0)
                if run.info.status == "FINISHED" or {"stopped_early",
                                                     "failure"} & set(run.data.tags):
                    self.ended.add(trial_id)

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
        for trial_id in [t for t in self.logged if t not in known]:
            print(f"warning: trial {trial_id} started after the study was last saved; it runs "
                  f"again as a new trial and its MLflow run is deleted", file=sys.stderr)
            self.put(trial_id, "forgotten", lambda run_id: self.client.set_tag(
                run_id, "forgotten", "started after the study was last saved; trained again "
                                     "as a new trial of the restored study"))
            self.put(trial_id, "end", lambda run_id: self.client.set_terminated(run_id, "KILLED"))
            self.put(trial_id, "deletion", lambda run_id: self.client.delete_run(run_id))
            del self.logged[trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id = trial.trial_id
        if trial_id in self.ended:
            # Ended before the driver was killed, but after Tune last saved its state: Tune runs
            # it again, and it ends at once from its final checkpoint. Its run stays as it was.
            return
        if trial_id in self.logged:  # resumed: continue the same child run
            self.put(trial_id, "restart",
                     lambda run_id: self.client.update_run(run_id, status="RUNNING"))
            return
        cfg = self.trial_config(trial)
        summary = summarize(cfg.architecture)
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: run_name(cfg),
                "trial_id": trial_id, "study": self.study.name, "seed": str(cfg.seed),
                "params": str(summary["params"]), "flops": str(summary["flops"]),
                "architecture": cfg.architecture.name, "parallel_layout": self.layout,
                "git_commit": self.commit, **package_versions()}
        params = [Param(k, v) for k, v in flat_params(cfg).items()]
        params += [Param("params", str(summary["params"])), Param("flops", str(summary["flops"]))]

        def create():
            self.runs[trial_id] = self.client.create_run(
                self.experiment_id, run_name=run_name(cfg), tags=tags).info.run_id
        self.logged[trial_id] = 0
        self.outbox.put(f"trial {trial_id} start", create)
        self.put(trial_id, "params", lambda run_id: self.client.log_batch(run_id, params=params))

    def tracked(self, trial_id: str) -> bool:
        """The trial has a run (created or queued) that has not reached its final state."""
        return trial_id in self.logged and trial_id not in self.ended

    def put(self, trial_id: str, what: str, update: Callable[[str], object]) -> None:
        """Queue one idempotent update of a trial's run (its id is known once it is created)."""
        self.outbox.put(f"trial {trial_id} {what}", lambda: update(self.runs[trial_id]))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        trial_id = trial.trial_id
        if not self.tracked(trial_id) or result.get("diverged"):
            return
        epoch = int(result.get("epoch", 0))
        if epoch <= self.logged[trial_id]:
            return  # already logged before a restart
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, epoch) for k in EPOCH_METRICS
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
        if last.get("diverged"):
            self.fail(trial_id, last["diverged"])
            return
        final = {"final_test_error": last.get("test_error"),
                 "best_test_error": last.get("best_test_error"),
                 "final_train_loss": last.get("train_loss"),
                 "time_total_s": last.get("time_total_s")}
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in final.items() if v is not None]
        self.put(trial_id, "final metrics", lambda run_id: client.log_batch(run_id,
                                                                            metrics=metrics))
        stopped_early = last.get("epoch", 0) < last.get("epochs_total", 0)
        checkpoint = last.get("checkpoint_path")
        if stopped_early:
            note = f"scheduler stopped it after epoch {last.get('epoch')}"
            self.put(trial_id, "stop", lambda run_id: client.set_tag(run_id, "stopped_early",
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

    def fail(self, trial_id: str, reason: str) -> None:
        self.put(trial_id, "failure", lambda run_id: self.client.set_tag(run_id, "failure",
                                                                         reason))
        self.put(trial_id, "end", lambda run_id: self.client.set_terminated(run_id, "FAILED"))


def failure_reason(trial) -> str:
    path = getattr(trial, "error_file", None)
    text = Path(path).read_text() if path and Path(path).is_file() else ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "trial failed"
