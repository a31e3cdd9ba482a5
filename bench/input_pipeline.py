"""Input pipeline throughput: ImageNet training augmentation (224x224) from JPEG files, the
project's image-folder path against torchvision's ImageFolder + DataLoader with PIL, side by side
at the same worker count (rounds interleaved; the best round of each is kept).

    python bench/input_pipeline.py                      # generates 1,024 JPEGs in a temp folder
    python bench/input_pipeline.py --images 2048 --workers 1 2 --rounds 3

Both do fb.resnet.torch's training augmentation: random-sized crop to 224, horizontal flip, colour
jitter (brightness, contrast, saturation 0.4), normalisation; the project also adds PCA lighting.
torchvision does all of it per image in the workers (PIL, then float tensors). The project's
workers decode with torchvision.io (libjpeg-turbo, from the file's bytes) and crop (a slice),
resize (torch's antialiased bilinear on uint8, channels-last) and flip uint8 tensors; jitter,
lighting and normalisation are one affine colour map per image; the workers hand over uint8
images with each image's channel means and colour draws, and the training process makes the maps
and applies them batched (`images.apply_colour`, channels-last as the nets run; with a GPU on the
device). Measured whole: one epoch from the first request to the last batch, every CPU second
counted, the workers' (reaped children) and the main process's (receiving batches, making and
applying the maps). Per core: images per CPU second of all processes (the cost per image on
fully used cores, the main process's work included), also with the main process reading every
batch once as a net's first layer would (torchvision's float batches lie in shared memory that
its first reader faults in); and images/s per worker process (wall clock, the main process on a
core of its own). Also: the workers alone (the host side of the GPU path, the maps not applied),
and each step's CPU cost per image in isolation.

    python bench/input_pipeline.py --device cuda        # the GPU paths, images/s (wall clock)

`--device cuda` compares the `decode: device` path (workers read the files and draw the
augmentation; nvJPEG decodes the batch, crops, resizes, flips and colour-maps on the GPU) with
the `decode: workers` path, torchvision's batched `decode_jpeg(device="cuda")` alone, and DALI
if it is installed; `--device cpu` runs the same code on the CPU, as a dry check.
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

from orchestrator.run import datasets, images  # noqa: E402


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
    batches = images.FolderBatches(train, "imagenet", 224, datasets.IMAGENET_MEAN,
                                   datasets.IMAGENET_STD, batch, "cpu", train=True,
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


def step_costs(root: Path, count: int = 200) -> dict[str, float]:
    """CPU milliseconds per image of each step, in isolation, in this process (one thread), on
    the first `count` JPEGs with one random-sized crop each: the decoders at hand (all wrap
    libjpeg-turbo) and the resize kernels (PIL's bilinear with a box; torch's antialiased
    bilinear on uint8, channels-last (its AVX2 path) and CHW)."""
    import torch.nn.functional as nnf
    from torchvision.io import ImageReadMode, decode_image

    paths = sorted(str(p) for p in (root / "train").rglob("*.JPEG"))[:count]
    blobs = [images.read_bytes(p) for p in paths]
    pils = [Image.open(p).convert("RGB") for p in paths]
    tensors = [images.read_image(p) for p in paths]
    rng = np.random.default_rng(0)
    split = images.FolderSplit(root, ("a",), paths, np.zeros(len(paths), np.int64))
    data = images.FolderImages(split, "imagenet", 224, True, 0, datasets.IMAGENET_MEAN,
                               datasets.IMAGENET_STD)
    draws = [data.draw(t.shape[2], t.shape[1], rng) for t in tensors]
    outs = [images.geometry(t, d, 224, data.pad_value) for t, d in zip(tensors, draws)]

    def pil_resize(i):
        x, y, w, h = draws[i].box
        pils[i].resize((224, 224), Image.BILINEAR, box=(x, y, x + w, y + h))

    def torch_resize(i, channels_last=True):
        x, y, w, h = draws[i].box
        crop = tensors[i][None, :, y:y + h, x:x + w]
        if channels_last:
            crop = crop.contiguous(memory_format=torch.channels_last)
        nnf.interpolate(crop, size=(224, 224), mode="bilinear", antialias=True)

    steps = {
        "read the file's bytes": lambda i: images.read_bytes(paths[i]),
        "decode: PIL (Image.open + convert RGB)":
            lambda i: Image.open(io.BytesIO(blobs[i])).convert("RGB"),
        "decode: torchvision.io.decode_image (CPU)":
            lambda i: decode_image(torch.frombuffer(blobs[i], dtype=torch.uint8),
                                   mode=ImageReadMode.RGB),
        "resize: PIL bilinear, box": pil_resize,
        "resize: torch antialiased, crop copied channels-last": torch_resize,
        "resize: torch antialiased, CHW crop": lambda i: torch_resize(i, False),
        "flip (224x224x3 uint8)": lambda i: outs[i].flip(1),
        "channel means (224x224x3)": lambda i: data.colour_inputs(
            outs[i][None], torch.from_numpy(draws[i].colour[None])),
        "JPEG frame header (size)": lambda i: images.jpeg_size(blobs[i]),
        "draws (generator + crop, flip, colour)":
            lambda i: data.draw(tensors[i].shape[2], tensors[i].shape[1],
                                np.random.default_rng(i)),
        "workers' path whole (read, decode, geometry, colour inputs)":
            lambda i: data[(0, i, i)],
    }
    try:
        import simplejpeg

        steps["decode: simplejpeg.decode_jpeg"] = lambda i: simplejpeg.decode_jpeg(blobs[i])
    except ImportError:
        pass
    costs = {}
    for name, step in steps.items():
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            for i in range(len(paths)):
                step(i)
            best = min(best, time.process_time() - started)
        costs[name] = 1000 * best / len(paths)
    return costs


def device_table(root: Path, device: str, batch: int, workers: int, rounds: int) -> None:
    """`--device`: images/s (wall clock) on `device` of the project's `decode: device` path
    (workers read the files and draw; the batch decoded, cropped, resized, flipped and colour-
    mapped on the device), of its `decode: workers` path (the maps applied on the device), of
    torchvision's batched `decode_jpeg` alone (bytes already in memory: the decoder's ceiling),
    and of DALI's ImageNet training pipeline if DALI is importable (not a dependency)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    train, _ = images.load_folder(root)
    blobs = [torch.frombuffer(images.read_bytes(p), dtype=torch.uint8) for p in train.paths]

    def project(decode):
        batches = images.FolderBatches(train, "imagenet", 224, datasets.IMAGENET_MEAN,
                                       datasets.IMAGENET_STD, batch, dev, train=True,
                                       workers=workers, channels_last=True, decode=decode)
        epochs = iter(range(10**6))
        return lambda: batches.epoch(next(epochs))

    def nvjpeg():
        for i in range(0, len(blobs) - batch + 1, batch):
            yield decode_jpeg(blobs[i:i + batch], mode=ImageReadMode.RGB, device=dev), None

    loaders = {"project, decode: device": project("device"),
               "project, decode: workers": project("workers"),
               "torchvision decode_jpeg alone (bytes in memory)": nvjpeg}
    try:
        loaders["DALI (readers.file, mixed decoder, random-resized crop, flip, normalise)"] = \
            dali_loader(root, batch, workers, dev)
    except ImportError:
        print("DALI: not importable (nvidia-dali-cuda*), not measured")
    best = dict.fromkeys(loaders, 0.0)
    for _ in range(rounds):  # interleaved
        for name, make in loaders.items():
            sync()
            started, n = time.perf_counter(), 0
            for x, _ in make():
                n += len(x)
            sync()
            best[name] = max(best[name], n / (time.perf_counter() - started))
    print(f"| {device}: images/s, best of {rounds} interleaved rounds, {workers} workers | "
          f"images/s |")
    print("| --- | ---: |")
    for name, rate in best.items():
        print(f"| {name} | {rate:.0f} |")


