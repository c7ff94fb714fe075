"""Time `scrub inspect --scan` against one `scrub evaluate` of the test images, in one run.

    python examples/benchmark_scan.py runs/r18_badnets runs/r18_blended runs/r18_clean

Each folder is one made by examples/make_backdoored.py. Both commands run as fresh processes,
as a user runs them; the table gives the scan's seconds, its ratio to evaluate, what it
flagged and the true target recorded in the model's metadata.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+")
    return parser.parse_args()


def timed_scrub(*args: str) -> tuple[float, dict]:
    """Seconds and JSON document of one `python -m backdoor_scrub ... --json --quiet` run."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "backdoor_scrub", *args, "--json", "--quiet"],
                            capture_output=True, text=True)
    return time.perf_counter() - started, json.loads(result.stdout)


def main() -> None:
    """Print one markdown row per model folder."""
    args = parse_args()
    print("| model | attack | true target | flagged | anomaly index of flagged | scan | evaluate (2,000 images) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        model = str(folder / "model.safetensors")
        scan_seconds, scan_doc = timed_scrub("inspect", model, "--scan", "--clean-dir", str(folder / "clean"))
        eval_seconds, _ = timed_scrub("evaluate", model, "--test-dir", str(folder / "test"),
                                      "--trigger", str(folder / "trigger.png"))
        entry = scan_doc["models"][0]
        scan = entry["scan"]
        indices = ", ".join(f"{c['anomaly_index']:.1f}" for c in scan["classes"] if c["flagged"]) or "-"
        attack = entry["metadata"].get("example.attack", "?")
        target = entry["metadata"].get("example.target", "?") if attack != "none" else "-"
        print(f"| {entry['arch']} {folder.name} | {attack} | {target} | {scan['flagged'] or 'none'} | {indices} "
              f"| {scan_seconds:.1f} s | {eval_seconds:.1f} s | {scan_seconds / eval_seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
