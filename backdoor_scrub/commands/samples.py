"""The handful of clean samples that edit and repair work from, and metrics measured on them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from backdoor_scrub.checkpoint import Checkpoint, ModelSpec
from backdoor_scrub.commands.common import RunOptions, skipped_images
from backdoor_scrub.data import ImageSet, Normalize, decode_listing, list_image_folder, to_unit_range, with_normalization
from backdoor_scrub.evaluation import evaluate, evaluate_poisoned
from backdoor_scrub.inference import batch_for, forward_batched, predict
from backdoor_scrub.metrics import Metrics
from backdoor_scrub.poisoned import PoisonedExamples, assumed_classes, paired_twins, pseudo_pairs
from backdoor_scrub.triggers import Stamp, TriggeredCopies

Trigger = Stamp | TriggeredCopies | PoisonedExamples


@dataclass
class Samples:
    """Clean samples with labels (from class folders, else the model's own predictions)."""

    images: ImageSet
    spec: ModelSpec
    device: torch.device
    batch_size: int
    labels_from: str
    options: RunOptions

    @classmethod
    def load(
        cls, folder: Path, checkpoint: Checkpoint, device: torch.device, options: RunOptions, allow_unlabeled: bool,
        triggered_dir: Path | None = None,
    ) -> Samples:
        """Read the folder (and the triggered copy of each image); unlabeled images get the checkpoint's predictions."""
        spec = checkpoint.spec
        batch_size = batch_for(options.batch_size, spec.input_size)
        listing = list_image_folder(folder, spec, allow_unlabeled)
        if triggered_dir is not None:
            listing = listing.paired_with(triggered_dir, options.image_error_handler())
        images = decode_listing(listing, spec, options.workers, options.image_error_handler())
        if images.labels is not None:
            return cls(images, spec, device, batch_size, "folder", options)
        classifier = with_normalization(checkpoint.model, spec)
        images.labels = predict(classifier, images.images, device, batch_size)
        return cls(images, spec, device, batch_size, "model predictions", options)

    @property
    def labels(self) -> torch.Tensor:
        """Class index per sample."""
        return self.images.labels

    def inputs(self) -> torch.Tensor:
        """The samples as the model takes them: float, normalized, on the device."""
        normalize = Normalize(self.spec.mean, self.spec.std).to(self.device)
        return normalize(to_unit_range(self.images.images.to(self.device)))

    def triggered_copies(self, folder: Path) -> TriggeredCopies:
        """The triggered copies read beside the samples, in [0,1], on the device."""
        digest = hashlib.sha256(self.images.triggered.numpy().tobytes()).hexdigest()
        return TriggeredCopies(to_unit_range(self.images.triggered.to(self.device)), str(folder), digest)

    def poisoned_examples(self, folder: Path) -> PoisonedExamples:
        """Unpaired poisoned examples (--poisoned-dir): a flat folder, or class folders of their true classes."""
        on_bad_image = self.options.image_error_handler()
        listing = list_image_folder(folder, self.spec, allow_unlabeled=True)
        examples = decode_listing(listing, self.spec, self.options.workers, on_bad_image)
        digest = hashlib.sha256(examples.images.numpy().tobytes()).hexdigest()
        return PoisonedExamples(to_unit_range(examples.images.to(self.device)), examples.labels, str(folder), digest)

    def model_trigger(self, trigger: Trigger) -> Trigger:
        """The trigger in the model's normalized input space."""
        return trigger.normalized(self.spec.mean, self.spec.std)

    def fitting_set(self, model: nn.Module, triggers: list[Trigger], target: int) -> tuple[torch.Tensor, list, torch.Tensor]:
        """What an edit or a repair fits: (the samples as the model takes them, the triggers in that space, labels).

        Poisoned examples have no clean twin: each is paired with samples of its class (see
        poisoned.pseudo_pairs), and the pairs take the samples' place.
        """
        inputs = self.inputs()
        if not any(isinstance(t, PoisonedExamples) for t in triggers):
            return inputs, [self.model_trigger(t) for t in triggers], self.labels
        (examples,) = triggers
        normalized = self.model_trigger(examples)
        logits = forward_batched(model.eval(), normalized.images, self.batch_size)
        sampled = torch.bincount(self.labels, minlength=self.spec.num_classes) > 0
        classes = assumed_classes(examples.labels, logits, target, sampled)
        samples, paired = pseudo_pairs(self.labels, classes)
        twins = paired_twins(inputs, normalized.images, samples, paired)
        return inputs[samples], [TriggeredCopies(twins, examples.folder, examples.sha256)], self.labels[samples]

    def measure(self, model: nn.Module, trigger: Trigger, target: int | None) -> Metrics:
        """CA, ASR, RA and per-class accuracy of `model` on the samples (ASR: on the poisoned examples when given)."""
        classifier = with_normalization(model, self.spec)
        batches = self.images.batches(self.batch_size)
        if isinstance(trigger, PoisonedExamples):
            return evaluate_poisoned(classifier, batches, self.spec.num_classes, self.device, trigger, target,
                                     self.batch_size)
        return evaluate(classifier, batches, self.spec.num_classes, self.device, trigger, target)

    def fingerprint(self) -> dict:
        """Count and sha256 of the decoded samples and their labels, for provenance."""
        digest = hashlib.sha256(self.images.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return {"count": len(self.images), "sha256": digest.hexdigest(), "labels": self.labels_from,
                "skipped_images": skipped_images(self.images.skipped)}
