"""Image-folder datasets (orchestrator.run.images): reading, labels, bad data, determinism,
data-parallel shards, the ImageNet recipe's augmentation; and (slow) training through them."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.errors import DataError
from orchestrator.run import datasets, images
from orchestrator.run.images import FolderBatches, FolderImages, load_folder
from orchestrator.commands.train import main as train_main
from tests.images import COLOURS, write_cifar_as_png, write_image_folder

CIFAR_NORM = ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))


def colour_class(image: np.ndarray) -> int:
    """The class whose colour an image shows (by luminance where it is gray)."""
    mean = image.reshape(-1, 3).mean(0)
    colours = np.asarray(COLOURS[:3], dtype=float)
    if np.ptp(mean) < 3:  # a grayscale file: compare luminances
        luma = colours @ np.array([0.299, 0.587, 0.114])
        return int(np.abs(luma - mean[0]).argmin())
    return int(np.linalg.norm(colours - mean, axis=1).argmin())


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


def test_folders_are_read_with_sorted_classes_and_right_labels(folder):
    """JPEG, PNG, grayscale and CMYK files of any size become RGB images of the net's size; each
    carries the label of its class folder."""
    train, val = load_folder(folder)
    assert (len(train), len(val)) == (36, 12) and train.classes == ("c00", "c01", "c02")
    suffixes = {Path(p).suffix for p in train.paths}
    assert suffixes == {".JPEG", ".jpg", ".png"}
    for split in (train, val):
        data = FolderImages(split, "cifar", 32, train=False, seed=0, mean=(0, 0, 0),
                            std=(1, 1, 1))
        for i in range(len(split)):
            image, label, skipped, _ = data[(0, i, i)]
            assert image.shape == (32, 32, 3) and image.dtype == torch.uint8 and not skipped
            assert label == split.labels[i] == colour_class(image.numpy())
    # A subset draws from every class (the files are sorted by class) and is the same each time.
    sub = train.subset(9)
    assert sub.paths == train.subset(9).paths and set(sub.labels.tolist()) == {0, 1, 2}


def _damage(root: Path, case: str) -> None:
    if case == "empty class folder":
        (root / "train" / "c03").mkdir()
        (root / "val" / "c03").mkdir()
    elif case == "not an image":
        (root / "train" / "c01" / "notes.txt").write_text("labels are in the folder names")
    elif case == "classes differ":
        shutil.rmtree(root / "val" / "c02")
        (root / "val" / "cat").mkdir()
        shutil.copy(next((root / "val" / "c00").iterdir()), root / "val" / "cat")
    elif case == "no images":
        for split in ("train", "val"):
            shutil.rmtree(root / split)
            (root / split).mkdir()
    elif case == "no val split":
        shutil.rmtree(root / "val")
    elif case == "one class":
        for split in ("train", "val"):
            shutil.rmtree(root / split / "c01")
            shutil.rmtree(root / split / "c02")
    elif case in ("a class name with a newline", "a class name not UTF-8"):
        import os

        for split in ("train", "val"):
            new = (b"c\n02" if "newline" in case else b"c\xff02")
            os.rename(root / split / "c02", os.path.join(bytes(root / split), new))


BAD_FOLDERS = {
    "empty class folder": "class folder {root}/train/c03 has no images; remove it or add images",
    "not an image": "{root}/train/c01/notes.txt is not an image (only .jpg, .jpeg, .png files",
    "classes differ": "classes differ between train/ and val/ (only in train: c02; only in val: "
                      "cat); give both splits the same class folders",
    "no images": "{root}/train has no class folders; put each class's images in",
    "no val split": "{root}/val is not a folder; an image folder needs",
    "one class": "{root}/train has one class folder (c00); a classifier needs two or more",
    "a class name with a newline": "class folder 'c\\n02' in {root}/train: not a printable "
                                   "name (control characters, bytes that are not UTF-8, or "
                                   "spaces at an end); rename it",
    "a class name not UTF-8": "class folder 'c\\udcff02' in {root}/train: not a printable name",
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folders_fail_at_start_in_one_line(case, folder, capsys):
    _damage(folder, case)
    message = BAD_FOLDERS[case].format(root=folder.resolve())
    with pytest.raises(DataError, match=None) as err:
        load_folder(folder)
    assert message in str(err.value) and "\n" not in str(err.value)
    # The command: exit 2, one line, nothing trained.
    args = ["--dataset", "imagefolder", "--data-dir", str(folder), "--depth", "18",
            "--epochs", "1", "--device", "cpu", "--data-workers", "0"]
    assert train_main(args) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and message in err_lines[0], err_lines


def test_imagenet_checks_its_thousand_classes(folder):
    with pytest.raises(DataError, match="train has 3 class folders, expected 1000"):
        load_folder(folder, 1000, "imagenet")


def test_undecodable_files_are_counted_skipped_and_named(folder, caplog):
    """A truncated JPEG and a text file named .jpg: each replaced by the next image of the split
    with that image's own label, counted, named in the log; `bad_images: error` stops."""
    train, _ = load_folder(folder)
    truncated, fake = train.paths[2], train.paths[20]
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 3])
    Path(fake).write_text("not a JPEG")
    batches = FolderBatches(train, "cifar", 32, *CIFAR_NORM, batch_size=12, device="cpu",
                            train=False, workers=0)
    with caplog.at_level(logging.WARNING, logger=images.__name__):
        labels = torch.cat([y for _, y in batches.epoch(0)])
    assert sorted(s.split(" (")[0] for s in batches.skipped) == sorted([truncated, fake])
    assert "skipped 2 undecodable image(s)" in caplog.text and truncated in caplog.text
    # The substitutes' labels are their own: the next files, here of the same class.
    assert labels.tolist() == train.labels.tolist()
    item = FolderImages(train, "cifar", 32, False, 0, (0, 0, 0), (1, 1, 1))[(0, 2, 2)]
    assert item[1] == train.labels[3] and colour_class(item[0].numpy()) == train.labels[3]

    strict = FolderBatches(train, "cifar", 32, *CIFAR_NORM, batch_size=12, device="cpu",
                           train=False, workers=0, bad_images="error")
    with pytest.raises(DataError, match=f"cannot decode {truncated} .*set bad_images: skip"):
        list(strict.epoch(0))


