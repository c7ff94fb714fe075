"""`scrub inspect`: what a checkpoint holds, its hookable layers and, with a scan, whether it has a backdoor."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from backdoor_scrub.checkpoint import Checkpoint
from backdoor_scrub.commands.common import ModelOutcome, Outcome, RunOptions, for_each_model
from backdoor_scrub.commands.samples import Samples
from backdoor_scrub.commands.scanning import save_triggers, scan_checkpoint
from backdoor_scrub.contract import ExitCode
from backdoor_scrub.editing import plan_edit
from backdoor_scrub.errors import ScrubError, usage_error
from backdoor_scrub.inference import resolve_device
from backdoor_scrub.input_edit import input_convolution
from backdoor_scrub.layers import count_parameters, describe_layers
from backdoor_scrub.scan import ScanSettings


@dataclass(frozen=True)
class ScanRequest:
    """Options of `inspect --scan`."""

    clean_dir: Path
    settings: ScanSettings = ScanSettings()
    seed: int = 0
    save_dir: Path | None = None
    fail_on_detect: bool = False


def run_inspect(paths: list[Path], options: RunOptions, scan: ScanRequest | None = None) -> Outcome:
    """Describe each checkpoint: spec, provenance, a dry-run table of its layers and an optional scan."""
    device = resolve_device(options.device) if scan else None

    def work(checkpoint: Checkpoint) -> ModelOutcome:
        outcome = describe_checkpoint(checkpoint)
        if scan is None:
            return outcome
        samples = Samples.load(scan.clean_dir, checkpoint, device, options, allow_unlabeled=True)
        report = scan_checkpoint(checkpoint, samples, scan.settings, scan.seed, options)
        if scan.save_dir is not None:
            folder = scan.save_dir if len(paths) == 1 else scan.save_dir / checkpoint.path.name.removesuffix(".safetensors")
            save_triggers(report, folder, samples, checkpoint.spec.classes)
        outcome.entry["scan"] = report.as_dict()
        if report.flagged and scan.fail_on_detect:
            outcome.exit_code = ExitCode.GATE_FAILED
        return outcome

    return for_each_model(paths, options, work, [scan.clean_dir] if scan else [])


def check_scan_options(scan: bool, clean_dir: Path | None) -> None:
    """--scan needs --clean-dir (usage error)."""
    if scan and clean_dir is None:
        raise usage_error("--scan needs --clean-dir")


def describe_checkpoint(checkpoint: Checkpoint) -> ModelOutcome:
    """The inspect JSON entry of one loaded checkpoint."""
    spec = checkpoint.spec
    layers = describe_layers(checkpoint.model, spec.input_size)
    selected = [layer.name for layer in layers if layer.auto_selected]
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
        "auto_selected": selected,
        "default_edit": {method: edited_layers(checkpoint, selected, method)
                         for method in ("closed-form", "activation-match")},
        "input_convolution": input_convolution(checkpoint.model, torch.zeros(1, *spec.input_size)),
    })


def edited_layers(checkpoint: Checkpoint, selected: list[str], method: str) -> list[str]:
    """The layers an edit with `method` changes among the automatic choice (none when it cannot edit them)."""
    try:
        stage, chain = plan_edit(checkpoint.model, selected, method)
    except ScrubError:
        return []
    return stage + chain
