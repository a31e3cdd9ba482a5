"""The training step object: precision policy, clipping, the device-side divergence check, exit
statuses, and `auto` settings resolved per device.

Mixed precision is checked against the float64 one-process step of test_parallel: bf16 and fp16
(with its loss scaler) in both execution forms and under branch and pipeline parallelism must give
the fp32 loss, gradients and SGD update within what a 16-bit forward allows.
"""
import json

import pytest
import torch

from orchestrator.errors import ConfigError
from orchestrator.parallel.engine import RankEngine
from orchestrator.run.config import TrainConfig
from orchestrator.run.step import TrainingStep
from orchestrator.study.config import StudyConfig
from orchestrator.study.tracking import flat_params
from tests.ranks import run_ranks
from tests.test_parallel import _step_rank, config, reference_step

# 16-bit convolutions: the loss to ~1e-3 (bf16, 8 bits of mantissa) or ~1e-5 (fp16, 11 bits);
# gradients at initialisation, where they come from cancelling terms, to ~8% and ~3% of their
# norm (measured on this net: 0.082 and 0.034).
LOSS_RTOL = {"bf16": 5e-3, "fp16": 1e-4}
GRAD_RTOL = {"bf16": 0.2, "fp16": 0.08}


def relative_error(got: dict, want: dict) -> float:
    diff = torch.cat([(got[n].double() - want[n]).flatten() for n in want])
    return (diff.norm() / torch.cat([t.flatten() for t in want.values()]).norm()).item()


# bf16 in both forms on every kind of mesh; fp16 (its loss scaler inside the pipeline schedule and
# its overflow check agreed across ranks) once per mesh kind. Meshes run in the whole suite.
MIXED = [("bf16", form, mesh) for form in ("reference", "fused")
         for mesh in ({}, dict(bp=2), dict(pp=2))]
MIXED += [("fp16", "reference", {}), ("fp16", "fused", dict(bp=2)),
          ("fp16", "reference", dict(pp=2))]


@pytest.mark.parametrize("precision, form, mesh", [
    pytest.param(*case, marks=[pytest.mark.slow] if case[2] else [],
                 id=f"{case[0]}-{case[1]}-{'-'.join(f'{k}{v}' for k, v in case[2].items())}"
                    if case[2] else f"{case[0]}-{case[1]}-one")
    for case in MIXED])
