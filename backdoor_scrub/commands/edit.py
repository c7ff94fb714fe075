"""`scrub edit`: unlearn a known trigger from a handful of clean samples and write the edited model."""

from __future__ import annotations

import time
from pathlib import Path

from backdoor_scrub.checkpoint import Checkpoint, Destination, save_checkpoint
from backdoor_scrub.commands.common import (
    ModelOutcome, Outcome, RunOptions, TriggerOptions, for_each_model, resolve_target, step_entry, step_report,
)
from backdoor_scrub.commands.samples import Samples
from backdoor_scrub.editing import edit_model
from backdoor_scrub.errors import usage_error
from backdoor_scrub.inference import resolve_device
from backdoor_scrub.layers import auto_select_layers


def run_edit(
    paths: list[Path],
    clean_dir: Path,
    trigger_options: TriggerOptions,
    target: int | None,
    layers: list[str],
    method: str,
    destination: Destination,
    seed: int,
    options: RunOptions,
) -> Outcome:
    """Edit every model so that stamped samples produce the activations of their clean versions."""
    destination.check(len(paths))
    if trigger_options.path is None:
        raise usage_error("--trigger is required")
    device = resolve_device(options.device)

    def work(checkpoint: Checkpoint) -> ModelOutcome:
        started = time.perf_counter()
        output = destination.path_for(checkpoint.path, "scrubbed")
        trigger = trigger_options.load(checkpoint.spec.input_size)
        samples = Samples.load(clean_dir, checkpoint, device, options, allow_unlabeled=True)
        chosen, source = resolve_target(target, checkpoint)
        before = samples.measure(checkpoint.model, trigger, chosen)
        names = layers or auto_select_layers(checkpoint.model, checkpoint.spec.input_size)
        edited, record = edit_model(
            checkpoint.model, samples.inputs(), samples.model_trigger(trigger), names, method, seed=seed
        )
        after = samples.measure(edited, trigger, before.target)
        entry = step_entry("edit", record, before, after, source, trigger, samples, seed)
        save_checkpoint(checkpoint, edited, output, entry, destination.force)
        return step_report(checkpoint, output, entry, started)

    return for_each_model(paths, options, work)
