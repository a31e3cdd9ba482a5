"""Image-folder datasets: a user's own folders and ImageNet (ILSVRC2012), read file by file.

Layout: `root/train/<class>/...` and `root/val/<class>/...`, JPEG or PNG of any size and mode
(grayscale, CMYK, palette: converted to RGB); class indices are the sorted folder names, as in
torchvision's `ImageFolder`. Everything the user can fix (a missing split, an empty class folder,
a file that is not an image, classes differing between train/ and val/) is a one-line
`DataError` before training. A file that cannot be decoded when it is read (corrupt, truncated)
is skipped by default: the next image of the split takes its place with its own label, and the
names are counted and logged (`bad_images: error` stops instead).

The pipeline, chosen by measurement (bench/input_pipeline.py, bench/RESULTS.md): DataLoader
worker processes decode with torchvision's decoders (libjpeg-turbo, libpng, straight from the
file's bytes) and do the geometry on uint8 tensors (the crop a slice, the resize torch's
antialiased bilinear, the flip a copy); they hand over uint8 images (a quarter of the bytes of
float ones) with what each image's affine colour map needs; the training process makes the maps
(colour augmentation and normalisation folded together) and applies them batched, on CPU and on
a GPU alike. With `decode: device` the workers only read the JPEGs and draw the augmentation from
the frame header's size; the training process decodes the batch on its device (nvJPEG on CUDA)
and crops there, with the same draws and the same code. An epoch's order and every
random choice are a pure function of (seed, epoch, position), so a resumed run sees
the same data, whatever the number of workers; each data-parallel replica decodes only its
slice of every global batch (the replica index is the mesh's, from the global rank).
"""
from __future__ import annotations

import functools
import errno
import io
import logging
import math
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2.functional import resize

from models.complexity import input_size
from orchestrator.errors import DataError
from orchestrator.run.batches import check_split, share, share_size
from orchestrator.run.cpus import default_workers
from orchestrator.run.data import pad_share
from orchestrator.run.datasets import DATASETS, FOLDER_NORMALIZATION, IMAGENET_CLASSES

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val")
SUBSTITUTES = 16  # undecodable images in a row before the split is declared unreadable

# fb.resnet.torch (datasets/imagenet.lua), which the paper's ImageNet code followed.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
JITTER = 0.4      # brightness, contrast and saturation: factors uniform in [1 - 0.4, 1 + 0.4]
LIGHTING = 0.1    # std of the PCA lighting noise
GRAY = (0.299, 0.587, 0.114)  # luminance weights of R, G, B (grayscale, saturation, contrast)
EVAL_RESIZE = 256 / 224  # evaluation: shorter side to 256, centre crop 224


@dataclass
class FolderSplit:
    """One split of an image folder: file paths and their class indices."""
    root: Path
    classes: tuple[str, ...]
    paths: list[str]
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, size: int | None) -> "FolderSplit":
        """N images drawn by a fixed permutation (the same for every run seed): the files are
        sorted by class, so the first N would hold the first classes only."""
        if size is None or size >= len(self):
            return self
        keep = np.random.default_rng(0).permutation(len(self))[:size]
        return FolderSplit(self.root, self.classes, [self.paths[i] for i in keep],
                           self.labels[keep])


