"""`scrub repair`: restore the target class an edit may have hurt, reading target, trigger and layers from provenance."""

from __future__ import annotations

import base64
import time
from pathlib import Path

from backdoor_scrub.checkpoint import Checkpoint, Destination, save_checkpoint
from backdoor_scrub.commands.common import (
    ModelOutcome,
    Outcome,
    RunOptions,
    TriggerOptions,
    for_each_model,
    step_entry,
    step_report,
    warn_line,
)
from backdoor_scrub.commands.samples import Samples
from backdoor_scrub.errors import input_error
from backdoor_scrub.inference import resolve_device
from backdoor_scrub.repair import NO_TARGET_SAMPLE, repair_model
from backdoor_scrub.triggers import Trigger, parse_trigger


def run_repair(
    paths: list[Path],
    clean_dir: Path,
    trigger_options: TriggerOptions,
    target: int | None,
    layer: str | None,
    destination: Destination,
    seed: int,
    options: RunOptions,
) -> Outcome:
    """Repair every edited model from labelled clean samples; flags override the recorded edit."""
    destination.check(len(paths))
    device = resolve_device(options.device)

    def work(checkpoint: Checkpoint) -> ModelOutcome:
        started = time.perf_counter()
        output = destination.path_for(checkpoint.path, "repaired")
        edit = _last_edit(checkpoint)
        samples = Samples.load(clean_dir, checkpoint, device, options, allow_unlabeled=False,
                               triggered_dir=trigger_options.triggered_dir)
        trigger = trigger_options.load(checkpoint.spec.input_size, samples) or _recorded_trigger(checkpoint, edit)
        chosen = target if target is not None else _recorded(checkpoint, edit, "target", "--target")
        head = layer or _recorded(checkpoint, edit, "layers", "--layer")[-1]
        before = samples.measure(checkpoint.model, trigger, chosen)
        inputs, (key,), labels = samples.fitting_set(checkpoint.model, [trigger], before.target)
        repaired, record = repair_model(checkpoint.model, inputs, labels.to(device), key, head, seed=seed,
                                        target=before.target)
        if record.method == NO_TARGET_SAMPLE:
            warn_line(f"{checkpoint.path}: no clean sample of target class {chosen}; nothing to repair from, "
                      "the output keeps the edit's weights")
        after = samples.measure(repaired, trigger, chosen)
        source = "given" if target is not None else "recorded"
        entry = step_entry("repair", record, before, after, source, trigger, samples, seed)
        save_checkpoint(checkpoint, repaired, output, [entry], destination.force)
        return step_report(checkpoint, output, [entry], started)

    folders = [clean_dir, trigger_options.triggered_dir, trigger_options.poisoned_dir]
    return for_each_model(paths, options, work, folders)


def _last_edit(checkpoint: Checkpoint) -> dict:
    edits = [entry for entry in checkpoint.history if entry.get("step") == "edit"]
    return edits[-1] if edits else {}


def _recorded(checkpoint: Checkpoint, edit: dict, key: str, flag: str):
    if edit.get(key) is None:
        raise input_error(f"{checkpoint.path}: no scrub edit recorded in its history; pass {flag}")
    return edit[key]


def _recorded_trigger(checkpoint: Checkpoint, edit: dict) -> Trigger:
    recorded = _recorded(checkpoint, edit, "trigger", "--trigger")
    if "function" in recorded:
        raise input_error(f"{checkpoint.path}: the edit used --trigger-fn {recorded['function']}; pass it again "
                          "(code is never imported from a checkpoint)")
    if "poisoned_dir" in recorded:
        raise input_error(f"{checkpoint.path}: the edit used --poisoned-dir {recorded['poisoned_dir']}; pass "
                          "--poisoned-dir again")
    if "triggered_dir" in recorded:
        raise input_error(f"{checkpoint.path}: the edit used --triggered-dir {recorded['triggered_dir']}; pass "
                          "--triggered-dir with the triggered copies of these samples")
    png = recorded.get("png_base64")
    if png is None:
        raise input_error(f"{checkpoint.path}: the recorded edit holds no trigger image; pass --trigger")
    return parse_trigger(base64.b64decode(png), f"{checkpoint.path} (recorded trigger)", checkpoint.spec.input_size)
