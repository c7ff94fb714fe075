"""Peak memory and time of `scrub edit` and `scrub repair` on large models, against one `scrub evaluate`.

    python examples/benchmark_scale.py --out runs/scale                      # every case below
    python examples/benchmark_scale.py --out runs/scale --case vgg11_bn:32   # one case

Each case is a randomly initialised torchvision model at one input side, saved as a checkpoint
with metadata, 10 random images per class as the clean samples, and a test folder of those
samples plus 1,000 more. Every command runs as its own process, one at a time; its peak RSS is
the kernel's figure for that process (`ru_maxrss`), its time the wall clock. The ratio is the
command's time over the time of `scrub evaluate` on the test folder (clean and stamped passes).
A separate case evaluates a ResNet-18 at 224 px over 12,000 images (streamed evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image

from backdoor_scrub.checkpoint import ModelSpec, spec_metadata
from backdoor_scrub.safetensors_io import write_safetensors

CASES = ("vgg11_bn:32", "resnet50:224", "vit_b_16:224", "vgg16_bn:224")  # the streamed evaluate runs after the first
CLASSES = 10


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="working folder (models, images, results)")
    parser.add_argument("--case", action="append", help="ARCH:SIDE, repeatable (default: all)")
    parser.add_argument("--per-class", type=int, default=10, help="clean samples per class")
    parser.add_argument("--extra-test", type=int, default=1000, help="test images besides the samples")
    parser.add_argument("--stream-images", type=int, default=12000, help="images of the streamed evaluate (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="OMP/torch threads per command (0: default)")
    return parser.parse_args()


def write_random_images(root: Path, side: int, per_class: int, seed: int, start: int = 0) -> None:
    """Random RGB PNGs (32 x 32 noise scaled up to `side`), `per_class` per class folder, named from `start`."""
    generator = torch.Generator().manual_seed(seed)
    for label in range(CLASSES):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(start, start + per_class):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).resize((side, side), Image.NEAREST).save(folder / f"{index}.png")


def link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` into `target` (same relative paths)."""
    for path in source.rglob("*.png"):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if not destination.exists():
            os.link(path, destination)


def prepare_case(root: Path, arch: str, side: int, per_class: int, extra_test: int) -> dict[str, Path]:
    """The checkpoint, trigger, sample folder and test folder of one case (written once)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {"model": root / "model.safetensors", "trigger": root / "trigger.png",
             "samples": root / "samples", "test": root / "test"}
    if not paths["model"].exists():
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch, weights=None, num_classes=CLASSES).eval()
        spec = ModelSpec(arch, CLASSES, (3, side, side), (0.5,) * 3, (0.5,) * 3, None)
        write_safetensors(paths["model"], model.state_dict(), spec_metadata(spec), overwrite=True)
        Image.new("RGBA", (max(3, side // 8),) * 2, (255, 255, 0, 255)).save(paths["trigger"])
        write_random_images(paths["samples"], side, per_class, seed=1)
        write_random_images(paths["test"], side, extra_test // CLASSES, seed=2, start=per_class)
        link_tree(paths["samples"], paths["test"])
    return paths


def run_measured(command: list[str], threads: int) -> dict:
    """Run `python -m backdoor_scrub COMMAND --json` as a child; its wall time, peak RSS and JSON."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "backdoor_scrub", *command, "--json"], env=environment,
                                   stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)  # files, not pipes: the child never blocks on output
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])}: exit {process.returncode}\n{errors.decode()[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024), "result": json.loads(output)}


def measure_case(root: Path, case: str, args: argparse.Namespace) -> dict:
    """evaluate, edit and repair of one case, one process each."""
    arch, side = case.split(":")
    paths = prepare_case(root / case.replace(":", "_"), arch, int(side), args.per_class, args.extra_test)
    edited, repaired = paths["model"].with_name("edited.safetensors"), paths["model"].with_name("repaired.safetensors")
    common = ["--trigger", str(paths["trigger"]), "--target", "0"]
    evaluate = run_measured(["evaluate", str(paths["model"]), "--test-dir", str(paths["test"]), *common], args.threads)
    edit = run_measured(["edit", str(paths["model"]), "--clean-dir", str(paths["samples"]), *common, "-o", str(edited),
                         "--force"], args.threads)
    repair = run_measured(["repair", str(edited), "--clean-dir", str(paths["samples"]), "-o", str(repaired),
                           "--force"], args.threads)
    row = {"case": case, "samples": args.per_class * CLASSES, "test_images": args.per_class * CLASSES + args.extra_test}
    for name, measured in (("evaluate", evaluate), ("edit", edit), ("repair", repair)):
        row[name] = {"seconds": measured["seconds"], "peak_rss_mib": measured["peak_rss_mib"],
                     "x_evaluate": round(measured["seconds"] / evaluate["seconds"], 2)}
    row["edit"]["layers"] = edit["result"]["models"][0]["layers"]
    print(json.dumps(row), flush=True)
    return row


def measure_streamed_evaluate(root: Path, images: int, threads: int) -> dict:
    """`scrub evaluate` of a ResNet-18 at 224 px over `images` test images: peak RSS and time."""
    paths = prepare_case(root / "resnet18_224_stream", "resnet18", 224, 1, images)
    measured = run_measured(["evaluate", str(paths["model"]), "--test-dir", str(paths["test"]), "--trigger",
                             str(paths["trigger"]), "--target", "0"], threads)
    row = {"case": "resnet18:224 evaluate", "test_images": images + CLASSES, "seconds": measured["seconds"],
           "peak_rss_mib": measured["peak_rss_mib"]}
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], streamed: dict | None) -> str:
    """The README table."""
    lines = ["| model (side) | samples | evaluate (test images) | edit: peak RSS, time, x evaluate | "
             "repair: peak RSS, time, x evaluate |", "|---|---|---|---|---|"]
    for row in rows:
        ev, ed, rp = row["evaluate"], row["edit"], row["repair"]
        lines.append(f"| {row['case']} | {row['samples']} | {ev['peak_rss_mib']} MiB, {ev['seconds']:.0f} s "
                     f"({row['test_images']}) | {ed['peak_rss_mib']} MiB, {ed['seconds']:.0f} s, {ed['x_evaluate']}x | "
                     f"{rp['peak_rss_mib']} MiB, {rp['seconds']:.0f} s, {rp['x_evaluate']}x |")
    if streamed:
        lines.append(f"\n`scrub evaluate` of a ResNet-18 at 224 px over {streamed['test_images']} images: "
                     f"{streamed['peak_rss_mib']} MiB peak RSS, {streamed['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure every case (the streamed evaluate after the first), writing results.json and results.md as it goes."""
    args = parse_args()
    rows: list[dict] = []
    streamed = None
    for number, case in enumerate(args.case or CASES):
        rows.append(measure_case(args.out, case, args))
        if number == 0 and args.stream_images:
            streamed = measure_streamed_evaluate(args.out, args.stream_images, args.threads)
        write_results(args.out, rows, streamed)
    print(markdown(rows, streamed))


def write_results(out: Path, rows: list[dict], streamed: dict | None) -> None:
    """results.json and results.md under `out`."""
    (out / "results.json").write_text(json.dumps({"cases": rows, "streamed": streamed}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, streamed))


if __name__ == "__main__":
    main()
