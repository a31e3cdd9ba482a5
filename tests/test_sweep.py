"""The sweep end to end on a real local Ray instance (one for the whole test run) and a real
MLflow database, read back after the run."""
import signal
from pathlib import Path

import pytest

from models.multi_resnet import Architecture
from models.complexity import summarize
from orchestrator.commands.sweep import main as sweep_main
from tests.sweeps import PARENT, SMOKE, checkpoints, new_database, runs, start_sweep


def assert_best_model_loads(uri: str, name: str, children) -> None:
    """The best trial's network, registered under the study's name, loads as a plain
    nn.Module and gives its run's final test error on the study's test split."""
    import mlflow.pytorch
    import torch

    from orchestrator.run.data import Batches, load_dataset

    mlflow.set_tracking_uri(uri)
    version = mlflow.MlflowClient(uri).get_model_version(name, "1")
    (run,) = [c for c in children if c.info.run_id == version.run_id]
    best = min(c.data.metrics["best_test_error"] for c in children
               if "best_test_error" in c.data.metrics)
    assert run.data.metrics["best_test_error"] == best
    model = mlflow.pytorch.load_model(f"models:/{name}/1")
    assert isinstance(model, torch.nn.Module)
    _, test = load_dataset("synthetic", None, 256, 128, seed=int(run.data.params["seed"]))
    wrong = sum((model(x).argmax(1) != y).sum().item()
                for x, y in Batches(test, "synthetic", 64, "cpu", train=False).epoch(0))
    # The trial evaluated under its precision (bf16 where the CPU has it), this in fp32.
    assert abs(wrong / len(test) - run.data.metrics["final_test_error"]) <= 2 / len(test)


