"""Data x pipeline x branch parallelism on several CPU processes (gloo) against one process.

Every mesh must compute what one process computes when it splits the global batch the same way
(dp replicas x micro-batches, each normalised by its own BatchNorm statistics): the loss, every
gradient (gathered to the canonical layout) and the parameters after one SGD step, in float64.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.multi_resnet import create_model
from orchestrator.parallel.engine import RankEngine
from orchestrator.parallel.branch import owned_functions
from orchestrator.parallel.pipeline import partition, stage_block_keys
from orchestrator.results import CHECKPOINT_FILE
from orchestrator.run.checkpoint import load_checkpoint
from orchestrator.run.config import ParallelConfig, TrainConfig
from orchestrator.run.loop import train_loop
from orchestrator.run.session import LocalSession
from orchestrator.run.step import TrainingStep
from tests.ranks import run_ranks

BATCH = 8


def config(parallel: dict, k: int = 4, **extra) -> TrainConfig:
    extra = {"dtype": "float64", **extra}
    return TrainConfig(architecture=dict(depth=8, k=k), dataset="synthetic", batch_size=BATCH,
                       device="cpu", parallel=parallel, **extra)


def global_batch():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (BATCH,), generator=g))


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _step_rank(rank, cfg: TrainConfig, out_path):
    cfg = cfg.resolved(cuda_available=False)
    engine = RankEngine(cfg, torch.device("cpu"))
    step = TrainingStep(cfg, engine, total_steps=10)
    x, y = global_batch()
    p = cfg.parallel
    xs, ys = x.tensor_split(p.dp)[engine.mesh.dp_rank], y.tensor_split(p.dp)[engine.mesh.dp_rank]
    engine.model.train()
    step(xs.to(torch.float32 if cfg.dtype == "float32" else torch.float64)
         .contiguous(memory_format=torch.channels_last), ys)
    loss = step.read().loss
    grads = {engine.names[q]: q.grad.clone() for q in engine.model.parameters()}
    engine.check_replicas()
    params = {n: q.detach().clone() for n, q in engine.model.named_parameters()}
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((grads, params), gathered, dst=0)
    if rank == 0:
        merged_grads, merged_params = {}, {}
        for g, q in gathered:
            merged_grads.update(g)
            merged_params.update(q)
        torch.save({"loss": loss, "grads": merged_grads, "params": merged_params}, out_path)


def reference_step(cfg: TrainConfig):
    """One process, the same split: dp replica slices, each cut into micro-batches."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.architecture).double().to(memory_format=torch.channels_last)
    model.train()
    x, y = global_batch()
    p = cfg.parallel
    chunks = [(xm, ym) for xr, yr in zip(x.tensor_split(p.dp), y.tensor_split(p.dp))
              for xm, ym in zip(xr.tensor_split(p.microbatches), yr.tensor_split(p.microbatches))]
    loss = sum(F.cross_entropy(model(xm), ym) for xm, ym in chunks) / len(chunks)
    loss.backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters()}  # before any clipping
    if cfg.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
    sgd(model.parameters()).step()
    return loss.item(), grads, {n: q.detach().clone() for n, q in model.named_parameters()}


# One mesh per kind of parallelism runs in the inner loop; their combinations and schedules in
# the whole suite (marked slow).
MESHES = [
    (dict(pp=2), 4),
    (dict(dp=2), 4),
    (dict(bp=2), 5),  # k=5 on bp=2: 3 + 2 functions
    pytest.param(dict(bp=2), 4, marks=pytest.mark.slow),
    pytest.param(dict(dp=2, bp=2), 4, marks=pytest.mark.slow),
    pytest.param(dict(pp=2, bp=2), 4, marks=pytest.mark.slow),
    pytest.param(dict(pp=2, microbatches=2, schedule="1f1b"), 4, marks=pytest.mark.slow),
    pytest.param(dict(pp=3, microbatches=2), 2, marks=pytest.mark.slow),
]


