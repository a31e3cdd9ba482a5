"""Real servers for tests (Ray nodes, MLflow), each started in a process group of its own and
stopped by that group only, on loopback ports."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.study.mlflow_client import quick_http
from tests.ranks import free_port
from tests.sweeps import new_database

BIN = Path(sys.executable).parent


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A command in a session of its own, so that it and everything it starts stop together."""
    return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            env=env or os.environ, start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    for signum, wait in ((sig, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            proc.poll()  # reaps the leader once it exits: a zombie would keep its group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    proc.poll()


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend in `folder`; stop() and start() again
    on the same port and database to simulate an outage."""

    def __init__(self, folder: Path, env: dict | None = None):
        self.folder, self.env, self.port = folder, env, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "MlflowServer":
        return self.launch().ready(timeout)

    def launch(self) -> "MlflowServer":
        """The server's process, started; ready() waits until it answers (other servers can
        start meanwhile)."""
        # One web worker and no job runner: the server starts in seconds instead of a minute on
        # two cores (the tests need neither more workers nor MLflow's background jobs).
        env = {**(self.env or os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if not (self.folder / "mlflow.db").exists():  # made once per test run, not per server
            new_database(self.folder)
        self.proc = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                           str(self.port), "--workers", "1", "--backend-store-uri",
                           f"sqlite:///{self.folder / 'mlflow.db'}", "--artifacts-destination",
                           str(self.folder / "artifacts")], self.folder / "mlflow.log", env)
        return self

    def ready(self, timeout: float = 90) -> "MlflowServer":
        assert self.proc is not None, "launch() first"
        deadline = time.time() + timeout
        while True:
            try:
                with quick_http():
                    MlflowClient(self.uri).search_experiments(max_results=1)
                return self
            except Exception:
                assert self.proc.poll() is None and time.time() < deadline, \
                    (self.folder / "mlflow.log").read_text()[-2000:]
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


class S3Server:
    """An S3-compatible server (moto's, from the dev extra) on 127.0.0.1, with one bucket;
    `uri(path)` is an s3:// storage URI that pyarrow (and so Ray Tune) reaches it with."""

    def __init__(self, folder: Path, bucket: str = "multires"):
        self.folder, self.bucket, self.port = folder, bucket, free_port()
        self.proc: subprocess.Popen | None = None

    def uri(self, path: str) -> str:
        return (f"s3://test:test@{self.bucket}/{path}?endpoint_override=127.0.0.1:{self.port}"
                f"&scheme=http&region=us-east-1")

    def start(self, timeout: float = 60) -> "S3Server":
        import pyarrow.fs

        self.proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                          self.folder / "moto.log")
        deadline = time.time() + timeout
        while True:
            try:
                fs, _ = pyarrow.fs.FileSystem.from_uri(self.uri("") + "&allow_bucket_creation=true")
                fs.create_dir(self.bucket)
                return self
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, \
                    (self.folder / "moto.log").read_text()[-2000:]
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def delete_bucket(self) -> None:
        """The bucket and everything in it gone at once, whatever is being written (moto's reset:
        an S3 client must empty a bucket before deleting it, and a running study refills it)."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{self.port}/moto-api/reset", method="POST"), timeout=30).close()