def test_a_run_of_undecodable_files_stops_in_one_line(folder, capsys):
    """16 undecodable files in a row (here: every training file), met inside a DataLoader worker:
    one DataError line from the training process, not the worker's traceback; the command exits
    2 with that line."""
    train, _ = load_folder(folder)
    for path in train.paths:
        Path(path).write_text("not an image")
    batches = FolderBatches(train, "cifar", 32, *CIFAR_NORM, batch_size=12, device="cpu",
                            train=True, workers=1)
    message = "16 images in a row cannot be decoded, e.g. "
    with pytest.raises(DataError) as err:
        list(batches.epoch(0))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert f"check the files under {train.root}" in str(err.value)
    args = ["--dataset", "imagefolder", "--data-dir", str(folder), "--depth", "8", "--k", "1",
            "--epochs", "1", "--device", "cpu", "--data-workers", "1", "--batch-size", "12",
            "--recipe", "cifar", "--config", str(folder.parent / "cifar_net.yaml")]
    (folder.parent / "cifar_net.yaml").write_text("architecture: {dataset: cifar10}\n")
    assert train_main(args) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and message in err_lines[0], err_lines


def _skipped_on_rank(rank, cfg):
    from orchestrator.run.loop import train_loop
    from orchestrator.run.session import LocalSession

    metrics = train_loop(cfg, LocalSession(cfg, interactive=False, echo=False))
    assert metrics["skipped_images"] == 2, (rank, metrics["skipped_images"])


def test_skipped_images_are_summed_over_data_parallel_replicas(folder, tmp_path):
    """Two undecodable files, two data-parallel replicas (each reads its slice of every batch):
    both ranks report 2, the epoch's count, not their own share."""
    from orchestrator.run.config import TrainConfig
    from tests.ranks import run_ranks

    train, _ = load_folder(folder)
    for i in (4, 20):  # not neighbours: each is met once, at its own position
        Path(train.paths[i]).write_text("not an image")
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(folder), recipe="cifar",
                      architecture=dict(depth=8, k=1, dataset="cifar10"), batch_size=12,
                      epochs=1, device="cpu", data_workers=0, parallel=dict(dp=2),
                      checkpoint_dir=str(tmp_path / "ckpt"))
    run_ranks(2, _skipped_on_rank, cfg)


