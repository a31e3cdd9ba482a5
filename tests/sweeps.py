"""The smoke study run by tests, in-process or as a driver process of its own, and its MLflow runs
read back."""
import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator import compat
from orchestrator.study.mlflow_client import quick_http, sqlite_path
from orchestrator.commands.sweep import main as sweep_main

SMOKE = str(Path(__file__).parent.parent / "search_spaces" / "smoke.yaml")
PARENT = "mlflow.parentRunId"


def new_database(folder: Path) -> str:
    """The URI of an empty MLflow database at `folder`/mlflow.db, copied from one made once per
    test run: making one runs every MLflow migration (about 1.2 s on two cores), which a test
    that only needs a place for its runs would pay each time. Tests of a new database's making
    (the smoke study, studies started at once on one) leave it to the sweep."""
    shutil.copyfile(_empty_database(), folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@functools.cache
def _empty_database() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mlflow-empty-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)  # its lines on making the tables, in a test's output
    try:
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    finally:
        logger.setLevel(level)
    return folder / "mlflow.db"


def start_sweep(args: list[str], ray_address: str, study: str = SMOKE,
                **kw) -> subprocess.Popen:
    """A study (the smoke study by default) in a driver process of its own on the test run's
    Ray instance, as `ray job submit` would run it."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", study, *args],
                            env={**os.environ, "RAY_ADDRESS": ray_address},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def runs(uri: str, experiment: str = "smoke"):
    """(client, parent runs, child runs) of an experiment."""
    with quick_http():
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        found = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in found if PARENT not in r.data.tags]
    children = [r for r in found if PARENT in r.data.tags]
    return client, parents, children


def child_statuses(uri: str, experiment: str = "smoke") -> list[str]:
    """While a sweep runs: its child runs' statuses, none before it made its database."""
    if not made(uri):
        return []
    try:
        return [c.info.status for c in runs(uri, experiment)[2]]
    except Exception:  # the database is still being created
        return []


def made(uri: str) -> bool:
    """Whether a sqlite database's MLflow schema is complete (other stores: True). A reader that
    finds it unfinished migrates it itself, and two processes migrating at once collide: the
    sweep then failed at its start (`MLflow at ... cannot be used (OperationalError)`). Alembic
    records each migration as it goes, so a recorded revision is not enough: it must be the
    last one."""
    path = sqlite_path(uri)
    if path is None:
        return True
    if not path.exists():
        return False
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        try:
            revisions = [row[0] for row in db.execute("select version_num from alembic_version")]
        except sqlite3.Error:  # not yet, or being written
            return False
    return revisions == [schema_head()]


@functools.cache
def schema_head() -> str:
    """MLflow's last schema revision (read from its migration scripts: 25 ms a call)."""
    return compat.resolve(compat.MLFLOW_SCHEMA_HEAD)()


def wait_for(condition, proc: subprocess.Popen, timeout: float = 900, every: float = 0.5,
             what: str = "the condition") -> None:
    """Poll `condition` while the sweep runs, at most `timeout` s (a bound, not a guess of when
    it holds: beside two busy loops on 2 cores a one-epoch trial took up to 6 minutes)."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the sweep ended before {what}:\n{proc.stdout.read()[-3000:]}"
        if time.time() >= deadline:
            # Not left running: its trials would hold the test run's Ray for the tests after.
            proc.kill()
            output = proc.communicate(timeout=60)[0] or ""
            raise AssertionError(f"{what}: not within {timeout:.0f} s; the sweep printed:\n"
                                 f"{output[-3000:]}")
        time.sleep(every)


def poll(fetch, done, bound_s: float, what: str):
    """fetch() until done(its value), at most bound_s; a failure says what was last seen."""
    deadline = time.monotonic() + bound_s
    while True:
        seen = fetch()
        if done(seen):
            return seen
        assert time.monotonic() < deadline, \
            f"{what}: not within {bound_s:.0f} s; last seen: {str(seen)[-2000:]}"
        time.sleep(0.5)


def checkpoints(results: Path, trial: str = "*", experiment: str = "smoke") -> list[Path]:
    return list(results.glob(f"{experiment}/train-{trial}/checkpoint_*/checkpoint.pt"))


def recorded_epochs(results: Path, trial: str, experiment: str = "smoke") -> list[int]:
    """The epochs of the checkpoints Ray Train recorded for a trial, in order."""
    snapshot = results / experiment / f"train-{trial}" / "checkpoint_manager_snapshot.json"
    return [c["metrics"]["epoch"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]


def assert_resumes_once(command: list[str], uri: str, results: Path, experiment: str = "smoke",
                        epochs: int = 2) -> list:
    """After an interrupted sweep: the same command (the study file and its arguments) resumes
    it in the same parent run; finished trials are left alone; every epoch of every trial is
    trained and logged once. Returns the trials' runs."""
    _, (parent,), children = runs(uri, experiment)
    finished = {c.info.run_id: c.info.end_time for c in children if c.info.status == "FINISHED"}
    assert finished

    assert sweep_main(command) == 0
    client, parents, children = runs(uri, experiment)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert parents[0].info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags["trial_id"] for c in children}) == len(children)
    for child in children:
        history = client.get_metric_history(child.info.run_id, "test_error")
        # No epoch logged twice, none missing; Ray Train recorded one checkpoint per epoch,
        # whatever was retried (one uploaded as a kill came, before Ray Train recorded it, is
        # not the run's: its epoch is trained again from the checkpoint before).
        assert [m.step for m in history] == list(range(1, epochs + 1))
        assert recorded_epochs(results, child.data.tags["trial_id"], experiment) == \
            list(range(1, epochs + 1))
        if child.info.run_id in finished:  # finished trials were not retrained
            assert child.info.end_time == finished[child.info.run_id]
    return children
