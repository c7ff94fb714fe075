"""Run a classifier over a labelled image set, clean and stamped, and compute its metrics."""

from __future__ import annotations

import torch
from rich.progress import Progress
from torch import nn

from backdoor_scrub.data import ImageSet
from backdoor_scrub.inference import predict
from backdoor_scrub.metrics import Metrics, compute_metrics, infer_target
from backdoor_scrub.triggers import Trigger


def evaluate(
    classifier: nn.Module,
    images: ImageSet,
    num_classes: int,
    device: torch.device,
    batch_size: int = 256,
    trigger: Trigger | None = None,
    target: int | None = None,
    progress: Progress | None = None,
) -> Metrics:
    """CA and per-class accuracy; with a trigger also ASR and RA (target inferred when None)."""
    labels = images.labels
    clean = predict(classifier, images.images, device, batch_size, progress=progress, description="clean")
    if trigger is None:
        return compute_metrics(clean, labels, num_classes)
    victims = labels != target if target is not None else torch.ones_like(labels, dtype=torch.bool)
    stamped = predict(
        classifier, images.images[victims], device, batch_size, trigger.stamp, progress, "stamped"
    )
    if target is None:
        target = infer_target(stamped, num_classes)
        stamped = stamped[labels != target]
    return compute_metrics(clean, labels, num_classes, stamped, target)
