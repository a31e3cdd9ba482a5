"""Bad input, one table: each case exits 2 with one line that names the problem and the fix,
leaves nothing behind (no files, no MLflow database or runs) and shows no traceback unless
--debug is given. (The study schema's own cases are in test_study.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.commands.lesion import main as lesion_main
from orchestrator.commands.report import main as report_main
from orchestrator.commands.summary import main as summary_main
from orchestrator.commands.sweep import main as sweep_main
from orchestrator.commands.train import main as train_main
from tests.conftest import write_cifar_layout
from tests.sweeps import new_database

SMOKE = (Path(__file__).parent.parent / "search_spaces" / "smoke.yaml").read_text()
IMAGEFOLDER = (Path(__file__).parent.parent / "search_spaces" / "imagefolder_cpu.yaml").read_text()
PAIRS = (Path(__file__).parent.parent / "search_spaces" / "pairs_cpu.yaml").read_text()
TINY = ["--dataset", "synthetic", "--depth", "8", "--train-size", "128", "--test-size", "64",
        "--batch-size", "64", "--epochs", "1", "--device", "cpu"]


def study(tmp: Path, text: str = SMOKE) -> str:
    path = tmp / "inputs" / "study.yaml"
    path.write_text(text)
    return str(path)


def cifar(tmp: Path, damage: str) -> str:
    folder = write_cifar_layout(tmp / "inputs" / "data", "cifar10")
    import pickle

    if damage == "missing":
        (folder / "data_batch_3").unlink()
    elif damage == "empty test split":
        record = {b"data": [], b"labels": []}
        (folder / "test_batch").write_bytes(pickle.dumps(record, protocol=2))
    elif damage == "empty arrays":
        import numpy as np

        record = {b"data": np.zeros((0, 3072), np.uint8), b"labels": np.zeros(0, np.int64)}
        (folder / "data_batch_3").write_bytes(pickle.dumps(record, protocol=2))
    elif damage == "float pixels":
        record = pickle.loads((folder / "data_batch_3").read_bytes())
        record[b"data"] = record[b"data"] / 255.0
        (folder / "data_batch_3").write_bytes(pickle.dumps(record, protocol=2))
    elif damage in ("/dev/zero", "a FIFO"):
        (folder / "data_batch_3").unlink()
        if damage == "a FIFO":
            os.mkfifo(folder / "data_batch_3")
        else:
            (folder / "data_batch_3").symlink_to("/dev/zero")
    elif damage == "labels":
        record = pickle.loads((folder / "data_batch_3").read_bytes())
        record[b"labels"][5] = 99
        (folder / "data_batch_3").write_bytes(pickle.dumps(record, protocol=2))
    else:
        (folder / "data_batch_3").write_bytes(b"\x80\x02 not a pickle")
    return str(tmp / "inputs" / "data")


def images(tmp: Path) -> str:
    """An image folder of 3 classes, 36 training and 12 validation images."""
    from tests.images import write_image_folder

    return str(write_image_folder(tmp / "inputs" / "images"))


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
    elif damage == "a test size of text":
        import torch

        state = torch.load(path, weights_only=True)
        state["config"]["test_size"] = "many"
        torch.save(state, path)
    elif damage == "metrics of text":
        import torch

        state = torch.load(path, weights_only=True)
        state["metrics"]["test_error"] = "low"
        torch.save(state, path)
    elif damage == "an epoch of text":
        import torch

        state = torch.load(path, weights_only=True)
        state["epoch"] = "one"
        torch.save(state, path)
    elif damage in ("a relative data dir", "an image folder of other classes"):
        import torch

        from tests.images import write_image_folder

        state = torch.load(path, weights_only=True)
        state["config"].update({"dataset": "cifar10", "data_dir": "data"} if damage[2] == "r"
                               else {"dataset": "imagefolder", "train_size": None,
                                     "test_size": None, "data_dir": str(write_image_folder(
                                         tmp / "inputs" / "images"))})
        torch.save(state, path)
    elif damage == "empty dict":
        import torch

        torch.save({}, path)
    elif damage == "weights of another net":
        import torch

        state = torch.load(path, weights_only=True)
        state["architecture"]["k"] = 3  # the weights are those of a k=1 net
        torch.save(state, path)
    elif damage in ("a tensor of another shape", "a bad RNG state"):
        import torch

        state = torch.load(path, weights_only=True)
        if damage == "a bad RNG state":
            state["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)
        else:
            key = next(k for k in state["model"] if k.endswith("weight"))
            state["model"][key] = torch.zeros(2, 2)
        torch.save(state, path)
    return str(folder)


def fifo(tmp: Path, name: str, link: str | None = None) -> str:
    """A named pipe (or, with `link`, a symbolic link to it) in the inputs: a reader that
    opened it would wait for a writer for ever."""
    path = tmp / "inputs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    if link is not None:
        (tmp / "inputs" / link).symlink_to(path)
        return str(tmp / "inputs" / link)
    return str(path)


def linked(tmp: Path, name: str, target: str) -> str:
    (tmp / "inputs" / name).symlink_to(target)
    return str(tmp / "inputs" / name)


def log_with(tmp: Path, line: str) -> str:
    """A real checkpoint and its --log-json file with `line` in the middle."""
    folder = checkpoint(tmp, "none")
    log = tmp / "inputs" / "log.jsonl"
    log.write_text(f'{{"kind": "epoch", "epoch": 1}}\n{line}\n{{"kind": "epoch", "epoch": 1}}\n')
    return folder


def bomb(tmp: Path) -> str:
    """A YAML alias bomb: 351 bytes that expand to 9^9 (387 million) strings."""
    lines, previous = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'], "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
        previous = name
    return study(tmp, "\n".join(lines) + "\nname: *i\n")


def truncated_state(tmp: Path) -> str:
    """A results folder whose multires_study.json was cut short by a crash."""
    folder = tmp / "inputs" / "results" / "smoke"
    folder.mkdir(parents=True)
    (folder / "multires_study.json").write_text('{"parent_run_id": "0a1b')
    return str(tmp / "inputs" / "results")


def mlflow_study(tmp: Path, damage: dict) -> str:
    """An MLflow database (in the inputs) holding a study's parent run and one finished trial
    whose params, metrics or tags are replaced by `damage` ({"param.seed": "abc", ...}; None
    leaves it out); the arguments of a report from it."""
    from mlflow.tracking import MlflowClient

    uri = new_database(tmp / "inputs")
    client = MlflowClient(uri)
    experiment = client.create_experiment("x")
    parent = client.create_run(experiment, tags={"study": "x"}).info.run_id
    values = {"param.arch.depth": "20", "param.arch.k": "4", "param.arch.width": "1",
              "param.seed": "0", "param.params": "1074874", "param.flops": "41000000",
              "metric.final_test_error": 0.063, "metric.test_error": 0.063,
              "tag.fidelity": "1.0", **damage}
    run = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
    for key, value in values.items():
        kind, name = key.split(".", 1)
        if value is not None:
            {"param": client.log_param, "metric": client.log_metric,
             "tag": client.set_tag}[kind](run, name, value)
    return ["--experiment", "x", "--tracking-uri", uri, "--out", str(tmp / "report")]


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
    # Read back: partial, corrupted, or another run's.
    "a log line that is not the run's": (
        lambda t: train_main([*TINY, "--k", "1", "--epochs", "2", "--resume", "--checkpoint-dir",
                              log_with(t, "not json"), "--log-json",
                              str(t / "inputs" / "log.jsonl")]),
        "log.jsonl, line 2: not a log line of orchestrator.train; give another --log-json"),
    "a checkpoint tensor of another shape": (
        lambda t: train_main([*TINY, "--k", "1", "--resume", "--checkpoint-dir",
                              checkpoint(t, "a tensor of another shape")]),
        "the checkpoint's state does not fit this run (RuntimeError: Error(s) in loading"),
    "a checkpoint with a bad RNG state": (
        lambda t: train_main([*TINY, "--k", "1", "--resume", "--checkpoint-dir",
                              checkpoint(t, "a bad RNG state")]),
        "the checkpoint's state does not fit this run (RuntimeError: Expected a "
        "CPUGeneratorImplState"),
    "a truncated study state": (
        lambda t: sweep_main([study(t), "--storage-path", truncated_state(t), "--tracking-uri",
                              f"sqlite:///{t / 'mlflow.db'}"]),
        "multires_study.json is not a study's state (truncated or edited); remove"),
    "an empty test split": (
        lambda t: train_main([*TINY, "--dataset", "cifar10", "--data-dir",
                              cifar(t, "empty test split")]),
        "cifar-10-batches-py/test_batch holds no images; delete it and download again"),
    "a CIFAR batch of empty arrays": (
        lambda t: train_main([*TINY, "--dataset", "cifar10", "--data-dir",
                              cifar(t, "empty arrays")]),
        "cifar-10-batches-py/data_batch_3 holds no images; delete it and download again"),
    "a CIFAR batch of pixels scaled to 0..1": (
        lambda t: train_main([*TINY, "--dataset", "cifar10", "--data-dir",
                              cifar(t, "float pixels")]),
        "data_batch_3: pixel values of float64 from 0.0 to 1.0, not whole numbers from 0 to "
        "255; replace the file"),
    "a CIFAR batch linked to /dev/zero": (
        lambda t: train_main([*TINY, "--dataset", "cifar10", "--data-dir",
                              cifar(t, "/dev/zero")]),
        "data_batch_3 is not a regular file (a pipe, a socket or a device); delete it"),
    "a CIFAR batch that is a FIFO (never read: it would block)": (
        lambda t: sweep(t, study(t), "--set", "train.dataset=cifar10", "--data-dir",
                        cifar(t, "a FIFO")),
        "data_batch_3 is not a regular file (a pipe, a socket or a device); delete it"),
    "a report CSV with inf": (
        lambda t: report_main(["--from-csv", csv(t, "depth,k,width,params,seed,test_error\n"
                                                    "20,4,1,1074874,0,inf\n"),
                               "--out", str(t / "report")]),
        "row 2, column test_error holds inf, not 0 to 100; fix the cell"),
    "a report CSV with no parameters": (
        lambda t: report_main(["--from-csv", csv(t, "depth,k,width,params,seed,test_error\n"
                                                    "20,4,1,0,0,6.3\n"),
                               "--out", str(t / "report")]),
        "row 2, column params holds 0, not 1 to 1e+15; fix the cell"),
    "a negative pair tolerance": (
        lambda t: report_main(["--from-csv", csv(t, "depth,k,width,params,seed,test_error\n"
                                                    "20,4,1,1074874,0,6.3\n"),
                               "--pair-tolerance", "-1", "--out", str(t / "report")]),
        "--pair-tolerance -1: a relative parameter gap above 0 and below 1"),
    "a key given twice in a study": (lambda t: sweep(t, study(t, SMOKE + "trials: 3\n")),
                                     "study.yaml: duplicate key 'trials' (line 20); give each "
                                     "key once"),
    "seeds: true": (lambda t: sweep(t, study(t), "--set", "seeds=true"),
                    "seeds: give a count (seeds: 3) or a list (seeds: [0, 1, 2]), not true"),
    "a seed that is not a number": (lambda t: sweep(t, study(t), "--set", "seeds=[true]"),
                                    "seeds.0: Input should be a valid integer"),
    # Sizes that would exhaust the machine: bounded at load.
    "a YAML alias bomb": (lambda t: sweep(t, bomb(t)),
                          "holds more than 100,000 values once its aliases (*name) are expanded"),
    "an alias bomb in --set": (
        lambda t: sweep(t, study(t), "--set",
                        "description=" + Path(bomb(t)).read_text().replace("\n", ", ")
                        .replace("name: *i", "z: *i").join("{}")),
        "holds more than 100,000 values once its aliases"),
    "a study file too large": (lambda t: sweep(t, study(t, SMOKE + "#" * (1 << 20) + "\n")),
                               "study.yaml is larger than 1,048,576 bytes"),
    "a hundred million seeds": (lambda t: sweep(t, study(t), "--set", "seeds=100000000",
                                                "--dry-run"),
                                "seeds: 100,000,000 seeds; at most 10,000 replicates"),
    "a seed past 2^31": (lambda t: train_main([*TINY, "--seed", "20000000000000"]),
                         "seed: Input should be less than or equal to 2147483647"),
    "a depth of two billion": (lambda t: summary_main(["--depth", "2000000000"]),
                               "depth: Input should be less than or equal to 2000"),
    "a depth of 20000": (lambda t: summary_main(["--depth", "20000"]),
                         "depth: Input should be less than or equal to 2000"),
    "k of 100000": (lambda t: summary_main(["--depth", "20", "--k", "100000"]),
                    "k: Input should be less than or equal to 64"),
    "too many residual functions": (lambda t: summary_main(["--depth", "1202", "--k", "64"]),
                                    "38,400 residual functions (blocks x k); at most 4,096"),
    "an int range of a million values": (
        lambda t: sweep(t, study(t), "--set", "space.epochs={type: int, low: 1, high: 999999}"),
        "space.epochs: 999,999 values from 1 to 999999; at most 100,000"),
    "a pair of a hundred thousand blocks": (
        lambda t: sweep(t, study(t), "--set", "pairs={deep: [[100000, 1, 1]], factors: [2]}"),
        "pairs.deep: blocks per stage must be 1 to 1000"),
    "a hundred million synthetic images": (
        lambda t: train_main([*TINY, "--train-size", "100000000"]),
        "synthetic data is generated in memory (3 KB an image): at most 1,000,000 images"),
    "a thousand-trial dry run": (lambda t: sweep(t, study(t), "--dry-run", "--dry-run-trials",
                                                 "100000"),
                                 "--dry-run-trials 100000: give 1 to 1000"),
    "a billion draws": (
        lambda t: report_main(["--from-csv", csv(t, "depth,k,width,params,seed,test_error\n"
                                                    "20,4,1,1074874,0,6.3\n"),
                               "--draws", "1000000000", "--out", str(t / "report")]),
        "--draws 1000000000: intervals need 100 to 1,000,000 draws"),
    # Rows read back from MLflow: the report CSV's checks, one line naming the run and the field.
    "a trial's error NaN in MLflow": (
        lambda t: report_main(mlflow_study(t, {"metric.final_test_error": float("nan")})),
        ": metric final_test_error (in percent) holds 'nan', not a number; a trained trial has "
        "it as a number; delete that run"),
    "a trial's error infinite in MLflow": (
        lambda t: report_main(mlflow_study(t, {"metric.final_test_error": float("inf")})),
        ": metric final_test_error (in percent) holds inf, not 0 to 100; delete that run"),
    "a trial's error negative in MLflow": (
        lambda t: report_main(mlflow_study(t, {"metric.final_test_error": -0.5})),
        ": metric final_test_error (in percent) holds -50, not 0 to 100"),
    "a trial of 0 parameters in MLflow": (
        lambda t: report_main(mlflow_study(t, {"param.params": "0"})),
        ": param params holds 0, not 1 to 1e+15"),
    "a trial without its depth in MLflow": (
        lambda t: report_main(mlflow_study(t, {"param.arch.depth": None})),
        ": param arch.depth is missing; a trained trial has it as a number"),
    "a trial's seed not a number in MLflow": (
        lambda t: report_main(mlflow_study(t, {"param.seed": "abc"})),
        ": param seed holds 'abc', not a number"),
    "a trial's depth not whole in MLflow": (
        lambda t: report_main(mlflow_study(t, {"param.arch.depth": "20.5"})),
        ": param arch.depth holds 20.5, not a whole number"),
    "a trial's top-5 error above 100% in MLflow": (
        lambda t: report_main(mlflow_study(t, {"metric.final_test_error_top5": 3.0})),
        ": metric final_test_error_top5 (in percent) holds 300, not 0 to 100"),
    "a trial's fidelity not a number in MLflow": (
        lambda t: report_main(mlflow_study(t, {"tag.fidelity": "half"})),
        ": tag fidelity holds 'half', not a share of the schedule above 0 and at most 1"),
    "an epoch's error NaN in MLflow": (
        lambda t: report_main(mlflow_study(t, {"metric.test_error": float("nan")})),
        ": metric test_error (in percent) holds 'nan', not a number"),
    "a report CSV with a fractional depth": (
        lambda t: report_main(["--from-csv", csv(t, "depth,k,width,params,seed,test_error\n"
                                                    "20.5,4,1,1074874,0,6.3\n"),
                               "--out", str(t / "report")]),
        "row 2, column depth holds 20.5, not a whole number; fix the cell"),
    # Pipes and devices in place of files read back: refused before they are opened (a pipe
    # would block the read for ever, /dev/zero never end).
    "a study file that is a pipe": (lambda t: sweep(t, fifo(t, "study.yaml")),
                                    "study.yaml is not a regular file (a pipe, a socket or a "
                                    "device); give a YAML file"),
    "a report CSV linked to a pipe": (
        lambda t: report_main(["--from-csv", fifo(t, "pipe", link="runs.csv"),
                               "--out", str(t / "report")]),
        "--from-csv {t}/inputs/runs.csv is not a regular file (a pipe, a socket or a device); "
        "give a file"),
    "a report CSV linked to /dev/zero": (
        lambda t: report_main(["--from-csv", linked(t, "runs.csv", "/dev/zero"), "--out",
                               str(t / "report")]),
        "runs.csv is not a regular file"),
    "a checkpoint that is a pipe": (
        lambda t: train_main([*TINY, "--k", "1", "--resume", "--checkpoint-dir",
                              str(Path(fifo(t, "ck/checkpoint.pt")).parent)]),
        "ck/checkpoint.pt is not a regular file (a pipe, a socket or a device); delete it to "
        "start over"),
    "a lesion of a checkpoint linked to a pipe": (
        lambda t: lesion_main([fifo(t, "pipe", link="checkpoint.pt"), "--out",
                               str(t / "lesion")]),
        "checkpoint.pt is not a regular file"),
    "a checkpoint whose epoch is text": (
        lambda t: train_main([*TINY, "--k", "1", "--resume", "--checkpoint-dir",
                              checkpoint(t, "an epoch of text")]),
        "checkpoint.pt is not a training checkpoint (its epoch holds 'one', not a number of 0 "
        "or more); delete it to start over"),
    "a checkpoint whose metrics hold text": (
        lambda t: train_main([*TINY, "--k", "1", "--resume", "--checkpoint-dir",
                              checkpoint(t, "metrics of text")]),
        "checkpoint.pt is not a training checkpoint (its metrics hold 'test_error': 'low', not "
        "a number); delete it to start over"),
    "a lesion of a checkpoint whose test size is text": (
        lambda t: lesion_main([str(Path(checkpoint(t, "a test size of text")) / "checkpoint.pt"),
                               "--out", str(t / "lesion")]),
        "checkpoint.pt: its run config lacks the dataset or seed, or holds sizes or a data dir "
        "of the wrong kind"),
    "an MLflow database that is a pipe, for a report": (
        lambda t: report_main(["--experiment", "x", "--tracking-uri",
                               f"sqlite:///{fifo(t, 'mlflow.db')}", "--out", str(t / "report")]),
        "--tracking-uri {t}/inputs/mlflow.db is not a regular file (a pipe, a socket or a "
        "device); give the path of an MLflow sqlite database"),
    "an MLflow database that is a pipe, for a sweep (before Ray)": (
        lambda t: sweep(t, study(t), "--tracking-uri", f"sqlite:///{fifo(t, 'mlflow.db')}"),
        "--tracking-uri {t}/inputs/mlflow.db is not a regular file"),
    "an MLflow database that is a folder": (
        lambda t: report_main(["--experiment", "x", "--tracking-uri",
                               f"sqlite:///{t / 'inputs'}", "--out", str(t / "report")]),
        "--tracking-uri {t}/inputs is a folder; give the path of an MLflow sqlite database"),
    "a --log-json pipe that nobody reads": (
        lambda t: train_main([*TINY, "--log-json", fifo(t, "log.jsonl")]),
        "--log-json {t}/inputs/log.jsonl is a named pipe that no process reads; start its "
        "reader first, or give a file"),
    # Every number of a study: finite, in range, a number (the rules live in the schema, so
    # these fail at load, before Ray starts).
    "an infinite learning rate": (lambda t: sweep(t, study(t), "--set", "train.lr=.inf"),
                                  "train.lr: Input should be a finite number"),
    "an infinite end of a range": (
        lambda t: sweep(t, study(t), "--set", "space.lr={type: float, low: 0.01, high: .inf}"),
        "space.lr.high: Input should be a finite number"),
    "NaN CPUs per worker": (lambda t: sweep(t, study(t), "--set",
                                            "resources.cpus_per_worker=.nan"),
                            "resources.cpus_per_worker: nan: give a number, or auto"),
    "infinite GPUs per worker": (lambda t: sweep(t, study(t), "--set",
                                                 "resources.gpus_per_worker=.inf"),
                                 "resources.gpus_per_worker: inf: give a number, or auto"),
    "infinite driver CPUs": (lambda t: sweep(t, study(t), "--set", "resources.driver_cpus=.inf"),
                             "resources.driver_cpus: Input should be a finite number"),
    "an infinite ASHA reduction factor": (
        lambda t: sweep(t, study(t), "--set", "scheduler.reduction_factor=.inf"),
        "scheduler.reduction_factor: Input should be a finite number"),
    "a negative searcher seed": (lambda t: sweep(t, study(t), "--set", "searcher.seed=-1"),
                                 "searcher.seed: Input should be greater than or equal to 0"),
    "a searcher seed past 2^31": (lambda t: sweep(t, study(t), "--set", "searcher.seed=" +
                                                  "9" * 20),
                                  "searcher.seed: Input should be less than or equal to "
                                  "2147483647"),
    "true as a number of epochs": (lambda t: sweep(t, study(t), "--set", "train.epochs=true"),
                                   "train: epochs takes a number, not true"),
    "a choice given twice": (
        lambda t: sweep(t, study(t), "--set", "space.depth={type: categorical, choices: [8, 8]}"),
        "space.depth.choices: 8 is listed twice; give each choice once"),
    "an ASHA grace period above the epochs": (
        lambda t: sweep(t, study(t), "--set", "scheduler.grace_period=5"),
        "scheduler.grace_period 5 is above train.epochs 2; lower it to at most 2"),
    "an epoch budget below one pair of trials": (
        lambda t: sweep(t, study(t, PAIRS), "--set", "budget.epochs=9"),
        "budget.epochs 9 is below one pair of trials (2 x train.epochs = 10); raise it"),
    # YAML shapes: what safe YAML holds that a study cannot be.
    "a !!python tag": (lambda t: sweep(t, study(t, SMOKE.replace(
                           "name: smoke", "name: !!python/object/apply:os.system ['echo x']"))),
                       "study.yaml: the tag !!python/object/apply:os.system is not read (line 3);"
                       " give plain values"),
    "a !!python tag in --set": (lambda t: sweep(t, study(t), "--set",
                                                "name=!!python/name:os.system"),
                                "the tag !!python/name:os.system is not read (line 1)"),
    "two YAML documents": (lambda t: sweep(t, study(t, SMOKE + "---\nname: other\n")),
                           "study.yaml: more than one YAML document (line 20); give one"),
    "a key that is not a name": (lambda t: sweep(t, study(t, SMOKE + "1: 2\n")),
                                 "study.yaml: key 1 is not a name (line 20); quote it or remove"),
    # Storage URIs of a shape no store takes.
    "a storage URI without a bucket": (lambda t: sweep(t, study(t), "--storage-path", "gs:///x"),
                                       "storage_path: 'gs:///x': no bucket (or host); give "
                                       "gs://BUCKET/PATH"),
    "a storage URI with ..": (lambda t: sweep(t, study(t), "--storage-path", "s3://b/x/../.."),
                              "a . or .. in the URI's path; give the path without them"),
    "a file URI with a host": (lambda t: sweep(t, study(t), "--storage-path", "file://host/x"),
                               "a file URI takes an absolute path: file:///PATH"),
    "a storage URI with a space": (lambda t: sweep(t, study(t), "--storage-path", "s3://b c/x"),
                                   "a space in the URI; percent-encode it"),
    # Image folders: checked before Ray starts (sizes against the folder and the batch).
    "a train size above the folder's images": (
        lambda t: train_main([*TINY, "--dataset", "imagefolder", "--data-dir",
                              images(t), "--train-size", "1000", "--data-workers", "0",
                              "--depth", "18"]),
        "train_size 1,000 is more than the 36 images imagefolder has there; lower train_size "
        "to at most 36 or leave it out"),
    "an image-folder study whose train size is above the folder's": (
        lambda t: sweep(t, study(t, IMAGEFOLDER), "--data-dir", images(t)),
        "train_size 2,000 is more than the 36 images imagefolder has there"),
    "an image-folder study smaller than one batch (before Ray)": (
        lambda t: sweep(t, study(t, IMAGEFOLDER), "--data-dir", images(t), "--set",
                        "train.train_size=null", "--set", "train.test_size=null"),
        "train_size 36 is smaller than one batch (64); raise train_size or lower batch_size"),
    "an image-folder study whose searched batch sizes outgrow it": (
        lambda t: sweep(t, study(t, IMAGEFOLDER), "--data-dir", images(t), "--set",
                        "train.train_size=null", "--set", "train.test_size=null", "--set",
                        "space.batch_size={type: categorical, choices: [16, 48]}"),
        "train_size 36 is smaller than one batch (48)"),
    "a lesion of a checkpoint whose data dir is relative": (
        lambda t: lesion_main([str(Path(checkpoint(t, "a relative data dir")) / "checkpoint.pt"),
                               "--out", str(t / "lesion")]),
        "its data dir 'data' is relative to the folder training ran in, not known here; pass "
        "--data-dir"),
    "a lesion on an image folder of other classes": (
        lambda t: lesion_main([str(Path(checkpoint(t, "an image folder of other classes")) /
                                   "checkpoint.pt"), "--out", str(t / "lesion")]),
        "images has 3 class folders, the checkpoint's net 10 classes: not the data it was "
        "trained on; pass --data-dir of that data"),
    "a long --set value that is not YAML": (
        lambda t: sweep(t, study(t), "--set", "trials=" + "[" * 100_000),
        "...(100,009 characters): nests too deeply; flatten it"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_in_one_line_and_leaves_nothing(case, tmp_path, capsys, monkeypatch):
    command, message = CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs").mkdir()
    assert command(tmp_path) == 2  # an exception escaping here would fail the test
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message.replace("{t}", str(tmp_path)) in err[0], err
    assert len(err[0]) <= 1000  # a value is quoted by a short prefix
    # Nothing besides the inputs: no results, no MLflow database, no partial checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_unreachable_cluster_and_debug_traceback(tmp_path):
    (tmp_path / "inputs").mkdir()
    path = study(tmp_path)
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}

    def sweep(results: str, *flags: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", path, "--storage-path",
                                 str(tmp_path / results), "--tracking-uri",
                                 f"sqlite:///{tmp_path / results}.db", *flags],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Both at once, each with its own places: each spends its time loading torch, Ray and MLflow.
    plain, debug = sweep("results"), sweep("debug", "--debug")
    run, traced = plain.communicate(timeout=120)[1], debug.communicate(timeout=120)[1]
    assert plain.returncode == 2
    assert run.strip() == ("error: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:1 "
                           "(ConnectionRefusedError); start it, fix the address or unset "
                           "RAY_ADDRESS")
    assert debug.returncode != 0 and "Traceback" in traced
    assert "cannot reach the Ray cluster" in traced
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("debug")) == \
        ["inputs"]


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
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    # The signal lands once torch's libraries are being mapped (the command has started loading
    # them), not after a fixed delay that a busy machine spends starting Python itself.
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:  # it has ended: the assertions below say how
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and out == ""
    assert err.startswith("interrupted; ") and err.count("\n") == 1, err


@pytest.fixture
def silent_store():
    """An S3 endpoint that takes connections and never answers (a store behind a black hole):
    its URI, and the listening socket."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    yield f"s3://bucket/results?endpoint_override=127.0.0.1:{port}&scheme=http", server
    server.close()


