"""Options shared by subcommands and the per-model loop that keeps going past bad models."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from backdoor_scrub import __version__
from backdoor_scrub.checkpoint import Checkpoint, SpecOverrides, load_checkpoint
from backdoor_scrub.contract import ExitCode
from backdoor_scrub.data import check_images
from backdoor_scrub.errors import ScrubError, error_entry, input_error
from backdoor_scrub.inference import set_threads
from backdoor_scrub.metrics import Metrics
from backdoor_scrub.native_memory import keep_large_buffers_mapped
from backdoor_scrub.poisoned import PoisonedExamples
from backdoor_scrub.trigger_functions import load_trigger_function
from backdoor_scrub.triggers import Stamp, TriggeredCopies, load_trigger

if TYPE_CHECKING:
    from backdoor_scrub.commands.samples import Samples


@dataclass(frozen=True)
class RunOptions:
    """Options every model-processing subcommand takes."""

    overrides: SpecOverrides = SpecOverrides()
    device: str = "auto"
    batch_size: int = 256
    workers: int = 0
    quiet: bool = False
    keep_going: bool = False
    skip_bad_images: bool = False
    progress: str = "auto"
    threads: int | None = None

    def image_error_handler(self) -> Callable[[ScrubError], None] | None:
        """With --skip-bad-images: warn on stderr and go on; else None (a bad image stops the run)."""
        return warn if self.skip_bad_images else None


def warn(error: ScrubError) -> None:
    """One warning line on stderr for a skipped input."""
    warn_line(f"{error} (skipped)")


def warn_line(message: str) -> None:
    """One warning line on stderr."""
    click.echo(f"scrub: warning: {message}", err=True)


@dataclass(frozen=True)
class TriggerOptions:
    """Where the trigger comes from and how it is placed."""

    path: Path | None = None
    alpha: float = 1.0
    position: str = "br"
    function: str | None = None
    triggered_dir: Path | None = None
    poisoned_dir: Path | None = None

    @property
    def given(self) -> bool:
        """Whether a trigger (file, function, triggered copies or poisoned examples) was given."""
        sources = (self.path, self.function, self.triggered_dir, self.poisoned_dir)
        return any(source is not None for source in sources)

    def load(
        self, input_size: tuple[int, int, int], samples: Samples | None = None
    ) -> Stamp | TriggeredCopies | PoisonedExamples | None:
        """The trigger at `input_size`, the triggered copies of `samples` (--triggered-dir) or the poisoned
        examples (--poisoned-dir).

        None when none was given, or only a folder and no samples (evaluate reads its triggered
        copies with the test images).
        """
        if self.poisoned_dir is not None:
            return None if samples is None else samples.poisoned_examples(self.poisoned_dir)
        if self.triggered_dir is not None:
            return None if samples is None else samples.triggered_copies(self.triggered_dir)
        if self.function is not None:
            return load_trigger_function(self.function)
        if self.path is None:
            return None
        return load_trigger(self.path, input_size, self.alpha, self.position)


@dataclass
class ModelOutcome:
    """One model's JSON entry and the exit code it contributes."""

    entry: dict
    exit_code: ExitCode = ExitCode.OK


@dataclass
class Outcome:
    """All models' entries, in order, the worst exit code among them, and extra JSON fields."""

    models: list[ModelOutcome] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> ExitCode:
        """The worst exit code of any model (0 when there are none)."""
        return max((m.exit_code for m in self.models), default=ExitCode.OK)


def for_each_model(
    paths: list[Path], options: RunOptions, work: Callable[[Checkpoint], ModelOutcome],
    image_folders: list[Path | None] = (),
) -> Outcome:
    """Load and process each model; with keep_going a failing model is reported and skipped.

    Unless --skip-bad-images is given, every image of `image_folders` is verified first: one error
    names every unreadable image before any model is loaded.
    """
    set_threads(options.threads)
    keep_large_buffers_mapped()
    if not options.skip_bad_images:
        try:
            check_images([folder for folder in image_folders if folder is not None], options.workers)
        except ScrubError as error:
            error.stopping(paths)
            raise
    outcome = Outcome()
    for path in paths:
        try:
            outcome.models.append(work(load_checkpoint(path, options.overrides)))
        except ScrubError as error:
            entry = error_entry(path, error)
            if not options.keep_going:
                error.models = [model.entry for model in outcome.models] + [entry]
                raise
            outcome.models.append(ModelOutcome(entry, error.exit_code))
    return outcome


