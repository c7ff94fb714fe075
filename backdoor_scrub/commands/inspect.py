"""`scrub inspect`: what a checkpoint holds and which of its layers can be hooked and edited."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from backdoor_scrub.checkpoint import Checkpoint
from backdoor_scrub.commands.common import ModelOutcome, Outcome, RunOptions, for_each_model
from backdoor_scrub.layers import count_parameters, describe_layers


def run_inspect(paths: list[Path], options: RunOptions) -> Outcome:
    """Describe each checkpoint: spec, provenance and a dry-run table of its layers."""
    return for_each_model(paths, options, describe_checkpoint)


def describe_checkpoint(checkpoint: Checkpoint) -> ModelOutcome:
    """The inspect JSON entry of one loaded checkpoint."""
    spec = checkpoint.spec
    layers = describe_layers(checkpoint.model, spec.input_size)
    return ModelOutcome({
        "path": str(checkpoint.path),
        "status": "ok",
        "arch": spec.arch,
        "num_classes": spec.num_classes,
        "classes": list(spec.classes) if spec.classes else None,
        "input_size": list(spec.input_size),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "parameters": count_parameters(checkpoint.model),
        "sha256": checkpoint.sha256,
        "metadata": {k: v for k, v in checkpoint.metadata.items() if not k.startswith("scrub.")},
        "history": checkpoint.history,
        "layers": [asdict(layer) for layer in layers],
        "auto_selected": [layer.name for layer in layers if layer.auto_selected],
    })
