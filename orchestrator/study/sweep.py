"""A study as Ray Tune trials of Ray Train runs, tracked in MLflow.

Study file -> StudyConfig -> Tuner(searcher, trial scheduler) -> trial driver -> TorchTrainer ->
workers (`orchestrator.cluster.worker`) -> ray.train.report -> Tune -> MLflow (`tracking`).
Running the same command again after Ctrl-C (or with --resume) continues the study with
`Tuner.restore`: finished trials are kept, unfinished ones resume from their last checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import Busy, ConfigError, StorageError, short
from orchestrator.results import trained
from orchestrator.run.data import DATASETS, load_dataset
from orchestrator.study.config import StudyConfig
from orchestrator.storage import (check_regular, check_writable, is_remote, join, read_text,
                                  resolve, shown, upload, write_text)
from orchestrator.study.trials import planned_trials

STATE_FILE = "multires_study.json"
LOCK_FILE = ".multires.lock"
log = logging.getLogger(__name__)


def start_ray(study: StudyConfig, study_file: str | None) -> tuple[StudyConfig, int]:
    """Connect to RAY_ADDRESS or start a local Ray; the study with its resources fitted to the
    cluster, and how many trials run at once."""
    from orchestrator.cluster.driver import init_ray
    from orchestrator.study.fit import Cluster, check_fit

    init_ray()
    return check_fit(study, Cluster.of_ray(), study_file)


def resolve_paths(study: StudyConfig) -> StudyConfig:
    """Make every path absolute (trials run in other folders, or on other machines) and fetch
    the dataset once, before any trial starts."""
    train = study.train
    if DATASETS[train.dataset].needs_files:
        data_dir = str(resolve(train.data_dir or "data", "--data-dir"))
        # Downloads when absent and online; checks the files, the sizes and the classes.
        images = len(load_dataset(train.dataset, data_dir, train.train_size, train.test_size,
                                  train.seed)[0])
        batch = max(study.trial_config(sampled).batch_size for sampled in _batch_choices(study))
        if images < batch:  # as orchestrator.train says, before any trial starts
            raise ConfigError(f"train_size {images} is smaller than one batch ({batch}); raise "
                              f"train_size or lower batch_size")
        train = train.model_copy(update={"data_dir": data_dir})
    mlflow = study.mlflow.model_copy(update={"tracking_uri": study.tracking_uri()})
    return study.model_copy(update={"train": train, "mlflow": mlflow,
                                    "storage_path": study.storage()})


def _batch_choices(study: StudyConfig) -> list[dict]:
    """A sampled trial at each end of the study's batch sizes (one when it is fixed)."""
    dist = study.searched().get("batch_size")
    values = getattr(dist, "choices", None) or [getattr(dist, "low", None),
                                                getattr(dist, "high", None)]
    return [{"batch_size": v} for v in values if v is not None] or [{}]


def config_hash(study: StudyConfig) -> str:
    return hashlib.sha256(json.dumps(study.model_dump(mode="json"), sort_keys=True).encode()
                          ).hexdigest()[:16]


class StudyState(BaseModel):
    """What a results folder's multires_study.json holds (read back: checked, never trusted)."""
    model_config = ConfigDict(extra="ignore", strict=True)
    # MLflow's run ids are hex; the id goes into search filters, so no quote gets in.
    parent_run_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    config_hash: str = Field(pattern=r"^[0-9a-f]{16}$")
    tracking_uri: str = Field(max_length=4096)
    experiment: str = Field(max_length=4096)


def read_state(results: str) -> dict | None:
    """The study's own state in its results folder (local or a storage URI), None if absent."""
    place = join(results, STATE_FILE)
    fix = f"remove {shown(results)} to start the study again"
    try:
        text = read_text(place, fix=fix)
        return None if text is None else StudyState.model_validate_json(text).model_dump()
    except (ValueError, ValidationError):  # not UTF-8, not JSON, not the fields
        raise ConfigError(f"{shown(place)} is not a study's state (truncated or edited); "
                          f"{fix}") from None


def local_folder(study: StudyConfig) -> Path:
    """Where this machine keeps the study's own files (Ray's log, the report, the lock): its
    results folder, or for remote storage a folder in the temporary directory."""
    results = study.results_place()
    return Path(tempfile.gettempdir(), "multires", study.name) if is_remote(results) else \
        Path(results)


