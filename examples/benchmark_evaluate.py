"""Time `scrub evaluate` against a bare torch inference loop over the same tensors, in one run.

    python examples/benchmark_evaluate.py --model runs/r18/model.safetensors \
        --test-dir runs/r18/test --trigger runs/r18/trigger.png

Both sides compute the same predictions (clean pass over every image, stamped pass over the
non-target images). The bare loop gets the images already decoded as tensors and the model
already built; `scrub evaluate` (called in-process through its CLI) decodes the PNGs, loads
the checkpoint and writes its report. The ratio is scrub / bare; interpreter start-up, which
only the subprocess figure includes, is reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from click.testing import CliRunner

from backdoor_scrub.checkpoint import load_checkpoint
from backdoor_scrub.cli import cli
from backdoor_scrub.data import load_image_folder, with_normalization
from backdoor_scrub.triggers import load_trigger


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--test-dir", type=Path, required=True)
    parser.add_argument("--trigger", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def time_scrub_in_process(args: argparse.Namespace) -> tuple[float, dict]:
    """Seconds for one `scrub evaluate` through the CLI, and its JSON."""
    command = ["evaluate", str(args.model), "--test-dir", str(args.test_dir), "--trigger", str(args.trigger),
               "--batch-size", str(args.batch_size), "--json", "--quiet"]
    started = time.perf_counter()
    result = CliRunner().invoke(cli, command, catch_exceptions=False)
    seconds = time.perf_counter() - started
    return seconds, json.loads(result.stdout)["models"][0]


def time_scrub_subprocess(args: argparse.Namespace) -> float:
    """Seconds for `python -m backdoor_scrub evaluate` as a fresh process (imports included)."""
    command = [sys.executable, "-m", "backdoor_scrub", "evaluate", str(args.model), "--test-dir", str(args.test_dir),
               "--trigger", str(args.trigger), "--json", "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


@torch.inference_mode()
def time_bare_loop(model, images: torch.Tensor, labels: torch.Tensor, trigger, target: int, batch_size: int) -> float:
    """Seconds for the same clean and stamped forward passes over preloaded float tensors."""
    victims = images[labels != target]
    started = time.perf_counter()
    clean = torch.cat([model(batch).argmax(1) for batch in images.split(batch_size)])
    stamped = torch.cat([model(trigger.stamp(batch)).argmax(1) for batch in victims.split(batch_size)])
    seconds = time.perf_counter() - started
    assert len(clean) == len(images) and len(stamped) == len(victims)
    return seconds


def main() -> None:
    """Run both sides `--repeats` times and print the medians and their ratio as markdown."""
    args = parse_args()
    checkpoint = load_checkpoint(args.model)
    spec = checkpoint.spec
    model = with_normalization(checkpoint.model, spec)
    image_set = load_image_folder(args.test_dir, spec)
    images = image_set.images.float() / 255
    trigger = load_trigger(args.trigger, spec.input_size)
    time_scrub_in_process(args)  # warm-up: first-call allocations and lazy imports
    scrub_runs, bare_runs = [], []
    for _ in range(args.repeats):
        seconds, result = time_scrub_in_process(args)
        scrub_runs.append(seconds)
        bare_runs.append(time_bare_loop(model, images, image_set.labels, trigger, result["target"], args.batch_size))
    process = time_scrub_subprocess(args)
    scrub, bare = statistics.median(scrub_runs), statistics.median(bare_runs)
    print("| model | images | bare torch loop | scrub evaluate | ratio | scrub as a new process |")
    print("|---|---|---|---|---|---|")
    print(f"| {spec.arch} | {len(image_set)} | {bare:.2f} s | {scrub:.2f} s | {scrub / bare:.2f} | {process:.2f} s |")
    print(f"CA {result['clean_accuracy']:.4f}  ASR {result['attack_success_rate']:.4f}  threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