def scan(root: Path, split: str) -> FolderSplit:
    """The images of `root/split/<class>/` (searched recursively, hidden files ignored), checked."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; an image folder needs {root}/train/ and "
                        f"{root}/val/ with one sub-folder per class")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name[0] != ".")
    if not classes:
        raise DataError(f"{folder} has no class folders; put each class's images in "
                        f"{folder}/<class name>/")
    if len(classes) == 1:  # every net is 100% right on one class: nothing is learned
        raise DataError(f"{folder} has one class folder ({classes[0]}); a classifier needs two "
                        f"or more, one per class")
    odd = next((c for c in classes if not c.isprintable() or c != c.strip()), None)
    if odd is not None:  # names go into logs, MLflow and reports, and are compared as text
        raise DataError(f"class folder {odd!r} in {folder}: not a printable name (control "
                        f"characters, bytes that are not UTF-8, or spaces at an end); rename it")
    paths, labels = [], []
    for index, name in enumerate(classes):
        found: list[str] = []
        others: list[str] = []
        for parent, dirs, files in os.walk(folder / name):
            dirs[:] = sorted(d for d in dirs if d[0] != ".")
            for f in sorted(files):
                if f[0] == ".":
                    continue
                (found if f.lower().endswith(IMAGE_SUFFIXES) else others).append(
                    os.path.join(parent, f))
        if others:
            raise DataError(f"{others[0]} is not an image (only {', '.join(IMAGE_SUFFIXES)} "
                            f"files may be in class folders; {len(others)} such file(s) in "
                            f"{folder / name}); move them out")
        if not found:
            raise DataError(f"class folder {folder / name} has no images; remove it or add "
                            f"images ({', '.join(IMAGE_SUFFIXES)})")
        paths += found
        labels += [index] * len(found)
    return FolderSplit(root, tuple(classes), paths, np.asarray(labels, dtype=np.int64))


def load_folder(data_dir: str | Path | None, expected_classes: int | None = None,
                name: str = "imagefolder") -> tuple[FolderSplit, FolderSplit]:
    """(train, val) of an image folder, with the classes of both splits checked to agree."""
    if data_dir is None:
        raise DataError(f"{name} needs a data dir: pass --data-dir DIR (the folder holding "
                        f"train/ and val/)")
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{name}: {root} is not a folder; pass --data-dir pointing at the folder "
                        f"holding train/ and val/")
    train, val = scan(root, "train"), scan(root, "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"{root}: classes differ between train/ and val/ (only in train: "
                        f"{', '.join(only_train[:5]) or '-'}; only in val: "
                        f"{', '.join(only_val[:5]) or '-'}); give both splits the same class "
                        f"folders")
    if expected_classes is not None and len(train.classes) != expected_classes:
        raise DataError(f"{name}: {root}/train has {len(train.classes)} class folders, expected "
                        f"{expected_classes} (ILSVRC2012: train/ and val/ with one folder per "
                        f"synset, val/ sorted into them as the usual valprep.sh does)")
    return train, val


# ----------------------------------------------------------------------------- worker side
def random_sized_crop(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """fb.resnet.torch's RandomSizedCrop: 8-100% of the area, aspect 3/4-4/3, ten attempts;
    (x, y, width, height) or None (then: scale and centre crop)."""
    for _ in range(10):
        area = rng.uniform(0.08, 1.0) * w * h
        aspect = rng.uniform(3 / 4, 4 / 3)
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if rng.uniform() < 0.5:
            cw, ch = ch, cw
        if cw <= w and ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    return None


def centre_box(w: int, h: int, scale: float) -> tuple[int, int, int, int]:
    """The square of the original image (x, y, side, side), in whole pixels, that becomes the
    centre crop once the shorter side is scaled by `scale` (evaluation: 256/224, then the centre
    224)."""
    side = min(min(w, h), round(min(w, h) / scale))
    return (w - side) // 2, (h - side) // 2, side, side


@dataclass
class Draws:
    """The random choices for one image, made from the image's size alone: workers draw them
    before decoding, so the GPU path can decode and crop on the device with the same draws."""
    box: tuple[int, int, int, int]     # (x, y, width, height) of the original image
    shift: tuple[int, int] | None      # the CIFAR recipe's pad-and-crop offset (row, column)
    flip: bool
    colour: np.ndarray                 # the ImageNet recipe's colour draws (9) or empty


def read_bytes(path: str) -> bytearray:
    """A file's bytes, writable (a tensor over them needs no copy). A pipe, a device (a link to
    /dev/zero) or a socket named .jpg raises OSError, a bad image: read, it would block or never
    end (opened without blocking, so a pipe is not waited on)."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a pipe, a socket or a device)", path)
        return bytearray(f.read())