def test_an_unreachable_store_fails_in_one_line_within_the_bound(tmp_path, capsys, monkeypatch,
                                                                silent_store):
    """The first write to the storage is waited on for at most REMOTE_CHECK_S (pyarrow's own
    retries took 35 minutes against an unreachable gs://), before Ray starts."""
    from orchestrator import storage

    monkeypatch.setattr(storage, "REMOTE_CHECK_S", 2)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs").mkdir()
    assert sweep(tmp_path, study(tmp_path), "--storage-path", silent_store[0]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: storage_path s3://bucket/results/smoke: no answer in 2 s; check the "
                   "URI, the network and the credentials"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


@pytest.mark.slow
def test_sigterm_stops_a_sweep_waiting_on_an_unreachable_store(tmp_path, silent_store):
    """SIGTERM while the store is being tried: the sweep ends at once (143), not when the
    store's client gives up."""
    import signal

    (tmp_path / "inputs").mkdir()
    command = [sys.executable, "-m", "orchestrator.sweep", study(tmp_path), "--storage-path",
               silent_store[0], "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"})
    silent_store[1].settimeout(300)  # the sweep's imports, on a loaded machine
    silent_store[1].accept()  # the check is under way
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"


def test_a_checkpoint_write_killed_midway_leaves_the_last_whole_one(tmp_path):
    """kill -9 while torch.save writes: the checkpoint is still the previous whole one (the new
    one is written aside and renamed), the partial file is never read (a resume takes the whole
    one), and the next save clears it."""
    import torch

    from orchestrator.run.checkpoint import load_checkpoint, save_atomic

    folder = Path(checkpoint(tmp_path, "none"))
    before = torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"]
    dying = ("import os, signal, sys, torch\n"
             "from pathlib import Path\n"
             "from orchestrator.run.checkpoint import save_atomic\n"
             "def save(state, f):\n"
             "    f.write(b'partial' * 10000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
             "torch.save = save\n"
             "save_atomic({'epoch': 9}, Path(sys.argv[1]))\n")
    run = subprocess.run([sys.executable, "-c", dying, str(folder / "checkpoint.pt")],
                         timeout=120)
    assert run.returncode == -9
    assert [p.name for p in folder.glob(".checkpoint.pt.tmp-*")]  # the partial one, aside
    assert load_checkpoint(folder / "checkpoint.pt")["epoch"] == before == 1
    assert train_main([*TINY, "--k", "1", "--resume", "--checkpoint-dir", str(folder)]) == 0
    save_atomic(load_checkpoint(folder / "checkpoint.pt"), folder / "checkpoint.pt")
    assert not list(folder.glob(".checkpoint.pt.tmp-*"))  # the next save clears it


def test_a_lock_left_by_a_killed_sweep_does_not_block_the_next(tmp_path):
    """The study lock is an flock, released by the kernel when its holder dies (kill -9): the
    file it leaves (with the dead pid) is taken over."""
    from orchestrator.study.config import load_study
    from orchestrator.study.folder import LOCK_FILE, study_lock

    (tmp_path / LOCK_FILE).write_text("4194303\n")  # a pid no process has
    study = load_study(Path(__file__).parent.parent / "search_spaces" / "smoke.yaml")
    with study_lock(tmp_path, study):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
