"""Edit without a trigger, checked: unlearn a flagged class's reconstructions, scan the edited model again, repeat."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch
from torch import nn

from backdoor_scrub.scan import ClassScan, ScanSettings, mask_l1, residual_anomaly
from backdoor_scrub.triggers import Trigger

Record = TypeVar("Record")


@dataclass(frozen=True)
class Round:
    """One round: how many reconstructions were unlearned, and the smallest trigger the edited model still has."""

    triggers: int
    residual_mask_l1: float
    residual_anomaly_index: float

    def as_dict(self) -> dict:
        """The JSON fields of this round."""
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def unlearn_in_rounds(
    flagged: ClassScan,
    norms: torch.Tensor,
    edit: Callable[[list[Trigger]], tuple[nn.Module, Record]],
    rescan: Callable[[nn.Module, Trigger, int], Trigger],
    widen: Callable[[list[Trigger]], list[Trigger]],
    settings: ScanSettings,
    max_rounds: int,
) -> tuple[nn.Module, Record, list[Round]]:
    """Edit with the class's reconstructions; while the edited model still has an anomalously small trigger
    for it, add that trigger and edit again from the start, up to `max_rounds` edits.

    `norms` are the scan's mask norms of every class: the residual trigger's anomaly index is taken
    among them. `widen(reconstructions)` gives the triggers to unlearn for them (a reconstruction is
    the smallest trigger that works, not the real one); `edit(triggers)` edits the unedited model;
    `rescan(edited, start, round)` reconstructs the class's trigger on the edited model from `start`.
    """
    settings = settings.for_classes(len(norms))
    latest = list(flagged.family or (flagged.trigger,))
    unlearned: list[Trigger] = []
    rounds: list[Round] = []
    while True:
        unlearned += widen(latest)
        edited, record = edit(unlearned)
        residual = rescan(edited, latest[0], len(rounds))
        anomaly = residual_anomaly(norms, flagged.index, mask_l1(residual), settings)
        rounds.append(Round(len(unlearned), mask_l1(residual), anomaly))
        if anomaly <= settings.threshold or len(rounds) >= max_rounds:
            return edited, record, rounds
        latest = [residual]
