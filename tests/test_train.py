"""Single-process training: learning, exact resume, determinism, logs and clear errors."""
import json

import pytest
import torch

from orchestrator.results import CHECKPOINT_FILE
from orchestrator.run.checkpoint import load_checkpoint
from orchestrator.run.config import TrainConfig
from orchestrator.run.loop import train_loop
from orchestrator.run.session import LocalSession
from orchestrator.commands.train import main as train_main

TINY = dict(dataset="synthetic", architecture=dict(depth=8, k=2), train_size=256,
            test_size=64, batch_size=64, epochs=3, device="cpu")


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_training_lowers_the_loss_and_logs_json(tmp_path):
    log = tmp_path / "log.jsonl"
    cfg = tiny(epochs=4, train_size=512, lr=0.05, log_json=str(log), log_every=1)
    session = LocalSession(cfg, interactive=False, echo=False)
    final = train_loop(cfg, session)
    session.close()
    records = read_log(log)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == 4 * 8 and [r["step"] for r in steps] == list(range(1, 33))
    assert set(steps[0]) == {"kind", "step", "epoch", "loss", "lr"}
    assert set(epochs[0]) == {"kind", "epoch", "train_loss", "train_error", "test_error",
                              "test_error_top5", "lr", "images_per_s", "epoch_time_s",
                              "data_time_s", "step_time_s"}
    assert all(0 <= r["test_error_top5"] <= r["test_error"] for r in epochs)
    # Untrained, the loss stays at ln(10) = 2.30 and the error at chance (0.9).
    assert epochs[-1]["train_loss"] < 0.85 * epochs[0]["train_loss"]
    assert final["test_error"] < 0.75
    # lr x0.1 at 50% and 75% of the steps.
    assert steps[15]["lr"] == pytest.approx(0.05) and steps[16]["lr"] == pytest.approx(0.005)
    assert steps[24]["lr"] == pytest.approx(0.0005)


def final_weights(cfg: TrainConfig) -> dict:
    train_loop(cfg, LocalSession(cfg, interactive=False, echo=False))
    return load_checkpoint(cfg.checkpoint_dir and __import__("pathlib").Path(cfg.checkpoint_dir)
                           / CHECKPOINT_FILE)


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    whole = final_weights(tiny(checkpoint_dir=str(tmp_path / "whole")))

    cfg = tiny(checkpoint_dir=str(tmp_path / "cut"))
    session = LocalSession(cfg, interactive=False, echo=False)
    report = session.report

    def report_then_stop(metrics, state):
        report(metrics, state)
        if metrics["epoch"] == 2:
            raise Interrupt

    session.report = report_then_stop
    with pytest.raises(Interrupt):
        train_loop(cfg, session)
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)["epoch"] == 2
    resumed = final_weights(tiny(checkpoint_dir=str(tmp_path / "cut"), resume=True))

    assert resumed["epoch"] == whole["epoch"] == 3
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert resumed["metrics"]["test_error"] == whole["metrics"]["test_error"]


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = final_weights(tiny(epochs=1, checkpoint_dir=str(tmp_path / "a")))
    b = final_weights(tiny(epochs=1, checkpoint_dir=str(tmp_path / "b")))
    c = final_weights(tiny(epochs=1, seed=1, checkpoint_dir=str(tmp_path / "c")))
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    assert not torch.equal(a["model"]["stem.weight"], c["model"]["stem.weight"])


def test_steps_limit_and_fused_execution(tmp_path):
    log = tmp_path / "log.jsonl"
    cfg = tiny(steps=6, execution="fused", log_json=str(log), log_every=1)
    final = train_loop(cfg, LocalSession(cfg, interactive=False, echo=False))
    steps = [r for r in read_log(log) if r["kind"] == "step"]
    assert len(steps) == 6 and final["epoch"] == 2 and final["step"] == 6


