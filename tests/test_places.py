"""The places written to: each command checks its outputs before any work (one line naming the
flag, exit 2, nothing left behind); a full disk is said as such, naming the place; a study's
results folder belongs to one sweep at a time, to one MLflow parent run, and a finished study's
command run again changes nothing. Without Ray: every case ends before Ray would start."""
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.commands.lesion import main as lesion_main
from orchestrator.commands.report import main as report_main
from orchestrator.commands.sweep import main as sweep_main
from orchestrator.commands.train import main as train_main
from tests.sweeps import made, new_database

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "search_spaces" / "smoke.yaml")
TINY = ["--dataset", "synthetic", "--depth", "8", "--k", "1", "--train-size", "128",
        "--test-size", "64", "--batch-size", "64", "--epochs", "1", "--device", "cpu"]
CSV = "depth,k,width,params,seed,test_error\n20,4,1,1074874,0,6.3\n"


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted at `folder` (as root), else the test is skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("needs root and tmpfs mounts")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()


def full(folder: Path) -> None:
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def inputs(t: Path) -> Path:
    return t / "inputs"


def a_file(t: Path) -> str:
    path = inputs(t) / "notes.txt"
    path.write_text("a file")
    return str(path)


def a_loop(t: Path) -> str:
    os.symlink("loop", inputs(t) / "loop")
    return str(inputs(t) / "loop")


def sweep(t: Path, *more: str) -> int:
    return sweep_main([SMOKE, "--storage-path", str(t / "results"),
                       "--tracking-uri", f"sqlite:///{t / 'mlflow.db'}", *more])


LONG = "x" * 300
CASES = {
    "train: checkpoint dir under a file": (
        lambda t: train_main([*TINY, "--checkpoint-dir", a_file(t) + "/ck"]),
        "notes.txt/ck: part of the path is a file, not a folder"),
    "train on two ranks: checkpoint dir under a file (before Ray)": (
        lambda t: train_main([*TINY, "--parallel", "dp=2", "--checkpoint-dir",
                              a_file(t) + "/ck"]),
        "notes.txt/ck: part of the path is a file, not a folder"),
    "train: checkpoint dir under /proc": (
        lambda t: train_main([*TINY, "--checkpoint-dir", "/proc/multires/ck"]),
        "--checkpoint-dir: /proc/multires"),
    "train: log a folder": (
        lambda t: train_main([*TINY, "--log-json", str(inputs(t))]),
        "--log-json " + "{t}/inputs is a folder; give a file"),
    "train: log name too long": (
        lambda t: train_main([*TINY, "--log-json", str(t / LONG)]),
        "a name in the path is too long"),
    "train: data dir a symlink loop": (
        lambda t: train_main([*TINY, "--dataset", "cifar10", "--data-dir", a_loop(t)]),
        "loop"),
    "sweep: storage a file": (
        lambda t: sweep(t, "--storage-path", a_file(t)),
        "storage_path: {t}/inputs/notes.txt/smoke: part of the path is a file"),
    "sweep: storage under /proc": (
        lambda t: sweep(t, "--storage-path", "/proc/multires"),
        "storage_path: /proc/multires"),
    "sweep: study name too long": (
        lambda t: sweep(t, "--set", f"name={LONG}"), "a name in the path is too long"),
    "sweep: data dir a symlink loop": (
        lambda t: sweep(t, "--set", "train.dataset=cifar10", "--data-dir", a_loop(t)),
        "--data-dir {t}/inputs/loop: a loop of symbolic links; fix the link"),
    "sweep: storage of an unsupported scheme": (
        lambda t: sweep(t, "--storage-path", "ftp://host/results"),
        "storage_path: scheme 'ftp' is not supported; give a folder, file://PATH or a URI "
        "starting with s3://, gs://, hdfs://"),
    "sweep: database in a file's folder": (
        lambda t: sweep(t, "--tracking-uri", f"sqlite:///{a_file(t)}/mlflow.db"),
        "--tracking-uri {t}/inputs/notes.txt is a file; give a folder"),
    "sweep: experiment name MLflow refuses": (
        lambda t: sweep(t, "--set", "mlflow.experiment=team/x"),
        "mlflow.experiment: MLflow refuses it (Names cannot contain '/' or ':'); choose "
        "another"),
    "sweep: a file store": (
        lambda t: sweep(t, "--tracking-uri", f"file://{t / 'inputs' / 'mlruns'}"),
        "is in maintenance mode and will not receive further updates; use sqlite:///"),
    "lesion: out an existing file (before the study)": (
        lambda t: lesion_main([str(t / "no-such.pt"), "--out", a_file(t)]),
        "--out {t}/inputs/notes.txt is a file; give a folder"),
    "report: out under /proc": (
        lambda t: report_main(["--from-csv", str(inputs(t) / "runs.csv"),
                               "--out", "/proc/multires-report"]),
        "--out: /proc/multires-report"),
}