def test_the_cost_estimate_counts_an_image_folder_without_train_size(folder):
    """A study on an image folder without `train_size`: the dry run's cost counts the folder's
    training images (36 here); a folder not there yet counts 0."""
    from orchestrator.results import training_flops
    from orchestrator.study.config import load_study
    from orchestrator.study.preview import estimated_cost

    study_file = Path(__file__).parent.parent / "search_spaces" / "imagefolder_cpu.yaml"
    settings = ["train.train_size=null", "train.batch_size=8", "train.epochs=2"]
    study = load_study(study_file, [*settings, f"train.data_dir={folder}"])
    assert estimated_cost(study, 10**9) == training_flops(10**9, 2 * (36 // 8), 8)
    missing = load_study(study_file, [*settings, f"train.data_dir={folder / 'absent'}"])
    assert estimated_cost(missing, 10**9) == 0


def test_an_epoch_is_a_pure_function_of_seed_and_epoch(folder):
    """Same (seed, epoch): the same batches, with or without worker processes; another epoch
    or seed: other ones. The ImageNet recipe's crops and colour noise included."""
    train, _ = load_folder(folder)

    def epoch(seed, e, workers):
        b = FolderBatches(train, "imagenet", 64, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD,
                          batch_size=12, device="cpu", train=True, seed=seed, workers=workers)
        return list(b.epoch(e))

    a, b = epoch(1, 0, 0), epoch(1, 0, 1)
    assert len(a) == 3 and a[0][0].shape == (12, 3, 64, 64)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], epoch(1, 1, 0)[0][0])
    assert not torch.equal(a[0][0], epoch(2, 0, 0)[0][0])
    # The workers hand over uint8 pixels and one colour map per image; the batches the training
    # process makes of them (maps applied batched, in either memory format) hold each image's
    # own map applied to its own pixels, as float64 arithmetic gives it.
    data = FolderImages(train, "imagenet", 64, True, 1, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)
    last = FolderBatches(train, "imagenet", 64, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD,
                         batch_size=12, device="cpu", train=True, seed=1, workers=0,
                         channels_last=True)
    keys = last.shard_indices(0)
    for (x, y), (xl, yl), batch in zip(a, last.epoch(0), keys):
        items = [data[(0, p, i)] for p, i in batch]
        maps = [data.maps(colour[None]) for _, _, _, colour in items]
        expected = torch.stack([
            torch.einsum("ij,hwj->ihw", M[0].double(), pixels.double())
            + t[0].double()[:, None, None] for (pixels, *_), (M, t) in zip(items, maps)])
        assert x.is_contiguous() and xl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x.double(), expected, rtol=1e-6, atol=1e-5)
        assert torch.equal(x, xl) and torch.equal(y, yl)
        assert y.tolist() == [label for _, label, _, _ in items]


def test_files_decode_to_the_pixels_pil_gives(folder, tmp_path):
    """`read_image` (torchvision's decoders, PIL where they do not give 8-bit RGB): the RGB
    pixels of PIL's `convert("RGB")`, for RGB, grayscale and CMYK JPEGs and PNGs of every mode."""
    paths = [str(p) for p in sorted(folder.rglob("*")) if p.is_file()]
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for mode in ("P", "RGBA", "LA", "L", "1"):  # 16-bit: scaled, not PIL's clip (below)
        paths.append(str(tmp_path / f"{mode.replace(';', '')}.png"))
        Image.fromarray(pixels).convert(mode).save(paths[-1])
    modes = set()
    for path in paths:
        with Image.open(path) as pil:
            modes.add(pil.mode)
            expected = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
        got = images.read_image(path)
        assert got.dtype == torch.uint8 and torch.equal(got, expected), path
    assert {"RGB", "L", "CMYK", "P", "RGBA", "LA", "1"} <= modes


def test_the_resize_stays_close_to_pils_bilinear(tmp_path):
    """The workers' geometry (a slice, then torch's antialiased bilinear on uint8) against PIL's
    bilinear resize of the same box, which the recipe was written with: random-sized crops
    (down- and upscaled), the evaluation centre crop and a flip, on ImageNet-like JPEGs; within
    rounding of the two kernels: mean abs difference under half a grey level in every image
    (measured: 0.05 over all, single pixels up to a few levels at sharp edges)."""
    root = write_image_folder(tmp_path / "big", classes=2, train=6, val=1, size=(300, 260),
                              noise=60)
    train, _ = load_folder(root)
    for is_train in (True, False):
        data = FolderImages(train, "imagenet", 112, is_train, 0, (0, 0, 0), (1, 1, 1))
        differences = []
        for i, path in enumerate(train.paths):
            image = images.read_image(path)
            draws = data.draw(image.shape[2], image.shape[1], np.random.default_rng(i))
            got = images.geometry(image, draws, 112, data.pad_value).numpy().astype(float)
            x, y, w, h = draws.box
            with Image.open(path) as pil:
                pil = pil.convert("RGB").resize((112, 112), Image.BILINEAR,
                                                 box=(x, y, x + w, y + h))
            if draws.flip:
                pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            differences.append(np.abs(got - np.asarray(pil, dtype=float)))
        assert len({d.shape for d in differences}) == 1
        assert np.mean(differences) < 0.2 and max(d.mean() for d in differences) < 0.5


