"""Run a classifier over labelled image batches, clean and stamped, and compute its metrics."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from rich.progress import Progress
from torch import nn

from backdoor_scrub.data import to_unit_range
from backdoor_scrub.metrics import Metrics, compute_metrics, infer_target
from backdoor_scrub.triggers import Trigger


@torch.inference_mode()
def evaluate(
    classifier: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    device: torch.device,
    trigger: Trigger | None = None,
    target: int | None = None,
    progress: Progress | None = None,
    total: int | None = None,
) -> Metrics:
    """CA and per-class accuracy; with a trigger also ASR and RA (target inferred when None).

    `batches` are (uint8 images, labels), e.g. ImageSet.batches or data.stream_image_folder; only
    predictions are kept, so memory does not grow with the number of images. With a known target
    only the images of other classes are stamped.
    """
    classifier.to(device).eval()
    task = progress.add_task("evaluating", total=total) if progress else None
    labels, clean, stamped, stamped_labels = [], [], [], []
    for images, batch_labels in batches:
        inputs = to_unit_range(images.to(device))
        labels.append(batch_labels)
        clean.append(classifier(inputs).argmax(1).cpu())
        if trigger is not None:
            victims = (batch_labels != target) if target is not None else torch.ones_like(batch_labels, dtype=torch.bool)
            if victims.any():
                stamped.append(classifier(trigger.stamp(inputs[victims.to(device)])).argmax(1).cpu())
                stamped_labels.append(batch_labels[victims])
        if progress:
            progress.advance(task, len(images))
    labels_all, clean_all = _cat(labels), _cat(clean)
    if trigger is None:
        return compute_metrics(clean_all, labels_all, num_classes)
    stamped_all, stamped_labels_all = _cat(stamped), _cat(stamped_labels)
    if target is None:
        target = infer_target(stamped_all, num_classes)
        stamped_all = stamped_all[stamped_labels_all != target]
    return compute_metrics(clean_all, labels_all, num_classes, stamped_all, target)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