@pytest.mark.parametrize("case", CASES)
def test_places_are_checked_before_any_work(case, tmp_path, capsys, monkeypatch):
    command, message = CASES[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("orchestrator.study.runner.start_ray", never)
    inputs(tmp_path).mkdir()
    (inputs(tmp_path) / "runs.csv").write_text(CSV)
    before = sorted(p.name for p in inputs(tmp_path).iterdir())
    assert command(tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message.format(t=tmp_path) in err[0], err
    assert len(err[0]) < 400
    # Nothing written: no results, no database, no checkpoint, no file store.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]
    assert {p.name for p in inputs(tmp_path).iterdir()} - {"notes.txt", "loop"} == set(before)


def test_a_read_only_filesystem_and_a_full_disk(tmp_path, capsys):
    """A read-only filesystem for a report; a full disk for a sweep's storage (at start) and
    for a checkpoint (at the end of epoch 1, bigger than the room left): each says so,
    naming the place."""
    csv = tmp_path / "runs.csv"
    csv.write_text(CSV)
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        assert report_main(["--from-csv", str(csv), "--out", str(ro / "report")]) == 2
        assert capsys.readouterr().err == (f"error: --out: {ro}/report is on a read-only "
                                           f"filesystem; choose a writable place\n")
    with tmpfs(tmp_path / "full", "size=64k") as disk:
        full(disk)
        assert sweep(tmp_path, "--storage-path", str(disk / "results")) == 2
        assert capsys.readouterr().err == (f"error: storage_path: no space left on {disk}/"
                                           f"results/smoke; free space there or choose another "
                                           f"place\n")
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    with tmpfs(tmp_path / "small", "size=16k") as disk:  # room for the check, not a checkpoint
        assert train_main([*TINY, "--checkpoint-dir", str(disk / "ck")]) == 2
        captured = capsys.readouterr()
        assert "epoch   1" in captured.out
        assert captured.err == (f"error: --checkpoint-dir: no space left on {disk}/ck/"
                                f"checkpoint.pt; free space there or choose another place\n")
        assert sorted(p.name for p in (disk / "ck").iterdir()) == []  # no partial checkpoint


def test_a_log_that_cannot_be_written_keeps_the_epochs_checkpoint(tmp_path, capsys):
    folder = tmp_path / "ck"
    assert train_main([*TINY, "--epochs", "2", "--log-json", "/dev/full",
                       "--checkpoint-dir", str(folder)]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("error: --log-json: no space left on /dev/full; free space there or "
                            "choose another place\n")
    import torch

    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert "epoch   2" not in captured.out  # it ends after the epoch that could not be logged


def test_undelivered_mlflow_updates_on_a_full_disk(tmp_path, monkeypatch, caplog):
    """MLflow down at the end of a sweep, and no room for the list of what it did not get: the
    disk-full line (naming the file), the list in the log; not a bug."""
    from mlflow.tracking import MlflowClient

    from orchestrator.errors import StorageError
    from orchestrator.study import mlflow_client
    from orchestrator.study.config import load_study
    from orchestrator.study.tracking import StudyRun

    monkeypatch.setattr(mlflow_client, "OUTBOXES", {})  # this test's own
    uri = new_database(tmp_path)
    study = load_study(SMOKE, ["mlflow.tracking_uri=" + uri])
    parent = StudyRun(MlflowClient(uri), study)
    results = tmp_path / "results"
    results.mkdir()
    parent.open(None, results, "name: smoke\n")

    def unreachable():
        raise ConnectionError("MLflow is down")
    mlflow_client.outbox(uri).put("trial 1 epoch 3", unreachable)
    (results / "mlflow_undelivered.txt").symlink_to("/dev/full")
    with pytest.raises(StorageError) as error:
        parent.close("FINISHED", 0)
    assert str(error.value) == (f"storage_path: no space left on {results}/mlflow_undelivered"
                                f".txt; free space there or choose another place")
    assert "2 updates were not delivered: trial 1 epoch 3; end of parent run (FINISHED)" in \
        caplog.text


def test_sigterm_is_ctrl_c_and_exits_143(tmp_path):
    """SIGTERM (ray job stop, Kubernetes, batch schedulers) takes the Ctrl-C path: the run is
    resumable and the exit status is 143. (A sweep's is in test_sweep's n0 study.)"""
    folder = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.train", *TINY, "--epochs", "50",
                             "--checkpoint-dir", str(folder)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith("epoch   1")
    while not (folder / "checkpoint.pt").exists():  # written just after the epoch's line
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err == "interrupted; continue with the same command plus --resume\n"
    assert (folder / "checkpoint.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # in-process commands restore it


# A study run before, as its results folder and MLflow database hold it, without Ray.
def finished_study(t: Path, status: str = "FINISHED"):
    from mlflow.tracking import MlflowClient

    from orchestrator.study.config import load_study
    from orchestrator.study.folder import STATE_FILE, config_hash, resolve_paths

    uri = new_database(t)
    study = resolve_paths(load_study(SMOKE, ["storage_path=" + str(t / "results"),
                                             "mlflow.tracking_uri=" + uri]))
    client = MlflowClient(uri)
    experiment = client.create_experiment("smoke")
    parent = client.create_run(experiment, run_name="smoke", tags={"study": "smoke"})
    run_id = parent.info.run_id
    client.log_metric(run_id, "best_test_error", 0.1234)
    client.log_metric(run_id, "trials_trained", 2)
    client.set_terminated(run_id, status)
    (t / "results" / "smoke").mkdir(parents=True)
    (t / "results" / "smoke" / STATE_FILE).write_text(json.dumps(
        {"parent_run_id": run_id, "config_hash": config_hash(study), "tracking_uri": uri,
         "experiment": "smoke"}))
    return client, run_id


def never(*args, **kwargs):
    raise AssertionError("Ray was started")


def test_a_finished_studys_command_again_changes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("orchestrator.study.runner.start_ray", never)
    client, run_id = finished_study(tmp_path)
    capsys.readouterr()
    before = (tmp_path / "mlflow.db").read_bytes()
    assert sweep(tmp_path) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"study smoke is finished (parent run {run_id}): 2 trials trained, "
                          f"best test error 12.34%\n")
    assert "nothing changed" in out
    assert (tmp_path / "mlflow.db").read_bytes() == before


def state_file(t: Path) -> Path:
    return t / "results" / "smoke" / "multires_study.json"


def state_holding(t: Path, **values) -> None:
    state = json.loads(state_file(t).read_text())
    state_file(t).write_text(json.dumps({**state, **values}))


def replaced(t: Path, by) -> None:
    state_file(t).unlink()
    by(state_file(t))


FIX = "; remove {t}/results/smoke to start the study again"
# What a rerun reads back of a study (its state file, its parent run's metrics), damaged.
READ_BACK = {
    "a state file replaced by a folder": (lambda t, c, r: replaced(t, Path.mkdir),
                                          "multires_study.json is a folder" + FIX),
    "a state file linked to /dev/zero": (
        lambda t, c, r: replaced(t, lambda p: p.symlink_to("/dev/zero")),
        "multires_study.json is not a regular file (a pipe, a socket or a device)" + FIX),
    "a state file that is a FIFO (never read: it would block)": (
        lambda t, c, r: replaced(t, os.mkfifo),
        "multires_study.json is not a regular file (a pipe, a socket or a device)" + FIX),
    "a state file of 20 MB": (lambda t, c, r: os.truncate(state_file(t), 20 << 20),
                              "multires_study.json is 20,971,520 bytes, more than the "
                              "16,777,216 such a file holds" + FIX),
    "a state file that is not UTF-8": (
        lambda t, c, r: state_file(t).write_bytes(b'{"parent_run_id": "\xff\xfe"}'),
        "multires_study.json is not a study's state (truncated or edited)" + FIX),
    "a state whose run id is a list": (lambda t, c, r: state_holding(t, parent_run_id=[r]),
                                       "multires_study.json is not a study's state"),
    "a state whose run id would widen a search": (
        lambda t, c, r: state_holding(t, parent_run_id=f"{r}' or '1' = '1"),
        "multires_study.json is not a study's state"),
    "a state whose hash is a number": (lambda t, c, r: state_holding(t, config_hash=12),
                                       "multires_study.json is not a study's state"),
    "a lock file that is a pipe": (
        lambda t, c, r: os.mkfifo(t / "results" / "smoke" / ".multires.lock"),
        "storage_path {t}/results/smoke/.multires.lock is not a regular file (a pipe, a socket "
        "or a device); remove it"),
    "the parent's best error NaN": (
        lambda t, c, r: c.log_metric(r, "best_test_error", float("nan"), step=1),
        "MLflow run {r}: metric best_test_error holds nan, not from 0 to 1; log the right "
        "value to it"),
    "the parent's trial count negative": (
        lambda t, c, r: c.log_metric(r, "trials_trained", -3, step=1),
        "MLflow run {r}: metric trials_trained holds -3, not a whole number from 0 to 1e+09"),
}


@pytest.mark.parametrize("case", READ_BACK)
def test_what_a_rerun_reads_back_is_checked(case, tmp_path, capsys, monkeypatch):
    """A finished study's command again, its state or its parent run damaged: one line naming
    the file or the run and the metric, exit 2, before Ray, nothing changed."""
    monkeypatch.setattr("orchestrator.study.runner.start_ray", never)
    damage, message = READ_BACK[case]
    client, run_id = finished_study(tmp_path)
    damage(tmp_path, client, run_id)
    capsys.readouterr()
    before = (tmp_path / "mlflow.db").read_bytes()
    assert sweep(tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message.format(t=tmp_path, r=run_id) in err[0], err
    assert (tmp_path / "mlflow.db").read_bytes() == before


def test_epoch_histories_read_back_from_tune_keep_only_possible_points():
    """Tune's result files are not signed: an epoch or error no run can report is left out of
    the history (a figure), never plotted or crashed on."""
    import pandas as pd

    from orchestrator.study.outputs import epoch_history

    frame = pd.DataFrame({"epoch": [1, 2, 3, 4, "x", -1, 6],
                          "test_error": [0.5, float("inf"), float("nan"), "a", 0.2, 0.3, 1.5],
                          "lr": 0.1})
    assert epoch_history(frame).values.tolist() == [[1.0, 0.5]]
    assert epoch_history(frame.drop(columns="epoch")) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_a_file_read_back_that_cannot_be_read_says_so(tmp_path, capsys):
    """A report CSV without read permission: said as a read (not "choose a place you can write
    to", the line for places written)."""
    csv = tmp_path / "runs.csv"
    csv.write_text(CSV)
    csv.chmod(0)
    assert report_main(["--from-csv", str(csv), "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err == (f"error: --from-csv {csv} cannot be read (permission "
                                       f"denied); make it readable to you, or give another file\n")


def test_a_tracking_server_that_repeats_a_page_is_an_error():
    """Runs are read past MLflow's pages by their tokens: a server that hands back a token it
    gave before is told in one line, not asked for ever."""
    from types import SimpleNamespace

    from mlflow.store.entities import PagedList

    from orchestrator.errors import TrackingError
    from orchestrator.study.mlflow_client import all_runs

    asked = []

    def search_runs(ids, filter_string, max_results, order_by, page_token):
        asked.append(page_token)
        return PagedList([SimpleNamespace(run=len(asked))], "again" if len(asked) > 1 else "b")
    client = SimpleNamespace(search_runs=search_runs, tracking_uri="http://mlflow:5000")
    with pytest.raises(TrackingError, match=r"^MLflow at http://mlflow:5000 answered the same "
                                            r"page of runs twice \(page token 'again'\)"):
        all_runs(client, ["1"])
    assert asked == [None, "b", "again"]
    pages = iter([PagedList([1], "b"), PagedList([2], None)])
    client.search_runs = lambda *args, **kwargs: next(pages)
    assert all_runs(client, ["1"]) == [1, 2]


def test_studies_started_at_once_on_a_new_database_all_reach_it(tmp_path):
    """Three commands open one new sqlite database at the same moment (studies started side by
    side on the default ./mlflow.db): each connects, none fails on the others' migration of
    it (without the lock, two of three failed in each of three rounds)."""
    go = tmp_path / "go"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opener = ("import sys, time\n"
              "from orchestrator.study.mlflow_client import connect\n"
              "print('ready', flush=True)\n"
              "while not __import__('os').path.exists(sys.argv[1]): time.sleep(0.01)\n"
              "connect(sys.argv[2])\n")
    procs = [subprocess.Popen([sys.executable, "-c", opener, str(go), uri],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 3  # each has loaded MLflow
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert made(uri)


def test_a_rerun_registers_the_best_model_once(tmp_path, capsys, monkeypatch, caplog):
    """A driver killed after registering the best model and before its parent run was marked
    FINISHED: the rerun finds the version made from that trial's run and registers none."""
    from types import SimpleNamespace

    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from orchestrator.study import mlflow_client
    from orchestrator.study.config import load_study
    from orchestrator.study.outputs import register_best_model

    monkeypatch.setattr(mlflow_client, "OUTBOXES", {})  # this test's own
    client, run_id = finished_study(tmp_path, status="KILLED")
    experiment = client.get_run(run_id).info.experiment_id
    trial = client.create_run(experiment, tags={"mlflow.parentRunId": run_id,
                                                "trial_id": "t1"}).info.run_id
    client.create_registered_model("smoke")
    client.create_model_version("smoke", f"runs:/{trial}/model", run_id=trial)
    assert train_main([*TINY, "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = load_study(SMOKE, ["storage_path=" + str(tmp_path / "results"),
                               "mlflow.tracking_uri=" + uri])
    results = [SimpleNamespace(metrics={"trial_id": "t1",
                                        CHECKPOINT_PATH_KEY: str(tmp_path / "ck")})]
    parent = SimpleNamespace(client=client, experiment_id=experiment, run_id=run_id)
    register_best_model(results, "t1", study, parent)
    assert capsys.readouterr().out == ('best model: mlflow.pytorch.load_model("models:/smoke/1") '
                                       '(registered before)\n')
    assert [str(v.version) for v in client.search_model_versions("name = 'smoke'")] == ["1"]
    # Its checkpoint damaged in the storage meanwhile: a warning, and the study ends as it is.
    (tmp_path / "ck" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    register_best_model(results, "t1", study, parent)
    captured = capsys.readouterr()
    assert captured.out == "" and "best model not registered: the checkpoint at " in caplog.text
    assert "checkpoint.pt is not a readable checkpoint" in caplog.text


def test_a_studys_parent_run_gone_or_its_database_moved(tmp_path, capsys, monkeypatch):
    """Before Ray starts: a clear error, never a new empty database or a second parent."""
    monkeypatch.setattr("orchestrator.study.runner.start_ray", never)
    client, run_id = finished_study(tmp_path, status="KILLED")
    client.delete_run(run_id)
    capsys.readouterr()
    assert sweep(tmp_path) == 2
    assert capsys.readouterr().err.startswith(
        f"error: the study's parent run {run_id} is deleted in MLflow at sqlite:///")
    (tmp_path / "mlflow.db").rename(tmp_path / "moved.db")
    assert sweep(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no MLflow database at {tmp_path}/mlflow.db, but ") and \
        f"holds a study begun there (parent run {run_id})" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_a_second_sweep_of_the_same_study_is_refused(tmp_path, capsys):
    from orchestrator.study.folder import LOCK_FILE

    folder = tmp_path / "results" / "smoke"
    folder.mkdir(parents=True)
    with open(folder / LOCK_FILE, "w") as lock:
        lock.write("4242\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert sweep(tmp_path) == 2
    assert capsys.readouterr().err == (
        f"error: study smoke is running in another process (pid 4242) on {folder}; wait for it "
        f"to end, or use another --storage-path\n")
    assert not (tmp_path / "mlflow.db").exists()


def test_report_takes_the_newest_study_run(tmp_path):
    """A later top-level run that is no study's (a notebook's, say) is not the study."""
    from mlflow.tracking import MlflowClient

    from orchestrator.study.tracking import finished_trials

    uri = new_database(tmp_path)
    client = MlflowClient(uri)
    experiment = client.create_experiment("x")
    study = client.create_run(experiment, tags={"study": "x"}).info.run_id
    child = client.create_run(experiment, tags={"mlflow.parentRunId": study, "study": "x",
                                                "architecture": "d8-k1-w1", "seed": "0",
                                                "params": "78042", "flops": "1"})
    for key, value in {"arch.depth": 8, "arch.k": 1, "arch.width": 1, "seed": 0,
                       "params": 78042, "flops": 1}.items():
        client.log_param(child.info.run_id, key, value)
    client.log_metric(child.info.run_id, "final_test_error", 0.5)
    client.create_run(experiment, run_name="notebook")
    assert finished_trials(uri, "x")[2] == study


@pytest.mark.parametrize("value, expected", [
    ("results", "{cwd}/results"), ("file:///data/results", "/data/results"),
    ("s3://bucket/results/", "s3://bucket/results"), ("gs://b/r", "gs://b/r"),
    ("hdfs://namenode:8020/r", "hdfs://namenode:8020/r")])
def test_storage_uris(value, expected, tmp_path, monkeypatch):
    from orchestrator.study.config import load_study

    monkeypatch.chdir(tmp_path)
    study = load_study(SMOKE, [f"storage_path={value}"])
    assert study.storage() == expected.format(cwd=tmp_path)
    assert study.results_place() == expected.format(cwd=tmp_path).rstrip("/") + "/smoke"


def test_a_study_on_s3_storage(ray_address, tmp_path, capsys, monkeypatch):
    """--storage-path s3://...: Tune's trials, their checkpoints and the study's own state go
    to the object store (moto's S3 server), nothing to a local folder named `s3:`; the best
    model is read back from there; the credentials in the URI are never shown; the command
    run again says the study is finished."""
    import pyarrow.fs

    from orchestrator.storage import filesystem, join, read_text
    from orchestrator.study.folder import STATE_FILE
    from tests.servers import S3Server

    monkeypatch.chdir(tmp_path)
    s3 = S3Server(tmp_path).start()
    try:
        results = s3.uri("results")
        args = [SMOKE, "--storage-path", results, "--tracking-uri",
                new_database(tmp_path), "--set", "trials=1", "--set",
                "space.depth=8", "--set", "space.k=1", "--set", "space.lr=0.05", "--set",
                "scheduler.type=none", "--set", "train.epochs=1"]
        assert sweep_main(args) == 0
        out = capsys.readouterr().out
        assert "test:test" not in out and "results: s3://multires/results/smoke\n" in out
        assert "best model: mlflow.pytorch.load_model(\"models:/smoke/1\")" in out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mlartifacts", "mlflow.db",
                                                             "moto.log"]  # no ./s3:
        state = json.loads(read_text(join(results, "smoke", STATE_FILE)))
        fs, path = filesystem(join(results, "smoke"))
        found = [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))]
        assert [p for p in found if p.endswith("/checkpoint.pt")]
        from mlflow.tracking import MlflowClient

        logged = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(
            state["parent_run_id"], "resolved_study.json", str(tmp_path / "dl"))
        assert json.loads(Path(logged).read_text())["storage_path"] == "s3://multires/results"
        # Ray's pickled state there was signed through the same layer: a pickle planted in the
        # bucket is refused before anything is unpickled, and the study is left as it was.
        from orchestrator.trust import check

        check(join(results, "smoke"))
        planted = f"{path.rstrip('/')}/searcher-state-2026-01-01_00-00-00.pkl"
        with fs.open_output_stream(planted) as f:
            f.write(b"\x80\x04N.")
        assert sweep_main(args) == 2
        assert "searcher-state-2026-01-01_00-00-00.pkl in s3://multires/results/smoke was not " \
            "written by a sweep of yours" in capsys.readouterr().err
        fs.delete_file(planted)
        assert sweep_main(args) == 0
        assert capsys.readouterr().out.startswith(
            f"study smoke is finished (parent run {state['parent_run_id']}): 1 trials trained")
    finally:
        s3.stop()


@pytest.mark.parametrize("exc, line", [
    (OSError(28, "No space left on device"), "no space left on /d/f; free space there"),
    (OSError(30, "Read-only file system", "/d/f"), "/d/f is on a read-only filesystem"),
    (RuntimeError("Symlink loop from '/d/f'"), "/d/f: a loop of symbolic links"),
    (FileNotFoundError(2, "No such file or directory", "/d/f"), None),  # a bug, maybe
    (RuntimeError("something else"), None),
])
def test_which_os_errors_are_the_places_wherever_they_come_from(exc, line):
    """What the commands' one error handler (cli.run_command) tells as a place's fault; a
    missing file outside the project's own writes stays a bug report."""
    from orchestrator.storage import os_error_line

    found = os_error_line(exc, "/d/f", anywhere=True)
    assert found == line if line is None else line in found
