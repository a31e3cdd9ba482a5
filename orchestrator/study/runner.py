"""A study as Ray Tune trials of Ray Train runs, tracked in MLflow.

Study file -> StudyConfig -> Tuner(searcher, trial scheduler) -> trial driver -> Ray Train run ->
workers (`orchestrator.cluster.worker`) -> ray.train.report -> Tune -> MLflow (`tracking`).
Running the same command again after Ctrl-C (or with --resume) continues the study with
`Tuner.restore`: finished trials are kept, unfinished ones resume from their last checkpoint.
Run with a larger budget (trials, budget.epochs, seeds, depths, pairs) it extends the study
(extension.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
from pathlib import Path

from ray.tune import ExperimentAnalysis, FailureConfig, RunConfig, TuneConfig, Tuner

from orchestrator.cluster.driver import init_ray, release_placement_groups
from orchestrator.errors import ConfigError, StorageError, TrialsFailed, short, stop_asked
from orchestrator.results import trained
from orchestrator.storage import check_still_there, check_writable, is_remote, join, shown, \
    upload, write_text
from orchestrator.study.config import StudyConfig
from orchestrator.study.console import RAY_LOG, StudyProgress, ray_output_to, start_line, \
    to_console
from orchestrator.study.extension import begin, check_extension, extended_line, mark_parent, \
    prior_for, seeded
from orchestrator.study.folder import STATE_FILE, config_hash, local_folder, read_state, \
    resolve_paths, study_lock
from orchestrator.study.mlflow_client import check_scheme, connect, sqlite_path
from orchestrator.study.n0_search import replayed, search_verdict
from orchestrator.study.outputs import failed_trials, register_best_model, report_n0, \
    report_summary, show_finished, summarize_results
from orchestrator.study.placement import Cluster, check_place
from orchestrator.study.searchers import build_searcher
from orchestrator.study.tracking import StudyRun, TrialTracker, check_parent
from orchestrator.study.trainable import trainable_of
from orchestrator.study.trials import build_scheduler, planned_trials
from orchestrator.trust import TUNER_STATE, check, sign, signing, state_key, unpickled_files

log = logging.getLogger(__name__)


def start_ray(study: StudyConfig, study_file: str | None) -> tuple[StudyConfig, int]:
    """Connect to RAY_ADDRESS or start a local Ray; the study with its resources fitted to the
    cluster, and how many trials run at once."""
    init_ray()
    return check_place(study, Cluster.of_ray(), study_file)


def check_results(results: str, trust: bool = False) -> None:
    """Before Ray starts: the folder's study state reads whole, and every file Ray would
    unpickle from it was signed by this user's sweeps (`trust`: sign what is there)."""
    state_key(create=True)  # one that cannot sign is refused now, not after training
    if read_state(results) is not None:
        (sign if trust else check)(results)
    elif unpickled_files(results):  # before the study's first sweep: planted, or not a study's
        name = next(iter(unpickled_files(results)))
        raise ConfigError(f"{name} in {shown(results)} was not written by a sweep of this "
                          f"study (Ray would unpickle it); remove it, or use another "
                          f"--storage-path")


def run(study: StudyConfig, study_file: str, resume: bool, verbose: bool = False,
        trust: bool = False) -> int:
    """Run the study; Ray's own output goes to a log file in its results folder unless
    `verbose`. A study that never started leaves no results folder behind."""
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
    digest = config_hash(study)  # before `auto` resources are fitted to this cluster
    settings = study.model_dump(mode="json")
    state = read_state(results)
    change = growth(study, state, digest, settings, resume, results)
    client, finished = tracking_before_ray(study, state, change, results, digest)
    if finished is not None:  # a rerun of a finished study changes nothing
        show_finished(finished, study, shown(results))
        return 0
    study, concurrency = start_ray(study, study_file)
    prior = None if state is None else (
        begin(results, state, digest, change, lambda: old_rows(study, results)) if change
        else prior_for(results, digest))
    restoring = state is not None and check(results)  # a signed Tuner to restore
    if resume and not restoring:
        raise ConfigError(f"nothing to resume in {shown(results)}; run without --resume")
    print(start_line(study, planned_trials(study), concurrency, shown(results), ray_log),
          flush=True)
    if prior:
        print(extended_line(study.name, prior), flush=True)

    parent = StudyRun(client or connect(study.tracking_uri()), study)
    # A driver killed before Tune first saved its state leaves a parent run and nothing to
    # restore: the fresh start continues that parent run instead of leaving it RUNNING.
    parent.open(state["parent_run_id"] if state else None, local, Path(study_file).read_text())
    if prior:
        mark_parent(parent, prior, Path(study_file).read_text())
    try:
        outcome = run_tuner(study, results, restoring, parent, (digest, settings), concurrency,
                      ray_log is not None, prior)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        try:
            parent.close("KILLED" if interrupted else "FAILED",
                         0 if interrupted else study.mlflow.outage_wait_s)
        except StorageError as full:  # the first failure is the one the command ends with
            log.warning(str(full))
        raise
    return conclude(study, outcome, parent, prior, results, local)


