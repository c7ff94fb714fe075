"""The handful of clean samples that edit and repair work from, and metrics measured on them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from backdoor_scrub.checkpoint import Checkpoint, ModelSpec
from backdoor_scrub.commands.common import RunOptions
from backdoor_scrub.data import ImageSet, Normalize, load_image_folder, to_unit_range, with_normalization
from backdoor_scrub.evaluation import evaluate
from backdoor_scrub.inference import predict
from backdoor_scrub.metrics import Metrics
from backdoor_scrub.triggers import Trigger


@dataclass
class Samples:
    """Clean samples with labels (from class folders, else the model's own predictions)."""

    images: ImageSet
    spec: ModelSpec
    device: torch.device
    batch_size: int
    labels_from: str

    @classmethod
    def load(
        cls, folder: Path, checkpoint: Checkpoint, device: torch.device, options: RunOptions, allow_unlabeled: bool
    ) -> Samples:
        """Read the folder; unlabeled images are labelled with the checkpoint's predictions."""
        spec = checkpoint.spec
        images = load_image_folder(folder, spec, allow_unlabeled, options.workers, options.image_error_handler())
        if images.labels is not None:
            return cls(images, spec, device, options.batch_size, "folder")
        classifier = with_normalization(checkpoint.model, spec)
        images.labels = predict(classifier, images.images, device, options.batch_size)
        return cls(images, spec, device, options.batch_size, "model predictions")

    @property
    def labels(self) -> torch.Tensor:
        """Class index per sample."""
        return self.images.labels

    def inputs(self) -> torch.Tensor:
        """The samples as the model takes them: float, normalized, on the device."""
        normalize = Normalize(self.spec.mean, self.spec.std).to(self.device)
        return normalize(to_unit_range(self.images.images.to(self.device)))

    def model_trigger(self, trigger: Trigger) -> Trigger:
        """The trigger in the model's normalized input space."""
        return trigger.normalized(self.spec.mean, self.spec.std)

    def measure(self, model: nn.Module, trigger: Trigger, target: int | None) -> Metrics:
        """CA, ASR, RA and per-class accuracy of `model` on the samples."""
        classifier = with_normalization(model, self.spec)
        return evaluate(classifier, self.images.batches(self.batch_size), self.spec.num_classes, self.device, trigger,
                        target)

    def fingerprint(self) -> dict:
        """Count and sha256 of the decoded samples and their labels, for provenance."""
        digest = hashlib.sha256(self.images.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return {"count": len(self.images), "sha256": digest.hexdigest(), "labels": self.labels_from}
