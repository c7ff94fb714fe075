"""CA, ASR, RA, per-class accuracy, DER and target inference (BackdoorBench definitions)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Metrics:
    """Clean and backdoor metrics of one model on one labelled image set; fractions in [0,1]."""

    clean_accuracy: float
    per_class_accuracy: list[float | None]
    images: int = 0  # clean images the accuracies are taken on
    per_class_images: list[int] | None = None
    attacked_images: int | None = None  # triggered images of other classes than the target: ASR's denominator
    attack_success_rate: float | None = None
    robust_accuracy: float | None = None
    target: int | None = None
    target_class_accuracy: float | None = None
    clean_target_rate: float | None = None  # the same images as ASR's, unstamped, assigned to the target

    def as_dict(self) -> dict:
        """The JSON fields of these metrics."""
        return asdict(self)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels."""
    return (predictions == labels).double().mean().item() if len(labels) else float("nan")


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Accuracy on the images of each class; None for a class with no images."""
    return [
        accuracy(predictions[labels == c], labels[labels == c]) if (labels == c).any() else None
        for c in range(num_classes)
    ]


def attack_success_rate(stamped_predictions: torch.Tensor, target: int) -> float:
    """Fraction of stamped non-target images assigned to the target."""
    return (stamped_predictions == target).double().mean().item()


def clean_target_rate(clean_predictions: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """Fraction of the non-target images assigned to the target without a trigger: ASR's floor.

    A model that confuses other classes with the target does so stamped or not; ASR cannot fall
    below this rate by removing a backdoor, and a clean model shows about this ASR for any trigger.
    """
    others = labels != target
    return (clean_predictions[others] == target).double().mean().item() if others.any() else float("nan")


def robust_accuracy(stamped_predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of stamped non-target images still assigned their true class."""
    return accuracy(stamped_predictions, labels)


def infer_target(stamped_predictions: torch.Tensor, num_classes: int) -> int:
    """The class most predicted on stamped images."""
    return int(torch.bincount(stamped_predictions, minlength=num_classes).argmax())


def defense_effectiveness_rate(metrics: Metrics, baseline: Metrics) -> float | None:
    """DER = (max(0, ASR_b - ASR) - max(0, CA_b - CA) + 1) / 2; None without ASR."""
    if metrics.attack_success_rate is None or baseline.attack_success_rate is None:
        return None
    asr_drop = max(0.0, baseline.attack_success_rate - metrics.attack_success_rate)
    ca_drop = max(0.0, baseline.clean_accuracy - metrics.clean_accuracy)
    return (asr_drop - ca_drop + 1) / 2


def compute_metrics(
    clean_predictions: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    stamped_predictions: torch.Tensor | None = None,
    target: int | None = None,
) -> Metrics:
    """All metrics; `stamped_predictions` cover the images whose label is not `target`."""
    per_class = per_class_accuracy(clean_predictions, labels, num_classes)
    clean = accuracy(clean_predictions, labels)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    if stamped_predictions is None or target is None:
        return Metrics(clean, per_class, len(labels), counts)
    victims = labels[labels != target]
    return Metrics(
        clean_accuracy=clean,
        per_class_accuracy=per_class,
        images=len(labels),
        per_class_images=counts,
        attacked_images=len(stamped_predictions),
        attack_success_rate=attack_success_rate(stamped_predictions, target),
        robust_accuracy=robust_accuracy(stamped_predictions, victims),
        target=target,
        target_class_accuracy=per_class[target],
        clean_target_rate=clean_target_rate(clean_predictions, labels, target),
    )
