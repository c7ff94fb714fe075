r"""Benchmark scrub's edit + repair against plain fine-tuning on held-out models, over several draws of samples.

    python examples/benchmark.py --split report --out-dir examples/results   # the README's figures
    python examples/benchmark.py --models runs/t_r18_checker --draws 1       # any folders

Each model folder is one made by examples/make_backdoored.py (via examples/zoo.py): model.safetensors
(metadata `example.target` and `example.attack`), trigger.png, clean/<class>/ (30 unseen clean
samples per class) and test/<class>/ (2,000 held-out images). A model whose trigger is not a stamp
(a warp, a per-image patch) has instead clean_triggered/ and test_triggered/ (the triggered copy of
every image) and poisoned/<class>/ (100 triggered pictures that are in neither folder). Draw d of k
samples per class is images 10d .. 10d+k-1 of each class folder, so the three draws are disjoint.
Measured on the whole test folder, against the true target:

- no defense;
- fine-tuning (the baseline: all weights, cross-entropy on the samples, full-batch Adam, BatchNorm
  in eval mode; timed in-process; draw 0 only, it is the slowest row);
- edit and edit + repair: `python -m backdoor_scrub edit` then `repair`, default settings, each a
  fresh process, timed; with `--trigger trigger.png`, else `--triggered-dir` (the draw's triggered copies);
- poisoned edit + repair (models without a stamp): the same with `--poisoned-dir poisoned/`, the
  unpaired poisoned pictures, instead of the triggered copies;
- scan + edit (no trigger) for patch (badnets) and clean models at the largest k, draw 0, once per
  `--scan-seeds` seed: `edit` without `--trigger`, with the classes its scan flagged.

Beside ASR, its floor: the share of the same images the defended model assigns to the target with
no trigger at all (evaluate's `clean_target_rate`). ASR cannot fall below it by removing a backdoor,
and on models of 81-87% CA it is 1-8% here; "ASR over its floor" is what the trigger still causes.
Beside it, the clean model's ASR: the same measurement on the zoo's never-backdoored model of the
same architecture (`reference` split, under --runs), where there is one. A full-image trigger sends
some images to the target of a model that never learnt it (up to 18% here); rows read with
--results that lack it get it measured.

Seconds are divided by one fresh `python -m backdoor_scrub evaluate` of the test folder, timed
in the same run. Writes results.json (every row), benchmark.md (per-model rows and a summary
with the median and the worst case of every column) and benchmark.png (matplotlib, optional
extra `pip install -e .[examples]`) under --out-dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from backdoor_scrub.checkpoint import Checkpoint, load_checkpoint
from backdoor_scrub.data import (
    ImageSet,
    decode_listing,
    list_image_folder,
    load_image_folder,
    to_unit_range,
    with_normalization,
)
from backdoor_scrub.evaluation import evaluate
from backdoor_scrub.triggers import Trigger, load_trigger

sys.path.insert(0, str(Path(__file__).parent))
from make_backdoored import main_logits  # noqa: E402
from zoo import ZOO, clean_reference  # noqa: E402

DEFENSES = ("fine-tuning", "edit", "edit + repair", "poisoned edit + repair", "scan + edit (no trigger)")
DEVICE = torch.device("cpu")


@dataclass
class ModelFolder:
    """A backdoored model with its trigger (None: test images paired with triggered copies), true target,
    clean samples and test images."""

    folder: Path
    checkpoint: Checkpoint
    trigger: Trigger | None
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

    def trigger_arguments(self, triggered: Path | None = None) -> tuple:
        """How scrub is given the trigger: the stamp, or the `triggered` copies (default: of the test folder)."""
        if self.trigger is not None:
            return "--trigger", self.file("trigger.png")
        return "--triggered-dir", triggered or self.file("test_triggered")


@dataclass
class Row:
    """One defense of one model at one sample count and draw, measured on the test folder."""

    model: str
    arch: str
    attack: str
    samples: int
    draw: int
    defense: str
    clean_accuracy: float
    attack_success_rate: float
    target_class_accuracy: float
    ca_change: float
    target_change: float
    seconds: float | None
    evaluate_seconds: float
    seed: int = 0
    flagged: list[int] | None = None
    true_target: int | None = None
    asr_floor: float | None = None  # non-target test images the defended model sends to the target unstamped
    clean_model_asr: float | None = None  # the ASR of the zoo's never-backdoored model of the same architecture

    @property
    def asr_over_clean_model(self) -> float | None:
        """ASR minus a never-backdoored model's: what is left beyond the trigger's effect on any model."""
        return None if self.clean_model_asr is None else self.attack_success_rate - self.clean_model_asr

    @property
    def asr_over_floor(self) -> float | None:
        """ASR minus its floor: the part of ASR the trigger still causes."""
        return None if self.asr_floor is None else self.attack_success_rate - self.asr_floor

    @property
    def ratio(self) -> float | None:
        """Seconds over one fresh `scrub evaluate` of the test folder."""
        return None if self.seconds is None else self.seconds / self.evaluate_seconds


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="Folders made by make_backdoored.py.")
    parser.add_argument("--split", choices=["tune", "report"], help="Every model of this zoo split, under --runs.")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 10], help="Clean samples per class.")
    parser.add_argument("--draws", type=int, default=3, help="Disjoint draws of the samples (at most 3).")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan-seeds", type=int, nargs="+", default=[0], help="Seeds of the no-trigger runs.")
    parser.add_argument("--defenses", nargs="+", choices=DEFENSES, default=list(DEFENSES), help="Defenses to run.")
    parser.add_argument("--results", type=Path, nargs="*", default=[],
                        help="results.json files of earlier runs to report with (or instead of) new measurements.")
    return parser.parse_args()


def load_model_folder(folder: Path) -> ModelFolder:
    """Read the checkpoint, its true target and attack, the trigger and the decoded test images (and their
    triggered copies when the trigger is not a stamp)."""
    checkpoint = load_checkpoint(folder / "model.safetensors")
    if "example.target" not in checkpoint.metadata:
        sys.exit(f"{folder}: model.safetensors has no example.target metadata (not made by make_backdoored.py?)")
    spec = checkpoint.spec
    stamp = folder / "trigger.png"
    trigger = load_trigger(stamp, spec.input_size) if stamp.exists() else None
    listing = list_image_folder(folder / "test", spec)
    if trigger is None:
        listing = listing.paired_with(folder / "test_triggered", None)
    test = decode_listing(listing, spec, workers=2)
    target, attack = int(checkpoint.metadata["example.target"]), checkpoint.metadata.get("example.attack", "?")
    return ModelFolder(folder, checkpoint, trigger, target, attack, test)


def write_draw(clean_dir: Path, per_class: int, draw: int, destination: Path) -> Path:
    """Copy images 10*draw .. 10*draw + per_class - 1 of every class folder of `clean_dir` into `destination`."""
    for class_dir in sorted(d for d in clean_dir.iterdir() if d.is_dir()):
        (destination / class_dir.name).mkdir(parents=True)
        for image in sorted(p for p in class_dir.iterdir() if p.is_file())[10 * draw : 10 * draw + per_class]:
            (destination / class_dir.name / image.name).write_bytes(image.read_bytes())
    return destination


def run_scrub(*arguments: str | Path) -> float:
    """Seconds for `python -m backdoor_scrub ARGUMENTS` as a fresh process; exits if it fails."""
    return run_scrub_json(*arguments)[0]


def run_scrub_json(*arguments: str | Path) -> tuple[float, dict | None]:
    """(seconds, the JSON document when --json is among the arguments) of a fresh `python -m backdoor_scrub`."""
    command = [sys.executable, "-m", "backdoor_scrub", *map(str, arguments)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with exit code {result.returncode}:\n{result.stderr.strip()}")
    return seconds, json.loads(result.stdout) if "--json" in arguments else None


def time_evaluate(model: ModelFolder) -> float:
    """Seconds for `scrub evaluate` of the model on its test folder with its trigger."""
    return run_scrub("evaluate", model.file("model.safetensors"), "--test-dir", model.file("test"),
                     *model.trigger_arguments(), "-q")


def edit_and_repair(model: ModelFolder, subset: Path, trigger: tuple, workdir: Path,
                    seed: int) -> tuple[Path, float, Path, float]:
    """Edit then repair through the CLI with the `trigger` arguments: (edited file, its seconds, repaired file,
    its seconds). Repair is given them again unless they are a stamp (which it reads from the edit's history)."""
    edited, repaired = workdir / "edited.safetensors", workdir / "repaired.safetensors"
    again = () if trigger[0] == "--trigger" else trigger
    edit_seconds = run_scrub("edit", model.file("model.safetensors"), "--clean-dir", subset, *trigger,
                             "-o", edited, "--seed", seed, "--force", "-q")
    repair_seconds = run_scrub("repair", edited, "--clean-dir", subset, *again, "-o", repaired, "--seed", seed,
                               "--force", "-q")
    return edited, edit_seconds, repaired, repair_seconds


def scan_and_edit(model: ModelFolder, subset: Path, workdir: Path, seed: int) -> tuple[nn.Module, float, list[int]]:
    """`edit` without the trigger file (scan, then edit): the model it writes (the input if nothing is flagged),
    its seconds and the flagged classes."""
    output = workdir / f"no-trigger-{seed}.safetensors"
    seconds, document = run_scrub_json("edit", model.file("model.safetensors"), "--clean-dir", subset, "-o", output,
                                       "--seed", seed, "--json", "-q")
    flagged = document["models"][0]["scan"]["flagged"]
    return (load_checkpoint(output).model if output.exists() else model.checkpoint.model), seconds, flagged


def measure(model: ModelFolder, network: nn.Module) -> tuple[float, float, float, float]:
    """(CA, ASR, target-class accuracy, ASR's floor) of `network` on the test folder, with the true target."""
    classifier = with_normalization(network, model.checkpoint.spec)
    metrics = evaluate(classifier, model.test.batches(256), model.checkpoint.spec.num_classes, DEVICE,
                       trigger=model.trigger, target=model.target)
    return metrics.clean_accuracy, metrics.attack_success_rate, metrics.target_class_accuracy, metrics.clean_target_rate


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
        F.cross_entropy(main_logits(classifier(images)), labels).backward()
        optimizer.step()
    return network.eval(), time.perf_counter() - started


def defenses(model: ModelFolder, per_class: int, draw: int, last_k: bool, args) -> list[tuple]:
    """(defense, network, seconds, seed, flagged) of each defense run on one draw of the samples."""
    measured = []
    with tempfile.TemporaryDirectory(prefix="scrub-bench-") as scratch:
        subset = write_draw(model.file("clean"), per_class, draw, Path(scratch) / "clean")
        if draw == 0 and "fine-tuning" in args.defenses:
            network, seconds = fine_tune(model, subset, args.finetune_steps, args.finetune_lr, args.seed)
            measured.append(("fine-tuning", network, seconds, args.seed, None))
        if {"edit", "edit + repair"} & set(args.defenses):
            triggered = None
            if model.trigger is None:
                triggered = write_draw(model.file("clean_triggered"), per_class, draw, Path(scratch) / "clean_triggered")
            trigger = model.trigger_arguments(triggered)
            edited, edit_seconds, repaired, repair_seconds = edit_and_repair(model, subset, trigger, Path(scratch),
                                                                             args.seed)
            measured += [("edit", load_checkpoint(edited).model, edit_seconds, args.seed, None),
                         ("edit + repair", load_checkpoint(repaired).model, edit_seconds + repair_seconds, args.seed,
                          None)]
        if model.trigger is None and "poisoned edit + repair" in args.defenses:
            trigger = ("--poisoned-dir", model.file("poisoned"))
            _, edit_seconds, repaired, repair_seconds = edit_and_repair(model, subset, trigger, Path(scratch), args.seed)
            measured.append(("poisoned edit + repair", load_checkpoint(repaired).model, edit_seconds + repair_seconds,
                             args.seed, None))
        if draw == 0 and last_k and model.attack in ("badnets", "none") and "scan + edit (no trigger)" in args.defenses:
            for seed in args.scan_seeds:
                network, seconds, flagged = scan_and_edit(model, subset, Path(scratch), seed)
                measured.append(("scan + edit (no trigger)", network, seconds, seed, flagged))
    return [m for m in measured if m[0] in args.defenses]


def clean_model_asr(model: ModelFolder, runs: Path) -> float | None:
    """The ASR of the zoo's never-backdoored model of the same architecture on this model's test images, trigger
    and target (None: no such model under `runs`, or one of another input size or normalisation).

    A full-image trigger also sends some images to the target class of a model that never saw it (a 20%
    blend makes a picture look like a shirt): that share is reached without any backdoor."""
    name = clean_reference(model.checkpoint.spec.arch)
    path = runs / name / "model.safetensors" if name else None
    if path is None or not path.exists():
        return None
    reference = load_checkpoint(path)
    if reference.spec != model.checkpoint.spec:
        return None
    return measure(model, reference.model)[1]


def fill_clean_model_asr(rows: list[Row], runs: Path) -> None:
    """Give rows read from earlier results (which lack it) their model's clean-model ASR, where its folder is here."""
    lacking = [r for r in rows if r.clean_model_asr is None and r.attack != "none" and clean_reference(r.arch)]
    for name in dict.fromkeys(r.model for r in lacking):
        if (runs / name / "model.safetensors").exists():
            value = clean_model_asr(load_model_folder(runs / name), runs)
            for r in rows:
                if r.model == name:
                    r.clean_model_asr = value


def benchmark_model(model: ModelFolder, args: argparse.Namespace) -> list[Row]:
    """All rows of one model: no defense, then each defense at each sample count and draw."""
    evaluate_seconds = time_evaluate(model)
    base = measure(model, model.checkpoint.model)
    base_ca, _, base_target, _ = base
    reference_asr = None if model.attack == "none" else clean_model_asr(model, args.runs)

    def row(per_class: int, draw: int, defense: str, network: nn.Module | None, seconds: float | None,
            seed: int = 0, flagged: list[int] | None = None) -> Row:
        ca, asr, target, floor = base if network is None else measure(model, network)
        return Row(model.name, model.checkpoint.spec.arch, model.attack, per_class, draw, defense, ca, asr, target,
                   ca - base_ca, target - base_target, seconds, evaluate_seconds, seed, flagged, model.target, floor,
                   reference_asr)

    rows = [row(0, 0, "no defense", None, None)]
    for per_class in args.samples:
        for draw in range(args.draws):
            for measured in defenses(model, per_class, draw, per_class == max(args.samples), args):
                rows.append(row(per_class, draw, *measured))
            print(f"  {model.name}: {per_class} samples/class, draw {draw} done", file=sys.stderr, flush=True)
    return rows


def percent(value: float | None, signed: bool = False) -> str:
    """A fraction as a percentage (or a signed change in points) with one decimal, or a dash."""
    if value is None:
        return "–"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}%"