def test_mixed_precision_step_matches_fp32(tmp_path, precision, form, mesh):
    cfg = config(mesh, dtype="float32", precision=precision, execution=form)
    run_ranks(cfg.parallel.world_size, _step_rank, cfg, tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt")
    loss, grads, params = reference_step(config(mesh))
    torch.manual_seed(0)
    initial = {n: q.detach().double() for n, q in RankEngine(
        config({}).resolved(False), torch.device("cpu")).model.named_parameters()}
    assert got["loss"] == pytest.approx(loss, rel=LOSS_RTOL[precision])
    assert relative_error(got["grads"], grads) < GRAD_RTOL[precision]
    update = {n: got["params"][n].double() - initial[n] for n in params}
    want = {n: params[n] - initial[n] for n in params}
    assert relative_error(update, want) < GRAD_RTOL[precision]
    # BatchNorm statistics stay fp32 under autocast.
    assert all(q.dtype == torch.float32 for q in got["params"].values())


@pytest.mark.parametrize("mesh", [pytest.param({}, id="one"),
                                  pytest.param(dict(pp=2, bp=2), id="pp2-bp2",
                                               marks=pytest.mark.slow)])
def test_clipping_uses_the_global_norm(tmp_path, mesh):
    cfg = config(mesh, grad_clip_norm=0.05)
    run_ranks(cfg.parallel.world_size, _step_rank, cfg, tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt")
    _, grads, params = reference_step(cfg)
    norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    assert norm > 0.05  # the clip acts
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g * 0.05 / (norm + 1e-6), rtol=1e-9,
                                   atol=1e-12)
    for name, q in params.items():
        torch.testing.assert_close(got["params"][name], q, rtol=1e-9, atol=1e-12)


def test_step_reads_the_device_only_when_asked():
    cfg = TrainConfig(architecture=dict(depth=8, k=2), dataset="synthetic", batch_size=8,
                      device="cpu").resolved(False)
    step = TrainingStep(cfg, RankEngine(cfg, torch.device("cpu")), total_steps=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    step(x, y)
    step(x, y)
    window = step.read()
    assert (window.steps, window.images, window.first_nonfinite) == (2, 16, None)
    assert 0 < window.loss < 10 and 0 <= window.wrong <= 16
    assert step.read().steps == 0  # a read starts the next window
    step(torch.full_like(x, float("nan")), y)
    step(x, y)
    assert step.read().first_nonfinite == 3  # counted from the start of training


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_resolved_settings_follow_the_device(monkeypatch, cpu_bf16):
    monkeypatch.setattr("orchestrator.run.config.cpu_computes_bf16", lambda: cpu_bf16)
    cfg = TrainConfig()
    gpu, cpu = cfg.resolved(cuda_available=True), cfg.resolved(cuda_available=False)
    assert (gpu.device, gpu.precision, gpu.compile, gpu.execution) == \
        ("cuda", "bf16", "cudagraphs", "fused")
    assert (cpu.device, cpu.precision, cpu.compile, cpu.execution) == \
        ("cpu", "bf16" if cpu_bf16 else "fp32", "none", "reference")
    branch = TrainConfig(parallel=dict(bp=2)).resolved(cuda_available=True)
    assert branch.compile == "none" and branch.precision == "bf16"
    assert TrainConfig(dtype="float64").resolved(True).precision == "fp32"
    with pytest.raises(ConfigError, match="no GPU is visible"):
        TrainConfig(device="cuda").resolved(cuda_available=False)
    with pytest.raises(ValueError, match="compile cudagraphs works on meshes without"):
        TrainConfig(compile="cudagraphs", parallel=dict(pp=2))
    with pytest.raises(ValueError, match="precision bf16 needs dtype float32"):
        TrainConfig(precision="bf16", dtype="float64")


def test_the_cpus_bf16_is_read_as_torch_reads_it():
    """`precision: auto` reads the CPU's bf16 arithmetic from the kernel's flags on Linux (a
    trial's driver then loads no torch): the same answer as torch's own check."""
    from orchestrator.run.config import cpu_computes_bf16

    assert cpu_computes_bf16() == bool(torch.cpu._is_amx_tile_supported()
                                       or torch.cpu._is_avx512_bf16_supported())


def test_studies_record_what_their_trials_run(monkeypatch):
    monkeypatch.setattr("orchestrator.run.config.cpu_computes_bf16", lambda: False)
    study = dict(name="s", space={"depth": 8}, train={"dataset": "synthetic"})
    on_gpus = StudyConfig(**study, resources={"gpus_per_worker": 0.25})
    params = flat_params(on_gpus.trial_config({}))
    assert (params["device"], params["precision"], params["compile"]) == \
        ("cuda", "bf16", "cudagraphs")
    assert flat_params(StudyConfig(**study).trial_config({}))["precision"] == "fp32"
    with pytest.raises(ValueError, match="give a fraction up to 1"):
        StudyConfig(**study, resources={"gpus_per_worker": 1.5})
    with pytest.raises(ValueError, match="train.device cuda needs GPUs"):
        StudyConfig(**{**study, "train": {"dataset": "synthetic", "device": "cuda"}},
                    resources={"gpus_per_worker": 0})


RUN = ["--dataset", "synthetic", "--depth", "8", "--k", "2", "--train-size", "64",
       "--test-size", "32", "--batch-size", "16", "--epochs", "2", "--device", "cpu"]


def test_a_diverged_run_names_the_first_bad_step(tmp_path, capsys):
    from orchestrator.commands.train import main

    assert main(RUN + ["--lr", "1e6", "--log-json", str(tmp_path / "l.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "loss became non-finite at step" in err and "lower the learning rate" in err


@pytest.mark.parametrize("raised, status, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), 3,
     "error: out of GPU memory: d8-k2-w1 at batch_size 16 does not fit in the GPU; lower "
     "batch_size"),
    (KeyError("momentum_buffer"), 1, "internal error: KeyError: 'momentum_buffer'"),
])
def test_out_of_memory_and_bugs_are_not_bad_input(monkeypatch, capsys, raised, status, message):
    import orchestrator.commands.train as train

    def fail(cfg, session):
        raise raised

    monkeypatch.setattr("orchestrator.run.loop.train_loop", fail)
    assert train.main(RUN) == status
    assert message in capsys.readouterr().err


@pytest.mark.slow  # fp16 convolutions are slow on a CPU: about a minute
def test_fp16_run_resumes_with_its_loss_scale(tmp_path):
    from orchestrator.results import CHECKPOINT_FILE
    from orchestrator.run.checkpoint import load_checkpoint
    from orchestrator.run.loop import train_loop
    from orchestrator.run.session import LocalSession
    from tests.test_parallel import _train_rank

    def run(folder, **extra):
        # Small: fp16 convolutions are emulated on CPUs, about 40x slower than fp32.
        return TrainConfig(architecture=dict(depth=8, k=2), dataset="synthetic", train_size=32,
                           test_size=16, batch_size=16, epochs=2, device="cpu",
                           precision="fp16", checkpoint_dir=str(tmp_path / folder), **extra)

    whole = run("a", log_json=str(tmp_path / "a.jsonl"), log_every=1)
    train_loop(whole, LocalSession(whole, interactive=False, echo=False))
    _train_rank(0, run("b"), 1)  # interrupted after epoch 1
    saved = load_checkpoint(tmp_path / "b" / CHECKPOINT_FILE)
    assert saved["epoch"] == 1 and saved["precision"] == "fp16" and saved["scaler"]["scale"] > 0
    _train_rank(0, run("b", resume=True), None)
    full, resumed = (load_checkpoint(tmp_path / d / CHECKPOINT_FILE) for d in ("a", "b"))
    assert resumed["scaler"] == full["scaler"] and resumed["config"]["precision"] == "fp16"
    for name, tensor in full["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    steps = [json.loads(line) for line in open(tmp_path / "a.jsonl") if '"step"' in line]
    assert [s["step"] for s in steps] == list(range(1, 5))  # log_every 1: a line per step


@pytest.mark.slow
def test_compiled_run_trains_like_the_eager_one(tmp_path):
    """compile: default (inductor; the model compiled in place, so checkpoints keep their
    names) in the fused form: the same losses as eager, to float32 rounding."""
    from orchestrator.results import CHECKPOINT_FILE
    from orchestrator.run.checkpoint import load_checkpoint
    from orchestrator.run.loop import train_loop
    from orchestrator.run.session import LocalSession

    runs = {}
    for mode in ("none", "default"):
        cfg = TrainConfig(architecture=dict(depth=8, k=2), dataset="synthetic", train_size=128,
                          test_size=64, batch_size=32, epochs=2, device="cpu", execution="fused",
                          precision="fp32",
                          compile=mode, log_every=1, log_json=str(tmp_path / f"{mode}.jsonl"),
                          checkpoint_dir=str(tmp_path / mode))
        final = train_loop(cfg, LocalSession(cfg, interactive=False, echo=False))
        losses = [json.loads(line)["loss"] for line in open(tmp_path / f"{mode}.jsonl")
                  if '"step"' in line]
        runs[mode] = final, losses, load_checkpoint(tmp_path / mode / CHECKPOINT_FILE)
    (eager, eager_losses, eager_state), (compiled, losses, state) = runs["none"], runs["default"]
    assert losses == pytest.approx(eager_losses, rel=1e-4) and len(losses) == 8
    assert compiled["test_error"] == pytest.approx(eager["test_error"], abs=1 / 64)
    assert state["model"].keys() == eager_state["model"].keys()
    assert state["config"]["compile"] == "default"


def test_a_trial_on_a_gpu_share_is_held_to_it(monkeypatch):
    """resources.gpus_per_worker 0.25: the worker may allocate a quarter of the GPU's memory,
    and running out names the share and what to change."""
    import types

    from orchestrator.cluster import worker
    from orchestrator.errors import OutOfMemory

    limits = []
    monkeypatch.setattr(worker.ray, "get_runtime_context", lambda: types.SimpleNamespace(
        get_assigned_resources=lambda: {"CPU": 1.0, "GPU": 0.25}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the metrics' GPU
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", limits.append)

    def out_of_memory(cfg, session):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(worker, "train_loop", out_of_memory)
    run = TrainConfig(architecture=dict(depth=8, k=2), dataset="synthetic", batch_size=16)
    with pytest.raises(OutOfMemory, match="does not fit in its 0.25 share of a GPU; lower "
                       "batch_size, use precision bf16 .* or raise resources.gpus_per_worker"):
        worker.train_loop_per_worker({"run": run.model_dump(mode="json")})
    assert limits == [0.25]


@pytest.mark.slow  # dynamo traces six block graphs: about 15 s on two cores
def test_regional_compilation_shares_graphs_and_computes_the_same():
    """Each block compiled on its own (dynamo's tracing, the cheap aot_eager backend): blocks
    of one shape share a graph, and forward and gradients match the eager model. Evaluation
    under the "force_eager" stance (TrainingStep.evaluation_context) compiles nothing more."""
    import torch._dynamo

    from models.multi_resnet import create_model
    from orchestrator.run.step import compile_blocks

    torch.manual_seed(0)
    eager = create_model(depth=20, k=2)  # 9 blocks: per stage a first block and two alike
    regional = create_model(depth=20, k=2)
    regional.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_blocks(regional, backend="aot_eager") == 9
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for model in (eager, regional):
        out = model(x)
        out.square().mean().backward()
        outs.append(out)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 6
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(eager.named_parameters(), regional.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    assert [n for n, _ in regional.named_parameters()] == [n for n, _ in eager.named_parameters()]
    regional.eval(), eager.eval()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        torch.testing.assert_close(regional(x[:3]), eager(x[:3]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 6
    torch._dynamo.reset()
