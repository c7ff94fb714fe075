"""Unpaired poisoned examples (--poisoned-dir): pseudo-pairs with clean samples of the class each belongs to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backdoor_scrub.errors import input_error
from backdoor_scrub.triggers import normalized_images

TRUE_CLASS = "clean activations of their true class (class folders)"
RUNNER_UP = "clean activations of the class the model ranks first after the target (flat folder)"


@dataclass(frozen=True)
class PoisonedExamples:
    """Triggered images whose clean versions are unknown, in [0,1]; `labels` are their true classes when known.

    The edit cannot map each one to its own clean activations, so it pairs each with clean samples of
    its class (the true one from class folders, else the one the model ranks first after the target)
    and maps it to their activations: in expectation, to the class's clean activations.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    folder: str
    sha256: str

    @property
    def values(self) -> str:
        """Where the edit takes the poisoned examples' values from, in words."""
        return RUNNER_UP if self.labels is None else TRUE_CLASS

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> PoisonedExamples:
        """The examples normalized with (x - mean) / std."""
        return PoisonedExamples(normalized_images(self.images, mean, std), self.labels, self.folder, self.sha256)

    def provenance(self) -> dict:
        """What the history and JSON record: the folder, the sha256 of the decoded images, their count and the mode."""
        return {"poisoned_dir": self.folder, "sha256": self.sha256, "count": len(self.images), "values": self.values}


def assumed_classes(labels: torch.Tensor | None, logits: torch.Tensor, target: int, sampled: torch.Tensor) -> torch.Tensor:
    """Each poisoned example's class: its label when known, else the class with a sample the model ranks
    highest after the target (what the example most likely was before the trigger).

    `sampled` marks the classes that have clean samples; an example can only be paired within those.
    """
    if labels is not None:
        return labels.to(logits.device)
    allowed = sampled.to(logits.device).clone()
    allowed[target] = False
    if not bool(allowed.any()):
        raise input_error("--poisoned-dir: the clean samples hold no class other than the target to pair with")
    return logits.masked_fill(~allowed, float("-inf")).argmax(1)


def pseudo_pairs(sample_labels: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample index, poisoned index or -1) of every pair, class by class.

    Within a class of n samples and m poisoned examples there are max(n, m) pairs, cycling through
    both, so every sample and every example is used. A sample of a class with no poisoned example is
    paired with itself (-1): it keeps its clean output. Examples of a class with no sample are left out.
    """
    sample_labels, classes = sample_labels.cpu(), classes.cpu()
    samples, examples = [], []
    for label in sample_labels.unique().tolist():
        in_class = (sample_labels == label).nonzero().flatten()
        poisoned = (classes == label).nonzero().flatten()
        count = max(len(in_class), len(poisoned))
        samples.append(in_class[torch.arange(count) % len(in_class)])
        examples.append(poisoned[torch.arange(count) % len(poisoned)] if len(poisoned) else torch.full((count,), -1))
    return torch.cat(samples), torch.cat(examples)


def paired_twins(inputs: torch.Tensor, poisoned: torch.Tensor, samples: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
    """The twin of every pair: its poisoned example, or the sample itself where it has none."""
    twins = inputs[samples].clone()
    has_example = examples >= 0
    twins[has_example] = poisoned[examples[has_example]].to(twins)
    return twins