def growth(study: StudyConfig, state: dict | None, digest: str, settings: dict, resume: bool,
           results: str):
    """How the study grew since its results folder began (None: it did not), or one line
    refusing what would alter trained trials (`extension.check_extension`)."""
    if state is None or state["config_hash"] == digest:
        return None
    change = check_extension(state.get("config"), settings, study.name, results)
    if resume:
        raise ConfigError(f"--resume continues study {study.name} as it began, but its "
                          f"settings grew ({'; '.join(change.grown)}); drop --resume to "
                          f"extend it")
    return change


def tracking_before_ray(study: StudyConfig, state: dict | None, change, results: str,
                        digest: str):
    """(an MLflow client, or None until the cluster is there; the parent run if the study
    finished and nothing grew), checked before Ray starts: the study's parent run is where the
    results folder says it is."""
    if state is None:
        database = sqlite_path(study.tracking_uri())
        if database is None or database.exists():
            return connect(study.tracking_uri()), None  # a server, a file store: checked now
        return None, None  # a new database is made once the cluster is there
    client, parent_run = check_parent(study, state, results)
    if change is None and parent_run.info.status == "FINISHED":
        return client, parent_run
    if change is not None and parent_run.info.status != "FINISHED" and \
            prior_for(results, digest) is None:
        raise ConfigError(f"study {study.name} in {shown(results)} was interrupted before "
                          f"it ended; run it to its end with the settings it began with, "
                          f"then extend it")
    return client, None


def conclude(study: StudyConfig, outcome, parent, prior, results: str, local: Path) -> int:
    """After Tune: interrupted (130), trials missing (`TrialsFailed`), or the summary, the best
    model and the report, and the parent run FINISHED."""
    ended = outcome.num_terminated + outcome.num_errors
    rows = summarize_results(outcome, study)
    missing = failed_trials(outcome, study)
    verdict, policy, kept = None, None, prior.rows if prior else []
    if stopped_early(outcome, ended, len(rows)):
        interrupted = True
    elif missing:  # reported below; a rerun trains them, then the search goes on
        interrupted = False
    elif study.searcher.sampler == "n0":
        policy = replayed(study, kept + rows)  # once, for the verdict and the report
        verdict = search_verdict(policy)  # None: the search wanted more trials
        interrupted = verdict is None
    else:
        interrupted = ended + len(kept) < planned_trials(study)
    if interrupted:
        parent.close("KILLED", study.mlflow.outage_wait_s)
        log.warning(f"sweep interrupted after {ended} trials; run the same command again (or "
                    f"add --resume) to continue")
        return 130
    rows = kept + rows
    best = report_summary(rows, study, parent, shown(results))
    if missing:  # the study is not done: no best model, no report until a rerun trains them
        fail_missing(missing, len(rows), parent, study)
    if best is not None:
        register_best_model(outcome, best, study, parent)
    report_n0(rows, study, parent, local, verdict, policy,
              [extended_line(study.name, prior)] if prior else [])
    if is_remote(results) and (local / "report").is_dir():
        upload(local / "report", join(results, "report"))
    parent.close("FINISHED", study.mlflow.outage_wait_s)
    return 0 if any(trained(r["status"]) for r in rows) else 1


def stopped_early(outcome, ended: int, trials: int) -> bool:
    """Whether trials were left unfinished: some never ended, or Ctrl-C or SIGTERM stopped the
    fit and the state Tune saved for `Tuner.restore` holds trials that had not ended. (Without a
    stop that state is not asked: on a loaded machine Tune was seen to save a trial that failed
    as still running.)"""
    return ended < trials or (stop_asked() and left_unfinished(outcome))


def left_unfinished(outcome) -> bool:
    """Whether the state Tune saved for `Tuner.restore` holds trials that had not ended. After
    Ctrl-C or SIGTERM, Tune's clean-up marks the trials it stops TERMINATED (or ERROR, one caught
    starting) in the outcome, while its saved state keeps them RUNNING or PENDING."""
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning for each trial with no result yet is noise here
    try:
        saved = ExperimentAnalysis(outcome.experiment_path, storage_filesystem=outcome.filesystem)
        return any(t.status not in ("TERMINATED", "ERROR") for t in saved.trials)
    except Exception as exc:  # unreadable: the outcome's own statuses decide
        log.warning(f"could not read the study's saved state back ({short(exc)})")
        return False
    finally:
        quiet.setLevel(level)


