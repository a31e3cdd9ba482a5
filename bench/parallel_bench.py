"""Branch parallelism against data parallelism at equal device count and equal global batch: the
design of the paper's Table V.

    python bench/parallel_bench.py                       # CPU: 2 processes, gloo, 1 thread each
    python bench/parallel_bench.py --device cuda         # 2 GPUs, nccl

(a) one architecture (multi-resnet-20 k=4) under dp=2 and under bp=2, in both execution forms;
(b) the paper's pairing: multi-resnet-110 with k=2/4/6 under bp=2 against pre-resnet-218/434/650
    (k=1, the same number of convolutions) under dp=2, at batch 128 and 32.
Per configuration: median time of an SGD step (forward, backward, gradient averaging, update),
images/s, the share of the step spent blocked in all-reduce calls, peak memory (max RSS per
process on CPU, peak allocated on GPU).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

# tests.ranks: the local launcher the parity tests use too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.parallel.engine import RankEngine  # noqa: E402
from orchestrator.run.config import TrainConfig  # noqa: E402
from orchestrator.run.step import TrainingStep  # noqa: E402
from tests.ranks import run_ranks  # noqa: E402

COMM = {"s": 0.0}


def _timed_all_reduce(original):
    def all_reduce(tensor, *args, **kwargs):
        start = time.perf_counter()
        out = original(tensor, *args, **kwargs)
        if tensor.is_cuda:
            torch.cuda.synchronize()
        COMM["s"] += time.perf_counter() - start
        return out
    return all_reduce


def _rank(rank, cfg: TrainConfig, steps: int, out_dir: str):
    dist.all_reduce = _timed_all_reduce(dist.all_reduce)  # branch.py and engine.py call this
    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    cfg = cfg.model_copy(update={"precision": "fp32", "compile": "none"}).resolved(
        device.type == "cuda")
    engine = RankEngine(cfg, device)
    engine.model.train()
    p = cfg.parallel
    step = TrainingStep(cfg, engine, total_steps=10**6)
    replica = cfg.batch_size // p.dp
    x = torch.randn(replica, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (replica,), device=device)
    times, comms = [], []
    for i in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        COMM["s"] = 0.0
        start = time.perf_counter()
        step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
            comms.append(COMM["s"])
    memory = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"step_s": statistics.median(times), "comm_share": sum(comms) / sum(times),
         "memory_mb": memory}))


def measure(arch: dict, mesh: dict, batch: int, form: str, device: str, steps: int) -> dict:
    cfg = TrainConfig(architecture=arch, dataset="synthetic", batch_size=batch, device=device,
                      execution=form, parallel=mesh)
    with tempfile.TemporaryDirectory() as out:
        run_ranks(cfg.parallel.world_size, _rank, cfg, steps, out,
                  backend="nccl" if device == "cuda" else "gloo")
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    step = max(r["step_s"] for r in ranks)
    return {"model": cfg.architecture.name, "mesh": "bp=2" if mesh.get("bp") else "dp=2",
            "form": form, "batch": batch, "ms_per_step": 1e3 * step,
            "images_per_s": batch / step,
            "comm_share": statistics.mean(r["comm_share"] for r in ranks),
            "peak_memory_mb": max(r["memory_mb"] for r in ranks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batches", default="128,32")
    p.add_argument("--ks", default="2,4,6")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--json", help="write all rows here")
    args = p.parse_args()
    rows = []

    def run(arch, mesh, batch, form):
        row = measure(arch, mesh, batch, form, args.device, args.steps)
        rows.append(row)
        print(f"{row['model']:<12}{row['mesh']:<6}{row['form']:<10}batch {row['batch']:>4}"
              f"{row['ms_per_step']:>10.1f} ms{row['images_per_s']:>9.1f} img/s"
              f"  comm {100 * row['comm_share']:5.1f}%  mem {row['peak_memory_mb']:8.1f} MB",
              flush=True)
        return row

    if not args.skip_a:
        print("(a) multi-resnet-20 k=4: dp=2 against bp=2")
        for form in ("reference", "fused"):
            for mesh in ({"dp": 2}, {"bp": 2}):
                run({"depth": 20, "k": 4}, mesh, 128, form)
    print("(b) multi-resnet-110 (k=2/4/6, bp=2) against pre-resnet-218/434/650 (dp=2)")
    for batch in map(int, args.batches.split(",")):
        for k in map(int, args.ks.split(",")):
            multi = run({"depth": 110, "k": k}, {"bp": 2}, batch, "auto")
            deep = run({"depth": 108 * k + 2, "k": 1}, {"dp": 2}, batch, "auto")
            print(f"    speed-up of multi-resnet-110 k={k} over pre-resnet-{108 * k + 2}: "
                  f"{deep['ms_per_step'] / multi['ms_per_step'] - 1:+.0%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
