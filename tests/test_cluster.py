"""A real two-node Ray cluster and a real MLflow server on this machine, both started (and
stopped, by process group) by the tests: the smoke study submitted with `ray job submit`, its
runs read back through the server's API, a dp=2 trial with one worker on each node; then the
worker node is stopped in the middle of a trial, which finishes on the head node."""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.cluster.driver import LOOPBACK_ONLY
from tests.ranks import free_port
from tests.servers import BIN, MlflowServer, start, stop
from tests.sweeps import poll, runs

REPO = Path(__file__).parent.parent


def node_ports(*taken: int) -> list[str]:
    """A node's ports, none inside its worker-port range (Ray refuses a node whose components
    share a port; free ports picked one by one could land in that range)."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
    while True:
        low = free_port()
        workers = range(low, low + 101)
        if not set(taken) & set(workers):
            break
    ports: list[int] = []
    while len(ports) < len(names):
        port = free_port()
        if port not in workers and port not in ports and port not in taken:
            ports.append(port)
    return [f"--{name}={port}" for name, port in zip(names, ports)] + [
        f"--min-worker-port={low}", f"--max-worker-port={low + 100}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    short = Path(tempfile.mkdtemp(prefix="mr"))  # Ray's socket paths must stay under 108 bytes
    # Token authentication on, with the test run's token (conftest.py): `ray start` refuses
    # to start a head in this mode without one.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    for name in ("RAY_ADDRESS", LOOPBACK_ONLY):  # a cluster of nodes, not the local instance
        env.pop(name, None)
    gcs, dashboard, client = free_port(), free_port(), free_port()
    # For Ray's own helpers on the nodes (a Ray Train run's placement-group cleaner): they find
    # their cluster by RAY_ADDRESS, not by looking, where this machine runs the test run's Ray too.
    nodes_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    ray = str(BIN / "ray")
    procs = []
    # The MLflow server starts while the Ray nodes do (it needs neither); its port is theirs
    # to avoid, like the head's.
    mlflow = MlflowServer(tmp, env)
    while mlflow.port in (gcs, dashboard, client):
        mlflow = MlflowServer(tmp, env)
    taken = (gcs, dashboard, client, mlflow.port)
    mlflow.launch()
    try:
        head = start([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                      "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                      f"--ray-client-server-port={client}", "--num-cpus=1",
                      f"--temp-dir={short / 'head'}", "--disable-usage-stats",
                      *node_ports(*taken)], tmp / "head.log", nodes_env)
        procs.append(head)
        assert head.wait(120) == 0, (tmp / "head.log").read_text()[-2000:]
        # Its own temp dir: two nodes on one machine must not share runtime-env folders.
        worker = start([ray, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", f"--temp-dir={short / 'node'}", "--disable-usage-stats",
                        *node_ports(*taken)], tmp / "node.log", nodes_env)
        procs.append(worker)
        assert worker.wait(120) == 0, (tmp / "node.log").read_text()[-2000:]
        mlflow.ready()
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "mlflow": mlflow.uri, "env": env,
               "shared": tmp / "shared", "gcs": f"127.0.0.1:{gcs}", "node": worker, "tmp": tmp}
    finally:
        mlflow.stop()
        # A test cluster has nothing to keep, and Ray's servers take 10 s and more on SIGTERM.
        for proc in reversed(procs):
            stop(proc, signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)


def ray_list(cluster, kind: str, *filters: str) -> list[dict]:
    listed = subprocess.run(
        [str(BIN / "ray"), "list", kind, "--address", cluster["dashboard"], "--format", "json",
         "--detail", "--limit", "1000", *[f for flt in filters for f in ("--filter", flt)]],
        env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    if listed.stdout.strip().startswith("No resource"):  # how `ray list` answers "none"
        return []
    try:
        return json.loads(listed.stdout)
    except ValueError:
        raise AssertionError(f"`ray list {kind}` answered: {listed.stdout[-2000:]}") from None


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

    client, parents, children = runs(cluster["mlflow"])  # through the server's API
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.tags["parallel_layout"].startswith("dp=2")
    assert client.get_metric_history(children[0].info.run_id, "test_error")

    # Checkpoints landed in the shared storage path.
    assert list(shared.glob("smoke/train-*/checkpoint_*/checkpoint.pt"))
    # The trial's two Ray Train workers ran on different nodes.
    workers = ray_list(cluster, "actors", "class_name=RayTrainWorker")
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2

    # The cluster checks the token (docs/cluster.md starts it with one): a wrong one is refused.
    nobody = {**{k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"},
              "RAY_AUTH_TOKEN": secrets.token_hex(32), "HOME": str(cluster["tmp"])}
    listed = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", cluster["dashboard"]],
                            env=nobody, capture_output=True, text=True, timeout=120)
    assert listed.returncode != 0, listed.stdout[-2000:]
    assert "token" in (listed.stdout + listed.stderr).lower(), listed.stderr[-2000:]


HOLD_HEAD = """
import sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
ray.init(address=sys.argv[1])
head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
hold = ray.remote(num_cpus=0.8)(type("Hold", (), {"ready": lambda self: True}))
actor = hold.options(scheduling_strategy=On(head, soft=False)).remote()
ray.get(actor.ready.remote())
print("held", flush=True)
time.sleep(3600)
"""


def test_trial_survives_its_worker_node_being_stopped(cluster):
    """The trial's worker runs on the worker node (the head is busy); that node is stopped
    after two epochs and the head freed: the trial restarts on the head from its checkpoint."""
    env, shared, tmp = cluster["env"], cluster["tmp"] / "shared-2", cluster["tmp"]
    holder = start([sys.executable, "-c", HOLD_HEAD, cluster["gcs"]], tmp / "hold.log", env)
    try:
        # The workers of the other test's trial (while the holder starts): not this trial's.
        before = {w["actor_id"] for w in ray_list(cluster, "actors",
                                                  "class_name=RayTrainWorker")}
        deadline = time.time() + 120
        while "held" not in (tmp / "hold.log").read_text():
            assert holder.poll() is None and time.time() < deadline, \
                (tmp / "hold.log").read_text()[-2000:]
            time.sleep(0.5)
        job = subprocess.Popen(
            [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"],
             "--working-dir", str(REPO), "--", "python", "-m", "orchestrator.sweep",
             "search_spaces/smoke.yaml", "--tracking-uri", cluster["mlflow"],
             "--storage-path", str(shared), "--set", "name=node-loss", "--set", "trials=1",
             "--set", "space.depth=8", "--set", "space.k=1", "--set", "scheduler.type=none",
             "--set", "train.epochs=6", "--set", "train.train_size=1024",
             "--set", "resources.cpus_per_worker=0.9", "--set", "resources.max_failures=3"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while len(list(shared.glob("node-loss/train-*/checkpoint_*/checkpoint.pt"))) < 2:
            assert job.poll() is None and time.time() < deadline, job.stdout.read()[-4000:]
            time.sleep(0.5)
        # At once: four epochs still to train (which node the worker was on is read after).
        stop(cluster["node"], signal.SIGKILL)  # the whole worker node, at once
        stopped_at = time.time()
        stop(holder)
        output = job.communicate(timeout=600)[0]
    finally:
        stop(holder)
    assert job.returncode == 0 and "succeeded" in output, output[-4000:]

    nodes = ray_list(cluster, "nodes")
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    (stopped,) = [n["node_id"] for n in nodes if not n["is_head_node"]]
    # The trial's workers: one on the node that was stopped, then one on the head, where the
    # trial finished (the state API reports a worker some time after it started).
    poll(lambda: [w for w in ray_list(cluster, "actors", "class_name=RayTrainWorker")
                  if w["actor_id"] not in before],
         lambda seen: {stopped, head} <= {w["node_id"] for w in seen}, 120,
         "the trial's Ray Train workers on the stopped node and on the head")

    client, _, (child,) = runs(cluster["mlflow"], "node-loss")
    assert child.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_error")]
    assert steps == [1, 2, 3, 4, 5, 6]
    saved = list(shared.glob("node-loss/train-*/checkpoint_*/checkpoint.pt"))
    print(f"node loss: {len(saved) - 6} epochs redone; the job ended "
          f"{time.time() - stopped_at:.0f} s after the node was stopped")
