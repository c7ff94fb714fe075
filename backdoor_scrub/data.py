"""Image folders -> uint8 tensors at the model's input size; class mapping; normalization."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from backdoor_scrub.checkpoint import ModelSpec
from backdoor_scrub.errors import ScrubError, input_error

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageSet:
    """Images as uint8 [N,C,H,W] at the model's input size, with labels when the folder has them."""

    images: torch.Tensor
    labels: torch.Tensor | None
    paths: list[Path]
    class_mapping: str

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) in order, `batch_size` at a time."""
        yield from zip(self.images.split(batch_size), self.labels.split(batch_size))


@dataclass(frozen=True)
class ImageListing:
    """The image files of a folder and their class indices (None: unlabeled), before any is decoded."""

    root: Path
    paths: list[Path]
    labels: list[int] | None
    class_mapping: str

    def decoded_bytes(self, spec: ModelSpec) -> int:
        """What all the images would take in memory once decoded at the model's input size."""
        channels, height, width = spec.input_size
        return len(self.paths) * channels * height * width


class Normalize(nn.Module):
    """Maps images in [0,1] to the model's normalized input: (x - mean) / std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def with_normalization(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """`model` preceded by its normalization, so it takes images in [0,1]."""
    return nn.Sequential(Normalize(spec.mean, spec.std), model).eval()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float images in [0,1]."""
    return images.float().div_(255)


def list_image_folder(root: Path, spec: ModelSpec, allow_unlabeled: bool = False) -> ImageListing:
    """The images of an ImageFolder-layout folder (or, if allowed, a flat folder of unlabeled images)."""
    if not root.is_dir():
        raise input_error(f"{root}: not a folder")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _image_files(d))
    if class_dirs:
        mapping, how = class_indices([d.name for d in class_dirs], spec, root)
        files = [(path, mapping[d.name]) for d in class_dirs for path in _image_files(d)]
        return ImageListing(root, [path for path, _ in files], [label for _, label in files], how)
    if _image_files(root) and allow_unlabeled:
        return ImageListing(root, _image_files(root), None, "unlabeled")
    if _image_files(root):
        raise input_error(f"{root}: images must be in class subfolders (ImageFolder layout)")
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    raise input_error(f"{root}: no images found (looked for {suffixes}, in class subfolders)")


def load_image_folder(
    root: Path,
    spec: ModelSpec,
    allow_unlabeled: bool = False,
    workers: int = 0,
    on_bad_image: Callable[[ScrubError], None] | None = None,
) -> ImageSet:
    """Decode every image of a folder (see list_image_folder) into one tensor.

    With `workers` > 0 the images are decoded by that many threads. An unreadable image is an
    input error, or, when `on_bad_image` is given, reported to it and left out.
    """
    listing = list_image_folder(root, spec, allow_unlabeled)
    read = functools.partial(_read_or_report, input_size=spec.input_size, on_bad_image=on_bad_image)
    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:
            decoded = list(pool.map(read, listing.paths))
    else:
        decoded = [read(path) for path in listing.paths]
    kept = [index for index, image in enumerate(decoded) if image is not None]
    if not kept:
        raise input_error(f"{root}: none of the {len(listing.paths)} images could be read")
    images = torch.stack([decoded[index] for index in kept])
    labels = None if listing.labels is None else torch.tensor([listing.labels[index] for index in kept])
    return ImageSet(images, labels, [listing.paths[index] for index in kept], listing.class_mapping)


def stream_image_folder(
    listing: ImageListing,
    spec: ModelSpec,
    batch_size: int,
    workers: int = 0,
    on_bad_image: Callable[[ScrubError], None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) of a labelled listing, one batch at a time: memory does not grow with the folder.

    The next batch is decoded by `workers` threads (at least one) while the caller uses this one.
    Unreadable images are handled as in load_image_folder.
    """
    read = functools.partial(_read_or_report, input_size=spec.input_size, on_bad_image=on_bad_image)
    starts = list(range(0, len(listing.paths), batch_size))
    with ThreadPoolExecutor(max(1, workers)) as pool:

        def submit(start: int) -> list[Future]:
            return [pool.submit(read, path) for path in listing.paths[start : start + batch_size]]

        pending, read_any = submit(0), False
        for start in starts:
            current, pending = pending, submit(start + batch_size)
            decoded = [future.result() for future in current]
            kept = [index for index, image in enumerate(decoded) if image is not None]
            if kept:
                read_any = True
                yield (torch.stack([decoded[i] for i in kept]),
                       torch.tensor([listing.labels[start + i] for i in kept]))
    if not read_any:
        raise input_error(f"{listing.root}: none of the {len(listing.paths)} images could be read")


def class_indices(names: list[str], spec: ModelSpec, root: Path) -> tuple[dict[str, int], str]:
    """Map subfolder names to class indices: by class name, else as integers, else sorted order."""
    if spec.classes is not None and all(name in spec.classes for name in names):
        return {name: spec.classes.index(name) for name in names}, "by class name"
    if all(name.isdigit() for name in names):
        unknown = [name for name in names if int(name) >= spec.num_classes]
        if unknown:
            raise input_error(f"{root}: class folder {unknown[0]!r} but the model has {spec.num_classes} classes")
        return {name: int(name) for name in names}, "by number"
    if len(names) > spec.num_classes:
        raise input_error(f"{root}: {len(names)} class folders but the model has {spec.num_classes} classes")
    return {name: index for index, name in enumerate(sorted(names))}, "by sorted order"


def read_image(path: Path, input_size: tuple[int, int, int]) -> torch.Tensor:
    """One image as uint8 [C,H,W], converted to the model's channels and resized."""
    channels, height, width = input_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise input_error(f"{path}: not a readable image ({exc})") from exc
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, channels).permute(2, 0, 1)


def _read_or_report(
    path: Path, input_size: tuple[int, int, int], on_bad_image: Callable[[ScrubError], None] | None
) -> torch.Tensor | None:
    try:
        return read_image(path, input_size)
    except ScrubError as error:
        if on_bad_image is None:
            raise
        on_bad_image(error)
        return None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
