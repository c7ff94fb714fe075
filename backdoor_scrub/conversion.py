"""Advice for a pickle checkpoint: what a safe, weights-only read shows of it, and how to convert it."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from backdoor_scrub.checkpoint import strip_prefixes
from backdoor_scrub.weight_shapes import matching_architectures

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts nest the weights
TRAINING_SPEC = "'input_size': 'C,H,W', 'mean': 'M,M,M', 'std': 'S,S,S'"


def pickle_advice(path: Path) -> str:
    """Why `path` is refused and the command that converts this very file (with what could be read of it)."""
    refused = f"{path}: pickle checkpoints are refused (they can run code)"
    stem = path.with_suffix(".safetensors")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it may not read
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever stops the weights-only reader, the file cannot be read safely
        return (f"{refused}, and a weights-only read cannot open it ({_first_line(exc)}): if it is a whole "
                f"pickled model and you trust it, load it where its code is importable and save its weights: "
                f"python -c \"import torch, safetensors.torch as s; m = torch.load('{path}', weights_only=False); "
                f"s.save_file(m.state_dict(), '{stem}', metadata={{'arch': 'NAME', 'num_classes': 'N', "
                f"{TRAINING_SPEC}}})\"")
    weights, key = _weights(loaded)
    if not weights:
        return f"{refused}; a weights-only read finds no tensors in it"
    stored = strip_prefixes(list(weights))
    shapes = {name: tuple(weights[source].shape) for name, source in stored.items()}
    matches = matching_architectures(shapes)
    arch, classes = matches[0] if len(matches) == 1 else ("NAME", "N")
    found = (f"its {len(weights)} tensors fit torchvision's {arch} with {classes} classes" if len(matches) == 1
             else f"its {len(weights)} tensors fit {'none' if not matches else 'several'} of torchvision's "
                  "architectures: give NAME and N (or --arch pkg.module:factory)")
    return (f"{refused}; a weights-only read (safe) shows that {found}. Convert it with: python -c \"import torch, "
            f"safetensors.torch as s; w = torch.load('{path}', weights_only=True){key}; s.save_file(w, '{stem}', "
            f"metadata={{'arch': '{arch}', 'num_classes': '{classes}', {TRAINING_SPEC}}})\" with the input size, "
            "mean and std the model was trained with")


def _weights(loaded: object) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a loaded state dict (unwrapped from a training checkpoint) and the indexing that unwraps it."""
    if isinstance(loaded, dict):
        for key in WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict):
                return _tensors(loaded[key]), f"['{key}']"
        return _tensors(loaded), ""
    return {}, ""


def _tensors(mapping: dict) -> dict[str, torch.Tensor]:
    return {name: value for name, value in mapping.items() if isinstance(name, str) and isinstance(value, torch.Tensor)}


def _first_line(exc: Exception) -> str:
    """The telling part of a load error: the class a whole pickled object needs, when torch names one."""
    named = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if named:
        return f"it holds a pickled {named.group(1)}, not a state dict"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines or [type(exc).__name__])[0]
