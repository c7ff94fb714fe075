r"""Compare scrub's edit and repair with plain fine-tuning on backdoored models, at a few samples per class.

    python examples/benchmark.py --models runs/r18_badnets runs/r18_blended \
        --samples 1 5 10 --out-dir runs/benchmark

Each model folder is one made by examples/make_backdoored.py: model.safetensors (metadata
`example.target` holds the true target, `example.attack` the attack), trigger.png, clean/<class>/
(10 unseen clean samples per class) and test/<class>/. For every k in --samples the first k
clean samples of each class are the defender's data, and four defenses are measured on the
whole test folder against the true target:

- no defense: the model as it is;
- fine-tuning: all weights, cross-entropy on the k-per-class samples, Adam, full batch,
  BatchNorm in eval mode (timed in-process: there is no CLI for it);
- edit: `python -m backdoor_scrub edit` (default method), timed as a fresh process;
- edit + repair: then `python -m backdoor_scrub repair`, seconds summed.

`python -m backdoor_scrub evaluate` on the test folder is also timed once per model as a fresh
process, and each defense's seconds are reported as a multiple of it. Writes benchmark.md
(the markdown table, also printed) and benchmark.png (ASR and CA bars) under --out-dir.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.nn import functional as F

from backdoor_scrub.checkpoint import Checkpoint, load_checkpoint
from backdoor_scrub.data import ImageSet, load_image_folder, to_unit_range, with_normalization
from backdoor_scrub.evaluation import evaluate
from backdoor_scrub.metrics import Metrics
from backdoor_scrub.triggers import Trigger, load_trigger

DEFENSES = ("no defense", "fine-tuning", "edit", "edit + repair", "scan + edit (no trigger)")
COLORS = {"no defense": (120, 120, 120), "fine-tuning": (230, 140, 30), "edit": (60, 120, 210),
          "edit + repair": (40, 160, 90), "scan + edit (no trigger)": (150, 80, 170)}
DEVICE = torch.device("cpu")


@dataclass
class ModelFolder:
    """A backdoored model with its trigger, true target, clean samples and test images."""

    folder: Path
    checkpoint: Checkpoint
    trigger: Trigger
    target: int
    attack: str
    test: ImageSet

    @property
    def name(self) -> str:
        """The folder's name, which names the model in the table."""
        return self.folder.name

    def file(self, name: str) -> Path:
        """A file inside the folder."""
        return self.folder / name


@dataclass
class Row:
    """One defense of one model at one sample count, measured on the test folder."""

    model: str
    attack: str
    samples: int
    defense: str
    metrics: Metrics
    seconds: float | None
    evaluate_seconds: float


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="Folders made by make_backdoored.py.")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 5, 10], help="Clean samples per class.")
    parser.add_argument("--no-trigger-samples", type=int, nargs="*", default=[10],
                        help="Sample counts at which the no-trigger path (scan, then edit) is also measured.")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_model_folder(folder: Path) -> ModelFolder:
    """Read the checkpoint, its true target and attack, the trigger and the decoded test images."""
    checkpoint = load_checkpoint(folder / "model.safetensors")
    if "example.target" not in checkpoint.metadata:
        sys.exit(f"{folder}: model.safetensors has no example.target metadata (not made by make_backdoored.py?)")
    trigger = load_trigger(folder / "trigger.png", checkpoint.spec.input_size)
    test = load_image_folder(folder / "test", checkpoint.spec, workers=2)
    target, attack = int(checkpoint.metadata["example.target"]), checkpoint.metadata.get("example.attack", "?")
    return ModelFolder(folder, checkpoint, trigger, target, attack, test)


def write_subset(clean_dir: Path, per_class: int, destination: Path) -> Path:
    """Copy the first `per_class` images of every class folder of `clean_dir` into `destination`."""
    for class_dir in sorted(d for d in clean_dir.iterdir() if d.is_dir()):
        (destination / class_dir.name).mkdir(parents=True)
        for image in sorted(p for p in class_dir.iterdir() if p.is_file())[:per_class]:
            shutil.copy2(image, destination / class_dir.name / image.name)
    return destination