def check_pixels(w: int, h: int) -> None:
    """Refuse an image whose header claims more than PIL's MAX_IMAGE_PIXELS (89 million, about
    9,500 x 9,500): a 380 KB PNG of 20,000 x 20,000 would decode to 1.2 GB. Raised as PIL's
    DecompressionBombError: a bad image, skipped or stopped on by `bad_images`."""
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f"{w} x {h} pixels, more than the "
                                           f"{Image.MAX_IMAGE_PIXELS:,} an image may have")


def read_image(path: str, data: bytearray | None = None) -> torch.Tensor:
    """A file's RGB pixels, uint8 (3, H, W): torchvision's decoders (libjpeg-turbo, libpng; C,
    from the file's bytes), PIL for what they do not read (rarer JPEG variants). Its size is read
    from the header first (`check_pixels`); 16-bit images are scaled to 8 bits (not clipped).
    EXIF orientation is not applied, by either decoder (as torchvision's ImageFolder). Raises
    ValueError/OSError if neither can."""
    data = read_bytes(path) if data is None else data
    with Image.open(io.BytesIO(data)) as pil:  # the header only: no pixel decoded yet
        check_pixels(*pil.size)
        try:
            image = decode_image(torch.frombuffer(data, dtype=torch.uint8),
                                 mode=ImageReadMode.RGB)
            if image.dtype == torch.uint16:  # a 16-bit PNG: 65535 -> 255, rounded
                return ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
            if image.dtype == torch.uint8:
                return image
        except RuntimeError:
            pass
        picture: Image.Image = pil
        if pil.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale
            pixels = np.asarray(pil, dtype=np.int64)
            picture = Image.fromarray(((pixels * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8))
        return torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)


def geometry(image: torch.Tensor, draws: Draws, size: int, pad_value) -> torch.Tensor:
    """An image's crop, resize, pad-and-crop and flip, uint8 (3, H, W) -> uint8 (size, size, 3),
    on the image's device. The crop is a slice; its resize is torch's antialiased bilinear on
    uint8 (PIL's filter, within rounding; on CPU in channels-last, its fast path)."""
    x, y, cw, ch = draws.box
    crop = image[None, :, y:y + ch, x:x + cw]
    if (ch, cw) != (size, size):
        crop = resize(crop.contiguous(memory_format=torch.channels_last), [size, size],
                      antialias=True)
    out = crop[0].permute(1, 2, 0)
    if draws.shift is not None:  # padded with the mean colour: zero after normalisation
        r, c = draws.shift
        padded = out.new_empty((size + 8, size + 8, 3))
        for channel, value in enumerate(pad_value):  # fills: no copy (and wait) per image
            padded[..., channel] = value
        padded[4:4 + size, 4:4 + size] = out
        out = padded[r:r + size, c:c + size]
    if draws.flip:
        out = out.flip(1)
    return out.contiguous()


@dataclass
class Encoded:
    """A JPEG for the training process to decode on its device (`decode: device`): the file's
    bytes (as bytes: pickled through the workers' pipe, not one shared-memory file per image),
    the image's draws, and its key (to redo it the workers' way if the device cannot decode
    it)."""
    data: bytearray
    draws: Draws
    key: tuple[int, int, int]


