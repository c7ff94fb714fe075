"""The scan step shared by `inspect --scan` and `edit` without a trigger, and its saved pictures."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from backdoor_scrub.checkpoint import Checkpoint
from backdoor_scrub.commands.common import RunOptions
from backdoor_scrub.commands.samples import Samples
from backdoor_scrub.data import to_unit_range, with_normalization
from backdoor_scrub.files import make_folder, write_atomically
from backdoor_scrub.progress import progress_reporter
from backdoor_scrub.scan import ClassScan, ScanSettings, reconstruct, scan
from backdoor_scrub.triggers import Trigger

SHEET_SCALE = 4


@dataclass(frozen=True)
class ScanReport:
    """Every class's reconstruction, the settings it was flagged with and how long the scan took."""

    classes: list[ClassScan]
    settings: ScanSettings
    seconds: float

    @property
    def norms(self) -> torch.Tensor:
        """Every class's mask norm, in class order."""
        return torch.tensor([result.mask_l1 for result in self.classes])

    @property
    def flagged(self) -> list[ClassScan]:
        """The classes whose reconstructed trigger is anomalously small."""
        return [result for result in self.classes if result.flagged]

    def as_dict(self) -> dict:
        """The `scan` JSON object."""
        return {"classes": [c.as_dict() for c in self.classes], "flagged": [c.index for c in self.flagged],
                "threshold": round(self.settings.threshold, 4), "min_compactness": self.settings.min_compactness,
                "seconds": round(self.seconds, 3)}


def scan_checkpoint(
    checkpoint: Checkpoint, samples: Samples, settings: ScanSettings, seed: int, options: RunOptions
) -> ScanReport:
    """Reconstruct a trigger for every class of the checkpoint from the clean samples."""
    started = time.perf_counter()
    settings = settings.for_classes(checkpoint.spec.num_classes)
    classifier, images, labels = _scan_inputs(checkpoint.model, checkpoint, samples)
    with progress_reporter(options.progress, options.quiet) as progress:
        results = scan(classifier, images, labels, checkpoint.spec.num_classes, settings, seed, progress)
    return ScanReport(results, settings, time.perf_counter() - started)


def rescan_class(
    model: torch.nn.Module, checkpoint: Checkpoint, samples: Samples, index: int, starts: list[Trigger],
    settings: ScanSettings, seed: int, fixed_mask: bool = False,
) -> list[Trigger]:
    """One class's trigger reconstructed again on `model` (the checkpoint's, or an edited copy), once from each
    of `starts`, in one batched optimisation.

    A rescan of an edited model starts from a trigger that worked before: it needs no warm-up and
    fewer steps (`recheck_steps`). With `fixed_mask`, only the pattern inside the start's mask is
    optimised, for the full number of steps (with 60, the no-trigger edit of `t_mnv3_cyan4_bl` left
    53.9% ASR instead of 33.0%).
    """
    if not fixed_mask:
        settings = dataclasses.replace(settings, steps=settings.recheck_steps, warmup_steps=0)
    classifier, images, labels = _scan_inputs(model, checkpoint, samples)
    return reconstruct(classifier, images, labels, [index] * len(starts), settings, seed, start=starts,
                       fixed_mask=fixed_mask)


def _scan_inputs(model: torch.nn.Module, checkpoint: Checkpoint, samples: Samples) -> tuple:
    """(frozen classifier taking [0,1] images, samples in [0,1], their labels), on the samples' device."""
    classifier = with_normalization(model, checkpoint.spec).to(samples.device)
    for parameter in classifier.parameters():
        parameter.requires_grad_(False)
    images = to_unit_range(samples.images.images.to(samples.device))
    return classifier, images, samples.labels.to(samples.device)


def save_triggers(report: ScanReport, folder: Path, samples: Samples, class_names: tuple[str, ...] | None) -> None:
    """Write class_<k>.png (usable as --trigger) per class and contact_sheet.png for a person."""
    make_folder(folder)
    for result in report.classes:
        png = result.trigger.to_png()
        write_atomically(folder / f"class_{result.index}.png", lambda handle, png=png: handle.write(png), True)
    example = to_unit_range(samples.images.images[:1])
    tiles = [_sheet_column(result, example, class_names) for result in report.classes]
    sheet = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
    for index, tile in enumerate(tiles):
        sheet.paste(tile, (index * tiles[0].width, 0))
    write_atomically(folder / "contact_sheet.png", lambda handle: sheet.save(handle, format="PNG"), True)


def _sheet_column(result: ClassScan, example: torch.Tensor, class_names: tuple[str, ...] | None) -> Image.Image:
    """Mask, masked pattern and a stamped example, stacked, under a caption."""
    trigger = result.trigger
    pictures = [trigger.mask.expand(3, -1, -1), (trigger.pattern * trigger.mask).expand(3, -1, -1),
                trigger.stamp(example)[0].expand(3, -1, -1)]
    height, width = trigger.mask.shape[1:]
    size = (width * SHEET_SCALE, height * SHEET_SCALE)
    column = Image.new("RGB", (max(size[0], 96) + 8, 3 * (size[1] + 4) + 44), "white")
    for row, picture in enumerate(pictures):
        array = picture.permute(1, 2, 0).mul(255).round().clamp(0, 255).byte().numpy()
        column.paste(Image.fromarray(array).resize(size, Image.Resampling.NEAREST), (4, 44 + row * (size[1] + 4)))
    draw = ImageDraw.Draw(column)
    name = class_names[result.index] if class_names else str(result.index)
    colour = "red" if result.flagged else "black"
    draw.text((4, 2), f"{result.index} {name}"[:16], fill=colour)
    draw.text((4, 14), f"L1 {result.mask_l1:.1f}", fill=colour)
    draw.text((4, 26), f"AI {result.anomaly_index:.1f}" + (" FLAG" if result.flagged else ""), fill=colour)
    return column
