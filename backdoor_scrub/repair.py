"""The repair: restore the margins of classes the edit hurt with a minimal, constrained head update."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from backdoor_scrub.editing import (
    EditRecord,
    as_columns,
    as_keys,
    augment,
    capture,
    closed_form_linear_edit,
    copies_for,
    linear_weight,
    set_linear_weight,
)
from backdoor_scrub.errors import usage_error
from backdoor_scrub.layers import is_linear_map
from backdoor_scrub.triggers import Trigger


@dataclass(frozen=True)
class RepairSettings:
    """Margin quantile of correctly classified samples to restore, weight pull, augmentation size.

    The pull grows as min_samples / (real samples) below min_samples: augmented copies are not
    independent evidence, so with 1 sample per class the repair trusts the current weights more.
    """

    margin_quantile: float = 0.25
    mu: float = 10.0
    min_samples: int = 100
    batch_size: int = 256


def repair_model(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger,
    head: str,
    settings: RepairSettings = RepairSettings(),
    seed: int = 0,
) -> tuple[nn.Module, EditRecord]:
    """A repaired copy of `model`: clean samples regain a margin for their class, stamped ones keep theirs.

    Logits the samples already get right by a margin are the values to keep; only short margins are
    raised (the true class up, its strongest rival down, half the shortfall each). A least-squares
    update of the head with a pull towards its current weights then changes as little as it can.
    """
    started = time.perf_counter()
    if not is_linear_map(model.get_submodule(head)):
        raise usage_error(f"repair edits a Linear or 1x1 Conv2d head; {head} is neither")
    repaired = copy.deepcopy(model).eval()
    copies = copies_for(len(inputs), settings.min_samples)
    clean = augment(inputs, copies, seed)
    stamped = trigger.stamp(clean)
    keys, logits = _head_keys_and_logits(repaired, head, torch.cat([clean, stamped]), settings.batch_size)
    clean_labels = labels.repeat(copies).to(logits.device)
    pooled = logits.flatten(2).mean(2) if logits.dim() == 4 else logits
    margin = _margin_to_restore(pooled[: len(clean)], clean_labels, settings.margin_quantile)
    shift = restore_margins(pooled, clean_labels.repeat(2), margin) - pooled  # stamped samples keep their class
    values = logits + (shift[:, :, None, None] if logits.dim() == 4 else shift)
    layer = repaired.get_submodule(head)
    weight = linear_weight(layer)
    key_energy = keys.double().pow(2).sum(0).mean().item()
    empty = keys[:, :0]
    pull = settings.mu * max(1.0, settings.min_samples / len(inputs)) * key_energy
    new_weight = closed_form_linear_edit(weight, keys, as_columns(values), empty, 0.0, pull)
    set_linear_weight(layer, new_weight)
    return repaired, EditRecord("margin-restoring closed form", [head], round(time.perf_counter() - started, 3))


def restore_margins(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Logits where each sample's class beats its strongest rival by at least `margin`."""
    rows = torch.arange(len(labels), device=logits.device)
    margins, rival = _margins_and_rivals(logits, labels)
    shortfall = (margin - margins).clamp_min(0)
    values = logits.clone()
    values[rows, labels] += shortfall / 2
    values[rows, rival] -= shortfall / 2
    return values


def _margin_to_restore(logits: torch.Tensor, labels: torch.Tensor, quantile: float) -> float:
    """A data-derived margin: the given quantile of the margins of correctly classified samples."""
    margins, _ = _margins_and_rivals(logits, labels)
    correct = margins[margins > 0]
    return torch.quantile(correct, quantile).item() if len(correct) else 0.0


def _margins_and_rivals(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: its class's logit minus the strongest other class's, and that rival class."""
    rows = torch.arange(len(labels), device=logits.device)
    others = logits.clone()
    others[rows, labels] = float("-inf")
    rival_logits, rivals = others.max(1)
    return logits[rows, labels] - rival_logits, rivals


def _head_keys_and_logits(model: nn.Module, head: str, inputs: torch.Tensor, batch_size: int):
    captured = capture(model, [head], inputs, batch_size)[head]
    layer = model.get_submodule(head)
    return as_keys(captured.inputs, layer.bias is not None), captured.outputs
