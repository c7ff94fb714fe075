"""`scrub edit`: unlearn a trigger (given, or reconstructed by a scan) from a handful of clean samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from backdoor_scrub.calibration import accuracy_shortfall, held_out_errors, held_out_shortfall
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
    warn_line,
)
from backdoor_scrub.commands.samples import Samples
from backdoor_scrub.commands.scanning import ScanReport, rescan_class, scan_checkpoint
from backdoor_scrub.editing import (
    EditRecord,
    EditSettings,
    edit_model,
    edit_steps,
    fallback_method,
    head_layers,
    resolve_method,
    trigger_spread,
    triggered_twins,
)
from backdoor_scrub.inference import resolve_device
from backdoor_scrub.input_span import within_clean_span
from backdoor_scrub.layers import auto_select_layers
from backdoor_scrub.poisoned import PoisonedExamples
from backdoor_scrub.progress import progress_reporter
from backdoor_scrub.rounds import unlearn_in_rounds
from backdoor_scrub.scan import ClassScan, ScanSettings, dilated
from backdoor_scrub.triggers import Stamp, Trigger


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
    rounds: int = 1


@dataclass(frozen=True)
class Suspect:
    """One trigger to unlearn, the class it leads to and where both came from."""

    trigger: Stamp
    target: int | None
    source: str
    scanned: ClassScan | None = None

    @property
    def pixel_twins(self) -> bool:
        """Whether each triggered image is its clean sample with the trigger itself applied, pixel for pixel.

        Only then is the input convolution edited (editing.EditSettings.input_strengths): a
        reconstruction is a few pixels that act like the trigger inside the network, not the trigger's
        pixels (on the demo, unlearning them in the first convolution left the real patch at 100% ASR),
        and a poisoned example's twin is another picture of its class.
        """
        return self.scanned is None and not isinstance(self.trigger, PoisonedExamples)

    @property
    def anomaly_index(self) -> float | None:
        """The scan's anomaly index of a reconstructed trigger's class."""
        return None if self.scanned is None else self.scanned.anomaly_index


def run_edit(paths: list[Path], request: EditRequest, destination: Destination, options: RunOptions) -> Outcome:
    """Edit every model so that stamped samples produce the activations of their clean versions."""
    destination.check(len(paths))
    device = resolve_device(options.device)

    def work(checkpoint: Checkpoint) -> ModelOutcome:
        started = time.perf_counter()
        output = destination.path_for(checkpoint.path, "scrubbed")
        samples = Samples.load(request.clean_dir, checkpoint, device, options, allow_unlabeled=True,
                               triggered_dir=request.trigger.triggered_dir)
        suspects, report = _suspects(checkpoint, samples, request, options)
        scan = None if report is None else report.as_dict()
        if not suspects:
            return _nothing_edited(checkpoint, scan, "no backdoor found; nothing edited")
        names = list(request.layers) or auto_select_layers(checkpoint.model, checkpoint.spec.input_size)
        unedited, span = (checkpoint.model, None) if report is None else within_clean_span(checkpoint.model,
                                                                                          samples.inputs())
        model, entries, declined = unedited, [], []
        for suspect in suspects:
            edited, entry = _edit_suspect(model, unedited, suspect, checkpoint, samples, report, request, names)
            if suspect.scanned is not None and entry.get("calibration", {}).get("erases_target"):
                declined.append(_declined(checkpoint, entry))
                continue
            model = edited
            restricted = span and entry["method"] != "direction-erasure"  # the erasure edits the unrestricted model
            entries.append({**entry, **({"input_span": span} if restricted else {})})
        if not entries:
            return _nothing_edited(checkpoint, scan, "no flagged class behaved like a backdoor's target; nothing edited",
                                   declined)
        save_checkpoint(checkpoint, model, output, entries, destination.force)
        outcome = step_report(checkpoint, output, entries, started, scan)
        if declined:
            outcome.entry["declined"] = declined
        return outcome

    trigger = request.trigger
    return for_each_model(paths, options, work, [request.clean_dir, trigger.triggered_dir, trigger.poisoned_dir])


def _edit_suspect(
    model: nn.Module, unedited: nn.Module, suspect: Suspect, checkpoint: Checkpoint, samples: Samples,
    report: ScanReport | None, request: EditRequest, names: list[str],
) -> tuple[nn.Module, dict]:
    """`model` with one suspect's trigger unlearned (a reconstruction: in checked rounds) and the history entry.

    `unedited` is the model before any suspect's edit, on which reconstructions are refitted.
    """
    before = samples.measure(model, suspect.trigger, suspect.target)
    settings = EditSettings() if suspect.pixel_twins else EditSettings(input_strengths=())

    def edit(triggers: list[Stamp]):
        inputs, keys, labels = samples.fitting_set(model, triggers, before.target)
        # Only a trigger whose pixels are known on each sample can be measured: not a reconstruction,
        # not poisoned pictures paired with other pictures of their class. A median: the first 256 tell
        # (a stamp is applied to those alone; triggered copies come whole and are cut to match).
        some = inputs[:256]
        spread = trigger_spread(some, triggered_twins(keys[0], some)[:256]) if suspect.pixel_twins else 0.0
        layers = head_layers(model, names)
        method = resolve_method(request.method, spread, len(inputs), checkpoint.spec.num_classes,
                                suspect.scanned is not None)

        def run(method: str) -> tuple[nn.Module, EditRecord]:
            if method == "direction-erasure" and suspect.scanned is not None:
                return _erase_reconstruction(checkpoint.model if model is unedited else model, suspect.scanned,
                                             samples, names, settings, request.seed, before.target, layers > 1)
            return _run_edit(model, inputs, keys, labels, names, method, settings, request.seed, before.target, samples)

        def checked(method: str) -> tuple[nn.Module, EditRecord]:
            # auto's choice, or where it falls short its fallback (itself checked: erasure, stage, closed form)
            edited, record = run(method)
            fallback = fallback_method(method, len(inputs), checkpoint.spec.num_classes, suspect.pixel_twins,
                                       suspect.scanned is not None, layers)
            if request.method != "auto" or fallback is None:
                return edited, record
            if method == "direction-erasure":
                grown = lambda: _grown_reconstruction_asr(edited, samples, suspect.scanned, before.target)  # noqa: E731
                return _erasure_checked(edited, record, settings, grown, lambda: checked(fallback))
            return _checked(edited, record, settings, lambda: run(fallback))

        return checked(method)

    rounds = None
    if suspect.scanned is None:
        edited, record = edit([suspect.trigger])
    else:
        edited, record, rounds = _edit_in_rounds(unedited, checkpoint, samples, suspect.scanned, report, edit,
                                                  request)
    after = samples.measure(edited, suspect.trigger, before.target)
    return edited, step_entry("edit", record, before, after, suspect.source, suspect.trigger, samples, request.seed,
                              suspect.anomaly_index, rounds)


def _erase_reconstruction(model: nn.Module, scanned: ClassScan, samples: Samples, names: list[str],
                          settings: EditSettings, seed: int, target: int, dilate: bool) -> tuple[nn.Module, EditRecord]:
    """The direction erasure of the scan's own reconstructions (grown by a pixel where `dilate`), on `model` as
    the scan saw it.

    Not on the model restricted to the clean input span nor with its refitted reconstructions: on a
    tuning MobileNetV3 with a cyan patch, the restriction turned the reconstruction's shift of the head's
    input from one direction into several, and the real patch kept 97% ASR instead of 0.3%. Dilated for a
    head of several layers (that MobileNetV3: 0.2% dilated, 100% not), as found for a one-layer head (the
    logits' own layer: a tuning ShuffleNetV2 0.0% on three seeds as found, 10-56% dilated; a tuning
    ResNet-18 2.9% against 20.7%, its floor about 3%).
    """
    family = [dilated(t) if dilate else t for t in (scanned.family or (scanned.trigger,))]
    inputs, keys, labels = samples.fitting_set(model, family, target)
    return _run_edit(model, inputs, keys, labels, names, "direction-erasure", settings, seed, target, samples)


def _grown_reconstruction_asr(edited: nn.Module, samples: Samples, scanned: ClassScan, target: int) -> float:
    """The share of the samples of other classes that the scan's reconstruction, grown by two pixels, sends to the
    class on the edited model, less the share sent there without it (its floor)."""
    metrics = samples.measure(edited, dilated(scanned.trigger, 2), target)
    return metrics.attack_success_rate - metrics.clean_target_rate


def _erasure_checked(edited: nn.Module, record: EditRecord, settings: EditSettings, grown_asr: Callable[[], float],
                     fallback: Callable[[], tuple[nn.Module, EditRecord]]) -> tuple[nn.Module, EditRecord]:
    """The direction erasure, or the fallback where the erasure falls short (_erasure_shortfall)."""
    reason = _erasure_shortfall(record.calibration, settings, grown_asr)
    if reason is None:
        return edited, record
    return _instead_of(record, reason, *fallback())


def _erasure_shortfall(calibration: dict | None, settings: EditSettings, grown_asr: Callable[[], float]) -> str | None:
    """Why the erasure falls short, or None: it got a held-out target-class sample wrong that the unedited model got
    right, or more than `check_max_lost` of the held-out samples fewer right, or the reconstruction grown by two
    pixels still sends more than `erasure_max_grown_asr` of the samples to the class over its floor (`grown_asr()`,
    run only where the held-out samples pass).

    The held-out flips of a reconstruction do not measure the erasure: a few pixels keep other ways to the
    target, while the real patch's direction is gone (tuning MobileNetV3s: 18-38 of 75-78 held-out flips left,
    real ASR 0.2-2.0%). Where the direction was also the target class's own (the demo: a shift of 7-10 clean
    standard deviations, not 40-400), the class lost 2 of its 6 held-out samples, and 34 points on the test set.
    A white patch, whose shift has more of its length off the direction (3% of its energy, not 1%), kept 28-41%
    real ASR on a tuning ResNet-18: there the reconstruction grown into more of the patch still sent 21-30% of
    the samples to the class over its floor, where the erasure had worked at most 6% (tuning ShuffleNetV2,
    ResNet-18 and MobileNetV3s). A red patch whose direction the erasure missed (tuning MobileNetV3, real ASR
    87-89%) sent 39-53%.

    A rescan of the erased model (its smallest trigger for the class at least 1.5 times the scan's) was a fourth
    check until this release: it declined a tuning MobileNetV3's working erasure (0.98 times; 0.4% real ASR
    against the closed form's 19.9%), and the grown reconstruction alone decides all six tuning MobileNetV3
    runs (two seeds of three models) as the real trigger would.
    """
    if calibration and "held_out_unedited" in calibration:  # not calibrated (a single sample): the probes alone
        edited, unedited = calibration["held_out"], calibration["held_out_unedited"]
        if edited["target_correct"] < unedited["target_correct"]:
            return (f"it got {unedited['target_correct'] - edited['target_correct']} held-out sample(s) of the class "
                    "wrong that the unedited model got right")
        lost = accuracy_shortfall(calibration, settings.check_max_lost)
        if lost is not None:
            return lost
    excess = grown_asr()
    if excess > settings.erasure_max_grown_asr:
        return f"the reconstruction grown by two pixels still sent {excess:.0%} of the samples to the class"
    return None


def _checked(edited: nn.Module, record: EditRecord, settings: EditSettings,
             fallback: Callable[[], tuple[nn.Module, EditRecord]]) -> tuple[nn.Module, EditRecord]:
    """`auto`'s first choice, or the fallback method's edit (`fallback()`) where the first falls short on the
    held-out samples (calibration.held_out_shortfall) and the fallback makes fewer held-out mistakes
    (calibration.held_out_errors: flips left plus samples not right). The record says what was declined."""
    shortfall = held_out_shortfall(record.calibration, settings.check_max_flips, settings.check_max_lost)
    if shortfall is None:
        return edited, record
    alternative, alternative_record = fallback()
    if held_out_errors(alternative_record.calibration) >= held_out_errors(record.calibration):
        return edited, record
    reason = f"{shortfall}, and made more held-out mistakes than {alternative_record.method}"
    return _instead_of(record, reason, alternative, alternative_record)


def _instead_of(declined: EditRecord, reason: str, alternative: nn.Module,
                alternative_record: EditRecord) -> tuple[nn.Module, EditRecord]:
    """The alternative edit, its record saying which method it replaced and why (`declined_method`)."""
    entry = {"method": declined.method, "held_out": (declined.calibration or {}).get("held_out"), "reason": reason}
    return alternative, replace(alternative_record,
                                calibration={**(alternative_record.calibration or {}), "declined_method": entry})


def _run_edit(model: nn.Module, inputs, keys, labels, names: list[str], method: str, settings: EditSettings,
              seed: int, target: int, samples: Samples) -> tuple[nn.Module, EditRecord]:
    """`edit_model` with a progress bar of its steps."""
    with progress_reporter(samples.options.progress, samples.options.quiet) as progress:
        steps = edit_steps(model, names, method, len(inputs), settings)
        task = progress.add_task(f"editing ({method})", total=steps or None)
        taken = 0

        def step() -> None:
            nonlocal taken
            taken += 1
            progress.advance(task)

        result = edit_model(model, inputs, keys, names, method, settings, seed, labels, target, on_step=step)
        progress.advance(task, steps - taken)  # activation matching's rounds that were not needed
        return result


def _nothing_edited(checkpoint: Checkpoint, scan: dict | None, message: str,
                    declined: list[dict] | None = None) -> ModelOutcome:
    """The JSON entry of a model left as it was: no file written, and why."""
    entry = {"path": str(checkpoint.path), "input": str(checkpoint.path), "output": None, "arch": checkpoint.spec.arch,
             "status": "ok", "scan": scan, "message": message}
    return ModelOutcome({**entry, **({"declined": declined} if declined else {})})


def _declined(checkpoint: Checkpoint, entry: dict) -> dict:
    """Why a flagged class was left unedited (calibration.erases_target), warned on stderr; its JSON entry."""
    unedited, edited = entry["calibration"]["held_out_unedited"], entry["calibration"]["held_out"]
    declined = {"class": entry["target"], "anomaly_index": entry["trigger"]["anomaly_index"],
                "held_out_target_images": unedited["target_images"],
                "held_out_target_correct": {"unedited": unedited["target_correct"], "edited": edited["target_correct"]},
                "reason": "unlearning its reconstruction unlearns the class: it is the class's own features, "
                          "not a trigger"}
    warn_line(f"{checkpoint.path}: class {declined['class']} was flagged, but unlearning its reconstruction cost "
              f"{unedited['target_correct'] - edited['target_correct']} of the {unedited['target_correct']} held-out "
              "samples of the class the model got right: it is the class's own features, not a trigger; not edited")
    return declined


def _edit_in_rounds(unedited: nn.Module, checkpoint: Checkpoint, samples: Samples, scanned: ClassScan,
                    report: ScanReport, edit, request: EditRequest) -> tuple:
    """Unlearn the class's dilated reconstructions, re-scan the edited model for it, repeat while it stays anomalous.

    The reconstructions are found on the checkpoint's model and refitted on `unedited`, the model
    the edit starts from: with its input restricted to the clean span (input_span.py), a
    reconstruction's part outside the span does nothing there, and the refit finds what does.
    """
    settings = report.settings

    def rescan(edited, start: Trigger, number: int) -> Trigger:
        return rescan_class(edited, checkpoint, samples, scanned.index, [start], settings,
                            request.seed + 1 + number)[0]

    def widen(reconstructions: list[Trigger]) -> list[Trigger]:
        # Each reconstruction refitted on the unedited model and grown by a pixel, and the pattern that
        # works best in the smallest one's neighbourhood two pixels out: closer to the real patch than either.
        if unedited is not checkpoint.model:
            reconstructions = rescan_class(unedited, checkpoint, samples, scanned.index, reconstructions, settings,
                                           request.seed + 1)
        neighbourhood = dilated(reconstructions[0], 2)
        [refitted] = rescan_class(unedited, checkpoint, samples, scanned.index, [neighbourhood], settings,
                                  request.seed, fixed_mask=True)
        return [dilated(t) for t in reconstructions] + [refitted]

    model, record, rounds = unlearn_in_rounds(scanned, report.norms, edit, rescan, widen, settings, request.rounds)
    if rounds[-1].residual_anomaly_index > settings.threshold:
        warn_line(f"{checkpoint.path}: class {scanned.index} still has an anomalously small trigger after "
                  f"{len(rounds)} edit(s) (anomaly index {rounds[-1].residual_anomaly_index:.2f}); the backdoor "
                  "may not be gone, try --rounds or a known trigger")
    return model, record, [r.as_dict() for r in rounds]


def _suspects(
    checkpoint: Checkpoint, samples: Samples, request: EditRequest, options: RunOptions
) -> tuple[list[Suspect], ScanReport | None]:
    """The given trigger, or the reconstructed trigger of every class a scan flags (and the scan)."""
    trigger = request.trigger.load(checkpoint.spec.input_size, samples)
    if trigger is not None:
        target, source = resolve_target(request.target, checkpoint)
        return [Suspect(trigger, target, source)], None
    report = scan_checkpoint(checkpoint, samples, request.scan, request.seed, options)
    suspects = [Suspect(dilated(c.trigger), c.index, "reconstructed", c) for c in report.flagged]
    return suspects, report
