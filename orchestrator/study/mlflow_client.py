"""Reaching MLflow: check a tracking URI, connect (quickly, before anything trains), read every
run past MLflow's pages, and deliver updates in order through outages (`Outbox`)."""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.errors import TrackingError, short
from orchestrator.storage import check_regular

log = logging.getLogger(__name__)

# One quick try per request: the reachability check fails fast, and while a server is down the
# outbox holds updates back instead of blocking Tune's loop in MLflow's long retries.
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


SCHEMES = {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks"}


def check_scheme(tracking_uri: str) -> None:
    scheme = urlparse(tracking_uri).scheme
    if scheme not in SCHEMES:
        raise TrackingError(f"tracking URI {short(tracking_uri)}: unknown scheme "
                            f"{short(repr(scheme), 60)}; use "
                            f"sqlite:///PATH/mlflow.db or http://HOST:PORT of an mlflow server")


def connect(tracking_uri: str) -> MlflowClient:
    """A client for `tracking_uri`, checked to answer (quickly: one try, 10 s) before anything is
    trained."""
    check_scheme(tracking_uri)
    database = sqlite_path(tracking_uri)
    if database is not None and database.exists():  # sqlite would block on a pipe
        check_regular(database, "--tracking-uri", TrackingError,
                      fix="give the path of an MLflow sqlite database")
    try:
        with quick_http(), one_at_a_time(database):
            client = MlflowClient(tracking_uri)
            client.search_experiments(max_results=1)
    except Exception as exc:
        if urlparse(tracking_uri).scheme in ("", "file"):  # MLflow's own reason, not ours
            reason = short((str(exc).strip().split(". ") or [""])[0], 200)
            raise TrackingError(f"tracking URI {short(tracking_uri)}: {reason}; use "
                                f"sqlite:///PATH/mlflow.db") from None
        raise TrackingError(f"MLflow at {short(tracking_uri)} cannot be used "
                            f"({type(exc).__name__}); start the server or pass another "
                            f"--tracking-uri") from None
    return client


@contextmanager
def one_at_a_time(database: Path | None):
    """Held while MLflow opens a sqlite database. MLflow's tracking store migrates a database
    whose schema it finds unfinished, with no lock: two studies started at once on a new one
    (the default ./mlflow.db) both migrated it, and each but one failed. A lock named after
    the database lets one make it and the others find it made."""
    if database is None:
        yield
        return
    name = hashlib.sha256(str(database.resolve()).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"multires-mlflow-{name}.lock"
    try:
        descriptor = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:  # another user's, unreadable: unlocked, as MLflow itself opens it
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


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

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, (requests.exceptions.RequestException, ConnectionError,
                            TimeoutError))


def all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str = "",
             order_by: list[str] | None = None) -> list:
    """Every matching run: search_runs answers in pages of at most 1,000. A server that
    hands back a page token it gave before would be asked for ever: that is an error."""
    runs: list = []
    token, seen = None, set()
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs
        if token in seen:
            raise TrackingError(f"MLflow at {short(client.tracking_uri)} answered the same page of "
                                f"runs twice (page token {short(repr(token), 40)}); check the "
                                f"server, or pass another --tracking-uri")
        seen.add(token)


class Outbox:
    """The sweep's MLflow updates, delivered in order; held back while MLflow cannot be reached.

    Training never waits on MLflow: a failed update stays queued with everything after it and is
    retried with the next update (at most every `retry_s`), and at the end of the sweep
    (`drain`; every `drain_retry_s` then, when nothing else waits, so that the sweep ends soon
    after MLflow is back). One outbox per tracking URI in the sweep's driver process, shared by
    the parent run and the trial tracker (which Tune re-creates on restore), so their order is
    kept."""

    retry_s = 20.0
    drain_retry_s = 2.0

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
                    log.warning(f"MLflow update {what} failed ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                                f"); skipped")
                    self.pending.popleft()
                    continue
                if self.down_since is None:
                    self.down_since = time.time()
                    log.warning(f"MLflow at {self.tracking_uri} unreachable "
                                f"({type(exc).__name__}); training goes on, updates are held "
                                f"and delivered when it answers")
                self.next_try = time.time() + self.retry_s
                return False
            self.pending.popleft()
        if self.down_since is not None:
            log.warning(f"MLflow at {self.tracking_uri} answers again after "
                        f"{time.time() - self.down_since:.0f} s; held updates delivered")
            self.down_since = None
        return True

    def drain(self, wait_s: float) -> list[str]:
        """Keep trying for up to `wait_s` seconds; return what could not be delivered."""
        deadline = time.time() + wait_s
        while True:
            self.next_try = 0.0
            if self.flush() or time.time() >= deadline:
                return [what for what, _ in self.pending]
            time.sleep(min(self.drain_retry_s, deadline - time.time()))


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
