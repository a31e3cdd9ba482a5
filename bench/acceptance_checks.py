"""Two checks of the GPU acceptance run (bench/gpu_acceptance.sh), each printing one JSON line:

    python bench/acceptance_checks.py mesh --device cuda     # bp=2 x dp=1, two ranks on one GPU
    python bench/acceptance_checks.py decode --device cuda   # `decode: device` against the workers

mesh: two ranks share the device. NCCL refuses two ranks on one GPU ("Duplicate GPU detected");
that is probed and recorded, and the mesh then runs on gloo (which all-reduces CUDA tensors).
A few SGD steps of multi-resnet-8 k=4 in fp32, eager; the replicated parameters must stay
identical across the two ranks (`check_replicas`), and the losses must match one process's.

decode: a generated image folder (JPEGs of every kind, PNGs, a truncated JPEG) read in epochs
with `decode: device` and with the workers' decode; the batches compared bit for bit (the share
identical, the largest difference in pixel levels). Between batches the device is kept busy with
work that allocates and frees memory, as a training step does: the setting in which an
unordered nvJPEG decode corrupts images (pytorch/vision#9606).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.parallel.engine import RankEngine  # noqa: E402
from orchestrator.run.config import TrainConfig  # noqa: E402
from orchestrator.run.images import FolderBatches, load_folder  # noqa: E402
from orchestrator.run.step import TrainingStep  # noqa: E402
from tests.images import write_image_folder  # noqa: E402
from tests.ranks import run_ranks  # noqa: E402

STEPS = 3
NORM = ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))
DECODE_TOLERANCE = 4  # pixel levels: nvJPEG's IDCT and the GPU resize round differently


def mesh_config(device: str, parallel: dict) -> TrainConfig:
    return TrainConfig(architecture=dict(depth=8, k=4), dataset="synthetic", batch_size=16,
                       device=device, precision="fp32", compile="none", parallel=parallel)


def losses(cfg: TrainConfig) -> list[float]:
    cfg = cfg.resolved(torch.cuda.is_available())
    engine = RankEngine(cfg, torch.device(cfg.device))
    step = TrainingStep(cfg, engine, total_steps=STEPS)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, 32, 32, generator=g).to(cfg.device, memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), generator=g).to(cfg.device)
    out = []
    for _ in range(STEPS):
        step(x, y)
        out.append(step.read().loss)
    engine.check_replicas()  # ReplicaMismatch: the bp ranks' shared parameters drifted apart
    return out


def probe_nccl() -> str:
    try:
        group = dist.new_group(backend="nccl", timeout=datetime.timedelta(seconds=60))
        t = torch.ones(1, device="cuda")
        dist.all_reduce(t, group=group)
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # the refusal is the expected answer; recorded, not raised
        return f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _mesh_rank(rank: int, device: str, out: str) -> None:
    nccl = probe_nccl() if device == "cuda" else "not tried (cpu)"
    result = losses(mesh_config(device, {"bp": 2}))
    if rank == 0:
        Path(out).write_text(json.dumps({"nccl_two_ranks_one_gpu": nccl, "backend": "gloo",
                                         "losses": result}))


def mesh(device: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "mesh.json"
        run_ranks(2, _mesh_rank, device, str(out))  # gloo; both ranks on the default device
        result = json.loads(out.read_text())
    one = losses(mesh_config(device, {}))
    diff = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], one))
    result.update(one_process_losses=one, max_rel_diff=diff, ok=diff < 1e-3)
    return result


def read_epoch(split, recipe: str, size: int, device: str, mode: str, epoch: int):
    """An epoch's batches (copied: kept past the next batch) and its skipped files; the device
    kept busy between batches as a training step keeps it."""
    b = FolderBatches(split, recipe, size, *NORM, batch_size=8, device=device, train=True,
                      seed=5, workers=2 if device == "cuda" else 0, decode=mode)
    got = []
    for x, y in b.epoch(epoch):
        busy(device)
        got.append((x.clone(), y.clone()))
    return got, b.skipped


def decode(device: str) -> dict:
    epochs = 3 if device == "cuda" else 1  # on a CPU: the logic only, not the race
    same = total = 0
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        train, _ = load_folder(write_image_folder(Path(folder) / "images", train=24, val=4))
        cut = next(p for p in train.paths if p.endswith(".JPEG"))
        Path(cut).write_bytes(Path(cut).read_bytes()[:400])  # a truncated JPEG
        for (recipe, size), epoch in itertools.product((("imagenet", 48), ("cifar", 32)),
                                                       range(epochs)):
            got, skipped = read_epoch(train, recipe, size, device, "device", epoch)
            reference, skipped_ref = read_epoch(train, recipe, size, device, "workers", epoch)
            if skipped != skipped_ref or len(got) != len(reference):
                raise AssertionError(f"skipped {skipped} vs {skipped_ref}")
            for (x, y), (xr, yr) in zip(got, reference):
                if not torch.equal(y, yr):
                    raise AssertionError("labels differ")
                levels = (x - xr).abs().amax((1, 2, 3)) * min(NORM[1])  # about pixel levels
                same += int((levels == 0).sum())
                total += len(levels)
                worst = max(worst, float(levels.max()))
    ok = same == total if device == "cpu" else worst <= DECODE_TOLERANCE  # NaN: not ok
    return {"images": total, "bit_identical": same, "max_level_diff": worst, "ok": ok}


def busy(device: str) -> None:
    n = 2048 if device == "cuda" else 64
    a = torch.randn(n, n, device=device)
    for _ in range(4):
        a = torch.tanh(a @ a / n)  # each result frees the previous: reused memory, queued work


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=["mesh", "decode"])
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    result = (mesh if args.check == "mesh" else decode)(args.device)
    print(json.dumps({"check": args.check, "device": args.device, **result}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