def mesh_id(parallel: dict, k: int) -> str:
    return ParallelConfig(**parallel).layout + f"-k{k}"


@pytest.mark.parametrize("parallel, k", MESHES,
                         ids=[mesh_id(*getattr(m, "values", m)) for m in MESHES])
def test_mesh_matches_one_process(tmp_path, parallel, k):
    cfg = config(parallel, k=k)
    run_ranks(cfg.parallel.world_size, _step_rank, cfg, tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt")
    loss, grads, params = reference_step(cfg)
    assert got["loss"] == pytest.approx(loss, rel=1e-12)
    assert got["grads"].keys() == grads.keys()  # every parameter, gathered to canonical names
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-9, atol=1e-12, msg=name)
    for name, q in params.items():
        torch.testing.assert_close(got["params"][name], q, rtol=1e-9, atol=1e-12, msg=name)


def test_function_shares_and_stage_balance():
    assert [owned_functions(5, 2, r) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [owned_functions(7, 3, r) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert partition([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert partition([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    model = create_model(depth=20, k=2)
    stages = stage_block_keys(model, 3)
    assert sum(stages, []) == list(model.blocks.keys()) and all(stages)


@pytest.mark.parametrize("parallel, message", [
    (dict(bp=3), "exceeds k=2"),
    (dict(pp=4), "exceeds the 3 blocks"),
    (dict(dp=3), "does not split into dp=3"),
    (dict(pp=2, microbatches=1, schedule="1f1b"), "1f1b needs microbatches >= pp"),
])
def test_bad_meshes_fail_before_any_worker_starts(parallel, message):
    with pytest.raises(ValueError, match=message):
        config(parallel, k=2)


def test_mesh_size_must_match_the_processes():
    with pytest.raises(ValueError, match="dp x pp x bp = 2 but 1 processes run"):
        RankEngine(config(dict(dp=2)).resolved(False), torch.device("cpu"))


class Stop(Exception):
    pass


def _train_rank(rank, cfg: TrainConfig, stop_after: int | None):
    session = LocalSession(cfg, interactive=False, echo=False)
    if stop_after is not None:
        report = session.report

        def report_then_stop(metrics, state):
            report(metrics, state)
            if metrics["epoch"] == stop_after:
                raise Stop

        session.report = report_then_stop
    try:
        train_loop(cfg, session)
    except Stop:
        pass


@pytest.mark.slow  # three process groups of two and four ranks: about 20 s
def test_checkpoint_saved_under_one_mesh_resumes_under_another(tmp_path):
    base = dict(train_size=32, test_size=16, epochs=2)
    whole = config({}, checkpoint_dir=str(tmp_path / "whole"), **base)
    train_loop(whole, LocalSession(whole, interactive=False, echo=False))
    reference = load_checkpoint(tmp_path / "whole" / CHECKPOINT_FILE)

    first = config(dict(bp=2), checkpoint_dir=str(tmp_path / "cut"), **base)
    run_ranks(2, _train_rank, first, 1)  # epoch 1 under bp=2, then interrupted
    saved = load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)
    assert saved["epoch"] == 1 and saved["model"].keys() == reference["model"].keys()
    second = config(dict(pp=2, bp=2), checkpoint_dir=str(tmp_path / "cut"), resume=True, **base)
    run_ranks(4, _train_rank, second, None)  # epoch 2 under pp=2 x bp=2
    resumed = load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)

    assert resumed["epoch"] == 2
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=1e-9, atol=1e-12,
                                   msg=name)
    for name, tensor in reference["momentum"].items():
        torch.testing.assert_close(resumed["momentum"][name], tensor, rtol=1e-9, atol=1e-12)
    assert math.isclose(resumed["metrics"]["train_loss"], reference["metrics"]["train_loss"],
                        rel_tol=1e-9)


def test_ray_train_run_reports_the_one_process_losses(ray_address, tmp_path):
    """orchestrator.train with 4 Ray Train workers (dp=2 x bp=2): the step losses of one process
    that cuts each batch into the same two halves (dp=2 <-> 2 micro-batches). (dp alone, and
    every other mesh, is checked against one process without Ray above.)"""
    mesh = "dp=2,bp=2"
    from orchestrator.commands.train import main as train_main

    common = ["--dataset", "synthetic", "--depth", "8", "--k", "2", "--train-size", "128",
              "--test-size", "32", "--batch-size", "32", "--epochs", "2", "--device", "cpu",
              "--dtype", "float64", "--log-every", "1"]
    # Its own driver process, on the test's Ray instance: the run's actors end with it.
    subprocess.run([sys.executable, "-m", "orchestrator.train", *common, "--parallel", mesh,
                    "--log-json", str(tmp_path / "ray.jsonl")], check=True, capture_output=True,
                   env={**os.environ, "RAY_ADDRESS": ray_address})
    assert train_main(common + ["--parallel", "microbatches=2",
                                "--log-json", str(tmp_path / "one.jsonl")]) == 0

    def losses(name):
        return [json.loads(line)["loss"] for line in open(tmp_path / name)
                if '"step"' in line]

    ray_losses, one_losses = losses("ray.jsonl"), losses("one.jsonl")
    assert len(ray_losses) == len(one_losses) == 8
    assert ray_losses == pytest.approx(one_losses, rel=1e-9)


def _diverge_rank(rank, cfg: TrainConfig):
    from orchestrator.parallel.engine import ReplicaMismatch

    engine = RankEngine(cfg.resolved(False), torch.device("cpu"))
    engine.check_replicas()  # identical after construction
    if rank == 1:
        with torch.no_grad():
            engine.model.head[-1].weight.add_(1e-3)  # replicated across the bp group
    with pytest.raises(ReplicaMismatch, match="bp replicas of head.4.weight differ"):
        engine.check_replicas()


def test_replicated_parameters_are_checked():
    run_ranks(2, _diverge_rank, config(dict(bp=2)))


def _perturbed_rank(rank, cfg: TrainConfig):
    """Rank 1 computes the replicated parameters' gradients slightly differently (as a
    different cuDNN algorithm does on a GPU): the step must still leave the bp replicas equal."""
    cfg = cfg.resolved(cuda_available=False)
    engine = RankEngine(cfg, torch.device("cpu"))
    step = TrainingStep(cfg, engine, total_steps=10)
    if rank == 1:
        for name, q in engine.model.named_parameters():
            if ".functions." not in name:
                q.register_hook(lambda g: g * (1 + 1e-6) + 1e-9)
    x, y = global_batch()
    step(x.contiguous(memory_format=torch.channels_last), y)
    engine.check_replicas()  # ReplicaMismatch if the replicated gradients were not averaged


def test_branch_parallel_ranks_average_replicated_gradients():
    run_ranks(2, _perturbed_rank, config(dict(bp=2)))


def _count_rank(rank, cfg: TrainConfig):
    engine = RankEngine(cfg.resolved(False), torch.device("cpu"))
    buffers = [b for b in engine.model.buffers() if b.is_floating_point()]
    with torch.no_grad():
        for b in buffers:
            b.add_(rank + 1)  # replicas' statistics differ, as after steps on different data
    mean = [b + 0.5 - rank for b in buffers]  # both ranks: the original + 1.5
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda *args, **kw: calls.append(1) or original(*args, **kw)
    try:
        engine.sync_batchnorm_statistics()
    finally:
        dist.all_reduce = original
    assert len(buffers) > 20 and len(calls) == 1
    for b, m in zip(buffers, mean):
        torch.testing.assert_close(b, m, rtol=0, atol=1e-12)


def test_batchnorm_statistics_sync_in_one_collective():
    run_ranks(2, _count_rank, config(dict(dp=2)))
