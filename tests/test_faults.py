"""Faults injected into running sweeps, each checked for what was lost: nothing.

Every sweep here runs in a driver process of its own on the test run's Ray instance
(RAY_ADDRESS), as `ray job submit` would run it: whatever a killed driver or a restarted worker
group leaves reserved ends with that driver, not with the test session."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.entities import ViewType

from tests.servers import MlflowServer
from tests.sweeps import (PARENT, SMOKE, assert_resumes_once, checkpoints, child_statuses,
                          new_database, poll, runs, start_sweep, wait_for)

ONE_TRIAL = ["--set", "trials=1", "--set", "space.depth=8", "--set", "space.lr=0.05",
             "--set", "scheduler.type=none"]


def test_killed_worker_restarts_from_its_checkpoint(ray_address, tmp_path):
    """SIGKILL of the trial's Ray Train worker after epoch 2 of 4: the worker group restarts from
    the epoch-2 checkpoint and ends with the weights of an uninterrupted run (float64)."""
    from ray.util.state import list_actors

    uri, results = new_database(tmp_path), tmp_path / "results"
    run = [*ONE_TRIAL, "--set", "space.k=2", "--set", "train.epochs=4",
           "--set", "train.train_size=128", "--set", "train.dtype=float64"]
    proc = start_sweep(["--storage-path", str(results), "--tracking-uri", uri,
                        "--set", "resources.max_failures=2", *run], ray_address)
    wait_for(lambda: len(checkpoints(results)) >= 2, proc)
    killed_at = time.time()
    # The state API reports a worker some time after it started (longer under load).
    workers = poll(lambda: list_actors(address=ray_address, detail=True, filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]), bool, 120,
        "the trial's live Ray Train worker")
    for actor in workers:
        os.kill(actor.pid, signal.SIGKILL)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]

    client, parents, (child,) = runs(uri)
    assert child.info.status == "FINISHED" and parents[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_error")]
    assert steps == [1, 2, 3, 4]  # no epoch missing, none logged twice
    states = [torch.load(p, weights_only=True) for p in checkpoints(results)]
    epochs = sorted(s["epoch"] for s in states)
    # Epoch 1 is never redone; epoch 2 is when the kill lands between its checkpoint's upload
    # and Ray Train registering it.
    assert sorted(set(epochs)) == [1, 2, 3, 4] and epochs.count(1) == 1 and len(epochs) <= 5
    print(f"worker kill: {len(epochs) - 4} epochs redone; the trial ended "
          f"{time.time() - killed_at:.1f} s after the kill")

    # The same training without the fault: one process with one thread, like the worker.
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "orchestrator.train", "--dataset", "synthetic",
                    "--depth", "8", "--k", "2", "--lr", "0.05", "--epochs", "4",
                    "--train-size", "128", "--test-size", "128", "--batch-size", "64",
                    "--device", "cpu", "--dtype", "float64", "--checkpoint-dir", str(reference)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    expected = torch.load(reference / "checkpoint.pt", weights_only=True)
    final = max(states, key=lambda s: s["epoch"])
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=1e-9, atol=1e-12, msg=name)


def test_killed_driver_resumes_without_retraining_or_duplicates(ray_address, tmp_path):
    """SIGKILL of the sweep's driver (no Ctrl-C handler runs) at one point of the sweep after
    another, each time run again by the same command: as the Tuner has just written its own
    file, right after Tune's first save, during a trial, as a trial has finished, and right
    after a later save. No rerun is refused; the last one finishes the study in the same MLflow
    runs, every trial trained and logged once."""
    uri, results = new_database(tmp_path), tmp_path / "results"
    folder = results / "smoke"
    args = ["--storage-path", str(results), "--tracking-uri", uri, "--set", "trials=3",
            "--set", "concurrency=1", "--set", "scheduler.type=none"]

    def saved() -> tuple:
        return tuple((p.name, p.stat().st_mtime_ns) for p in
                     sorted(folder.glob("experiment_state-*.json")))

    def after_next_save():
        first = saved()
        return lambda: saved() != first

    kill_points = [
        ("the Tuner wrote its file", lambda: (folder / "tuner.pkl").exists, 0.02),
        ("Tune's first save", lambda: bool(saved()), 0.02),
        # (Registered: a kill between a checkpoint's upload and Ray Train recording it redoes
        # that epoch, as test_killed_worker_restarts_from_its_checkpoint shows.)
        ("a trial's first checkpoint", lambda: registered_checkpoint(folder), 0.2),
        ("a trial finished", lambda: "FINISHED" in child_statuses(uri), 0.5),
        ("the next save", None, 0.02)]
    for what, condition, every in kill_points:
        proc = start_sweep(args, ray_address, cwd=tmp_path)
        condition = condition or after_next_save()
        # A bound, not a guess: each point is a few epochs of the smoke study past the start.
        wait_for(condition, proc, timeout=600, every=every, what=what)
        proc.kill()
        output = proc.communicate(timeout=60)[0]
        refused = [line for line in output.splitlines() if "error:" in line]
        assert not refused, (what, output[-3000:])  # the last rerun was not refused

    _, (parent,), _ = runs(uri)
    assert parent.info.status == "RUNNING"  # nothing closed it
    assert len(assert_resumes_once([SMOKE, *args], uri, results)) == 3
    # A trial started after Tune last saved the study is trained again as a new trial: its
    # first run is ended and deleted (whether a kill lands in that window is up to timing).
    client, _, children = runs(uri)
    for run in client.search_runs([parent.info.experiment_id],
                                  run_view_type=ViewType.DELETED_ONLY):
        assert run.info.status == "KILLED" and "forgotten" in run.data.tags
        assert run.data.tags["trial_id"] not in {c.data.tags["trial_id"] for c in children}


def registered_checkpoint(folder) -> bool:
    """Whether Ray Train recorded a checkpoint of a trial in the study's folder."""
    for snapshot in folder.glob("train-*/checkpoint_manager_snapshot.json"):
        try:
            if "checkpoint_" in snapshot.read_text():
                return True
        except OSError:  # being replaced
            pass
    return False


