"""Run a classifier over labelled image batches, clean and stamped, and compute its metrics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from rich.progress import Progress
from torch import nn

from backdoor_scrub.data import Batch, to_unit_range
from backdoor_scrub.inference import fast_layout, forward_batched
from backdoor_scrub.metrics import Metrics, attack_success_rate, compute_metrics, infer_target, robust_accuracy
from backdoor_scrub.poisoned import PoisonedExamples
from backdoor_scrub.triggers import Stamp


@torch.inference_mode()
def evaluate(
    classifier: nn.Module,
    batches: Iterable[Batch],
    num_classes: int,
    device: torch.device,
    trigger: Stamp | None = None,
    target: int | None = None,
    progress: Progress | None = None,
    total: int | None = None,
) -> Metrics:
    """CA and per-class accuracy; with a trigger, or triggered twins in the batches, also ASR and RA.

    `batches` are (uint8 images, labels, triggered twins or None), e.g. ImageSet.batches or
    data.stream_image_folder; only predictions are kept, so memory does not grow with the number
    of images. Twins (from --triggered-dir) are used as they are; else `trigger` stamps the
    images. With a known target only the images of other classes are attacked; else the target is
    inferred from the attacked predictions.
    """
    classifier.to(device).eval()
    task = progress.add_task("evaluating", total=total) if progress else None
    labels, clean, stamped, stamped_labels, attacked = [], [], [], [], trigger is not None
    with fast_layout(classifier, device):
        for images, batch_labels, twins in batches:
            inputs = to_unit_range(images.to(device))
            labels.append(batch_labels)
            clean.append(classifier(inputs).argmax(1).cpu())
            attacked = attacked or twins is not None
            if attacked:
                victims = (batch_labels != target) if target is not None else torch.ones_like(batch_labels, dtype=torch.bool)
                if victims.any():
                    victim_rows = victims.to(device)
                    triggered = trigger.stamp(inputs[victim_rows]) if twins is None else to_unit_range(twins[victims].to(device))
                    stamped.append(classifier(triggered).argmax(1).cpu())
                    stamped_labels.append(batch_labels[victims])
            if progress:
                progress.advance(task, len(images))
    labels_all, clean_all = _cat(labels), _cat(clean)
    if not attacked:
        return compute_metrics(clean_all, labels_all, num_classes)
    stamped_all, stamped_labels_all = _cat(stamped), _cat(stamped_labels)
    if target is None:
        target = infer_target(stamped_all, num_classes)
        stamped_all = stamped_all[stamped_labels_all != target]
    return compute_metrics(clean_all, labels_all, num_classes, stamped_all, target)


@torch.inference_mode()
def evaluate_poisoned(
    classifier: nn.Module,
    batches: Iterable[Batch],
    num_classes: int,
    device: torch.device,
    poisoned: PoisonedExamples,
    target: int | None,
    batch_size: int,
) -> Metrics:
    """CA and per-class accuracy on the clean batches; ASR on unpaired poisoned examples (and RA when their
    classes are known). Without a known target it is the class most examples go to; an example of the target
    class is not counted, and in a flat folder every example counts as a victim.
    """
    clean = evaluate(classifier, batches, num_classes, device)
    predictions = forward_batched(classifier, poisoned.images.to(device), batch_size).argmax(1).cpu()
    target = infer_target(predictions, num_classes) if target is None else target
    labels = None if poisoned.labels is None else poisoned.labels.cpu()
    victims = torch.ones(len(predictions), dtype=torch.bool) if labels is None else labels != target
    attacked = predictions[victims]
    return replace(clean, attacked_images=len(attacked), attack_success_rate=attack_success_rate(attacked, target),
                   robust_accuracy=None if labels is None else robust_accuracy(attacked, labels[victims]),
                   target=target, target_class_accuracy=clean.per_class_accuracy[target])


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
