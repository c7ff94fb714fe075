"""`scrub edit`: unlearn a trigger (given, or reconstructed by a scan) from a handful of clean samples."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from backdoor_scrub.checkpoint import Checkpoint, Destination, save_checkpoint
from backdoor_scrub.commands.common import (
    ModelOutcome,
    Outcome,
    RunOptions,
    TriggerOptions,
    for_each_model,
    resolve_target,
    step_entry,
    step_report,
)
from backdoor_scrub.commands.samples import Samples
from backdoor_scrub.commands.scanning import scan_checkpoint
from backdoor_scrub.editing import edit_model, resolve_method
from backdoor_scrub.inference import resolve_device
from backdoor_scrub.layers import auto_select_layers
from backdoor_scrub.scan import ScanSettings, dilated
from backdoor_scrub.triggers import Trigger


@dataclass(frozen=True)
class EditRequest:
    """What to remove and how: the trigger (None: scan for it), target, layers, method, seed."""

    clean_dir: Path
    trigger: TriggerOptions
    target: int | None = None
    layers: tuple[str, ...] = ()
    method: str = "auto"
    seed: int = 0
    scan: ScanSettings = ScanSettings()


@dataclass(frozen=True)
class Suspect:
    """One trigger to unlearn, the class it leads to and where both came from."""

    trigger: Trigger
    target: int | None
    source: str
    anomaly_index: float | None = None


def run_edit(paths: list[Path], request: EditRequest, destination: Destination, options: RunOptions) -> Outcome:
    """Edit every model so that stamped samples produce the activations of their clean versions."""
    destination.check(len(paths))
    device = resolve_device(options.device)

    def work(checkpoint: Checkpoint) -> ModelOutcome:
        started = time.perf_counter()
        output = destination.path_for(checkpoint.path, "scrubbed")
        samples = Samples.load(request.clean_dir, checkpoint, device, options, allow_unlabeled=True)
        suspects, scan = _suspects(checkpoint, samples, request, options)
        if not suspects:
            return ModelOutcome({"path": str(checkpoint.path), "input": str(checkpoint.path), "output": None,
                                 "arch": checkpoint.spec.arch, "status": "ok", "scan": scan,
                                 "message": "no backdoor found; nothing edited"})
        names = list(request.layers) or auto_select_layers(checkpoint.model, checkpoint.spec.input_size)
        method = resolve_method(request.method)
        model, entries = checkpoint.model, []
        for suspect in suspects:
            before = samples.measure(model, suspect.trigger, suspect.target)
            model, record = edit_model(model, samples.inputs(), samples.model_trigger(suspect.trigger), names,
                                       method, seed=request.seed, labels=samples.labels, target=before.target)
            after = samples.measure(model, suspect.trigger, before.target)
            entries.append(step_entry("edit", record, before, after, suspect.source, suspect.trigger, samples,
                                      request.seed, suspect.anomaly_index))
        save_checkpoint(checkpoint, model, output, entries, destination.force)
        return step_report(checkpoint, output, entries, started, scan)

    return for_each_model(paths, options, work)


def _suspects(
    checkpoint: Checkpoint, samples: Samples, request: EditRequest, options: RunOptions
) -> tuple[list[Suspect], dict | None]:
    """The given trigger, or the reconstructed trigger of every class a scan flags (and the scan)."""
    trigger = request.trigger.load(checkpoint.spec.input_size)
    if trigger is not None:
        target, source = resolve_target(request.target, checkpoint)
        return [Suspect(trigger, target, source)], None
    report = scan_checkpoint(checkpoint, samples, request.scan, request.seed, options.quiet)
    suspects = [Suspect(dilated(c.trigger), c.index, "reconstructed", c.anomaly_index) for c in report.flagged]
    return suspects, report.as_dict(request.scan.threshold)