def test_mlflow_outage_during_training(ray_address, tmp_path):
    """The MLflow server goes down as the trial starts and comes back once training has ended:
    training never waits, and every epoch reaches the server once it is back."""
    server = MlflowServer(tmp_path)
    results = tmp_path / "results"
    try:
        server.start()
        proc = start_sweep(["--storage-path", str(results), "--tracking-uri", server.uri,
                            *ONE_TRIAL, "--set", "space.k=1", "--set", "train.epochs=6",
                            "--set", "train.train_size=1024"], ray_address)
        wait_for(lambda: child_statuses(server.uri), proc)
        server.stop()
        down_at = len(checkpoints(results))
        wait_for(lambda: len(checkpoints(results)) == 6, proc)  # trained on, unseen
        assert down_at <= 3  # at least three epochs trained while MLflow was down
        server.start()
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-3000:]
        assert "unreachable" in output and "answers again" in output

        client, parents, (child,) = runs(server.uri)
        assert parents[0].info.status == "FINISHED" and child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_error")]
        assert steps == [1, 2, 3, 4, 5, 6]
        assert not (results / "smoke" / "mlflow_undelivered.txt").exists()
    finally:
        server.stop()


def test_mlflow_stopped_mid_study_is_caught_up_by_the_rerun(ray_address, tmp_path, caplog):
    """The MLflow server stops as the first of two trials starts and is still down when the study
    ends: both trials train, the sweep exits 0 listing what MLflow did not get (the second
    trial's run among it). With the server back, the same command brings every run up to date
    from the results folder (Tune does not run a finished trial again) and drops the list."""
    from orchestrator.commands.sweep import main as sweep_main

    server = MlflowServer(tmp_path)
    results = tmp_path / "results"
    args = ["--storage-path", str(results), "--tracking-uri", server.uri, "--set", "trials=2",
            "--set", "concurrency=1", "--set", "space.depth=8", "--set", "space.lr=0.05",
            "--set", "scheduler.type=none", "--set", "train.epochs=1",
            "--set", "mlflow.outage_wait_s=2"]
    proc = None
    try:
        server.start()
        proc = start_sweep(args, ray_address, cwd=tmp_path)
        wait_for(lambda: child_statuses(server.uri), proc, timeout=600,
                 what="the first trial's run")
        server.stop()
        output = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, output[-3000:]
        assert "were not delivered" in output, output[-3000:]
        lost = (results / "smoke" / "mlflow_undelivered.txt").read_text().splitlines()
        assert lost[-1] == "end of parent run (FINISHED)"
        assert sum(line.endswith(" start") for line in lost) == 1, lost  # the second trial
        assert sum(line.endswith(" epoch 1") for line in lost) >= 1, lost
        assert len(checkpoints(results)) == 2  # training lost nothing

        server.start()
        assert sweep_main([SMOKE, *args]) == 0
        assert "brought up to date" in caplog.text
        client, (parent,), children = runs(server.uri)
        assert parent.info.status == "FINISHED" and parent.data.metrics["trials_trained"] == 2
        assert [c.info.status for c in children] == ["FINISHED"] * 2
        for child in children:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_error")]
            assert steps == [1] and "final_test_error" in child.data.metrics
        assert not (results / "smoke" / "mlflow_undelivered.txt").exists()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        server.stop()