@contextlib.contextmanager
def study_lock(folder: Path, study: StudyConfig):
    """One sweep of a study at a time on a results folder: a second one is refused, not mixed
    in. (With remote storage the lock is this machine's only.)"""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / LOCK_FILE).exists():  # read back below: a pipe would block, a device not lock
        check_regular(folder / LOCK_FILE, "storage_path", fix="remove it")
    with open(folder / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = short(lock.read(64).strip() or "?", 20)
            raise Busy(f"study {study.name} is running in another process (pid {holder}) on "
                       f"{shown(study.results_place())}; wait for it to end, or use another "
                       f"--storage-path") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def check_results(results: str, trust: bool = False) -> None:
    """Before Ray starts: the folder's study state reads whole, and every file Ray would
    unpickle from it was signed by this user's sweeps (`trust`: sign what is there)."""
    from orchestrator.trust import check, sign, state_key

    state_key(create=True)  # one that cannot sign is refused now, not after training
    if read_state(results) is not None:
        (sign if trust else check)(results)


def run(study: StudyConfig, study_file: str, resume: bool, verbose: bool = False,
        trust: bool = False) -> int:
    """Run the study; Ray's own output goes to a log file in its results folder unless
    `verbose`. A study that never started leaves no results folder behind."""
    from orchestrator.study.console import RAY_LOG, ray_output_to
    from orchestrator.study.mlflow_client import check_scheme, sqlite_path

    check_scheme(study.tracking_uri())
    results = study.results_place()
    # Before anything: a file, read-only, a name too long, a full disk.
    check_writable(results, "storage_path")
    database = sqlite_path(study.tracking_uri())
    if database is not None:
        check_writable(database.parent, "--tracking-uri")
    check_results(results, trust)
    study = resolve_paths(study)  # the data checked before anything is started
    local = local_folder(study)
    # The outermost folder this run creates: removed again if the study never starts.
    created = next((p for p in (*reversed(local.parents), local) if not p.exists()), None)
    try:
        with study_lock(local, study):
            with contextlib.nullcontext() if verbose else ray_output_to(local / RAY_LOG):
                return _run(study, study_file, resume, results, local,
                            ray_log=None if verbose else local / RAY_LOG)
    except BaseException:
        if created is not None and read_state(results) is None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _run(study: StudyConfig, study_file: str, resume: bool, results: str, local: Path,
         ray_log: Path | None) -> int:
    from ray.tune import Tuner

    from orchestrator.study.console import start_line
    from orchestrator.study.mlflow_client import connect, sqlite_path
    from orchestrator.study.summary import (register_best_model, report_n0, report_summary,
                                            summarize_results, show_finished)
    from orchestrator.study.tracking import StudyRun, check_parent

    digest = config_hash(study)  # before `auto` resources are fitted to this cluster
    state = read_state(results)
    if state is not None and state["config_hash"] != digest:
        raise ConfigError(f"{shown(results)} holds study {study.name} with a different "
                          f"configuration; use another --storage-path or remove that folder")
    # Before Ray starts: the study's parent run is where the results folder says it is.
    if state is not None:
        client, parent_run = check_parent(study, state, results)
        if parent_run.info.status == "FINISHED":  # a rerun changes nothing
            show_finished(parent_run, study, shown(results))
            return 0
    elif sqlite_path(study.tracking_uri()) is None or sqlite_path(study.tracking_uri()).exists():
        client = connect(study.tracking_uri())  # a server, a file store: checked before Ray
    else:
        client = None  # a new database is made once the cluster is there
    study, concurrency = start_ray(study, study_file)
    restoring = state is not None and Tuner.can_restore(results)
    if resume and not restoring:
        raise ConfigError(f"nothing to resume in {shown(results)}; run without --resume")
    print(start_line(study, planned_trials(study), concurrency, shown(results), ray_log),
          flush=True)

    client = client or connect(study.tracking_uri())
    parent = StudyRun(client, study)
    # A driver killed before Tune first saved its state leaves a parent run and nothing to
    # restore: the fresh start continues that parent run instead of leaving it RUNNING.
    parent.open(state and state["parent_run_id"], local, Path(study_file).read_text())
    try:
        outcome = fit(study, results, restoring, parent, digest, concurrency, ray_log is not None)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        try:
            parent.close("KILLED" if interrupted else "FAILED",
                         0 if interrupted else study.mlflow.outage_wait_s)
        except StorageError as full:  # the first failure is the one the command ends with
            log.warning(str(full))
        raise
    ended = outcome.num_terminated + outcome.num_errors
    rows = summarize_results(outcome, study)
    verdict, policy = None, None
    if ended < len(rows):  # trials that never ended: interrupted
        interrupted = True
    elif study.searcher.sampler == "n0":
        from orchestrator.study.n0_search import replayed, search_verdict

        policy = replayed(study, rows)  # once, for the verdict and the report
        verdict = search_verdict(policy)  # None: the search wanted more trials
        interrupted = verdict is None
    else:
        interrupted = ended < planned_trials(study)
    if interrupted:
        parent.close("KILLED", study.mlflow.outage_wait_s)
        log.warning(f"sweep interrupted after {ended} trials; run the same command again (or "
                    f"add --resume) to continue")
        return 130
    best = report_summary(rows, study, parent, shown(results))
    if best is not None:
        register_best_model(outcome, best, study, parent)
    report_n0(rows, study, parent, local, verdict, policy)
    if is_remote(results) and (local / "report").is_dir():
        upload(local / "report", join(results, "report"))
    parent.close("FINISHED", study.mlflow.outage_wait_s)
    return 0 if any(trained(r["status"]) for r in rows) else 1


def fit(study: StudyConfig, results: str, restoring: bool, parent, digest: str,
        concurrency: int, quiet: bool):
    import ray.tune
    from ray.tune import Tuner

    from orchestrator.cluster.driver import release_placement_groups
    from orchestrator.study.console import StudyProgress
    from orchestrator.study.searchers import build_searcher
    from orchestrator.study.tracking import TrialTracker
    from orchestrator.trust import check, signing
    from orchestrator.study.trials import build_scheduler, trial_driver

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial_driver,
                                 study_data=study.model_dump(mode="json", exclude_unset=True)),
        {"cpu": study.resources.driver_cpus})
    if restoring:
        log.info(f"resuming study {study.name} from {shown(results)}")
        check(results)  # again, just before Tune unpickles its state
        # The MLflow tracker and the searcher's state come back with the experiment (see
        # TrialTracker.__reduce__ and orchestrator.study.searchers).
        tuner = Tuner.restore(results, trainable=trainable, resume_unfinished=True,
                              resume_errored=False, restart_errored=False)
    else:
        write_text(join(results, STATE_FILE), json.dumps(  # whole or absent, even if killed
            {"parent_run_id": parent.run_id, "config_hash": digest,
             "tracking_uri": study.tracking_uri(), "experiment": study.experiment_name}))
        tracker = TrialTracker(study.tracking_uri(), study, parent.experiment_id, parent.run_id,
                               layout=study.parallel.layout)
        tuner = Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                search_alg=build_searcher(study), scheduler=build_scheduler(study),
                num_samples=planned_trials(study), max_concurrent_trials=concurrency,
                # The next trial runs in a finished trial's driver process: no new process,
                # no second import of torch and Ray Train (about 6 CPU-seconds a trial).
                reuse_actors=True,
                trial_name_creator=lambda trial: study.trial_name(trial.config)),
            run_config=ray.tune.RunConfig(
                name=study.name, storage_path=study.storage(),
                callbacks=[tracker, StudyProgress(study, planned_trials(study))],
                verbose=0 if quiet else None,  # our table (console.py) instead of Tune's
                # A trial whose driver's node was lost restarts from its last checkpoint too.
                failure_config=ray.tune.FailureConfig(
                    max_failures=study.resources.max_failures)),
        )
    ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        with signing(results):
            return tuner.fit()
    finally:
        try:
            release_placement_groups()
        except Exception as exc:  # the command ends with its own outcome, not this
            log.warning(f"could not release this sweep's placement groups: {exc}")
        # Tune leaves its own Ctrl-C handler behind, which would swallow the caller's next one.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, ctrl_c)