class FolderImages(torch.utils.data.Dataset):
    """Decoded, geometrically augmented uint8 images (H, W, 3) of one split, each with what its
    affine colour map needs (`colour_inputs`); the training process makes the maps (M, t) that
    augment (ImageNet recipe) and normalise a batch (`maps`: pixel -> M pixel + t) and applies
    them (`apply_colour`). Items are keyed by (epoch, position in the epoch, index): the
    position seeds the augmentation. `decode="device"`: an RGB or grayscale JPEG is handed over
    undecoded (`Encoded`), for the training process to decode and crop on its device."""

    def __init__(self, split: FolderSplit, recipe: str, size: int, train: bool, seed: int,
                 mean: tuple[float, ...], std: tuple[float, ...], decode: str = "workers"):
        self.split, self.recipe, self.size, self.train, self.seed = split, recipe, size, train, seed
        self.mean, self.std = tuple(mean), tuple(std)
        self.pad_value = tuple(round(m) for m in mean)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, int], decode: str | None = None):
        epoch, position, index = key
        skipped: list[str] = []
        for attempt in range(SUBSTITUTES):
            i = (index + attempt) % len(self.split)
            rng = np.random.default_rng((self.seed, epoch, position, attempt))
            try:
                data = read_bytes(self.split.paths[i])
                if (decode or self.decode) == "device":
                    size = jpeg_size(data)
                    if size is not None:
                        check_pixels(*size)
                        item = Encoded(data, self.draw(*size, rng), key)
                        return item, int(self.split.labels[i]), tuple(skipped), None
                image = read_image(self.split.paths[i], data)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                skipped.append(f"{self.split.paths[i]} ({type(exc).__name__}: {exc})")
                continue
            draws = self.draw(image.shape[2], image.shape[1], rng)
            pixels = geometry(image, draws, self.size, self.pad_value)
            colour = self.colour_inputs(pixels[None], torch.from_numpy(draws.colour[None]))[0]
            return pixels, int(self.split.labels[i]), tuple(skipped), colour
        # No image: the training process raises (`FolderBatches.epoch`), in one line; raised in
        # a worker, it would come wrapped in the worker's traceback.
        return None, -1, tuple(skipped), None

    def draw(self, w: int, h: int, rng: np.random.Generator) -> Draws:
        """The augmentation's random choices for a w x h image (or the evaluation crop)."""
        if self.recipe == "imagenet":
            box = random_sized_crop(w, h, rng) if self.train else None
            if box is None:
                box = centre_box(w, h, 1.0 if self.train else EVAL_RESIZE)
            shift = None
        else:  # the CIFAR recipe: shorter side to `size`, centre crop, 4-pixel pad + crop
            box = centre_box(w, h, 1.0)
            drawn = rng.integers(0, 9, 2) if self.train else None
            shift = (int(drawn[0]), int(drawn[1])) if drawn is not None else None
        flip = bool(self.train and rng.uniform() < 0.5)
        colour = (np.concatenate([d[0] for d in colour_draws(1, rng)])
                  if self.train and self.recipe == "imagenet" else np.empty(0))
        return Draws(box, shift, flip, colour)

    def colour_inputs(self, pixels: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """What the colour maps of images (n, H, W, 3) need, (n, 12) float64 on their device
        (ImageNet recipe, training): the per-channel means in [0, 1], then the random draws
        (n, 9) on that device (jitter factors, their order, lighting weights); (n, 0)
        otherwise. Nothing is read back: on a GPU the means stay there. The maps are made
        batched (`maps`): 3x3 algebra costs a call's overhead per image, not per batch."""
        if not (self.train and self.recipe == "imagenet"):
            return torch.empty(len(pixels), 0, dtype=torch.float64, device=pixels.device)
        n, h, w, _ = pixels.shape
        if h * w % 64 == 0:  # 64 pixels to a row: a vectorised column sum (3.5x faster)
            sums = pixels.reshape(n, -1, 192).sum(1, dtype=torch.int32).view(n, 64, 3).sum(1)
        else:
            sums = pixels.reshape(n, h * w, 3).sum(1, dtype=torch.int64)
        means = sums.double() / (h * w * 255)  # exact integer sums
        return torch.cat([means, draws.double()], 1)

    def maps(self, colour: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The colour maps (M, t) of a batch for its uint8 pixels, float32 on `colour`'s device,
        from `colour_inputs` (n, 12 or 0): the colour augmentation, then normalisation by the
        mean and std (0-255)."""
        device = colour.device
        if colour.shape[1]:
            M, t = colour_transform(colour[:, :3], colour[:, 3:6], colour[:, 6:9].long(),
                                    colour[:, 9:])
            M, t = M.float(), t.float()
        else:
            M = torch.eye(3, device=device).expand(len(colour), 3, 3)
            t = torch.zeros(len(colour), 3, device=device)
        mean, std = (constant(v, device, torch.float32) for v in (self.mean, self.std))
        # x01 = x / 255 -> M x01 + t -> (. - mean / 255) / (std / 255)
        return M / std[:, None], (255 * t - mean) / std

    def finish(self, items: list, device: torch.device):
        """A `decode: device` batch, made as `collate` makes the workers' batches, on `device`:
        the `Encoded` JPEGs decoded there in one batched call (nvJPEG on CUDA) and cropped,
        resized and flipped there with the workers' draws. A JPEG the device cannot decode is
        redone the workers' way, here (with its substitute if the file is bad)."""
        items = list(items)
        encoded = [i for i, item in enumerate(items) if isinstance(item[0], Encoded)]
        data = [torch.frombuffer(items[i][0].data, dtype=torch.uint8) for i in encoded]
        decoded = decode_in_order(data, device)
        for i, image in zip(encoded, decoded):
            item, label, skipped, _ = items[i]
            if image is None:
                items[i] = self.__getitem__(item.key, "workers")  # decoded the workers' way
            else:
                pixels = geometry(image, item.draws, self.size, self.pad_value)
                items[i] = (pixels, label, skipped, item.draws)
        images, labels, skipped, colour = zip(*items)
        names = [name for names in skipped for name in names]
        if any(image is None for image in images):
            return None, None, names, None
        x = torch.stack([image.to(device, non_blocking=True) for image in images])
        # The workers' colour inputs are (means, draws); the means again, batched, are the same.
        drawn = np.stack([c.colour if isinstance(c, Draws) else np.asarray(c)[3:]
                          for c in colour])
        draws = to_device(torch.from_numpy(drawn), device)
        return x, torch.tensor(labels), names, self.colour_inputs(x, draws)


def decode_all(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the batched call: one by one
        return [decode_one(d, device) for d in data]


def decode_in_order(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """`decode_all`, on CUDA ordered with the work queued before it. torchvision's nvJPEG
    decode writes its outputs from a stream of its own that does not wait for the caller's
    (pytorch/vision#9606): memory freed by the running step could be written while queued
    kernels still use it. Decoding on a side stream that waits for the current one, then
    making the current stream wait for it (and telling the allocator), orders both."""
    if device.type != "cuda":
        return decode_all(data, device)
    current = torch.cuda.current_stream(device)
    side = side_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        decoded = decode_all(data, device)
    current.wait_stream(side)
    for image in decoded:
        if image is not None:
            image.record_stream(current)  # freed later: not reused before the current's uses
    return decoded


@functools.cache
def side_stream(device: torch.device) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device)


def decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
HUFFMAN_DCT = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive: what nvJPEG decodes


def jpeg_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(width, height) of a Huffman-coded DCT JPEG with 1 or 3 components (grayscale, YCbCr or
    RGB: what nvJPEG decodes to RGB), from its frame header; None for anything else (CMYK,
    lossless or arithmetic-coded JPEG, PNG, not an image, a header cut short), which the workers
    decode. So is a file that does not end with the end-of-image marker (cut short: libjpeg
    fails on it, nvJPEG may decode it without an error)."""
    b = memoryview(data)
    if len(b) < 4 or b[0] != 0xFF or b[1] != 0xD8 or b[-2:] != b"\xff\xd9":
        return None
    i = 2
    while i + 9 < len(b) and b[i] == 0xFF:
        marker = b[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
        elif marker in SOF_MARKERS:
            h, w, components = b[i + 5] << 8 | b[i + 6], b[i + 7] << 8 | b[i + 8], b[i + 9]
            return (w, h) if w and h and components in (1, 3) and marker in HUFFMAN_DCT \
                else None
        elif marker in (0xD9, 0xDA):  # end of image or scan data before a frame header
            return None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + (b[i + 2] << 8 | b[i + 3])
    return None


@dataclass
class ToDecode:
    """A `decode: device` batch's items, for the training process to decode
    (`FolderImages.finish`). Not a sequence: pin_memory passes it through untouched, while the
    workers' tuples may come back as lists (torch before 2.10)."""
    items: list


def collate(items):
    if any(isinstance(item[0], Encoded) for item in items):
        return ToDecode(items)
    images, labels, skipped, colour = zip(*items)
    names = [name for names in skipped for name in names]
    if any(image is None for image in images):  # a run of undecodable files: no batch
        return None, None, names, None
    # default_collate stacks straight into shared memory in a worker: no copy on the way out.
    images = torch.utils.data.default_collate(images)
    return images, torch.tensor(labels), names, torch.stack(colour)


# ----------------------------------------------------------------------------- training side
PIXELS_PER_ROW = 8  # see apply_colour


def apply_colour(x: torch.Tensor, M: torch.Tensor, t: torch.Tensor,
                 memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """Float images (N, 3, H, W) in `memory_format` from uint8 ones (N, H, W, 3) and their
    colour maps: pixel -> M pixel + t (M: (N, 3, 3), t: (N, 3)), on x's device.

    A matrix product with 3 output columns runs far below a BLAS's speed, so each image's pixels
    go 8 to a row through the block-diagonal map diag(M^T, ..., M^T) (24 columns; the zero
    blocks add exact zeros). On CPU a few images at a time, so that the float copy of the uint8
    pixels is still in cache when the product reads it (measured: 1.7x the speed of one product
    over a batch of 64); on a GPU the whole batch in one product."""
    n, h, w, _ = x.shape
    k = PIXELS_PER_ROW if (h * w) % PIXELS_PER_ROW == 0 else 1
    blocks = torch.einsum("ab,nji->naibj", torch.eye(k, device=M.device, dtype=M.dtype),
                          M).reshape(n, 3 * k, 3 * k)
    offsets = t.repeat(1, k)[:, None, :]
    rows = x.view(n, h * w // k, 3 * k)
    out = batch_memory(rows.shape, M.dtype, x.device)
    step = n if x.device.type == "cuda" else 2
    for i in range(0, n, step):
        torch.baddbmm(offsets[i:i + step], rows[i:i + step].to(M.dtype), blocks[i:i + step],
                      out=out[i:i + step])
    return out.view(n, h, w, 3).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


def colour_draws(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The random part of the colour augmentation for n images: jitter factors (brightness,
    contrast, saturation), their order, PCA lighting weights."""
    factors = 1 + JITTER * (2 * rng.random((n, 3)) - 1)
    order = np.argsort(rng.random((n, 3)), axis=1)
    return factors, order, rng.standard_normal((n, 3)) * LIGHTING


def colour_transform(mean: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                     lighting: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fb.resnet.torch's ColorJitter (brightness, contrast, saturation in a random order per
    image) and PCA Lighting, for images in [0, 1] with per-channel means `mean` (n, 3), as one
    affine map per image: x -> M x + t (M: (n, 3, 3), t: (n, 3)), in `mean`'s dtype on its
    device (`order`: int64). Every step is affine in the RGB vector (contrast blends with the
    mean gray level, which follows from the mean), so the whole chain is applied to the pixels
    once."""
    n, device, dtype = len(mean), mean.device, mean.dtype
    gray = constant(GRAY, device, dtype)
    eye, to_gray = torch.eye(3, device=device, dtype=dtype), gray.expand(3, 3)  # rows: gray
    M, t = eye.expand(n, 3, 3), torch.zeros_like(mean)
    for step in range(3):
        op = order[:, step]
        alpha = factors.gather(1, op[:, None])[:, :, None]  # (n, 1, 1)
        mean_gray = (torch.einsum("nij,nj->ni", M, mean) + t) @ gray  # (n,)
        # op 0 brightness: blend with black; 1 contrast: with the mean gray; 2 saturation: with
        # the pixel's gray.
        A = alpha * eye + (1 - alpha) * (op == 2)[:, None, None] * to_gray
        offset = (1 - alpha[:, :, 0]) * (op == 1)[:, None] * mean_gray[:, None]
        M, t = A @ M, torch.einsum("nij,nj->ni", A, t) + offset
    eigvec, eigval = constant(PCA_EIGVEC, device, dtype), constant(PCA_EIGVAL, device, dtype)
    return M, t + (lighting * eigval) @ eigvec.T  # channel c: sum_j eigvec[c,j] a_j eigval_j


@functools.lru_cache(maxsize=64)
def constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant on a device, made once: made per batch on a GPU, each would be a
    blocking host-to-device copy."""
    return torch.tensor(values, dtype=dtype, device=device)


def batch_memory(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for a batch; on CPU (Linux) in transparent huge pages. The C
    allocator maps a batch of this size (about 40 MB for 64 images of 224x224) anew for every
    batch, and faulting it in 4 KiB pages cost twice the colour work itself (measured: 0.24 ms
    per image, 0.03 in 2 MiB pages; bench/RESULTS.md)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE") or nbytes < 2**21:
        return torch.empty(shape, dtype=dtype, device=device)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype).view(shape)  # the tensor keeps `memory` alive


class FolderBatches:
    """Batches of an image-folder split, an `EpochBatches`: epoch e's order and augmentation
    depend only on (seed, e); `shard=(index, count)` gives one data-parallel replica its `share`
    of every global batch, for training and evaluation."""

    def __init__(self, split: FolderSplit, recipe: str, size: int, mean, std, batch_size: int,
                 device: torch.device | str, train: bool, seed: int = 0,
                 shard: tuple[int, int] = (0, 1), channels_last: bool = False,
                 workers: int | None = None, bad_images: str = "skip",
                 decode: str = "workers"):
        self.split, self.recipe, self.batch_size, self.train = split, recipe, batch_size, train
        self.seed, self.device, self.bad_images = seed, torch.device(device), bad_images
        self.shard_index, self.shard_count = shard
        if train:
            check_split(batch_size, self.shard_count)
        self.images = FolderImages(split, recipe, size, train, seed, mean, std, decode)
        self.workers = default_workers() if workers is None else workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.skipped: list[str] = []  # undecodable files met in the latest epoch (this replica)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def shard_indices(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This replica's (position, index) in the epoch's order, batch by batch (empty where
        its share of a short evaluation batch is)."""
        n = len(self.split)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + epoch)) if self.train else torch.arange(n)).tolist()
        return [[(p, order[p]) for p in share(step * self.batch_size, n, self.batch_size,
                                             self.shard_index, self.shard_count)]
                for step in range(len(self))]

    def loader(self, epoch: int, start_step: int = 0) -> torch.utils.data.DataLoader:
        """The workers' side of an epoch: batches (uint8 images, labels, skipped names, the
        colour maps' inputs) as the workers make them."""
        return self.load(epoch, self.shard_indices(epoch)[start_step:])

    def load(self, epoch: int, shares: list[list[tuple[int, int]]]
             ) -> torch.utils.data.DataLoader:
        keys = [[(epoch, p, i) for p, i in mine] for mine in shares if mine]
        return torch.utils.data.DataLoader(
            self.images, batch_sampler=keys, num_workers=self.workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.workers else None)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped = []
        shares = self.shard_indices(epoch)[start_step:]
        loaded = iter(self.load(epoch, shares))
        for mine in shares:
            # An empty share (of a short evaluation batch): an empty batch, so that every replica
            # steps through the same batches.
            yield self.batch(next(loaded)) if mine else self.empty()
        if self.skipped:
            log.warning(f"skipped {len(self.skipped)} undecodable image(s) this epoch, each "
                        f"replaced by the next image of the split: "
                        f"{'; '.join(self.skipped[:20])}")

    def batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images and labels on the device from a batch of the workers (or of JPEGs to
        decode here, on the device)."""
        if isinstance(batch, ToDecode):
            batch = self.images.finish(batch.items, self.device)
        x, y, skipped, colour = batch
        if skipped:
            if self.bad_images == "error":
                raise DataError(f"cannot decode {skipped[0]}; replace or remove the file, "
                                f"or set bad_images: skip")
            self.skipped += skipped
        if x is None:
            raise DataError(f"{SUBSTITUTES} images in a row cannot be decoded, e.g. "
                            f"{skipped[-1]}; check the files under {self.split.root}")
        M, t = (to_device(m, self.device) for m in self.images.maps(colour))
        x = apply_colour(to_device(x, self.device), M, t, self.memory_format)
        return x, to_device(y, self.device)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.images.size
        x = torch.empty((0, 3, size, size), device=self.device, memory_format=self.memory_format)
        return x, torch.empty(0, dtype=torch.int64, device=self.device)

    def padded_epoch(self, shard: tuple[int, int] = (0, 1)
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Evaluation batches as `data.Batches.padded_epoch` gives them: (images, labels, how
        many are real), this replica's share of every batch padded to one fixed size."""
        if shard != (self.shard_index, self.shard_count):
            raise ValueError(f"these batches are replica {self.shard_index} of "
                             f"{self.shard_count}'s, not {shard[0]} of {shard[1]}'s")
        per = share_size(self.batch_size, self.shard_count)
        for x, y in self.epoch(0):
            yield *pad_share(x, y, per, self.memory_format), len(y)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy that does not wait: from pinned memory to CUDA (a pageable source blocks); a
    tensor already there as it is."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def folder_batches(split: FolderSplit, cfg, batch_size: int, device, train: bool,
                   shard: tuple[int, int], normalization: dict) -> FolderBatches:
    """`FolderBatches` for a run config (a resolved `TrainConfig`): its recipe, input size,
    workers, seed and bad-image policy."""
    mean, std = normalization[cfg.recipe]
    return FolderBatches(split, cfg.recipe, input_size(cfg.architecture), mean, std, batch_size,
                         device, train, seed=cfg.seed, shard=shard,
                         channels_last=cfg.channels_last, workers=cfg.data_workers,
                         bad_images=cfg.bad_images, decode=cfg.decode)


# The loaders and the batcher that `DATASETS` (datasets.py) names for image folders.
def load_image_folder(data_dir, train_size, test_size, seed) -> tuple[FolderSplit, FolderSplit]:
    return load_folder(data_dir)


def load_imagenet(data_dir, train_size, test_size, seed) -> tuple[FolderSplit, FolderSplit]:
    return load_folder(data_dir, IMAGENET_CLASSES, "imagenet")


def image_folder_batches(split: FolderSplit, cfg, batch_size: int, device, train: bool,
                         shard: tuple[int, int]) -> FolderBatches:
    return folder_batches(split, cfg, batch_size, device, train, shard, FOLDER_NORMALIZATION)


@functools.lru_cache(maxsize=16)
def train_images(name: str, data_dir: str | None) -> int:
    """Images in a dataset's training split, for cost estimates: the registry's count, or for
    an image folder the files in its train/ (listed, none opened; 0 while the folder is not
    there, as in a dry run before the data is copied)."""
    count = DATASETS[name].train_images
    if count or data_dir is None or not (Path(data_dir).expanduser() / "train").is_dir():
        return count
    return len(scan(Path(data_dir).expanduser().resolve(), "train"))