def test_a_sweep_that_misses_its_bound_is_stopped_not_left_to_the_next_tests():
    """A fault test's driver that misses a bound is killed with the failure: left running, its
    trials held the test run's one Ray instance and the tests after it failed too."""
    proc = subprocess.Popen([sys.executable, "-c", "print('training', flush=True); "
                             "import time; time.sleep(600)"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with pytest.raises(AssertionError, match="the condition: not within 1 s; the sweep printed"):
        wait_for(lambda: False, proc, timeout=1)
    assert proc.poll() is not None


def test_run_of_a_trial_the_restored_study_forgot_is_ended_and_deleted(tmp_path):
    """The tracker of a restored study, given the trials Tune restored: a child run of any other
    trial (started after Tune's last save) is ended, tagged and deleted; the others are kept."""
    from types import SimpleNamespace

    from orchestrator.study.config import load_study
    from orchestrator.study.mlflow_client import connect
    from orchestrator.study.tracking import StudyRun, TrialTracker

    uri = new_database(tmp_path)
    study = load_study(SMOKE, [f"mlflow.tracking_uri={uri}"])
    parent = StudyRun(connect(uri), study)
    parent.open(None, tmp_path, "")
    client = parent.client
    for trial_id in ("kept", "forgot"):
        client.create_run(parent.experiment_id, tags={PARENT: parent.run_id, "trial_id": trial_id})

    tracker = TrialTracker(uri, study, parent.experiment_id, parent.run_id, layout="dp=1")
    tracker.on_step_begin(0, [SimpleNamespace(trial_id="kept")])
    _, _, children = runs(uri)
    assert [c.data.tags["trial_id"] for c in children] == ["kept"]
    assert children[0].info.status == "RUNNING"
    (deleted,) = client.search_runs([parent.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert deleted.data.tags["trial_id"] == "forgot" and deleted.info.status == "KILLED"
    assert "forgotten" in deleted.data.tags


def test_trials_that_ended_unseen_by_mlflow_are_caught_up_from_their_stored_results(tmp_path):
    """The tracker of a rerun, at the end of a Tune experiment whose trials had all ended
    before (their MLflow updates outlasted an outage): the trial whose run was never created
    gets one, the one whose run stopped at epoch 1 gets epoch 2; both get their final metrics
    and end FINISHED, from the results Tune stored for them; a finished run is left alone."""
    import json
    from types import SimpleNamespace

    import pyarrow.fs

    from orchestrator.study.config import load_study
    from orchestrator.study.mlflow_client import connect
    from orchestrator.study.tracking import StudyRun, TrialTracker

    uri = new_database(tmp_path)
    study = load_study(SMOKE, [f"mlflow.tracking_uri={uri}"])
    parent = StudyRun(connect(uri), study)
    parent.open(None, tmp_path, "")
    client = parent.client
    epochs = [{"epoch": e, "test_error": 0.9 - e / 10, "train_loss": 2.0} for e in (1, 2)]
    trials = []
    for trial_id in ("unseen", "cut", "done"):
        folder = tmp_path / trial_id
        folder.mkdir()
        (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in epochs))
        trials.append(SimpleNamespace(
            trial_id=trial_id, status="TERMINATED", path=str(folder), last_result=epochs[-1],
            config={"arch": study.feasible()[0].name, "seed": 0, "lr": 0.05},
            storage=SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())))
    for trial_id, status in (("cut", "RUNNING"), ("done", "FINISHED")):
        run = client.create_run(parent.experiment_id, tags={PARENT: parent.run_id,
                                                            "trial_id": trial_id})
        client.log_metric(run.info.run_id, "test_error", 0.8, step=1)
        if status == "FINISHED":
            client.set_terminated(run.info.run_id, status)
    done_end = client.get_run(run.info.run_id).info.end_time

    # Ended by an interruption before it reported: nothing to catch up, its run stays absent.
    silent = SimpleNamespace(trial_id="silent", status="TERMINATED", last_result={})
    tracker = TrialTracker(uri, study, parent.experiment_id, parent.run_id, layout="dp=1")
    tracker.on_experiment_end([*trials, silent])
    _, _, children = runs(uri)
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    assert sorted(by_trial) == ["cut", "done", "unseen"]
    for trial_id, steps in (("unseen", [1, 2]), ("cut", [1, 2]), ("done", [1])):
        child = by_trial[trial_id]
        history = client.get_metric_history(child.info.run_id, "test_error")
        assert [m.step for m in history] == steps, trial_id
        assert child.info.status == "FINISHED"
        assert ("final_test_error" in child.data.metrics) == (trial_id != "done")
    assert by_trial["done"].info.end_time == done_end


def test_a_storage_that_went_away_is_one_line_naming_it(tmp_path):
    from orchestrator.errors import StorageError
    from orchestrator.storage import check_still_there

    folder = tmp_path / "results" / "smoke"
    folder.mkdir(parents=True)
    check_still_there(str(folder))  # there: nothing to say
    folder.rmdir()
    with pytest.raises(StorageError) as err:
        check_still_there(str(folder))
    assert str(err.value).startswith(f"storage_path {folder} went away while the study ran")
    assert "\n" not in str(err.value) and "another --storage-path" in str(err.value)


def test_a_failing_update_is_not_an_outage(caplog):
    """Only connection failures and 5xx answers hold the outbox back; a 4xx answer or a bug in
    one update is reported at once and the updates after it are delivered."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from orchestrator.study.mlflow_client import Outbox

    delivered = []

    def fail(exc):
        def update():
            raise exc
        return update

    box = Outbox("http://127.0.0.1:1")
    box.put("run of trial a", fail(MlflowException("bad name",
                                                   error_code=INVALID_PARAMETER_VALUE)))
    box.put("metrics of trial a", fail(KeyError("run_id")))
    box.put("run of trial b", lambda: delivered.append("b"))
    assert delivered == ["b"] and not box.pending and box.down_since is None
    err = caplog.text
    assert "MLflow update run of trial a failed (MlflowException: bad name); skipped" in err
    assert "MLflow update metrics of trial a failed (KeyError: 'run_id'); skipped" in err
    box.put("epoch 1 of trial b", fail(requests.exceptions.ConnectionError("refused")))
    box.put("epoch 2 of trial b", lambda: delivered.append("b2"))
    assert delivered == ["b"] and len(box.pending) == 2 and box.down_since is not None
    assert "unreachable (ConnectionError)" in caplog.text


def test_the_end_of_a_sweep_tries_mlflow_often(caplog):
    """At the end of a sweep (drain) the held updates are tried every drain_retry_s, not every
    retry_s: delivered once MLflow answers again, within the wait."""
    from orchestrator.study.mlflow_client import Outbox

    answers = [ConnectionError("refused")] * 4 + [None]
    delivered = []

    def update():
        if answer := answers.pop(0):
            raise answer
        delivered.append("epoch 1")

    box = Outbox("http://127.0.0.1:1")
    box.retry_s, box.drain_retry_s = 1000.0, 0.01
    box.put("epoch 1", update)
    assert box.drain(wait_s=1.0) == [] and delivered == ["epoch 1"] and not answers
    assert "answers again" in caplog.text


def test_every_run_is_read_past_mlflows_first_page(tmp_path):
    """search_runs answers in pages (1,000 runs at most; a server may answer fewer): the
    tracker and the report read them all. Pages of 10 here, so that a few runs make pages
    (1,003 runs took 20-50 s to create)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.study.mlflow_client import all_runs

    class SmallPages(MlflowClient):
        def search_runs(self, *args, max_results: int = 1000, **kwargs):
            return super().search_runs(*args, max_results=min(max_results, 10), **kwargs)

    client = SmallPages(new_database(tmp_path))
    experiment = client.create_experiment("many")
    for _ in range(23):
        client.create_run(experiment)
    assert len(client.search_runs([experiment])) == 10
    assert len({run.info.run_id for run in all_runs(client, [experiment])}) == 23


def test_system_metrics_reach_the_trials_run(tmp_path):
    """A worker's sampler (CPU, memory; GPU where there is one) averages its samples between
    reports, and the tracker logs them per epoch under MLflow's system/ names."""
    from types import SimpleNamespace

    from orchestrator.cluster.system_metrics import SystemSampler
    from orchestrator.study.config import load_study
    from orchestrator.study.mlflow_client import connect
    from orchestrator.study.tracking import StudyRun, TrialTracker

    sampler = SystemSampler(interval_s=0.05)
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass  # busy: the samples see this process work
    sampler.close()
    sampled = sampler.read()
    assert not sampler.samples and not sampler.thread.is_alive()
    assert 0 <= sampled["system/cpu_utilization_percentage"] <= 100
    assert sampled["system/process_memory_rss_megabytes"] > 10
    assert 0 < sampled["system/system_memory_usage_percentage"] < 100

    uri = new_database(tmp_path)
    study = load_study(SMOKE, [f"mlflow.tracking_uri={uri}"])
    parent = StudyRun(connect(uri), study)
    parent.open(None, tmp_path, "")
    tracker = TrialTracker(uri, study, parent.experiment_id, parent.run_id, layout="dp=1")
    trial = SimpleNamespace(trial_id="t1", config={"arch": study.feasible()[0].name, "seed": 0,
                                                   "lr": 0.05})
    tracker.on_trial_start(0, [trial], trial)
    tracker.on_trial_result(0, [trial], trial, {"epoch": 1, "test_error": 0.5, **sampled})
    history = parent.client.get_metric_history(tracker.runs["t1"],
                                               "system/cpu_utilization_percentage")
    assert [(m.step, m.value) for m in history] == [
        (1, pytest.approx(sampled["system/cpu_utilization_percentage"]))]


def test_a_sweep_releases_the_placement_groups_its_job_left(ray_address):
    """What a sweep's driver does as its trials end, however they end: a placement group its
    job made and did not remove (a Ray Train worker group being made as SIGTERM arrived was
    seen to outlive its job, holding its CPUs) is removed."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from orchestrator.cluster.driver import release_placement_groups

    left = placement_group([{"CPU": 0.01}])
    ray.get(left.ready(), timeout=60)
    release_placement_groups()
    assert placement_group_table(left)["state"] == "REMOVED"


def test_a_failed_trial_is_named_and_the_rerun_trains_exactly_it(ray_address, tmp_path):
    """The Ray Train controller of a trial is killed after its first epoch, and no retry is
    allowed: the sweep names the trial in an `error:` line with what it raised, marks the parent
    run FAILED and exits non-zero, the other trial trained; the same command again trains
    that trial alone, from its checkpoint, and finishes the study."""
    from ray.util.state import list_actors

    uri, results = new_database(tmp_path), tmp_path / "results"
    args = ["--storage-path", str(results), "--tracking-uri", uri, "--set", "trials=2",
            "--set", "concurrency=1", "--set", "scheduler.type=none",
            "--set", "resources.max_failures=0", "--set", "train.epochs=5"]
    proc = start_sweep(args, ray_address, cwd=tmp_path)
    # Killed once Ray Train recorded the checkpoint (killed between its upload and its record,
    # the retry would start over: Ray Train's behaviour, not what this test is about).
    wait_for(lambda: registered_checkpoint(results / "smoke"), proc, timeout=600,
             what="the first recorded checkpoint")
    (controller,) = poll(lambda: list_actors(address=ray_address, detail=True, filters=[
        ("class_name", "=", "TrainController"), ("state", "=", "ALIVE")]),
        lambda seen: len(seen) == 1, 120, "the trial's live Ray Train controller")
    os.kill(controller.pid, signal.SIGKILL)
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode == 4, output[-3000:]
    failed = [line for line in output.splitlines() if line.startswith("error: trial ")]
    assert len(failed) == 1 and " did not train: " in failed[0], output[-3000:]
    assert "error: 1 of 2 trials did not train" in output, output[-3000:]
    _, (parent,), children = runs(uri)
    assert parent.info.status == "FAILED"
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    retried = next(c for c in children if c.info.status == "FAILED").data.tags["trial_id"]
    assert 1 <= len(checkpoints(results, retried)) < 5  # killed before its last epoch
    # The rerun: that trial goes on from its checkpoint; the finished one is untouched.
    assert len(assert_resumes_once([SMOKE, *args], uri, results, epochs=5)) == 2


def test_a_bucket_deleted_mid_study_fails_cleanly(ray_address, tmp_path):
    """The study's s3 bucket is deleted (with everything in it) while the trial trains: the sweep
    ends, without hanging, with exit 2 and one `error:` line naming the storage (without its
    credentials) and what to do; its parent run ends FAILED, no run is left RUNNING."""
    import pyarrow.fs

    from tests.servers import S3Server

    s3 = S3Server(tmp_path).start()
    uri = new_database(tmp_path)
    proc = None
    try:
        proc = start_sweep(["--storage-path", s3.uri("results"), "--tracking-uri", uri,
                            *ONE_TRIAL, "--set", "space.k=1", "--set", "train.epochs=3"],
                           ray_address, cwd=tmp_path)
        fs, _ = pyarrow.fs.FileSystem.from_uri(s3.uri(""))
        stored = pyarrow.fs.FileSelector(f"{s3.bucket}/results/smoke", recursive=True,
                                         allow_not_found=True)
        wait_for(lambda: any(f.path.endswith("/checkpoint.pt") for f in fs.get_file_info(stored)),
                 proc, timeout=600, what="the first checkpoint in the bucket")
        s3.delete_bucket()
        assert fs.get_file_info(s3.bucket).type == pyarrow.fs.FileType.NotFound
        output = proc.communicate(timeout=600)[0]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        s3.stop()
    assert proc.returncode == 2, output[-3000:]  # the user's to fix: not an internal error
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert "storage_path s3://multires/results/smoke went away" in errors[0], errors
    assert "create it again" in errors[0] and "test:test" not in output
    assert not (tmp_path / "s3:").exists()  # nothing written to a local stand-in
    _, parents, children = runs(uri)
    assert [p.info.status for p in parents] == ["FAILED"]
    assert "RUNNING" not in [c.info.status for c in children]


def test_only_a_stop_makes_trials_left_in_tunes_saved_state_an_interruption(monkeypatch):
    """Tune's saved state was seen (loaded machine) to list a trial that had failed as running:
    without a Ctrl-C or SIGTERM that state is not asked, and the failure is reported as one.
    Ctrl-C, noted before Tune's own handler runs, and SIGTERM make it an interruption."""
    import signal

    from orchestrator import errors
    from orchestrator.study import runner

    monkeypatch.setattr(runner, "left_unfinished", lambda outcome: True)  # the stale state
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        errors.sigterm_as_ctrl_c(fresh=True)
        assert not runner.stopped_early(None, ended=2, trials=2)
        assert runner.stopped_early(None, ended=1, trials=2)  # a trial that never ended
        errors.note_ctrl_c()
        errors.note_ctrl_c()  # wraps once
        signal.raise_signal(signal.SIGINT)
        assert seen == [signal.SIGINT] and runner.stopped_early(None, ended=2, trials=2)
        assert errors.interrupted_status() == errors.EXIT_INTERRUPTED
        errors.sigterm_as_ctrl_c(fresh=True)
        assert not runner.stopped_early(None, ended=2, trials=2)
        signal.raise_signal(signal.SIGTERM)  # Ctrl-C's path, exit 143
        assert seen == [signal.SIGINT] * 2 and runner.stopped_early(None, ended=2, trials=2)
        assert errors.interrupted_status() == errors.EXIT_TERMINATED
    finally:
        errors.sigterm_as_ctrl_c(fresh=True)  # the notes cleared
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