def test_smoke_study_end_to_end(ray_address, tmp_path):
    """The smoke study as a user runs it (its own driver process): a console that reads like
    the study (a start line, a line per trial, the summary: under 60 lines), Ray's own output
    in the results folder's ray.log; every run, metric and artifact in MLflow; the best model
    registered and loadable."""
    # A parameter budget that the depth-14 nets (172,506 and 343,674) exceed: never sampled.
    proc = start_sweep(["--set", "budget.max_params=160000", "--set", "mlflow.log_checkpoint=true"],
                       ray_address, cwd=tmp_path)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert len(lines) < 60, out
    results = tmp_path / "results" / "smoke"
    assert lines[0].startswith("study smoke: up to 4 trials, 2 at a time, each 1 worker x 0.9 "
                               "CPU; MLflow: sqlite:///") and f"results: {results}" in lines[0]
    assert sum(line.startswith(("done ", "stopped ")) for line in lines) == 4
    assert "best:" in out and str(results) in out
    assert 'best model: mlflow.pytorch.load_model("models:/smoke/1")' in out
    for noise in ("pid=", "core_worker", "Configuration for experiment", "TensorBoard"):
        assert noise not in out
    ray_log = (results / "ray.log").read_text()
    assert "RayTrainWorker" in ray_log and "TrainController" in ray_log

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default: mlflow.db in the working dir
    client, parents, children = runs(uri)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags[PARENT] for c in children} == {parent.info.run_id}
    assert parent.data.metrics["trials_trained"] == 4
    assert parent.data.params["architectures_in_budget"] == "2"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"study.yaml", "resolved_study.json", "summary.csv", "best.json",
            "architectures.csv"} <= artifacts
    listed = Path(client.download_artifacts(parent.info.run_id, "architectures.csv",
                                            str(tmp_path))).read_text()
    assert "d14-k1-w1,172506,172,506 parameters > max_params 160,000" in listed

    assert len({child.info.run_name for child in children}) == len(children)
    assert_best_model_loads(uri, "smoke", children)
    # The model is the study's: in its experiment, its files beside the database.
    (model,) = client.search_logged_models([parent.info.experiment_id])
    assert model.name == "model" and not (tmp_path / "mlruns").exists()
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert tags["architecture"].startswith("d8-")  # the depth-14 nets are outside
        assert child.info.status in ("FINISHED", "KILLED")  # KILLED: stopped early by ASHA
        arch = Architecture(depth=int(params["arch.depth"]), k=int(params["arch.k"]))
        assert int(tags["params"]) == summarize(arch)["params"] == int(params["params"])
        assert child.info.run_name == f"{arch.name}-s0-lr{float(params['lr']):.3g}"
        assert tags["git_commit"] and tags["version.torch"] and tags["parallel_layout"]
        for key in ("train_loss", "train_error", "test_error", "lr", "images_per_s",
                    "epoch_time_s"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert steps == list(range(1, len(steps) + 1)) and steps, key
        if child.info.status == "FINISHED":
            assert len(client.get_metric_history(child.info.run_id, "test_error")) == 2
            assert "final_test_error" in child.data.metrics
            logged = [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")]
            assert logged == ["checkpoint/checkpoint.pt"]
    # Checkpoints landed in the results folder.
    assert list((tmp_path / "results" / "smoke").glob("train-*/checkpoint_*/checkpoint.pt"))


def pair_study(tmp_path: Path, **changes) -> Path:
    """Two matched pairs (pre-resnet-14 / multi-resnet-8 and pre-resnet-26 / multi-resnet-14,
    k=2) on synthetic data, one epoch, with the n0 searcher: one seed each first, two at most."""
    import yaml

    study = yaml.safe_load(Path(SMOKE).read_text())
    study.update(name="pairs", space={"lr": 0.05}, seeds=2, trials=12,
                 pairs={"deep": [[2, 2, 2], [4, 4, 4]], "factors": [2]},
                 searcher={"sampler": "n0"}, n0={"min_seeds": 1, "target_width": 0.01},
                 # no third pair (blocks 6,6,6, 561k) from the ladder: two pairs keep it short
                 budget={"max_params": 400_000},
                 scheduler={"type": "none"}, **changes)
    study["train"]["epochs"] = 1
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_trials_on_a_data_parallel_mesh_one_diverging(ray_address, tmp_path):
    """`parallel:` in a study sets each trial's Ray Train workers (two ranks, dp=2); a trial
    whose loss becomes non-finite fails with that reason, and the sweep goes on. Ctrl-C
    belongs to the caller again afterwards. The storage is given as a file:// URI: the same
    folder."""
    uri = new_database(tmp_path)
    ctrl_c = signal.getsignal(signal.SIGINT)
    assert sweep_main([SMOKE, "--storage-path", (tmp_path / "results").as_uri(),
                       "--tracking-uri", uri,
                       "--set", "space.depth=8", "--set", "space.k=1", "--set",
                       "space.lr={type: categorical, choices: [0.05, 1.0e+8]}",
                       "--set", "searcher.sampler=grid", "--set", "scheduler.type=none",
                       "--set", "train.epochs=1", "--set", "parallel.dp=2"]) == 0
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # not Tune's handler, left behind
    client, parents, children = runs(uri)
    status = {c.data.params["lr"]: c for c in children}
    trained, failed = status["0.05"], status["100000000.0"]
    assert trained.info.status == "FINISHED"
    assert trained.data.tags["parallel_layout"].startswith("dp=2,pp=1,bp=1")
    assert len(client.get_metric_history(trained.info.run_id, "test_error")) == 1
    assert failed.info.status == "FAILED"
    assert "loss became non-finite at step" in failed.data.tags["failure"]
    assert parents[0].info.status == "FINISHED"
    assert checkpoints(tmp_path / "results", trained.data.tags["trial_id"])
    assert (tmp_path / "results" / "smoke" / "multires_study.json").is_file()


@pytest.mark.parametrize("uri, message", [
    ("foo://bar", "unknown scheme 'foo'"),
    ("http://127.0.0.1:9", "MLflow at http://127.0.0.1:9 cannot be used"),
])
def test_unusable_tracking_server_fails_before_training(ray_address, tmp_path, capsys, uri,
                                                        message):
    assert sweep_main([SMOKE, "--storage-path", str(tmp_path / "results"),
                       "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_two_studies_side_by_side_each_keep_to_their_own_local_ray(tmp_path):
    """Two sweeps started at once on one machine, neither given RAY_ADDRESS (and the test run's
    own Ray instance may be a third), tracked in one new MLflow database: each starts its own
    local Ray and every process of it (Tune, Ray Train, Train's placement-group cleaner)
    reaches that one; both finish, every trial trained once, in its own study and folder.
    (Left trains two trials one at a time, the case that reused trial processes would break;
    right one, beside it.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # As a loaded machine makes it: a trial process that Tune would reuse has not ended its
    # last trial by the time the next one comes (Tune waits 2 s, here none): a study that
    # reused trial processes would drop that trial.
    env["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = "0"
    trials = {"left": 2, "right": 1}
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sweep", SMOKE, "--storage-path", str(tmp_path / name),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--set", f"name={name}",
         "--set", f"trials={trials[name]}", "--set", "concurrency=1", "--set",
         "scheduler.type=none", "--set", "train.epochs=1"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for name in trials}
    outputs = {name: proc.communicate(timeout=900)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][-3000:]
        client, parents, children = runs(f"sqlite:///{tmp_path / 'mlflow.db'}", name)
        assert [p.info.status for p in parents] == ["FINISHED"]
        assert [c.info.status for c in children] == ["FINISHED"] * trials[name]
        ids = {c.data.tags["trial_id"] for c in children}
        assert len(ids) == trials[name]
        for child in children:
            history = client.get_metric_history(child.info.run_id, "test_error")
            assert [m.step for m in history] == [1]
        # Ray Train's runs of this study, and no other's, in its folder.
        assert {p.name for p in (tmp_path / name / name).glob("train-*")} == {
            f"train-{t}" for t in ids}
        log = (tmp_path / name / name / "ray.log").read_text()
        assert "Found multiple active Ray instances" not in log, name
