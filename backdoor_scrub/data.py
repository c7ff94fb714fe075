"""Image folders -> uint8 tensors at the model's input size; class mapping; normalization."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from backdoor_scrub.checkpoint import ModelSpec
from backdoor_scrub.errors import ScrubError, input_error

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # uint8 images, labels, their triggered twins


@dataclass
class ImageSet:
    """Images as uint8 [N,C,H,W] at the model's input size, with labels when the folder has them.

    `triggered` holds the triggered copy of each image (from --triggered-dir), in the same order.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    paths: list[Path]
    class_mapping: str
    triggered: torch.Tensor | None = None
    skipped: list[Path] = field(default_factory=list)  # unreadable images left out (--skip-bad-images)

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """(uint8 images, labels, triggered twins or None) in order, `batch_size` at a time."""
        for start in range(0, len(self.paths), batch_size):
            rows = slice(start, start + batch_size)
            yield self.images[rows], self.labels[rows], None if self.triggered is None else self.triggered[rows]


@dataclass(frozen=True)
class ImageListing:
    """The image files of a folder and their class indices (None: unlabeled), before any is decoded."""

    root: Path
    paths: list[Path]
    labels: list[int] | None
    class_mapping: str
    twins: list[Path] | None = None
    skipped: list[Path] = field(default_factory=list)  # images left out already: their triggered copy is missing

    def decoded_bytes(self, spec: ModelSpec) -> int:
        """What all the images would take in memory once decoded at the model's input size."""
        channels, height, width = spec.input_size
        return len(self.paths) * channels * height * width * (1 if self.twins is None else 2)

    def without(self, indices: set[int]) -> ImageListing:
        """The listing less the entries at `indices`."""
        keep = [index for index in range(len(self.paths)) if index not in indices]
        pick = lambda values: None if values is None else [values[index] for index in keep]  # noqa: E731
        left_out = [self.paths[index] for index in sorted(indices)]
        return ImageListing(self.root, pick(self.paths), pick(self.labels), self.class_mapping, pick(self.twins),
                            self.skipped + left_out)

    def paired_with(self, triggered_root: Path, on_bad_image: Callable[[ScrubError], None] | None) -> ImageListing:
        """The listing with each image's triggered twin: the file at the same relative path under `triggered_root`.

        Images without a twin are an input error naming them (the first 20), or, when
        `on_bad_image` is given, reported to it one by one and left out.
        """
        if not triggered_root.is_dir():
            raise input_error(f"{triggered_root}: not a folder")
        twins = [triggered_root / path.relative_to(self.root) for path in self.paths]
        missing = [index for index, twin in enumerate(twins) if not twin.is_file()]
        if missing and on_bad_image is None:
            names = ", ".join(str(twins[index]) for index in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise input_error(f"{triggered_root}: no triggered copy for {len(missing)} image(s): {names}{more}")
        for index in missing:
            on_bad_image(input_error(f"{twins[index]}: missing (the triggered copy of {self.paths[index]})"))
        if len(missing) == len(self.paths):
            raise input_error(f"{triggered_root}: none of the {len(self.paths)} images has a triggered copy")
        paired = ImageListing(self.root, self.paths, self.labels, self.class_mapping, twins, self.skipped)
        return paired.without(set(missing))


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
    """Decode every image of a folder (see list_image_folder and decode_listing) into one tensor."""
    return decode_listing(list_image_folder(root, spec, allow_unlabeled), spec, workers, on_bad_image)


def decode_listing(
    listing: ImageListing,
    spec: ModelSpec,
    workers: int = 0,
    on_bad_image: Callable[[ScrubError], None] | None = None,
) -> ImageSet:
    """Decode every image of a listing into one tensor.

    With `workers` > 0 the images are decoded by that many threads. Every unreadable image is
    found first; then they are one input error that lists them, or, when `on_bad_image` is given,
    reported to it one by one and left out (ImageSet.skipped).
    """
    read = functools.partial(_read_entry, listing=listing, input_size=spec.input_size)
    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:
            decoded = list(pool.map(read, range(len(listing.paths))))
    else:
        decoded = [read(index) for index in range(len(listing.paths))]
    bad = [index for index, pair in enumerate(decoded) if isinstance(pair, ScrubError)]
    report_bad_images([decoded[index] for index in bad], on_bad_image)
    kept = [index for index, pair in enumerate(decoded) if not isinstance(pair, ScrubError)]
    if not kept:
        raise input_error(f"{listing.root}: none of the {len(listing.paths)} images could be read")
    images, triggered = _stack([decoded[index] for index in kept])
    labels = None if listing.labels is None else torch.tensor([listing.labels[index] for index in kept])
    return ImageSet(images, labels, [listing.paths[index] for index in kept], listing.class_mapping, triggered,
                    listing.skipped + [listing.paths[index] for index in bad])


def readable_part(
    listing: ImageListing, workers: int = 0, on_bad_image: Callable[[ScrubError], None] | None = None
) -> ImageListing:
    """The listing without its unreadable images (then in `skipped`), found by opening and verifying every
    file (without decoding it) before a streamed run starts; reported as decode_listing reports them."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(functools.partial(_check_entry, listing=listing), range(len(listing.paths))))
    bad = [index for index, problem in enumerate(problems) if problem is not None]
    report_bad_images([problems[index] for index in bad], on_bad_image)
    if len(bad) == len(listing.paths):
        raise input_error(f"{listing.root}: none of the {len(listing.paths)} images could be read")
    return listing.without(set(bad))


def check_images(folders: list[Path], workers: int = 0) -> None:
    """Open and verify every image file of the folders (and their class subfolders) without decoding it:
    one input error naming every unreadable one, before any model is loaded."""
    files = [path for folder in folders if folder.is_dir()
             for place in [folder, *sorted(d for d in folder.iterdir() if d.is_dir())] for path in _image_files(place)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        outcomes = pool.map(functools.partial(_or_error, verified_size), files)
        report_bad_images([outcome for outcome in outcomes if isinstance(outcome, ScrubError)], None)


def report_bad_images(errors: list[ScrubError], on_bad_image: Callable[[ScrubError], None] | None) -> None:
    """Unreadable images: one input error naming them all (the first 20, then a count), or each reported."""
    if not errors:
        return
    if on_bad_image is not None:
        for error in errors:
            on_bad_image(error)
        return
    if len(errors) == 1:
        raise errors[0]
    more = f"; and {len(errors) - 20} more" if len(errors) > 20 else ""
    raise input_error(f"{len(errors)} unreadable images: {'; '.join(map(str, errors[:20]))}{more} "
                      "(--skip-bad-images leaves them out)")


def stream_image_folder(
    listing: ImageListing,
    spec: ModelSpec,
    batch_size: int,
    workers: int = 0,
) -> Iterator[Batch]:
    """(uint8 images, labels, twins) of a labelled listing, one batch at a time: memory does not grow with the folder.

    The next batch is decoded by `workers` threads (at least one) while the caller uses this one.
    Check the listing with readable_part first: an image that still cannot be decoded is an input error.
    """
    read = functools.partial(_read_entry, listing=listing, input_size=spec.input_size)
    starts = list(range(0, len(listing.paths), batch_size))
    with ThreadPoolExecutor(max(1, workers)) as pool:

        def submit(start: int) -> list[Future]:
            return [pool.submit(read, index) for index in range(start, min(start + batch_size, len(listing.paths)))]

        pending = submit(0)
        for start in starts:
            current, pending = pending, submit(start + batch_size)
            decoded = [future.result() for future in current]
            report_bad_images([pair for pair in decoded if isinstance(pair, ScrubError)], None)
            images, triggered = _stack(decoded)
            yield images, torch.tensor(listing.labels[start : start + len(decoded)]), triggered


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
    with opened_image(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, channels).permute(2, 0, 1)


def verified_size(path: Path) -> tuple[int, int]:
    """Width and height of an image whose file passes Pillow's verify (truncation, bad checksums, bombs)."""
    with opened_image(path) as image:
        image.verify()
        return image.size


def image_size(path: Path) -> tuple[int, int]:
    """Width and height from the image's header (no decoding)."""
    with opened_image(path) as image:
        return image.size


@contextlib.contextmanager
def opened_image(path: Path) -> Iterator[Image.Image]:
    """The image file, open; anything that stops Pillow reading it (a decompression bomb included) is the
    input error `PATH: not a readable image (reason)`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise input_error(f"{path}: not a readable image ({exc})") from exc


def _read_entry(
    index: int, listing: ImageListing, input_size: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor | None] | ScrubError:
    """(image, its triggered twin or None) of one listing entry, or the error that says why it cannot be read."""

    def read() -> tuple[torch.Tensor, torch.Tensor | None]:
        path = listing.paths[index]
        if listing.twins is None:
            return read_image(path, input_size), None
        _check_pair_sizes(path, listing.twins[index], image_size)
        return read_image(path, input_size), read_image(listing.twins[index], input_size)

    return _or_error(read)


def _check_entry(index: int, listing: ImageListing) -> ScrubError | None:
    """Why one listing entry (and its twin) cannot be read, from opening and verifying the files; None if it can."""
    if listing.twins is None:
        problem = _or_error(verified_size, listing.paths[index])
    else:
        problem = _or_error(_check_pair_sizes, listing.paths[index], listing.twins[index], verified_size)
    return problem if isinstance(problem, ScrubError) else None


def _check_pair_sizes(path: Path, twin: Path, size_of: Callable[[Path], tuple[int, int]]) -> None:
    """A triggered copy keeps its image's size: an input error naming both sizes otherwise."""
    size, twin_size = size_of(path), size_of(twin)
    if twin_size != size:
        raise input_error(f"{twin}: {'x'.join(map(str, twin_size))}, but {path} is "
                          f"{'x'.join(map(str, size))} (a triggered copy keeps the image's size)")


def _or_error(function: Callable, *args):
    """function(*args), or the ScrubError it raised (so that every bad image can be collected, then reported)."""
    try:
        return function(*args)
    except ScrubError as error:
        return error


def _stack(pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images and twins of decoded pairs as two batches (twins None when there are none)."""
    images = torch.stack([image for image, _ in pairs])
    return images, None if pairs[0][1] is None else torch.stack([twin for _, twin in pairs])


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
