"""Trigger PNG -> (pattern, mask) at the model's input size; stamping images with it."""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from backdoor_scrub.contract import TRIGGER_POSITIONS
from backdoor_scrub.errors import input_error, usage_error


class Stamp(Protocol):
    """What the edit, the repair and the metrics need of any trigger (a stamp, or a --trigger-fn function)."""

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """The triggered batch of float images [N,C,H,W]."""

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Stamp:
        """The same trigger for inputs normalized with (x - mean) / std."""

    def provenance(self) -> dict:
        """What the history and JSON record of the trigger."""


@dataclass(frozen=True)
class Trigger:
    """A trigger at full input size: x' = (1 - mask) * x + mask * pattern, all in [0,1]."""

    pattern: torch.Tensor
    mask: torch.Tensor
    sha256: str

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp float images in [0,1] of shape [N,C,H,W]."""
        mask = self.mask.to(images.device)
        return images * (1 - mask) + self.pattern.to(images.device) * mask

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Trigger:
        """The same trigger for normalized inputs: stamping commutes with (x - mean) / std."""
        return Trigger(normalized_images(self.pattern[None], mean, std)[0], self.mask, self.sha256)

    def provenance(self) -> dict:
        """What the history and JSON record of it: the sha256 of its source and the placed trigger as a PNG."""
        return {"sha256": self.sha256, "png_base64": base64.b64encode(self.to_png()).decode()}

    def to_png(self) -> bytes:
        """The placed trigger as a full-size RGBA PNG (alpha = mask), loadable with load_trigger."""
        rgb = self.pattern.expand(3, -1, -1) if self.pattern.shape[0] == 1 else self.pattern
        rgba = torch.cat([rgb, self.mask]).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0)
        buffer = io.BytesIO()
        Image.fromarray(rgba.numpy(), mode="RGBA").save(buffer, format="PNG")
        return buffer.getvalue()


def load_trigger(
    path: Path, input_size: tuple[int, int, int], alpha: float = 1.0, position: str = "br"
) -> Trigger:
    """Read a trigger PNG (RGBA: alpha is the mask; else `alpha` everywhere) and place it."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise input_error(f"{path}: cannot read the trigger ({exc.strerror})") from exc
    return parse_trigger(raw, str(path), input_size, alpha, position)


def parse_trigger(
    raw: bytes, source: str, input_size: tuple[int, int, int], alpha: float = 1.0, position: str = "br"
) -> Trigger:
    """A trigger from PNG bytes; `source` names it in error messages."""
    channels, height, width = input_size
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            rgba = image.convert("RGBA")
    except OSError as exc:
        raise input_error(f"{source}: not a readable trigger image ({exc})") from exc
    patch_w, patch_h = rgba.size
    if patch_w > width or patch_h > height:
        raise input_error(f"{source}: trigger is {patch_w}x{patch_h}, larger than the {width}x{height} input")
    pattern = _to_tensor(rgba.convert("L" if channels == 1 else "RGB"))
    mask = _to_tensor(rgba.getchannel("A")) if has_alpha else torch.full((1, patch_h, patch_w), float(alpha))
    left, top = placement(position, (patch_w, patch_h), (width, height), source)
    full_pattern = torch.zeros(channels, height, width)
    full_mask = torch.zeros(1, height, width)
    full_pattern[:, top : top + patch_h, left : left + patch_w] = pattern
    full_mask[:, top : top + patch_h, left : left + patch_w] = mask
    return Trigger(full_pattern, full_mask, hashlib.sha256(raw).hexdigest())


def placement(position: str, patch: tuple[int, int], image: tuple[int, int], source: str) -> tuple[int, int]:
    """Top-left corner (x, y) of a patch placed at `position` (a named corner, center or X,Y)."""
    (patch_w, patch_h), (width, height) = patch, image
    named = {
        "tl": (0, 0), "tr": (width - patch_w, 0), "bl": (0, height - patch_h),
        "br": (width - patch_w, height - patch_h),
        "center": ((width - patch_w) // 2, (height - patch_h) // 2),
    }
    if position in named:
        return named[position]
    try:
        left, top = (int(v) for v in position.split(","))
    except ValueError:
        raise usage_error(f"--trigger-pos {position!r}: use one of {', '.join(TRIGGER_POSITIONS)} or X,Y") from None
    if not (0 <= left <= width - patch_w and 0 <= top <= height - patch_h):
        raise input_error(f"{source}: trigger at {left},{top} does not fit inside the {width}x{height} input")
    return left, top


def _to_tensor(image: Image.Image) -> torch.Tensor:
    channels = len(image.getbands())
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().div(255)
    return pixels.view(image.height, image.width, channels).permute(2, 0, 1)


@dataclass(frozen=True)
class TriggeredCopies:
    """Triggered copies of the samples themselves (--triggered-dir): row i is sample i with the trigger.

    Unlike a stamp it cannot be re-applied to other images, nor follow a shift or a mirror: the
    samples are not augmented when it is used (editing.copies_for).
    """

    images: torch.Tensor
    folder: str
    sha256: str

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> TriggeredCopies:
        """The copies normalized with (x - mean) / std."""
        return TriggeredCopies(normalized_images(self.images, mean, std), self.folder, self.sha256)

    def provenance(self) -> dict:
        """What the history and JSON record: the folder and the sha256 of the decoded copies."""
        return {"triggered_dir": self.folder, "sha256": self.sha256}


def normalized_images(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """A batch [N,C,H,W] in [0,1] normalized with (x - mean) / std per channel."""
    shape = (1, -1, 1, 1)
    return (images - torch.tensor(mean).view(shape).to(images)) / torch.tensor(std).view(shape).to(images)