def run_scrub(*arguments: str | Path) -> float:
    """Seconds for `python -m backdoor_scrub ARGUMENTS` as a fresh process; exits if it fails."""
    command = [sys.executable, "-m", "backdoor_scrub", *map(str, arguments)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with exit code {result.returncode}:\n{result.stderr.strip()}")
    return seconds


def time_evaluate(model: ModelFolder) -> float:
    """Seconds for `scrub evaluate` of the model on its test folder with its trigger."""
    return run_scrub("evaluate", model.file("model.safetensors"), "--test-dir", model.file("test"),
                     "--trigger", model.file("trigger.png"), "-q")


def measure(model: ModelFolder, network: nn.Module) -> Metrics:
    """CA, ASR, RA and target-class accuracy of `network` on the test folder, with the true target."""
    classifier = with_normalization(network, model.checkpoint.spec)
    return evaluate(classifier, model.test, model.checkpoint.spec.num_classes, DEVICE,
                    trigger=model.trigger, target=model.target)


def freeze_batchnorm(network: nn.Module) -> nn.Module:
    """Train mode everywhere except BatchNorm layers, which keep their running statistics."""
    network.train()
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return network


def fine_tune(model: ModelFolder, subset: Path, steps: int, lr: float, seed: int) -> tuple[nn.Module, float]:
    """The baseline: all weights, cross-entropy on the labelled subset, full-batch Adam; and its seconds."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    spec = model.checkpoint.spec
    samples = load_image_folder(subset, spec)
    network = copy.deepcopy(model.checkpoint.model)
    classifier = freeze_batchnorm(with_normalization(network, spec))
    images, labels = to_unit_range(samples.images), samples.labels
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(classifier(images), labels).backward()
        optimizer.step()
    return network.eval(), time.perf_counter() - started


def edit_and_repair(model: ModelFolder, subset: Path, workdir: Path, seed: int) -> tuple[Path, float, Path, float]:
    """Edit then repair through the CLI: (edited file, its seconds, repaired file, its seconds)."""
    edited, repaired = workdir / "edited.safetensors", workdir / "repaired.safetensors"
    trigger = model.file("trigger.png")
    edit_seconds = run_scrub("edit", model.file("model.safetensors"), "--clean-dir", subset, "--trigger", trigger,
                             "-o", edited, "--seed", seed, "-q")
    repair_seconds = run_scrub("repair", edited, "--clean-dir", subset, "-o", repaired, "--seed", seed, "-q")
    return edited, edit_seconds, repaired, repair_seconds


def scan_and_edit(model: ModelFolder, subset: Path, workdir: Path, seed: int) -> tuple[nn.Module, float]:
    """`edit` without the trigger file (scan, then edit): the model it writes, or the input if nothing is flagged."""
    output = workdir / "no-trigger.safetensors"
    seconds = run_scrub("edit", model.file("model.safetensors"), "--clean-dir", subset, "-o", output,
                        "--seed", seed, "-q")
    return (load_checkpoint(output).model if output.exists() else model.checkpoint.model), seconds


def benchmark_samples(model: ModelFolder, per_class: int, evaluate_seconds: float, args: argparse.Namespace) -> list[Row]:
    """The defenses of one model from its first `per_class` clean samples per class."""
    with tempfile.TemporaryDirectory(prefix="scrub-bench-") as scratch:
        subset = write_subset(model.file("clean"), per_class, Path(scratch) / "clean")
        tuned, tune_seconds = fine_tune(model, subset, args.finetune_steps, args.finetune_lr, args.seed)
        edited, edit_seconds, repaired, repair_seconds = edit_and_repair(model, subset, Path(scratch), args.seed)
        measured = [
            ("fine-tuning", tuned, tune_seconds),
            ("edit", load_checkpoint(edited).model, edit_seconds),
            ("edit + repair", load_checkpoint(repaired).model, edit_seconds + repair_seconds),
        ]
        if per_class in args.no_trigger_samples:
            measured.append(("scan + edit (no trigger)", *scan_and_edit(model, subset, Path(scratch), args.seed)))
        return [Row(model.name, model.attack, per_class, defense, measure(model, network), seconds, evaluate_seconds)
                for defense, network, seconds in measured]


def benchmark_model(model: ModelFolder, args: argparse.Namespace) -> list[Row]:
    """All rows of one model: no defense, then each defense at each sample count."""
    evaluate_seconds = time_evaluate(model)
    undefended = measure(model, model.checkpoint.model)
    rows = []
    for per_class in args.samples:
        rows.append(Row(model.name, model.attack, per_class, "no defense", undefended, None, evaluate_seconds))
        rows += benchmark_samples(model, per_class, evaluate_seconds, args)
        print(f"  {model.name}: {per_class} samples/class done", file=sys.stderr)
    return rows


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal, or a dash."""
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| model | attack | samples/class | defense | CA | ASR | RA | target-class acc | seconds | ÷ evaluate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.metrics
        seconds = "–" if r.seconds is None else f"{r.seconds:.1f}"
        ratio = "–" if r.seconds is None else f"{r.seconds / r.evaluate_seconds:.2f}"
        lines.append(
            f"| {r.model} | {r.attack} | {r.samples} | {r.defense} | {percent(m.clean_accuracy)} | "
            f"{percent(m.attack_success_rate)} | {percent(m.robust_accuracy)} | "
            f"{percent(m.target_class_accuracy)} | {seconds} | {ratio} |"
        )
    return "\n".join(lines)


def footnotes(rows: list[Row], args: argparse.Namespace) -> str:
    """What the seconds and the ratio mean, and the evaluate time of each model."""
    evaluate_times = ", ".join(dict.fromkeys(f"{r.model} {r.evaluate_seconds:.1f} s" for r in rows))
    return (
        f"Metrics on the full test/ folder with the true target from `example.target`. Seconds are wall "
        f"time on {torch.get_num_threads()} CPU threads. edit and edit + repair run "
        f"`python -m backdoor_scrub edit/repair` as fresh processes (interpreter start-up, imports, checkpoint "
        f"read and write included); edit + repair is the sum of both. Fine-tuning ({args.finetune_steps} full-batch "
        f"Adam steps, lr {args.finetune_lr:g}, BatchNorm in eval mode, seed {args.seed}) has no CLI and is timed "
        f"in-process: reading the samples and training only, no start-up or checkpoint I/O. "
        f"\"÷ evaluate\" divides a defense's seconds by those of `python -m backdoor_scrub evaluate MODEL "
        f"--test-dir test --trigger trigger.png -q` as a fresh process: {evaluate_times}."
    )


def ratio_summaries(rows: list[Row], per_class: int) -> list[str]:
    """One line per model: (edit + repair seconds) / (evaluate seconds) at `per_class` samples/class."""
    return [
        f"{r.model}: edit + repair at {per_class} samples/class took {r.seconds:.1f} s = "
        f"{r.seconds / r.evaluate_seconds:.2f} x scrub evaluate ({r.evaluate_seconds:.1f} s)"
        for r in rows if r.defense == "edit + repair" and r.samples == per_class
    ]


def font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans at `size` pixels if installed, else Pillow's scalable default font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def draw_panel(draw: ImageDraw.ImageDraw, rows: list[Row], groups: list[tuple], metric: str, box: tuple) -> None:
    """One bar panel: `metric` of every defense, grouped by (model, samples/class), in `box`."""
    left, top, right, bottom = box
    small, label = font(13), font(16)
    draw.text((left - 60, top - 30), f"{metric} (%)", fill="black", font=label)
    for tick in range(0, 101, 25):
        y = bottom - (bottom - top) * tick / 100
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.text((left - 8, y), str(tick), fill="black", font=small, anchor="rm")
    group_width = (right - left) / len(groups)
    bar = group_width * 0.8 / len(DEFENSES)
    values = {(r.model, r.samples, r.defense): r.metrics for r in rows}
    for g, (model, samples) in enumerate(groups):
        x0 = left + g * group_width + group_width * 0.1
        for d, defense in enumerate(DEFENSES):
            metrics = values.get((model, samples, defense))
            if metrics is None:
                continue
            value = metrics.attack_success_rate if metric == "ASR" else metrics.clean_accuracy
            x, y = x0 + d * bar, bottom - (bottom - top) * value
            draw.rectangle((x + 1, y, x + bar - 1, bottom), fill=COLORS[defense])
            shown = f"{100 * value:.1f}" if value < 0.1 else f"{100 * value:.0f}"
            draw.text((x + bar / 2, y - 2), shown, fill="black", font=small, anchor="mb")
        draw.text((x0 + 2 * bar, bottom + 8), f"{samples}/class", fill="black", font=small, anchor="mt")
    draw.line((left, bottom, right, bottom), fill="black")


def draw_model_labels(draw: ImageDraw.ImageDraw, rows: list[Row], groups: list[tuple], box: tuple) -> None:
    """Under the bars, each model's name and attack centred beneath its groups, with separators."""
    left, top, right, bottom = box
    group_width = (right - left) / len(groups)
    attacks = {r.model: r.attack for r in rows}
    models = list(dict.fromkeys(model for model, _ in groups))
    for model in models:
        indices = [i for i, (m, _) in enumerate(groups) if m == model]
        start, end = left + indices[0] * group_width, left + (indices[-1] + 1) * group_width
        draw.text(((start + end) / 2, bottom + 30), f"{model} ({attacks[model]})", fill="black",
                  font=font(16), anchor="mt")
        if indices[0] > 0:
            draw.line((start, top, start, bottom + 48), fill=(150, 150, 150), width=2)


def draw_legend(draw: ImageDraw.ImageDraw, x: int, y: int) -> None:
    """A colour swatch and the name of each defense, in one line."""
    for defense in DEFENSES:
        draw.rectangle((x, y, x + 18, y + 18), fill=COLORS[defense])
        draw.text((x + 26, y + 9), defense, fill="black", font=font(16), anchor="lm")
        x += 60 + int(draw.textlength(defense, font=font(16)))


def draw_chart(rows: list[Row], path: Path) -> None:
    """benchmark.png: an ASR panel above a CA panel, bars per defense, grouped by model and samples/class."""
    groups = list(dict.fromkeys((r.model, r.samples) for r in rows))
    width, panel = max(900, 120 + 170 * len(groups)), 300
    image = Image.new("RGB", (width, 2 * panel + 220), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width / 2, 16), "Backdoor removal: attack success rate (lower is better) and clean accuracy",
              fill="black", font=font(20), anchor="mt")
    draw_legend(draw, 80, 52)
    asr_box = (80, 120, width - 30, 120 + panel - 40)
    ca_box = (80, 120 + panel + 60, width - 30, 120 + 2 * panel + 20)
    draw_panel(draw, rows, groups, "ASR", asr_box)
    draw_panel(draw, rows, groups, "CA", ca_box)
    draw_model_labels(draw, rows, groups, asr_box)
    draw_model_labels(draw, rows, groups, ca_box)
    image.save(path)


def write_outputs(rows: list[Row], args: argparse.Namespace) -> None:
    """Print the table, its notes and the ratio summary; write benchmark.md and benchmark.png."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = ratio_summaries(rows, max(args.samples))
    report = "\n\n".join([markdown_table(rows), footnotes(rows, args), "\n".join(f"- {s}" for s in summary)])
    print(report)
    (args.out_dir / "benchmark.md").write_text(report + "\n")
    draw_chart(rows, args.out_dir / "benchmark.png")
    print(f"\nwrote {args.out_dir / 'benchmark.md'} and {args.out_dir / 'benchmark.png'}", file=sys.stderr)


def main() -> None:
    """Benchmark every model folder and write the report."""
    args = parse_args()
    rows = []
    for folder in args.models:
        print(f"{folder}: loading", file=sys.stderr)
        rows += benchmark_model(load_model_folder(folder), args)
    write_outputs(rows, args)


if __name__ == "__main__":
    main()