def dali_loader(root: Path, batch: int, workers: int, device: torch.device):
    """DALI's usual ImageNet training pipeline (GPU only), as a reference."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    @pipeline_def(batch_size=batch, num_threads=max(1, workers), device_id=device.index or 0)
    def pipeline():
        jpegs, labels = fn.readers.file(file_root=str(root / "train"), random_shuffle=True,
                                        name="reader")
        x = fn.decoders.image_random_crop(jpegs, device="mixed", output_type=types.RGB,
                                          random_area=[0.08, 1.0],
                                          random_aspect_ratio=[3 / 4, 4 / 3])
        x = fn.resize(x, resize_x=224, resize_y=224)
        x = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW",
                                     mean=list(datasets.IMAGENET_MEAN),
                                     std=list(datasets.IMAGENET_STD), mirror=fn.random.coin_flip())
        return x, labels

    pipe = pipeline()
    pipe.build()
    iterator = DALIGenericIterator(pipe, ["x", "y"], reader_name="reader", auto_reset=True)
    return lambda: ((b[0]["x"], b[0]["y"]) for b in iterator)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--folder", help="use this image folder (train/, val/) instead of generating")
    p.add_argument("--device", help="compare the GPU paths on this device instead (cuda; cpu: a "
                   "dry run of the same code)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the training process's share: one core for the batched colour work
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.folder) if args.folder else Path(tmp)
        if not args.folder:
            generate(root, args.images)
        size = sum(f.stat().st_size for f in (root / "train").rglob("*.JPEG")) / args.images
        print(f"{args.images} JPEGs, {size / 1024:.0f} KB on average; {os.cpu_count()} CPUs; "
              f"torch {torch.__version__}")
        print(f"load average at start: {os.getloadavg()[0]:.1f}")
        if args.device:
            return device_table(root, args.device, args.batch, args.workers[0], args.rounds)
        print("CPU ms per image, each step in isolation (one process, one thread):")
        for name, ms in step_costs(root).items():
            print(f"  {name:62s} {ms:6.3f}")
        print("images per CPU second (all processes: the workers and the main process), then "
              "images/s per worker process (wall clock); tv = torchvision ImageFolder + PIL")
        print("| workers | tv | project | ratio | tv, batches read | project, batches read | "
              "ratio | project's main process share | project's workers alone (GPU host side) "
              "| tv, images/s per worker | project, images/s per worker | ratio |")
        print("|" + " ---: |" * 12)
        for workers in args.workers:
            loaders = {"tv": lambda w=workers: torchvision_loader(root, args.batch, w),
                       "project": lambda w=workers: project_loader(root, args.batch, w),
                       "workers": lambda w=workers: project_loader(root, args.batch, w, False)}
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