def model_table(rows: list[Row]) -> str:
    """Every row as a markdown table."""
    lines = ["| model | arch | attack | samples/class | draw | defense | CA | CA change (pt) | ASR | ASR floor | "
             "clean model's ASR | target-class change (pt) | seconds | ÷ evaluate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = "–" if r.seconds is None else f"{r.seconds:.1f}"
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"| {r.model} | {r.arch} | {r.attack} | {r.samples or '–'} | {r.draw} | {r.defense} | "
                     f"{percent(r.clean_accuracy)} | {percent(r.ca_change, True)} | {percent(r.attack_success_rate)} | "
                     f"{percent(r.asr_floor)} | {percent(r.clean_model_asr)} | {percent(r.target_change, True)} | "
                     f"{seconds} | {ratio} |")
    return "\n".join(lines)


def summary_table(rows: list[Row]) -> str:
    """Per (samples/class, defense): median and worst over backdoored models and draws of each column."""
    rows = [r for r in rows if r.attack != "none"]
    lines = ["| samples/class | defense | runs | ASR median / worst | ASR over its floor median / worst (pt) | "
             "ASR over a clean model's median / worst (pt) | CA change median / worst (pt) | "
             "target-class change median / worst (pt) | ÷ evaluate median / worst |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = dict.fromkeys((r.samples, r.defense) for r in rows if r.defense != "no defense")
    for samples, defense in sorted(groups, key=lambda g: (g[0], DEFENSES.index(g[1]))):
        group = [r for r in rows if (r.samples, r.defense) == (samples, defense)]
        asr = [r.attack_success_rate for r in group]
        over_floor = median_and_worst([r.asr_over_floor for r in group])
        over_clean = median_and_worst([r.asr_over_clean_model for r in group])
        ca, target = [r.ca_change for r in group], [r.target_change for r in group]
        ratios = [r.ratio for r in group if r.ratio is not None]
        lines.append(
            f"| {samples} | {defense} | {len(group)} | {percent(statistics.median(asr))} / {percent(max(asr))} | "
            f"{over_floor} | {over_clean} | "
            f"{percent(statistics.median(ca), True)} / {percent(min(ca), True)} | "
            f"{percent(statistics.median(target), True)} / {percent(min(target), True)} | "
            f"{statistics.median(ratios):.2f} / {max(ratios):.2f} |")
    return "\n".join(lines)


def median_and_worst(changes: list[float | None]) -> str:
    """'median / largest' of the changes that were measured, in signed points, or a dash."""
    measured = [c for c in changes if c is not None]
    return f"{percent(statistics.median(measured), True)} / {percent(max(measured), True)}" if measured else "–"


def no_trigger_table(rows: list[Row]) -> str:
    """Per model, the no-trigger runs side by side over seeds: flagged classes, ASR and CA change after."""
    lines = ["| model | attack | true target | seeds | flagged (per seed) | ASR after (per seed) | "
             "CA change, pt (per seed) | ÷ evaluate (per seed) |", "|---|---|---|---|---|---|---|---|"]
    runs = [r for r in rows if r.defense == "scan + edit (no trigger)"]
    for name in dict.fromkeys(r.model for r in runs):
        group = sorted((r for r in runs if r.model == name), key=lambda r: r.seed)
        attack = group[0].attack
        lines.append(
            f"| {name} | {attack} | {'–' if attack == 'none' else group[0].true_target} | "
            f"{', '.join(str(r.seed) for r in group)} | "
            f"{'; '.join(str(r.flagged) for r in group)} | "
            f"{', '.join('–' if attack == 'none' else percent(r.attack_success_rate) for r in group)} | "
            f"{', '.join(percent(r.ca_change, True) for r in group)} | "
            f"{', '.join(f'{r.ratio:.1f}' for r in group)} |")
    return "\n".join(lines)


def draw_chart(rows: list[Row], path: Path) -> None:
    """benchmark.png: ASR and CA change of every run, one column of points per (samples/class, defense)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        print("matplotlib is not installed (pip install -e .[examples]): no chart", file=sys.stderr)
        return
    groups = sorted(dict.fromkeys((r.samples, r.defense) for r in rows if r.defense != "no defense"),
                    key=lambda g: (g[0], DEFENSES.index(g[1])))
    figure, (asr_axis, ca_axis) = pyplot.subplots(2, 1, figsize=(max(8, 1.3 * len(groups)), 8), sharex=True)
    for position, group in enumerate(groups):
        chosen = [r for r in rows if (r.samples, r.defense) == group]
        spread = torch.linspace(-0.2, 0.2, len(chosen)).tolist()
        asr_axis.scatter([position + s for s in spread], [max(0.1, 100 * r.attack_success_rate) for r in chosen], s=14)
        ca_axis.scatter([position + s for s in spread], [100 * r.ca_change for r in chosen], s=14)
    asr_axis.set_yscale("log")
    asr_axis.set_ylim(0.08, 130)
    asr_axis.axhline(2, color="grey", linestyle="--", linewidth=0.8)
    asr_axis.set_ylabel("ASR after (%, log; 0.1 = at most 0.1)")
    ca_axis.axhline(0, color="grey", linewidth=0.8)
    ca_axis.set_ylabel("CA change (points)")
    ca_axis.set_xticks(range(len(groups)), [f"{d}\n{k}/class" for k, d in groups], fontsize=8)
    asr_axis.set_title("Held-out models: every model and draw of samples is a point")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_outputs(rows: list[Row], args: argparse.Namespace) -> None:
    """Print the tables; write results.json, benchmark.md and benchmark.png."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = "\n\n".join([summary_table(rows), no_trigger_table(rows), model_table(rows), footnote(args)])
    print(report)
    (args.out_dir / "benchmark.md").write_text(report + "\n")
    (args.out_dir / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    draw_chart(rows, args.out_dir / "benchmark.png")
    print(f"\nwrote {args.out_dir}/benchmark.md, results.json and benchmark.png", file=sys.stderr)


def footnote(args: argparse.Namespace) -> str:
    """How the figures were taken."""
    return (f"Test metrics on each model's 2,000 held-out images with the true trigger and target. Seconds: wall time "
            f"on {torch.get_num_threads()} CPU thread(s); edit and repair are fresh `python -m backdoor_scrub` "
            f"processes (start-up and checkpoint I/O included), divided by one fresh `scrub evaluate` of the test "
            f"folder. Fine-tuning: {args.finetune_steps} full-batch Adam steps at lr {args.finetune_lr:g}, in-process.")


def main() -> None:
    """Benchmark every model folder and write the report."""
    args = parse_args()
    folders = list(args.models)
    if args.split:
        folders += [args.runs / name for name, (split, _) in ZOO.items() if split == args.split]
    rows = [Row(**row) for path in args.results for row in json.loads(path.read_text())]
    fill_clean_model_asr(rows, args.runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        print(f"{folder}: loading", file=sys.stderr, flush=True)
        rows += benchmark_model(load_model_folder(folder), args)
        # Rows so far, so that a failure on a later model does not lose them (they can be given back with --results).
        (args.out_dir / "partial.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    write_outputs(rows, args)


if __name__ == "__main__":
    main()