def test_device_decoding_gives_the_workers_images(folder):
    """`decode: device` on CPU (decode_jpeg on a batch, as on CUDA with nvJPEG): the same
    batches as the workers' path, bit for bit, labels and skipped files included: RGB, grayscale
    and progressive JPEGs go to the device with the workers' draws; CMYK JPEGs, PNGs and files
    that are not JPEGs are decoded by the workers; a truncated JPEG fails on the device and is
    redone the workers' way (its substitute)."""
    from orchestrator.run.config import TrainConfig

    train, val = load_folder(folder)
    with Image.open(train.paths[0]) as first:  # a progressive JPEG too
        first.load()
    first.save(train.paths[0], quality=90, progressive=True)
    sizes = [images.jpeg_size(images.read_bytes(p)) for p in train.paths]
    for path, size in zip(train.paths, sizes):
        mode = Image.open(path).mode
        assert size == (Image.open(path).size if mode in ("RGB", "L") and
                        path.lower().endswith((".jpg", ".jpeg")) else None), path
    assert sum(s is not None for s in sizes) > len(sizes) // 2
    truncated = next(p for p, size in zip(train.paths[4:], sizes[4:]) if size)  # RGB JPEG
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2])
    assert images.jpeg_size(images.read_bytes(truncated)) is None  # cut short: the workers
    for split, recipe, is_train, size in ((train, "imagenet", True, 48),
                                          (val, "imagenet", False, 48),
                                          (train, "cifar", True, 32)):
        def epoch(decode, workers):
            b = FolderBatches(split, recipe, size, *CIFAR_NORM, batch_size=6, device="cpu",
                              train=is_train, seed=2, workers=workers, decode=decode)
            return list(b.epoch(1)), b.skipped
        (reference, skipped) = epoch("workers", 0)
        for workers in (0, 1):
            batches, skipped_here = epoch("device", workers)
            assert len(batches) == len(reference) and skipped_here == skipped
            for (x, y), (xr, yr) in zip(batches, reference):
                assert torch.equal(x, xr) and torch.equal(y, yr)
        if split is train:
            assert [s.split(" (")[0] for s in skipped] == [truncated]
    with pytest.raises(ValueError, match="decode device decodes image files; cifar10 is"):
        TrainConfig(dataset="cifar10", decode="device")


@pytest.mark.parametrize("shape", [(5, 8, 8, 3), (3, 5, 7, 3)])  # 7x5 pixels: not 8 to a row
def test_colour_maps_are_applied_per_image(shape):
    """`apply_colour` (the training process's batched map application): image n's pixels
    through image n's map, in float64 arithmetic, in both memory formats."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    M, t = torch.randn(shape[0], 3, 3, generator=gen), torch.randn(shape[0], 3, generator=gen)
    expected = torch.einsum("nij,nhwj->nihw", M.double(), x.double()) + t.double()[..., None, None]
    for fmt in (torch.channels_last, torch.contiguous_format):
        got = images.apply_colour(x, M, t, fmt)
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-4)


def test_data_parallel_replicas_get_disjoint_slices_of_each_global_batch(folder):
    """Two replicas (a two-worker data-parallel run; the index is the mesh's replica index,
    from the global rank): disjoint, together the one-replica batch, training and evaluation."""
    train, val = load_folder(folder)
    for split, is_train, size in ((train, True, 12), (val, False, 8)):
        def make(shard):
            return FolderBatches(split, "cifar", 32, *CIFAR_NORM, batch_size=size, device="cpu",
                                 train=is_train, seed=3, shard=shard, workers=0)
        whole = make((0, 1)).shard_indices(4)
        parts = [make((r, 2)).shard_indices(4) for r in range(2)]
        assert len(whole) == len(parts[0]) == len(parts[1])
        seen = []
        for step, batch in enumerate(whole):
            mine = [set(p[step]) for p in parts]
            assert not mine[0] & mine[1] and mine[0] | mine[1] == set(batch)
            seen += [i for _, i in batch]
        assert len(seen) == len(set(seen))  # no image twice in an epoch
        y_whole = torch.cat([y for _, y in make((0, 1)).epoch(4)])
        y_parts = [[y for _, y in make((r, 2)).epoch(4)] for r in range(2)]
        assert torch.equal(y_whole, torch.cat([torch.cat(pair) for pair in zip(*y_parts)]))


def reference_colour(x: torch.Tensor, factors, order, alpha) -> torch.Tensor:
    """fb.resnet.torch's ColorJitter and Lighting, one image at a time, as transforms.lua."""
    gray_w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    out = []
    for img, f, o, a in zip(x, factors, order, alpha):
        for op in o.tolist():
            gs = (img * gray_w).sum(0, keepdim=True)
            if op == 0:    # Brightness: blend with black
                img = img * f[0]
            elif op == 1:  # Contrast: blend with the mean of the grayscale image
                img = img * f[1] + gs.mean() * (1 - f[1])
            else:          # Saturation: blend with the grayscale image
                img = img * f[2] + gs * (1 - f[2])
        eigvec = torch.tensor(images.PCA_EIGVEC)
        rgb = (eigvec * (a * torch.tensor(images.PCA_EIGVAL)).view(1, 3)).sum(1)
        out.append(img + rgb.view(3, 1, 1))
    return torch.stack(out)


