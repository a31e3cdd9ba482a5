"""A real two-node Ray cluster and a real MLflow server on this machine, both started (and
stopped, by process group) by the test: the smoke study submitted with `ray job submit`, its runs
read back through the server's API, a dp=2 trial with one worker on each node."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.parallel.local import free_port

REPO = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
PARENT = "mlflow.parentRunId"


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A command in a session of its own, so that it and everything it starts stop together."""
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def node_ports() -> list[str]:
    names = ("node-manager-port", "object-manager-port", "metrics-export-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
    flags = [f"--{name}={free_port()}" for name in names]
    low = free_port()
    return flags + [f"--min-worker-port={low}", f"--max-worker-port={low + 100}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    short = Path(tempfile.mkdtemp(prefix="mr"))  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, mlflow_port = free_port(), free_port(), free_port()
    ray = str(BIN / "ray")
    procs = []
    try:
        head = start([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                      "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                      f"--ray-client-server-port={free_port()}", "--num-cpus=1",
                      f"--temp-dir={short / 'head'}", "--disable-usage-stats", *node_ports()], tmp / "head.log", env)
        procs.append(head)
        assert head.wait(120) == 0, (tmp / "head.log").read_text()[-2000:]
        # Its own temp dir: two nodes on one machine must not share runtime-env folders.
        worker = start([ray, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", f"--temp-dir={short / 'node'}", "--disable-usage-stats", *node_ports()],
                       tmp / "node.log", env)
        procs.append(worker)
        assert worker.wait(120) == 0, (tmp / "node.log").read_text()[-2000:]
        server = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                        str(mlflow_port), "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                        "--artifacts-destination", str(tmp / "artifacts")], tmp / "mlflow.log", env)
        procs.append(server)
        uri = f"http://127.0.0.1:{mlflow_port}"
        deadline = time.time() + 60
        while True:
            try:
                MlflowClient(uri).search_experiments(max_results=1)
                break
            except Exception:
                assert time.time() < deadline, (tmp / "mlflow.log").read_text()[-2000:]
                time.sleep(1)
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "mlflow": uri, "env": env,
               "shared": tmp / "shared"}
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(short, ignore_errors=True)


def test_study_submitted_to_a_two_node_cluster(cluster):
    env, shared = cluster["env"], cluster["shared"]
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir",
         str(REPO), "--", "python", "-m", "orchestrator.sweep", "search_spaces/smoke.yaml",
         "--tracking-uri", cluster["mlflow"], "--storage-path", str(shared),
         "--set", "trials=1", "--set", "parallel.dp=2", "--set", "resources.cpus_per_worker=0.9",
         "--set", "scheduler.type=none", "--set", "train.epochs=1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, \
        (job.stdout + job.stderr)[-4000:]

    client = MlflowClient(cluster["mlflow"])  # through the server's API
    experiment = client.get_experiment_by_name("smoke")
    found = client.search_runs([experiment.experiment_id])
    parents = [r for r in found if PARENT not in r.data.tags]
    children = [r for r in found if PARENT in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.tags["parallel_layout"].startswith("dp=2")
    assert client.get_metric_history(children[0].info.run_id, "test_error")

    # Checkpoints landed in the shared storage path.
    assert list(shared.glob("smoke/train-*/checkpoint_*/checkpoint.pt"))
    # The trial's two Ray Train workers ran on different nodes.
    listed = subprocess.run(
        [str(BIN / "ray"), "list", "actors", "--address", cluster["dashboard"], "--filter",
         "class_name=RayTrainWorker", "--format", "json", "--detail", "--limit", "100"],
        env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    workers = json.loads(listed.stdout)
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2
