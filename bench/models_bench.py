"""Training-step throughput of the execution forms and of the run settings, and of the data
pipeline.

    python bench/models_bench.py                       # CPU: d20-k4 and d110-k1, batch 128
    python bench/models_bench.py --device cuda --models d20-k4,d110-k1,d26-k2-w10,d200-k5-bn
    python bench/models_bench.py --settings before,default --models d20-k4,d68-k1

Variants run interleaved, round after round, so that a noisy machine affects all alike; the table
reports the median images/s per variant and its ratio to the first variant. One step is forward,
backward and an SGD update on random data (the data pipeline is measured on its own).

`--settings` times the trials' own step (`orchestrator.run.step.TrainingStep`) under named
settings, PRECISION-COMPILE-FORM[-blocks] (e.g. bf16-cudagraphs-fused; `-blocks`: regional
compilation, `compile_scope: blocks`), `default` (what `auto` resolves to for the net on the
device), and `before`: fp32, eager, the fastest form, the loss read back after every step (the
step before the step object existed).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
import torch.nn.functional as F

from models.blocks import set_fused
from models.multi_resnet import Architecture, create_model
from orchestrator.run.data import Batches, synthetic_cifar


def parse_model(name: str) -> Architecture:
    """'d20-k4', 'd26-k2-w10', 'd200-k5-bn' -> Architecture."""
    fields = {"block": "basic"}
    for part in name.split("-"):
        if part == "bn":
            fields["block"] = "bottleneck"
        else:
            fields[{"d": "depth", "k": "k", "w": "width"}[part[0]]] = int(part[1:])
    return Architecture(**fields)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_runner(arch: Architecture, fused: bool, channels_last: bool, device: torch.device,
                batch: int):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = set_fused(create_model(arch), fused).to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(step, device: torch.device, steps: int) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def bench_forms(arch: Architecture, device: torch.device, batch: int, steps: int, rounds: int,
                layouts: list[bool]) -> list[dict]:
    variants = [(form, cl) for form in ("reference", "fused") for cl in layouts]
    if arch.k == 1:  # one function: both forms run the same code
        variants = [v for v in variants if v[0] == "reference"]
    runners = {v: step_runner(arch, v[0] == "fused", v[1], device, batch) for v in variants}
    for step in runners.values():  # warm-up: allocator, kernels, autotuning
        time_steps(step, device, 2)
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            times[v].append(time_steps(runners[v], device, steps))
    base = statistics.median(times[variants[0]])
    rows = []
    for (form, cl), ts in times.items():
        med = statistics.median(ts)
        rows.append({"model": arch.name, "form": form, "channels_last": cl, "batch": batch,
                     "ms_per_step": 1e3 * med, "images_per_s": batch / med,
                     "speedup_vs_first": base / med})
    return rows


def settings_runner(arch: Architecture, setting: str, device: torch.device, batch: int):
    from orchestrator.parallel.engine import RankEngine
    from orchestrator.run.config import TrainConfig
    from orchestrator.run.step import TrainingStep

    cfg = TrainConfig(architecture=arch.model_dump(exclude_unset=True), dataset="synthetic",
                      batch_size=batch, device=device.type, lr=0.01)
    fields = {}
    if setting == "before":
        fields = {"precision": "fp32", "compile": "none"}
    elif setting != "default":
        precision, compile_mode, form, *scope = setting.split("-")
        fields = {"precision": precision, "compile": compile_mode, "execution": form,
                  "compile_scope": scope[0] if scope else "model"}
    cfg = cfg.model_copy(update=fields).resolved(device.type == "cuda")
    engine = RankEngine(cfg, device)
    engine.model.train()
    step = TrainingStep(cfg, engine, total_steps=10**6)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    name = f"{cfg.precision}-{cfg.compile}-{cfg.execution}" + \
        ("-blocks" if cfg.compile_scope == "blocks" else "")

    def run():
        step(x, y)
        if setting == "before":
            step.read()  # the per-step .item() of the loop before the step object

    return ("before: " if setting == "before" else "") + name, run


def bench_settings(arch: Architecture, settings: list[str], device: torch.device, batch: int,
                   steps: int, rounds: int) -> list[dict]:
    runners = dict(settings_runner(arch, s, device, batch) for s in settings)
    warmup = {}
    for name, run in runners.items():  # warm-up: compilation, CUDA-graph recording, autotuning
        started = time.perf_counter()
        time_steps(run, device, 4)
        warmup[name] = time.perf_counter() - started
        print(f"  {arch.name} {name}: warm-up {warmup[name]:.1f} s", flush=True)
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(time_steps(run, device, steps))
    base = statistics.median(next(iter(times.values())))
    return [{"model": arch.name, "setting": name, "batch": batch,
             "ms_per_step": 1e3 * statistics.median(ts),
             "images_per_s": batch / statistics.median(ts),
             "speedup_vs_first": base / statistics.median(ts), "warmup_s": warmup[name]}
            for name, ts in times.items()]


def bench_data(device: torch.device, batch: int, steps: int) -> dict:
    train, _ = synthetic_cifar(train_size=batch * steps, test_size=1)
    batches = Batches(train, "synthetic", batch, device, train=True)
    for _ in itertools.islice(batches.epoch(0), 2):
        pass
    sync(device)
    start = time.perf_counter()
    n = sum(len(y) for _, y in batches.epoch(1))
    sync(device)
    return {"data_pipeline_images_per_s": n / (time.perf_counter() - start)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="d20-k4,d110-k1")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steps per timing")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layouts", default="both", choices=["both", "nchw", "nhwc"])
    p.add_argument("--settings", help="compare run settings instead of forms, e.g. "
                   "before,default,bf16-none-fused (see above)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    device = torch.device(args.device)
    layouts = {"both": [False, True], "nchw": [False], "nhwc": [True]}[args.layouts]
    rows = []
    for name in args.models.split(","):
        if args.settings:
            rows += bench_settings(parse_model(name), args.settings.split(","), device,
                                   args.batch, args.steps, args.rounds)
        else:
            rows += bench_forms(parse_model(name), device, args.batch, args.steps, args.rounds,
                                layouts)
    data = bench_data(device, 512, 40)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.settings:
        print(f"{'model':<14}{'setting':<34}{'ms/step':>9}{'img/s':>9}{'vs first':>9}")
        for r in rows:
            print(f"{r['model']:<14}{r['setting']:<34}{r['ms_per_step']:>9.1f}"
                  f"{r['images_per_s']:>9.1f}{r['speedup_vs_first']:>9.2f}")
    else:
        print(f"{'model':<14}{'form':<11}{'layout':<8}{'ms/step':>9}{'img/s':>9}{'vs first':>9}")
        for r in rows:
            print(f"{r['model']:<14}{r['form']:<11}{'NHWC' if r['channels_last'] else 'NCHW':<8}"
                  f"{r['ms_per_step']:>9.1f}{r['images_per_s']:>9.1f}"
                  f"{r['speedup_vs_first']:>9.2f}")
    print(f"data pipeline (batch 512, augmentation on {device.type}): "
          f"{data['data_pipeline_images_per_s']:,.0f} images/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, **data}, f, indent=1)


if __name__ == "__main__":
    main()