def colour_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """`images.colour_transform` applied to images in [0, 1] (N, 3, H, W)."""
    M, t = images.colour_transform(x.mean((2, 3)), *map(torch.from_numpy,
                                                        images.colour_draws(len(x), rng)))
    return torch.einsum("nij,njhw->nihw", M, x) + t[:, :, None, None]


def test_colour_augmentation_matches_fb_resnet_torch():
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    got = colour_augment(x, np.random.default_rng(5))
    factors, order, alpha = images.colour_draws(6, np.random.default_rng(5))  # the same draws
    assert len({tuple(o) for o in order.tolist()}) > 1  # the random order is exercised
    torch.testing.assert_close(got, reference_colour(x, *map(torch.from_numpy,
                                                             (factors, order, alpha))))


def numpy_colour_maps(colour: np.ndarray, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """The colour maps as the training process made them on the host, in numpy, before they
    moved to torch on the batch's device: the reference they must equal."""
    means, factors, order, lighting = (colour[:, :3], colour[:, 3:6],
                                       colour[:, 6:9].astype(np.int64), colour[:, 9:])
    n = len(means)
    gray = np.array((0.299, 0.587, 0.114))
    eye, to_gray = np.eye(3), np.tile(gray, (3, 1))
    M, t = np.tile(eye, (n, 1, 1)), np.zeros((n, 3))
    for step in range(3):
        op = order[:, step]
        alpha = factors[np.arange(n), op][:, None, None]
        mean_gray = (np.einsum("nij,nj->ni", M, means) + t) @ gray
        A = alpha * eye + (1 - alpha) * (op == 2)[:, None, None] * to_gray
        offset = (1 - alpha[:, :, 0]) * (op == 1)[:, None] * mean_gray[:, None]
        M, t = A @ M, np.einsum("nij,nj->ni", A, t) + offset
    t = t + (lighting * np.asarray(images.PCA_EIGVAL)) @ np.asarray(images.PCA_EIGVEC).T
    M, t = torch.from_numpy(M).float(), torch.from_numpy(t).float()
    mean, std = torch.tensor(mean), torch.tensor(std)
    return M / std[:, None], (255 * t - mean) / std


def imagenet_colour_inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (n, 8, 8, 3) and their colour draws as the workers make them."""
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
    draws = np.concatenate(images.colour_draws(n, rng), axis=1)
    return pixels, torch.from_numpy(draws)


def test_colour_maps_in_torch_equal_the_numpy_reference():
    """The maps made in torch (on the batch's device) are the host's numpy maps, within float32
    rounding, for the same draws: the same seeding, the same augmentation."""
    data = FolderImages(None, "imagenet", 8, True, 0, datasets.IMAGENET_MEAN,
                        datasets.IMAGENET_STD)
    pixels, draws = imagenet_colour_inputs(256, seed=4)
    colour = data.colour_inputs(pixels, draws)
    means = pixels.reshape(256, -1, 3).double().mean(1) / 255
    assert torch.equal(colour, torch.cat([means, draws], 1))
    assert len({tuple(o) for o in colour[:, 6:9].tolist()}) == 6  # every order drawn
    M, t = data.maps(colour)
    M0, t0 = numpy_colour_maps(colour.numpy(), datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)
    assert M.dtype == t.dtype == torch.float32
    torch.testing.assert_close(M, M0, rtol=2e-7, atol=0)
    torch.testing.assert_close(t, t0, rtol=2e-7, atol=1e-6)


@pytest.mark.parametrize("recipe, train", [("imagenet", True), ("imagenet", False),
                                           ("cifar", True)])
def test_colour_maps_are_made_on_the_batchs_device_without_reading_back(recipe, train):
    """On a meta device (shapes only: a read-back to the host, `.cpu()`, `.numpy()`, `.item()`,
    raises): a batch's colour inputs and maps are made there from its pixels and draws, so on
    a GPU (`decode: device`) nothing waits for the device."""
    data = FolderImages(None, recipe, 8, train, 0, datasets.IMAGENET_MEAN,
                        datasets.IMAGENET_STD)
    for shape in ((4, 8, 8, 3), (4, 5, 7, 3)):  # 64 pixels to a row, and not
        pixels = torch.empty(shape, dtype=torch.uint8, device="meta")
        colour = data.colour_inputs(pixels, torch.empty(4, 9, dtype=torch.float64,
                                                        device="meta"))
        assert colour.device.type == "meta"
        assert colour.shape == (4, 12 if (recipe, train) == ("imagenet", True) else 0)
        M, t = data.maps(colour)
        assert M.device.type == t.device.type == "meta"
        assert M.shape == (4, 3, 3) and t.shape == (4, 3) and M.dtype == torch.float32


def test_a_folder_run_resumes_as_if_uninterrupted(tmp_path, monkeypatch):
    """CIFAR-family net on a folder of 32x32 images: two epochs in one go, and one epoch, a stop,
    then a resumed second, log the same numbers (order and augmentation follow (seed, epoch))."""
    from orchestrator.run.session import LocalSession

    root = write_image_folder(tmp_path / "folder", train=8, val=2, size=(32, 32),
                              exact_size=True)
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset: imagefolder\ndata_dir: {root}\narchitecture: {{depth: 8, "
                      f"dataset: cifar10}}\nbatch_size: 8\nepochs: 2\ndevice: cpu\n"
                      f"data_workers: 0\nprecision: fp32\nlog_every: 1\n")

    def run(name, resume=False):
        args = ["--config", str(config), "--checkpoint-dir", str(tmp_path / name),
                "--log-json", str(tmp_path / f"{name}.jsonl")]
        status = train_main(args + (["--resume"] if resume else []))
        return status, [json.loads(line) for line in
                        (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    status, whole = run("whole")
    assert status == 0
    report = LocalSession.report

    def stop_after_the_first_epoch(self, metrics, state):
        report(self, metrics, state)
        raise KeyboardInterrupt
    monkeypatch.setattr(LocalSession, "report", stop_after_the_first_epoch)
    assert run("parts")[0] != 0
    monkeypatch.setattr(LocalSession, "report", report)
    status, parts = run("parts", resume=True)
    keys = ("kind", "epoch", "step", "loss", "train_loss", "test_error", "test_error_top5")
    assert status == 0 and len(whole) == len(parts)
    assert [{k: r.get(k) for k in keys} for r in whole] == [{k: r.get(k) for k in keys}
                                                            for r in parts]
    # The lesion command evaluates the folder's checkpoint as the run did.
    from orchestrator.commands.lesion import main as lesion_main

    assert lesion_main([str(tmp_path / "whole" / "checkpoint.pt"), "--out",
                        str(tmp_path / "lesion")]) == 0
    first = (tmp_path / "lesion" / "lesion.csv").read_text().splitlines()[1].split(",")
    assert float(first[-1]) == pytest.approx(whole[-1]["test_error"])


def test_imagenet_recipe_defaults():
    from orchestrator.run.config import TrainConfig
    from orchestrator.run.step import build_optimizer

    cfg = TrainConfig(dataset="imagenet", architecture=dict(depth=101, k=2))
    assert (cfg.recipe, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.momentum,
            cfg.nesterov) == ("imagenet", 90, 256, 0.1, 1e-4, 0.9, True)
    assert TrainConfig(dataset="imagenet", architecture=dict(depth=18), batch_size=1024).lr == 0.4
    per_epoch = 5004  # 1,281,167 images / 256
    _, scheduler = build_optimizer(cfg, torch.nn.Linear(2, 2), 90 * per_epoch)
    assert sorted(scheduler.milestones) == [30 * per_epoch, 60 * per_epoch]
    with pytest.raises(ValueError, match="recipe imagenet augments image files; cifar10 is"):
        TrainConfig(dataset="cifar10", recipe="imagenet")
    # A folder trained as CIFAR: the CIFAR recipe and a CIFAR-family net.
    cfg = TrainConfig(dataset="imagefolder", architecture=dict(depth=8, dataset="cifar10"))
    assert (cfg.recipe, cfg.epochs, cfg.lr, cfg.architecture.dataset) == ("cifar", 200, 0.1,
                                                                          "cifar10")


@pytest.mark.slow
def test_imagenet_recipe_trains_a_generated_imagenet_folder(tmp_path):
    """`orchestrator.train` on an ImageNet-layout folder (3 classes, ImageNet-like JPEGs): the
    ImageNet recipe (224 crops), top-1 and top-5 error, data and step time in every epoch's
    record; the head has the folder's 3 classes; `--decode device` trains the same."""
    root = write_image_folder(tmp_path / "imagenet", train=16, val=4, size=(300, 260))
    log = tmp_path / "log.jsonl"
    assert train_main(["--dataset", "imagefolder", "--data-dir", str(root), "--depth", "18",
                       "--batch-size", "16", "--steps", "2", "--device", "cpu",
                       "--data-workers", "1", "--log-json", str(log),
                       "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    (epoch,) = [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "epoch"]
    assert 0 <= epoch["test_error_top5"] <= epoch["test_error"] <= 1
    assert epoch["data_time_s"] > 0 and epoch["step_time_s"] > 0 and epoch["skipped_images"] == 0
    state = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=False)
    assert state["config"]["recipe"] == "imagenet" and state["config"]["lr"] == 0.1 * 16 / 256
    head = [w for w in state["model"].values() if w.ndim == 2][-1]  # the last Linear layer
    assert state["architecture"]["classes"] == 3 and head.shape[0] == 3
    # Decoding on the device (here the CPU): the same images, so the same run.
    on_device = tmp_path / "on_device.jsonl"
    assert train_main(["--dataset", "imagefolder", "--data-dir", str(root), "--depth", "18",
                       "--batch-size", "16", "--steps", "2", "--device", "cpu",
                       "--data-workers", "1", "--decode", "device", "--log-json",
                       str(on_device)]) == 0
    (again,) = [r for r in map(json.loads, on_device.read_text().splitlines())
                if r["kind"] == "epoch"]
    keys = ("train_loss", "test_error", "test_error_top5", "skipped_images")
    assert {k: again[k] for k in keys} == {k: epoch[k] for k in keys}


@pytest.mark.slow
def test_cifar10_as_png_folder_trains_like_the_native_loader(cifar10_dir, tmp_path):
    """CIFAR-10 written out as PNG files, trained through `imagefolder` with the CIFAR recipe and
    a CIFAR net: the same test error as the native loader (same seed, recipe and images), within
    seed noise (the two draw their augmentation differently)."""
    root = write_cifar_as_png(cifar10_dir, tmp_path / "cifar_png", train=2000, test=1000)
    common = ["--depth", "8", "--k", "1", "--train-size", "2000", "--test-size", "1000",
              "--batch-size", "64", "--epochs", "4", "--lr", "0.05", "--device", "cpu",
              "--seed", "1", "--precision", "fp32"]
    as_cifar = tmp_path / "as_cifar.yaml"  # a CIFAR-family net on the folder
    as_cifar.write_text("architecture: {depth: 8, dataset: cifar10}\n")
    errors = {}
    for name, args in (("native", ["--dataset", "cifar10", "--data-dir", str(cifar10_dir)]),
                       ("folder", ["--dataset", "imagefolder", "--data-dir", str(root),
                                   "--config", str(as_cifar), "--data-workers", "1"])):
        log = tmp_path / f"{name}.jsonl"
        assert train_main([*common, *args, "--log-json", str(log)]) == 0
        last = [json.loads(r) for r in log.read_text().splitlines()][-1]
        errors[name] = last["test_error"]
    print(f"test error: native {errors['native']:.4f}, folder {errors['folder']:.4f}")
    # Seed noise of this subset and recipe: about 2 points (std between seeds).
    assert errors["native"] < 0.75 and abs(errors["native"] - errors["folder"]) < 0.05, errors


def test_report_shows_top5_beside_top1_and_n0_uses_top1(tmp_path):
    from orchestrator.analysis.report_builder import build_report
    from tests.test_analysis import constructed

    runs = constructed(seeds=2)
    plain, _ = build_report(runs, tmp_path / "plain", "plain", draws=200)
    with_top5 = runs.assign(test_error_top5=runs.test_error / 3)
    n0, path = build_report(with_top5, tmp_path / "top5", "top5", draws=200)
    assert (n0.value, n0.low, n0.high) == (plain.value, plain.low, plain.high)
    text = path.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 24 "))
    expected = with_top5[with_top5.depth == 24].test_error_top5.mean()
    assert "top-5 error" in text and f"| {expected:.2f} |" in row
    assert "top-5 error" not in (tmp_path / "plain" / "report.md").read_text()


@pytest.mark.slow
def test_a_sweep_over_an_image_folder_tracks_top1_and_top5(ray_address, tmp_path, monkeypatch):
    """search_spaces/imagefolder_cpu.yaml on a generated folder (one small trial): every epoch's
    top-1 and top-5 error, data and step time in MLflow; the final top-5 on the run."""
    from orchestrator.commands.sweep import main as sweep_main
    from tests.sweeps import new_database, runs

    root = write_image_folder(tmp_path / "folder", train=16, val=4, size=(32, 32),
                              exact_size=True)
    monkeypatch.chdir(tmp_path)
    uri = new_database(tmp_path)
    study = str(Path(__file__).parent.parent / "search_spaces" / "imagefolder_cpu.yaml")
    assert sweep_main([study, "--data-dir", str(root), "--storage-path", str(tmp_path / "results"),
                       "--tracking-uri", uri, "--set", "space.depth=8", "--set", "space.k=1",
                       "--set", "trials=1", "--set", "concurrency=1", "--set", "train.epochs=2",
                       "--set", "train.batch_size=16",
                       # the whole folder: a size above its images is refused, never cut
                       "--set", "train.train_size=null", "--set", "train.test_size=null"]) == 0
    client, _, (child,) = runs(uri, "imagefolder_cpu")
    assert child.info.status == "FINISHED"
    for key in ("test_error", "test_error_top5", "data_time_s", "step_time_s"):
        history = client.get_metric_history(child.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    top1 = client.get_metric_history(child.info.run_id, "test_error")[-1].value
    assert child.data.metrics["final_test_error_top5"] <= top1 == \
        child.data.metrics["final_test_error"]


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (RGB for (h, w, 3) pixels, grayscale for (h, w)), written by hand: PIL
    writes no 16-bit RGB."""
    import struct
    import zlib

    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour,
                                                                     0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 1])
def test_sixteen_bit_pngs_are_scaled_to_eight_bits_not_clipped(channels, tmp_path):
    """65535 is white: a 16-bit value v reads as round(255 v / 65535), in RGB and grayscale."""
    values = np.array([0, 257, 30000, 40000, 65535], dtype=np.uint16)
    pixels = np.stack([values, values[::-1], values], -1)[None] if channels == 3 else values[None]
    png16(tmp_path / "deep.png", pixels)
    image = images.read_image(str(tmp_path / "deep.png"))
    expected = np.round(pixels.astype(np.float64) * 255 / 65535).astype(np.uint8)
    expected = expected if channels == 3 else np.repeat(expected[..., None], 3, -1)
    assert image.dtype == torch.uint8
    assert image.permute(1, 2, 0).numpy().tolist() == expected.tolist()


def test_an_image_larger_than_the_pixel_cap_is_never_decoded(tmp_path, monkeypatch):
    """A decompression bomb (a small file of a huge image) is refused from its header, in both
    decode paths, and skipped and named as any bad image."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    Image.new("RGB", (150, 100)).save(tmp_path / "bomb.png")  # 1.5 x the cap
    Image.new("RGB", (150, 100)).save(tmp_path / "bomb.jpg")
    for name in ("bomb.png", "bomb.jpg"):
        with pytest.raises(Image.DecompressionBombError, match="150 x 100 pixels, more than the "
                                                                "10,000 an image may have"):
            images.read_image(str(tmp_path / name))


def test_pipes_and_devices_named_as_images_are_skipped_not_read(folder):
    """A FIFO would block the read for ever, /dev/zero never end: each is a bad image."""
    import os

    train, _ = load_folder(folder)
    for path in train.paths[2:4]:
        os.unlink(path)
    os.mkfifo(train.paths[2])
    os.symlink("/dev/zero", train.paths[3])
    data = FolderImages(train, "cifar", 32, train=False, seed=0, mean=(0, 0, 0), std=(1, 1, 1))
    image, label, skipped, _ = data[(0, 2, 2)]  # both met, the next file read instead
    assert image is not None and label == train.labels[4] and len(skipped) == 2
    for path, line in zip(train.paths[2:4], skipped):
        assert line.startswith(f"{path} (OSError: [Errno 22] not a regular file (a pipe, a "
                               f"socket or a device)")


def test_a_full_disk_during_an_image_folder_epoch_ends_in_one_line(folder, tmp_path, capsys,
                                                                    monkeypatch):
    """/dev/shm full while a decoding worker hands over its batch: torch raises it again in
    the training process as a RuntimeError without its errno; it is still a full disk (exit 2,
    one line naming the place), not an internal error."""
    def full(items):
        raise RuntimeError("unable to write to file </torch_1_2_3>: No space left on device (28)")

    monkeypatch.setattr(images, "collate", full)
    config = tmp_path / "run.yaml"
    config.write_text("architecture: {depth: 8, dataset: cifar10}\nrecipe: cifar\n")
    args = ["--config", str(config), "--dataset", "imagefolder", "--data-dir", str(folder),
            "--epochs", "1", "--batch-size", "12", "--device", "cpu", "--data-workers", "1"]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no space left on shared memory (/dev/shm); free space there or "
                   "choose another place"], err
