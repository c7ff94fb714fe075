"""`scrub evaluate`: CA, ASR, RA and DER of several models on one test folder, and the CI gates."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from backdoor_scrub.checkpoint import Checkpoint, ModelSpec, load_checkpoint
from backdoor_scrub.commands.common import (
    ModelOutcome,
    Outcome,
    RunOptions,
    TriggerOptions,
    for_each_model,
    resolve_target,
    skipped_images,
)
from backdoor_scrub.contract import ExitCode
from backdoor_scrub.data import (
    Batch,
    ImageSet,
    decode_listing,
    list_image_folder,
    readable_part,
    stream_image_folder,
    with_normalization,
)
from backdoor_scrub.errors import usage_error
from backdoor_scrub.evaluation import evaluate
from backdoor_scrub.inference import batch_for, resolve_device
from backdoor_scrub.metrics import Metrics, defense_effectiveness_rate
from backdoor_scrub.progress import progress_reporter

# Test sets up to this size once decoded are kept for every model; larger ones are streamed per model.
KEEP_DECODED_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Gates:
    """Release thresholds; None means not checked."""

    max_asr: float | None = None
    min_acc: float | None = None
    max_acc_drop: float | None = None

    @property
    def active(self) -> bool:
        """True when at least one threshold is set."""
        return any(v is not None for v in (self.max_asr, self.min_acc, self.max_acc_drop))

    def failures(self, metrics: Metrics, baseline: Metrics | None) -> list[str]:
        """A message for every threshold the metrics miss."""
        failures = []
        asr = metrics.attack_success_rate
        if self.max_asr is not None and asr is not None and asr > self.max_asr:
            failures.append(f"attack_success_rate {asr:.4f} > {self.max_asr}")
        if self.min_acc is not None and metrics.clean_accuracy < self.min_acc:
            failures.append(f"clean_accuracy {metrics.clean_accuracy:.4f} < {self.min_acc}")
        if self.max_acc_drop is not None and baseline is not None:
            drop = baseline.clean_accuracy - metrics.clean_accuracy
            if drop > self.max_acc_drop:
                failures.append(f"clean_accuracy drop {drop:.4f} > {self.max_acc_drop}")
        return failures


class TestImages:
    """The test folder for every model: decoded once and kept when small, else streamed per model in batches."""

    def __init__(self, folder: Path, options: RunOptions, triggered_dir: Path | None = None):
        self.folder, self.options, self.triggered_dir = folder, options, triggered_dir
        self.cache: dict[tuple, ImageSet] = {}

    def batches(self, spec: ModelSpec) -> tuple[Iterable[Batch], int, list[Path]]:
        """(uint8 images, labels, triggered twins) batches at the model's input size, how many images there are,
        and the unreadable ones left out (--skip-bad-images). Unreadable images are found before any batch."""
        key = (spec.input_size, spec.classes, spec.num_classes)
        options, batch_size = self.options, batch_for(self.options.batch_size, spec.input_size)
        if key not in self.cache:
            listing = list_image_folder(self.folder, spec)
            if self.triggered_dir is not None:
                listing = listing.paired_with(self.triggered_dir, options.image_error_handler())
            if listing.decoded_bytes(spec) > KEEP_DECODED_BYTES:
                readable = readable_part(listing, options.workers, options.image_error_handler())
                stream = stream_image_folder(readable, spec, batch_size, options.workers)
                return stream, len(readable.paths), readable.skipped
            self.cache[key] = decode_listing(listing, spec, options.workers, options.image_error_handler())
        images = self.cache[key]
        return images.batches(batch_size), len(images), images.skipped


def check_gate_options(gates: Gates, has_trigger: bool, has_baseline: bool) -> None:
    """Refuse gates that cannot be checked with the given inputs (usage error)."""
    if gates.max_asr is not None and not has_trigger:
        raise usage_error("--max-asr needs --trigger, --trigger-fn or --triggered-dir")
    if gates.max_acc_drop is not None and not has_baseline:
        raise usage_error("--max-acc-drop needs --baseline")


def run_evaluate(
    paths: list[Path],
    test_dir: Path,
    trigger_options: TriggerOptions,
    target: int | None,
    baseline_path: Path | None,
    gates: Gates,
    options: RunOptions,
) -> Outcome:
    """Evaluate every model (and the baseline first) on the same images and trigger."""
    check_gate_options(gates, trigger_options.given, baseline_path is not None)
    device = resolve_device(options.device)
    images = TestImages(test_dir, options, trigger_options.triggered_dir)

    def measure(checkpoint: Checkpoint) -> tuple[Metrics, str, dict]:
        spec = checkpoint.spec
        trigger = trigger_options.load(spec.input_size)
        chosen, source = resolve_target(target, checkpoint)
        batches, total, skipped = images.batches(spec)
        with progress_reporter(options.progress, options.quiet) as progress:
            metrics = evaluate(with_normalization(checkpoint.model, spec), batches, spec.num_classes, device, trigger,
                               chosen, progress, total)
        return metrics, source, skipped_images(skipped)

    baseline, baseline_source = None, None
    if baseline_path is not None:
        baseline, baseline_source, _ = measure(load_checkpoint(baseline_path, options.overrides))

    def work(checkpoint: Checkpoint) -> ModelOutcome:
        metrics, source, skipped = measure(checkpoint)
        failures = gates.failures(metrics, baseline)
        entry = {
            "path": str(checkpoint.path), "arch": checkpoint.spec.arch, "status": "ok",
            "classes": list(checkpoint.spec.classes) if checkpoint.spec.classes else None,
            **metrics.as_dict(),
            "skipped_images": skipped,
            "target_source": source if metrics.target is not None else None,
            "der": defense_effectiveness_rate(metrics, baseline) if baseline else None,
            "gate": {"passed": not failures, "failures": failures} if gates.active else None,
        }
        return ModelOutcome(entry, ExitCode.GATE_FAILED if failures else ExitCode.OK)

    outcome = for_each_model(paths, options, work, [test_dir, trigger_options.triggered_dir])
    if baseline is not None:
        outcome.extra["baseline"] = {"path": str(baseline_path), **baseline.as_dict(), "target_source": baseline_source}
    return outcome