def old_rows(study: StudyConfig, results: str) -> list[dict]:
    """The summary rows of the study's last Tune experiment in `results` (none if it never
    saved its state), read before an extension starts a new one there."""
    if not check(results):  # signed, or refused before anything is unpickled
        return []
    return summarize_results(Tuner.restore(results, trainable=trainable_of(study)).get_results(),
                             study)


def fail_missing(missing: dict[str, str], trials: int, parent, study: StudyConfig) -> None:
    """Trials that did not train: each named on the console with its reason, the parent run
    FAILED, and the command's error line (the same command again trains exactly those)."""
    for name, reason in missing.items():
        to_console(f"error: trial {name} did not train: {reason}")
    parent.close("FAILED", study.mlflow.outage_wait_s)
    raise TrialsFailed(f"{len(missing)} of {trials} trials did not train "
                       f"({', '.join(missing)}); run the same command again to train them")


def run_tuner(study: StudyConfig, results: str, restoring: bool, parent,
              config: tuple[str, dict], concurrency: int, quiet: bool, prior=None):
    """Run (or restore) the study's Tune experiment; `config`: its hash and what it trains, as
    the results folder keeps them; `prior`: an extension's finished trials."""
    if restoring:
        log.info(f"resuming study {study.name} from {shown(results)}")
        check(results)  # again, just before Tune unpickles its state
        # The MLflow tracker and the searcher's state come back with the experiment (see
        # TrialTracker.__reduce__ and orchestrator.study.searchers).
        tuner = Tuner.restore(results, trainable=trainable_of(study), resume_unfinished=True,
                              # a failed trial is trained again, from its last checkpoint
                              resume_errored=True, restart_errored=False)
    else:
        tuner = new_tuner(study, results, parent, config, concurrency, quiet, prior)
    ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        with signing(results):
            try:
                outcome = tuner.fit()
            except Exception:
                check_still_there(results)  # a deleted bucket is the user's to fix, not a bug
                raise
            check_still_there(results)  # Tune logs the writes that failed and goes on
            return outcome
    finally:
        try:
            release_placement_groups()
        except Exception as exc:  # the command ends with its own outcome, not this
            log.warning(f"could not release this sweep's placement groups: {exc}")
        # Tune leaves its own Ctrl-C handler behind, which would swallow the caller's next one.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, ctrl_c)


def new_tuner(study: StudyConfig, results: str, parent, config: tuple[str, dict],
              concurrency: int, quiet: bool, prior):
    """The study's Tune experiment, started: the results folder's state file written first,
    then the Tuner (its own state file signed at once)."""
    write_text(join(results, STATE_FILE), json.dumps(  # whole or absent, even if killed
        {"parent_run_id": parent.run_id, "config_hash": config[0],
         "tracking_uri": study.tracking_uri(), "experiment": study.experiment_name,
         "config": config[1]}))
    # An extension's trials before it are neither run nor tracked again.
    kept = prior.trial_ids() if prior else frozenset()
    tracker = TrialTracker(study.tracking_uri(), study, parent.experiment_id, parent.run_id,
                           layout=study.parallel.layout, kept=kept)
    planned = planned_trials(study) - len(kept)
    tuner = Tuner(
        trainable_of(study),
        tune_config=TuneConfig(
            search_alg=seeded(build_searcher(study), prior), scheduler=build_scheduler(study),
            num_samples=max(1, planned), max_concurrent_trials=concurrency,
            # Each trial in a driver process of its own. Reusing one (Tune's reset_config)
            # waits 2 s for the last trial's thread, which runs a Ray Train fit that a
            # stopped trial cannot end; past that Tune drops the next trial (seen under load).
            reuse_actors=False,
            trial_name_creator=lambda trial: study.trial_name(trial.config)),
        run_config=RunConfig(
            name=study.name, storage_path=study.storage(),
            callbacks=[tracker, StudyProgress(study, planned)],
            verbose=0 if quiet else None,  # our table (console.py) instead of Tune's
            # A trial whose driver's node was lost restarts from its last checkpoint too.
            failure_config=FailureConfig(max_failures=study.resources.max_failures)),
    )
    sign(results, only=(TUNER_STATE,))  # written by Tuner() itself, not through Tune's copy
    return tuner
