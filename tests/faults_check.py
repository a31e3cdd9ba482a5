"""Faults injected into a running sweep: nothing is lost."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient


SMOKE = str(Path(__file__).parent.parent / "search_spaces" / "smoke.yaml")
RUN = ["--set", "trials=1", "--set", "space.depth=8", "--set", "space.k=2",
       "--set", "space.lr=0.05", "--set", "scheduler.type=none", "--set", "train.epochs=8",
       "--set", "train.train_size=1024", "--set", "train.dtype=float64"]


def kill_a_worker_after_epoch(address: str, results: Path, epoch: int, killed: list) -> None:
    """SIGKILL the trial's Ray Train worker once `epoch` checkpoints are stored."""
    from ray.util.state import list_actors

    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.2)
        if len(list(results.glob("smoke/train-*/checkpoint_*"))) >= epoch:
            for actor in list_actors(address=address, detail=True,
                                     filters=[("class_name", "=", "RayTrainWorker"),
                                              ("state", "=", "ALIVE")]):
                os.kill(actor.pid, signal.SIGKILL)
                killed.append(actor.pid)
            return


def test_killed_worker_restarts_from_its_checkpoint(ray_address, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed: list = []
    killer = threading.Thread(target=kill_a_worker_after_epoch,
                              args=(ray_address, tmp_path / "results", 2, killed))
    killer.start()
    # The sweep in its own driver process on the test's Ray: whatever a restarted worker group
    # leaves reserved (placement groups) ends with that driver, not with the test session.
    subprocess.run([sys.executable, "-m", "orchestrator.sweep", SMOKE, "--storage-path",
                    str(tmp_path / "results"), "--tracking-uri", uri,
                    "--set", "resources.max_failures=2", *RUN],
                   check=True, capture_output=True, env={**os.environ, "RAY_ADDRESS": ray_address})
    killer.join()
    assert killed, "no worker was killed"

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("smoke")
    (child,) = client.search_runs([exp.experiment_id], "tags.trial_id != ''")
    assert child.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_error")]
    assert steps == list(range(1, 9))  # no epoch missing, none logged twice

    # The same training without the fault, one process with one thread like the worker.
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "orchestrator.train", "--dataset", "synthetic",
                    "--depth", "8", "--k", "2", "--lr", "0.05", "--epochs", "8",
                    "--train-size", "1024", "--test-size", "128", "--batch-size", "64",
                    "--device", "cpu", "--dtype", "float64", "--checkpoint-dir", str(reference)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    expected = torch.load(reference / "checkpoint.pt", weights_only=True)
    states = [torch.load(p, weights_only=True) for p in
              (tmp_path / "results" / "smoke").glob("train-*/checkpoint_*/checkpoint.pt")]
    final = max(states, key=lambda s: s["epoch"])
    assert final["epoch"] == 8
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=1e-9, atol=1e-12, msg=name)