def skipped_images(paths: list[Path]) -> dict:
    """The JSON account of the unreadable images left out (--skip-bad-images): how many, and the first 20."""
    return {"count": len(paths), "paths": [str(path) for path in paths[:20]]}


def recorded_target(checkpoint: Checkpoint) -> int | None:
    """The target recorded by the latest scrub edit in the checkpoint's history, if any."""
    targets = [entry["target"] for entry in checkpoint.history if entry.get("target") is not None]
    return targets[-1] if targets else None


def resolve_target(given: int | None, checkpoint: Checkpoint) -> tuple[int | None, str]:
    """The target (None: infer it from stamped predictions) and where it came from."""
    if given is not None and given >= checkpoint.spec.num_classes:
        raise input_error(f"{checkpoint.path}: --target {given} but the model has {checkpoint.spec.num_classes} classes")
    if given is not None:
        return given, "given"
    recorded = recorded_target(checkpoint)
    if recorded is not None:
        return recorded, "recorded"
    return None, "inferred"


def step_entry(step: str, record, before: Metrics, after: Metrics, target_source: str, trigger: Stamp,
               samples, seed: int, anomaly_index: float | None = None, rounds: list[dict] | None = None) -> dict:
    """The provenance entry of one edit or repair: what was done, to what, and the metrics around it.

    Nothing in it depends on the clock, so the same inputs and seed give the same output bytes.
    """
    return {
        "step": step,
        "method": record.method,
        "layers": record.layers,
        "target": before.target,
        "target_source": target_source,
        "trigger": {**trigger.provenance(), **({"anomaly_index": anomaly_index} if anomaly_index is not None else {})},
        "samples": samples.fingerprint(),
        "seed": seed,
        **({"calibration": record.calibration} if record.calibration is not None else {}),
        **({"rounds": rounds} if rounds is not None else {}),
        "before": measured_on_samples(before, target_source == "reconstructed"),
        "after": measured_on_samples(after, target_source == "reconstructed"),
        "scrub_version": __version__,
    }


def measured_on_samples(metrics: Metrics, reconstructed: bool) -> dict:
    """Metrics on the samples a step was fitted on, saying so; a reconstructed trigger's rates get their own names.

    `attack_success_rate` is only ever a rate measured with a trigger the user gave: a CI gate
    reading it must not pass a model on the strength of the tool's own reconstruction.
    """
    measured = {**metrics.as_dict(), "held_out": False}
    if reconstructed:
        measured["reconstructed_trigger_asr"] = measured["attack_success_rate"]
        measured["reconstructed_trigger_robust_accuracy"] = measured["robust_accuracy"]
        measured["attack_success_rate"] = measured["robust_accuracy"] = None
    return measured


def step_report(
    checkpoint: Checkpoint, output: Path, entries: list[dict], started: float, scan: dict | None = None
) -> ModelOutcome:
    """The JSON entry of an edit or repair: the (last) provenance entry without trigger images, plus timing.

    With several edits (several flagged classes) they are all listed under `edits`; a scan is under `scan`.
    """
    shown = [{**entry, "trigger": {k: v for k, v in entry["trigger"].items() if k != "png_base64"}}
             for entry in entries]
    report = {"path": str(checkpoint.path), "input": str(checkpoint.path), "output": str(output),
              "arch": checkpoint.spec.arch, "status": "ok", **shown[-1],
              "seconds": round(time.perf_counter() - started, 3)}
    if len(shown) > 1:
        report["edits"] = shown
    if scan is not None:
        report["scan"] = scan
    return ModelOutcome(report)
