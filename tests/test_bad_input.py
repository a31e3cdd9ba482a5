"""Bad input, one table: each case exits 2 with one line that names the problem and the fix,
leaves nothing behind (no files, no MLflow database or runs) and shows no traceback unless
--debug is given. (The study schema's own cases are in test_study.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.lesion import main as lesion_main
from orchestrator.report import main as report_main
from orchestrator.sweep import main as sweep_main
from orchestrator.train import main as train_main
from tests.conftest import write_cifar_layout

SMOKE = (Path(__file__).parent.parent / "search_spaces" / "smoke.yaml").read_text()
TINY = ["--dataset", "synthetic", "--depth", "8", "--train-size", "128", "--test-size", "64",
        "--batch-size", "64", "--epochs", "1", "--device", "cpu"]


def study(tmp: Path, text: str = SMOKE) -> str:
    path = tmp / "inputs" / "study.yaml"
    path.write_text(text)
    return str(path)


def cifar(tmp: Path, damage: str) -> str:
    folder = write_cifar_layout(tmp / "inputs" / "data", "cifar10")
    if damage == "missing":
        (folder / "data_batch_3").unlink()
    elif damage == "labels":
        import pickle

        record = pickle.loads((folder / "data_batch_3").read_bytes())
        record[b"labels"][5] = 99
        (folder / "data_batch_3").write_bytes(pickle.dumps(record, protocol=2))
    else:
        (folder / "data_batch_3").write_bytes(b"\x80\x02 not a pickle")
    return str(tmp / "inputs" / "data")


def binary(tmp: Path) -> str:
    path = tmp / "inputs" / "study.bin"
    path.write_bytes(bytes(range(256)) * 4)
    return str(path)


def csv(tmp: Path, text: str, name: str = "runs.csv") -> str:
    path = tmp / "inputs" / name
    path.write_text(text)
    return str(path)


def checkpoint(tmp: Path, damage: str) -> str:
    """A real checkpoint from one epoch of training, then damaged."""
    folder = tmp / "inputs" / "ckpt"
    assert train_main([*TINY, "--k", "1", "--checkpoint-dir", str(folder)]) == 0
    path = folder / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty dict":
        import torch

        torch.save({}, path)
    elif damage == "weights of another net":
        import torch

        state = torch.load(path, weights_only=True)
        state["architecture"]["k"] = 3  # the weights are those of a k=1 net
        torch.save(state, path)
    return str(folder)


def sweep(tmp, path, *more):
    return sweep_main([path, "--storage-path", str(tmp / "results"),
                       "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *more])


CASES = {
    "malformed YAML": (lambda t: sweep(t, study(t, "name: x\nspace: {depth: [8,\n")),
                       "not valid YAML (line 3); fix the syntax"),
    "YAML not a mapping": (lambda t: sweep(t, study(t, "- depth\n- k\n")),
                           "expected a mapping of keys to values"),
    "unknown key": (lambda t: sweep(t, study(t, SMOKE + "colour: red\n")),
                    "colour: unknown key"),
    "wrong type": (lambda t: sweep(t, study(t), "--set", "trials=many"),
                   "trials: Input should be a valid integer"),
    "impossible architecture": (lambda t: sweep(t, study(t), "--set", "space.depth=21"),
                                "depth must be 6n+2"),
    "impossible mesh": (lambda t: sweep(t, study(t), "--set", "space.k=1",
                                        "--set", "parallel.bp=2"),
                        "parallel.bp=2 exceeds k=1"),
    "missing dataset file": (lambda t: sweep(t, study(t), "--set", "train.dataset=cifar10",
                                             "--data-dir", cifar(t, "missing")),
                             "is incomplete: missing data_batch_3; download cifar10 again"),
    "corrupt dataset file": (lambda t: sweep(t, study(t), "--set", "train.dataset=cifar10",
                                             "--data-dir", cifar(t, "corrupt")),
                             "data_batch_3 is not a readable CIFAR batch"),
    "labels outside the classes": (lambda t: train_main([*TINY, "--dataset", "cifar10",
                                                         "--data-dir", cifar(t, "labels")]),
                                   "data_batch_3: labels from 0 to 99, not 0..9; download "
                                   "cifar10 again"),
    "a report CSV with an empty cell": (
        lambda t: report_main(["--from-csv", csv(t, "depth,k,width,params,seed,test_error\n"
                                                    "20,4,1,1074874,0,\n"),
                               "--out", str(t / "report")]),
        "row 2, column test_error is empty; give every cell a number"),
    "a checkpoint of the wrong structure": (
        lambda t: train_main([*TINY, "--k", "1", "--resume", "--checkpoint-dir",
                              checkpoint(t, "empty dict")]),
        "checkpoint.pt is not a training checkpoint (it lacks model, momentum, scheduler"),
    "an --set value that is not YAML": (lambda t: sweep(t, study(t), "--set", "trials=[1,"),
                                        "--set trials=[1,: the value is not valid YAML"),
    "a folder as the study": (lambda t: sweep(t, str(t / "inputs")),
                              "inputs is a folder; give the YAML file in it"),
    "a binary file as the study": (lambda t: sweep(t, binary(t)),
                                   "study.bin is not a text file; give a YAML file"),
    "an absurd train size": (lambda t: train_main([*TINY, "--train-size", str(10**20)]),
                             "train_size: Input should be less than or equal to 1000000000"),
    "a report into a file": (
        lambda t: report_main(["--from-csv", csv(t, "depth,k,width,params,seed,test_error\n"
                                                    "20,4,1,1074874,0,6.3\n"),
                               "--out", csv(t, "not a folder", "notes.txt")]),
        "notes.txt is a file; give a folder"),
    "unknown tracking scheme": (lambda t: sweep(t, study(t), "--tracking-uri", "foo://x"),
                                "unknown scheme 'foo'; use sqlite:///PATH/mlflow.db"),
    "truncated checkpoint": (lambda t: train_main([*TINY, "--k", "1", "--resume",
                                                   "--checkpoint-dir",
                                                   checkpoint(t, "truncated")]),
                             "checkpoint.pt is not a readable checkpoint"),
    "corrupt checkpoint for a lesion": (
        lambda t: lesion_main([str(Path(checkpoint(t, "garbage")) / "checkpoint.pt"),
                               "--out", str(t / "lesion")]),
        "checkpoint.pt is not a readable checkpoint"),
    "a lesion of weights that do not match their architecture": (
        lambda t: lesion_main([str(Path(checkpoint(t, "weights of another net")) /
                                   "checkpoint.pt"), "--out", str(t / "lesion")]),
        "its model does not match its architecture (RuntimeError: Error(s) in loading"),
    "checkpoint of another architecture": (
        lambda t: train_main([*TINY, "--k", "2", "--epochs", "2", "--resume",
                              "--checkpoint-dir", checkpoint(t, "none")]),
        "the checkpoint holds a different architecture"),
    "report without a database": (
        lambda t: report_main(["--experiment", "nope", "--out", str(t / "report")]),
        "no MLflow database at"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_in_one_line_and_leaves_nothing(case, tmp_path, capsys, monkeypatch):
    command, message = CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs").mkdir()
    assert command(tmp_path) == 2  # an exception escaping here would fail the test
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    # Nothing besides the inputs: no results, no MLflow database, no partial checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_unreachable_cluster_and_debug_traceback(tmp_path):
    (tmp_path / "inputs").mkdir()
    path = study(tmp_path)
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    command = [sys.executable, "-m", "orchestrator.sweep", path, "--storage-path",
               str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == ("error: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:1 "
                                  "(ConnectionRefusedError); start it, fix the address or unset "
                                  "RAY_ADDRESS")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]
    debug = subprocess.run([*command, "--debug"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "cannot reach the Ray cluster" in debug.stderr


@pytest.mark.parametrize("command", [
    ["orchestrator.sweep", "search_spaces/smoke.yaml", "--dry-run"],
    ["orchestrator.train", "--dataset", "synthetic", "--depth", "8", "--epochs", "1"],
])
def test_ctrl_c_while_the_libraries_load_ends_in_one_line(command):
    """A command imports torch, Ray and MLflow after it starts: Ctrl-C in those first seconds
    is an interruption like any other, not a traceback."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    time.sleep(0.5)  # the first imports take seconds
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and out == ""
    assert err.startswith("interrupted; ") and err.count("\n") == 1, err
