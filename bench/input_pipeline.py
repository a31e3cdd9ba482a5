"""Input pipeline throughput: ImageNet training augmentation (224x224) from JPEG files, the
project's image-folder path against torchvision's ImageFolder + DataLoader with PIL, side by side
at the same worker count (rounds interleaved; the best round of each is kept).

    python bench/input_pipeline.py                      # generates 1,024 JPEGs in a temp folder
    python bench/input_pipeline.py --images 2048 --workers 1 2 --rounds 3

Both do fb.resnet.torch's training augmentation: random-sized crop to 224, horizontal flip, colour
jitter (brightness, contrast, saturation 0.4), normalisation; the project also adds PCA lighting.
torchvision does all of it per image in the workers (PIL, then float tensors). The project decodes
and crops in the workers (PIL, uint8) and folds jitter, lighting and normalisation into one affine
colour map per image; the workers hand over uint8 images with each image's channel means and
colour draws, and the training process makes the maps and applies them batched
(`images.apply_colour`, channels-last as the nets run; with a GPU on the device). Measured whole: one epoch from the first request to the
last batch, every CPU second counted, the workers' (reaped children) and the main process's
(receiving batches, making and applying the maps). Per core: images per CPU second of all processes (the
cost per image on fully used cores, the main process's work included), also with the main
process reading every batch once as a net's first layer would (torchvision's float batches lie
in shared memory that its first reader faults in); and images/s per worker process (wall clock,
the main process on a core of its own). Also: the workers alone (the host side of the GPU path,
the maps not applied), and the decode-only cost per image of the JPEG decoders at hand (PIL,
torchvision.io.decode_jpeg, simplejpeg if installed).
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.run import images  # noqa: E402


def generate(root: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    """ImageNet-like JPEGs: about 400x350 (300-500 x 250-450), quality 90, smooth content with
    texture (about 50 KB each, near ImageNet's average file)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = int(rng.integers(300, 501)), int(rng.integers(250, 451))
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((w, h), Image.BICUBIC)).astype(np.int16)
        pixels = (pixels + rng.integers(-20, 21, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "train" / f"n{i % classes:08d}" / f"{i}.JPEG",
                                     quality=90)
    for c in range(classes):  # one val image per class: the loader needs both splits
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(
            root / "val" / f"n{c:08d}" / "0.JPEG")


def torchvision_loader(root: Path, batch: int, workers: int):
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
                    T.ColorJitter(0.4, 0.4, 0.4), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = torchvision.datasets.ImageFolder(str(root / "train"), tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    return lambda: iter(loader)


def project_loader(root: Path, batch: int, workers: int, apply: bool = True):
    """The project's path whole (`apply`: float batches, the maps applied in this process), or
    the workers alone (uint8 batches and their maps, as a GPU's host side)."""
    train, _ = images.load_folder(root)
    batches = images.FolderBatches(train, "imagenet", 224, images.IMAGENET_MEAN,
                                   images.IMAGENET_STD, batch, "cpu", train=True,
                                   workers=workers, channels_last=True)
    epochs = iter(range(10**6))
    if apply:
        return lambda: batches.epoch(next(epochs))
    return lambda: (batch[:2] for batch in batches.loader(next(epochs)))


def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process and of its reaped children (the workers, once
    an epoch's DataLoader has shut them down)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def measure(make, read: bool = False) -> tuple[float, float, float]:
    """One whole epoch: (images/s, images per CPU second of all processes, the main process's
    share of that CPU time). `read`: the main process reads every batch once, as a net's first
    layer does (a batch in shared memory is faulted in by its first reader)."""
    own, children = cpu_seconds()
    started, n = time.perf_counter(), 0
    for x, _ in make():
        if read:
            x.sum()
        n += len(x)
    wall = time.perf_counter() - started
    own_end, children_end = cpu_seconds()
    cpu = own_end - own + children_end - children
    return n / wall, n / cpu, (own_end - own) / cpu


def decode_costs(root: Path, count: int = 100) -> dict[str, float]:
    """Milliseconds per image to decode (only) the first `count` JPEGs, in this process."""
    from torchvision.io import decode_jpeg

    blobs = [p.read_bytes() for p in sorted((root / "train").rglob("*.JPEG"))[:count]]
    decoders = {"PIL (Image.open + convert RGB)":
                lambda b: Image.open(io.BytesIO(b)).convert("RGB"),
                "torchvision.io.decode_jpeg (CPU)":
                lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))}
    try:
        import simplejpeg

        decoders["simplejpeg.decode_jpeg"] = simplejpeg.decode_jpeg
    except ImportError:
        pass
    costs = {}
    for name, decode in decoders.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for b in blobs:
                decode(b)
            best = min(best, time.perf_counter() - started)
        costs[name] = 1000 * best / len(blobs)
    return costs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--folder", help="use this image folder (train/, val/) instead of generating")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the training process's share: one core for the batched colour work
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.folder) if args.folder else Path(tmp)
        if not args.folder:
            generate(root, args.images)
        size = sum(f.stat().st_size for f in (root / "train").rglob("*.JPEG")) / args.images
        print(f"{args.images} JPEGs, {size / 1024:.0f} KB on average; {os.cpu_count()} CPUs; "
              f"torch {torch.__version__}")
        for name, ms in decode_costs(root).items():
            print(f"decode only  {name:36s} {ms:6.2f} ms/image")
        print(f"load average at start: {os.getloadavg()[0]:.1f}")
        print("images per CPU second (all processes: the workers and the main process), then "
              "images/s per worker process (wall clock); tv = torchvision ImageFolder + PIL")
        print("| workers | tv | project | ratio | tv, batches read | project, batches read | "
              "ratio | project's main process share | project's workers alone (GPU host side) "
              "| tv, images/s per worker | project, images/s per worker | ratio |")
        print("|" + " ---: |" * 12)
        for workers in args.workers:
            loaders = {"tv": lambda: torchvision_loader(root, args.batch, workers),
                       "project": lambda: project_loader(root, args.batch, workers),
                       "workers": lambda: project_loader(root, args.batch, workers, False)}
            runs = {name: [] for name in ("tv", "project", "tv read", "project read", "workers")}
            for _ in range(args.rounds):  # interleaved: all see the same load
                for name in runs:
                    runs[name].append(measure(loaders[name.split()[0]](), "read" in name))
            # The best round of each (load only slows): by CPU time, and by wall clock.
            cpu = {name: max(r[1] for r in rounds) for name, rounds in runs.items()}
            wall = {name: max(r[0] for r in rounds) / workers for name, rounds in runs.items()}
            share = next(r[2] for r in runs["project"] if r[1] == cpu["project"])
            print(f"| {workers} | {cpu['tv']:.0f} | {cpu['project']:.0f} | "
                  f"{cpu['project'] / cpu['tv']:.2f} | {cpu['tv read']:.0f} | "
                  f"{cpu['project read']:.0f} | {cpu['project read'] / cpu['tv read']:.2f} | "
                  f"{share:.0%} | {cpu['workers']:.0f} | {wall['tv']:.0f} | "
                  f"{wall['project']:.0f} | {wall['project'] / wall['tv']:.2f} |", flush=True)
        print(f"(best of {args.rounds} interleaved rounds; whole epochs of {args.images} images, "
              f"batch {args.batch}; load average at the end: {os.getloadavg()[0]:.1f})")

if __name__ == "__main__":
    main()