def test_cli_trains_and_resumes(tmp_path, capsys, monkeypatch):
    """Ctrl-C after epoch 2 of 3 (a checkpoint exists: the advice is --resume), then the same
    run from a YAML file with --resume; the JSON log keeps one line per step."""
    args = ["--dataset", "synthetic", "--depth", "8", "--k", "2", "--train-size", "128",
            "--test-size", "32", "--batch-size", "32", "--epochs", "3", "--device", "cpu",
            "--checkpoint-dir", str(tmp_path / "ck"), "--log-json", str(tmp_path / "log.jsonl"),
            "--log-every", "1"]
    report = LocalSession.report

    def report_then_interrupt(self, metrics, state):
        report(self, metrics, state)
        if metrics["epoch"] == 2:  # a step of epoch 3 is logged, then Ctrl-C
            self.log_step({"kind": "step", "step": 9, "epoch": 3, "loss": 0.0, "lr": 0.1})
            raise KeyboardInterrupt

    monkeypatch.setattr(LocalSession, "report", report_then_interrupt)
    assert train_main(args) == 130
    captured = capsys.readouterr()
    assert "epoch   2" in captured.out and "continue with the same command plus --resume" \
        in captured.err
    monkeypatch.setattr(LocalSession, "report", report)
    config = tmp_path / "run.yaml"
    config.write_text("dataset: synthetic\narchitecture: {depth: 8, k: 2}\nepochs: 3\n"
                      "train_size: 128\ntest_size: 32\nbatch_size: 32\ndevice: cpu\n"
                      "log_every: 1\n")
    assert train_main(["--config", str(config), "--checkpoint-dir", str(tmp_path / "ck"),
                       "--log-json", str(tmp_path / "log.jsonl"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "epoch   3" in out and "epoch   1" not in out and "done: final test error" in out
    steps = [r["step"] for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "step"]
    assert steps == list(range(1, 13))  # the line logged after the checkpoint is not kept


def test_a_log_line_torn_by_a_crash_is_dropped_on_resume(tmp_path, monkeypatch):
    """A crash mid-write leaves a partial last line: the resume drops it and continues the
    log, every step once."""
    args = ["--dataset", "synthetic", "--depth", "8", "--train-size", "64", "--test-size", "16",
            "--batch-size", "32", "--epochs", "2", "--device", "cpu", "--log-every", "1",
            "--checkpoint-dir", str(tmp_path / "ck"), "--log-json", str(tmp_path / "log.jsonl")]
    report = LocalSession.report

    def report_then_crash_mid_line(self, metrics, state):
        report(self, metrics, state)
        self.log.write('{"kind": "step", "step": 3, "epoch": 2, "lo')
        self.log.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalSession, "report", report_then_crash_mid_line)
    assert train_main(args) == 130
    monkeypatch.setattr(LocalSession, "report", report)
    assert train_main([*args, "--resume"]) == 0
    records = read_log(tmp_path / "log.jsonl")
    assert [(r["kind"], r["step"] if r["kind"] == "step" else r["epoch"]) for r in records] == [
        ("step", 1), ("step", 2), ("epoch", 1), ("step", 3), ("step", 4), ("epoch", 2)]


def test_interrupted_before_any_checkpoint_says_so(tmp_path, capsys, monkeypatch):

    def interrupt(cfg, session):
        raise KeyboardInterrupt

    monkeypatch.setattr("orchestrator.run.loop.train_loop", interrupt)
    assert train_main(["--dataset", "synthetic", "--depth", "8", "--checkpoint-dir",
                       str(tmp_path / "ck")]) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was written yet" in err and "--resume" not in err


def test_a_new_run_never_replaces_an_earlier_one(tmp_path, capsys):
    """Without --resume an existing checkpoint or log is refused before anything is written;
    with --resume every key that changes the result must match."""
    base = ["--dataset", "synthetic", "--depth", "8", "--train-size", "64", "--test-size", "16",
            "--batch-size", "32", "--epochs", "2", "--device", "cpu"]
    ck, log = tmp_path / "ck", tmp_path / "l.jsonl"
    assert train_main(base + ["--checkpoint-dir", str(ck), "--log-json", str(log)]) == 0
    saved, logged = (ck / CHECKPOINT_FILE).read_bytes(), log.read_text()
    capsys.readouterr()
    assert train_main(base + ["--epochs", "1", "--checkpoint-dir", str(ck)]) == 2
    assert "checkpoint.pt exists; pass --resume to continue that run, or choose another " \
        "--checkpoint-dir" in capsys.readouterr().err
    assert train_main(base + ["--log-json", str(log), "--train-size", "1"]) == 2  # also bad data
    assert "l.jsonl exists; pass --resume to continue its run" in capsys.readouterr().err
    assert (ck / CHECKPOINT_FILE).read_bytes() == saved and log.read_text() == logged
    with open(log, "a") as f:  # a line past the checkpoint: a resume would train it again
        f.write('{"kind": "step", "step": 99, "epoch": 3, "loss": 1.0, "lr": 0.1}\n')
    logged = log.read_text()
    assert train_main(base + ["--checkpoint-dir", str(ck), "--log-json", str(log), "--resume",
                              "--lr", "0.5", "--seed", "7", "--batch-size", "16"]) == 2
    assert ("the checkpoint was trained with batch_size=32, lr=0.1, seed=0, this run asks for "
            "batch_size=16, lr=0.5, seed=7; resume with the checkpoint's values or start a "
            "fresh --checkpoint-dir") in capsys.readouterr().err
    assert train_main(base + ["--checkpoint-dir", str(ck), "--log-json", str(log), "--resume",
                              "--k", "2", "--epochs", "1"]) == 2
    assert "different architecture" in capsys.readouterr().err
    # A refused resume (even one whose checkpoint is older than the log) cuts no log line.
    assert (ck / CHECKPOINT_FILE).read_bytes() == saved and log.read_text() == logged
    (tmp_path / "notes.txt").write_text("a file")
    assert train_main(base + ["--checkpoint-dir", str(tmp_path / "notes.txt" / "ck")]) == 2
    captured = capsys.readouterr()
    assert "notes.txt/ck: part of the path is a file, not a folder" in captured.err
    assert "epoch" not in captured.out  # refused before the first epoch


@pytest.mark.parametrize("args, message", [
    (["--depth", "21"], r"depth must be 6n\+2"),
    (["--dataset", "synthetic", "--depth", "8", "--resume"], "resume needs checkpoint_dir"),
    (["--depth", "8", "--k", "0", "--dataset", "synthetic"], "architecture.k"),
    (["--dataset", "synthetic", "--depth", "8", "--train-size", "10"], "smaller than one batch"),
    (["--dataset", "synthetic", "--depth", "8", "--lr", "-1"], "lr: Input should be greater"),
])
def test_bad_input_is_one_clear_line(args, message, capsys):
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_bad_yaml_and_unknown_keys(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    assert train_main(["--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("epochz: 3\n")
    assert train_main(["--config", str(bad)]) == 2
    assert "epochz: unknown key" in capsys.readouterr().err


def test_missing_dataset_offline(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def offline(root, **kwargs):  # as torchvision does: the folder first, then the download
        __import__("pathlib").Path(root).mkdir(parents=True)
        raise OSError("offline")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    data = tmp_path / "new" / "data"
    assert train_main(["--depth", "8", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "could not be downloaded" in err and str(data) in err
    assert not (tmp_path / "new").exists()  # no empty folders left behind


def test_checkpoint_errors(tmp_path, capsys):
    ck = tmp_path / "ck"
    base = ["--dataset", "synthetic", "--train-size", "64", "--test-size", "16", "--batch-size",
            "32", "--epochs", "1", "--device", "cpu", "--checkpoint-dir", str(ck)]
    assert train_main(base + ["--depth", "8"]) == 0
    assert train_main(base + ["--depth", "14", "--resume"]) == 2
    assert "different architecture" in capsys.readouterr().err
    data = (ck / CHECKPOINT_FILE).read_bytes()
    (ck / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])  # truncated
    assert train_main(base + ["--depth", "8", "--resume"]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert train_main(base + ["--depth", "8", "--resume", "--checkpoint-dir",
                              str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not list(ck.glob(".*tmp*"))  # no partial files left behind


def test_real_cifar10_learns(cifar10_dir, tmp_path):
    """A few hundred steps on real CIFAR-10 bring test error well below chance (90%)."""
    cfg = TrainConfig(architecture=dict(depth=8, k=2), dataset="cifar10",
                      data_dir=str(cifar10_dir), train_size=20_000, test_size=2000, steps=300,
                      batch_size=128, lr=0.1, device="cpu", log_json=str(tmp_path / "l.jsonl"))
    final = train_loop(cfg, LocalSession(cfg, interactive=False, echo=False))
    assert final["test_error"] < 0.55, final


def test_a_save_clears_what_a_killed_writer_left(tmp_path):
    """A writer SIGKILLed mid-save leaves its temporary file; the next save removes it (the
    checkpoint itself is only ever replaced by a complete, fsynced file)."""
    from orchestrator.run.checkpoint import save_atomic

    stale = tmp_path / f".{CHECKPOINT_FILE}.tmp-99999"
    stale.write_bytes(b"half a checkpoint")
    save_atomic({"epoch": 1}, tmp_path / CHECKPOINT_FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True) == {"epoch": 1}


def test_every_command_takes_debug():
    from orchestrator.commands.summary import main as summary_main

    assert summary_main(["--depth", "20", "--k", "4", "--debug"]) == 0


MB = 2**20


@pytest.mark.parametrize("every, epochs, size, since, write, due", [
    (1, 5, MB, 0.1, 0.01, True),
    (2, 5, MB, 0.1, 0.01, False),       # epoch 3 of 5, every 2: no
    (3, 5, MB, 9e9, 0.01, True),        # epoch 3 of 5, every 3: yes
    (4, 3, MB, 0.0, 9e9, True),         # the last epoch always has one
    ("auto", 5, 8 * MB, 0.1, 30.0, True),   # small (a thin net): every epoch, whatever it cost
    ("auto", 5, 555 * MB, 0.5, None, True),  # nothing written by this process yet
    ("auto", 5, 555 * MB, 20.0, 1.0, True),  # 5% of 20 s
    ("auto", 5, 555 * MB, 10.0, 1.0, False),  # 10%: wait
    ("auto", 5, 555 * MB, 120.0, 30.0, True),  # expensive, but two minutes have passed
    ("auto", 5, 555 * MB, 119.0, 30.0, False),
])
def test_checkpoint_schedule(every, epochs, size, since, write, due):
    from orchestrator.run.checkpoint import checkpoint_due

    assert checkpoint_due(every, 3, epochs, size, since, write) is due


def test_resume_from_a_checkpoint_every_n_epochs_equals_uninterrupted(tmp_path):
    """Checkpoints every 2 epochs of 5: metrics are reported every epoch but a checkpoint only
    on epochs 2, 4 and 5; stopped after epoch 3, the run resumes from epoch 2 and ends with the
    weights and metrics of the uninterrupted run."""
    five = dict(epochs=5, checkpoint_every=2, train_size=128)
    whole = final_weights(tiny(checkpoint_dir=str(tmp_path / "whole"), **five))

    cfg = tiny(checkpoint_dir=str(tmp_path / "cut"), **five)
    session = LocalSession(cfg, interactive=False, echo=False)
    report, reports = session.report, []

    def report_then_stop(metrics, state):
        report(metrics, state)
        reports.append((metrics["epoch"], state is not None))
        if metrics["epoch"] == 3:
            raise Interrupt

    session.report = report_then_stop
    with pytest.raises(Interrupt):
        train_loop(cfg, session)
    assert reports == [(1, False), (2, True), (3, False)]
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)["epoch"] == 2
    resumed = final_weights(tiny(checkpoint_dir=str(tmp_path / "cut"), resume=True, **five))
    assert resumed["epoch"] == whole["epoch"] == 5
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for key in ("momentum",):
        for name, tensor in whole[key].items():
            assert torch.equal(tensor, resumed[key][name]), name
    timings = ("images_per_s", "epoch_time_s", "data_time_s", "step_time_s")
    assert resumed["metrics"] == {**whole["metrics"],
                                  **{key: resumed["metrics"][key] for key in timings}}


@pytest.mark.parametrize("arch, device, form", [
    (dict(depth=20, k=4), "cuda", "fused"),              # narrow: measured 1.38x fused
    (dict(depth=200, k=5, block="bottleneck"), "cuda", "fused"),  # 1.19x fused
    (dict(depth=26, k=2, width=10), "cuda", "reference"),  # wide: fused 0.91x, 0.75x in bf16
    (dict(depth=26, k=2, width=4), "cuda", "reference"),
    (dict(depth=26, k=2, width=3), "cuda", "fused"),
    (dict(depth=68, k=1), "cuda", "reference"),           # one function: nothing to fuse
    (dict(depth=20, k=4), "cpu", "reference"),             # grouped convolutions slow on CPU
])
def test_auto_execution_form_by_net_and_device(arch, device, form):
    cfg = TrainConfig(dataset="synthetic", architecture=arch, device=device)
    assert cfg.resolved(cuda_available=True).execution == form
    pinned = TrainConfig(dataset="synthetic", architecture=arch, device=device,
                         execution="fused")
    assert pinned.resolved(cuda_available=True).execution == "fused"  # an explicit form stays
