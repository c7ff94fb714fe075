"""`--triggered-dir`: triggered copies of the images given as files, matched by relative path (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from backdoor_scrub.checkpoint import load_checkpoint
from backdoor_scrub.triggers import load_trigger
from tests.conftest import run_scrub


def write_triggered_copies(demo: Path, folder: str, trigger: Path | None = None) -> Path:
    """`trigger` (the demo's) stamped on every image of demo/<folder>, saved at the same relative path under a twin
    folder."""
    source, target = demo / folder, demo / f"{folder}_triggered"
    for path in sorted(source.rglob("*.png")):
        with Image.open(path) as image:
            pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            size = image.size
        unit = pixels.view(size[1], size[0], 3).permute(2, 0, 1).float().div(255)[None]
        stamped = load_trigger(trigger or demo / "trigger.png", (3, size[1], size[0])).stamp(unit)[0]
        twin = target / path.relative_to(source)
        twin.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(stamped.mul(255).round().byte().permute(1, 2, 0).numpy()).save(twin)
    return target


def evaluated(demo: Path, *trigger) -> dict:
    result = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test", *trigger, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["models"][0]


@pytest.mark.parametrize("streamed", [False, True])
def test_triggered_copies_measure_what_the_stamp_does(demo, monkeypatch, streamed):
    if streamed:
        monkeypatch.setattr("backdoor_scrub.commands.evaluate.KEEP_DECODED_BYTES", 0)
    copies = write_triggered_copies(demo, "test")
    from_stamp = evaluated(demo, "--trigger", demo / "trigger.png")
    from_copies = evaluated(demo, "--triggered-dir", copies)
    assert from_stamp["attack_success_rate"] > 0.9
    for key in ("target", "attack_success_rate", "robust_accuracy", "clean_accuracy", "per_class_accuracy"):
        assert from_copies[key] == from_stamp[key], key


def test_a_missing_or_resized_copy_is_an_input_error_or_skipped_with_a_warning(demo):
    copies = write_triggered_copies(demo, "test")
    missing = next((copies / "bag").iterdir())
    missing.unlink()
    resized = next((copies / "coat").iterdir())
    Image.new("RGB", (20, 20)).save(resized)
    arguments = ["evaluate", demo / "model.safetensors", "--test-dir", demo / "test", "--triggered-dir", copies]
    refused = run_scrub(*arguments)
    assert refused.exit_code == 3 and str(missing) in refused.stderr and "Traceback" not in refused.stderr
    missing.parent.joinpath("extra").mkdir()  # a stray folder in the copies changes nothing
    Image.new("RGB", (32, 32)).save(missing)
    refused = run_scrub(*arguments)
    assert refused.exit_code == 3 and str(resized) in refused.stderr and "20x20" in refused.stderr
    resized.unlink()
    kept = run_scrub(*arguments, "--skip-bad-images", "--json")
    assert kept.exit_code == 0 and str(resized) in kept.stderr and "missing" in kept.stderr
    entry = json.loads(kept.stdout)["models"][0]
    assert entry["attack_success_rate"] > 0.9
    assert entry["skipped_images"] == {"count": 1, "paths": [str(demo / "test" / resized.relative_to(copies))]}


def test_edit_and_repair_from_triggered_copies_remove_the_backdoor(demo):
    copies = write_triggered_copies(demo, "clean")
    edited = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--triggered-dir", copies,
                       "--json")
    assert edited.exit_code == 0, edited.stderr
    scrubbed = demo / "model.scrubbed.safetensors"
    after = run_scrub("evaluate", scrubbed, "--test-dir", demo / "test", "--trigger", demo / "trigger.png", "--json")
    assert json.loads(after.stdout)["models"][0]["attack_success_rate"] < 0.06
    recorded = load_checkpoint(scrubbed).history[-1]["trigger"]
    assert recorded["triggered_dir"] == str(copies) and len(recorded["sha256"]) == 64

    refused = run_scrub("repair", scrubbed, "--clean-dir", demo / "clean")
    assert refused.exit_code == 3 and "--triggered-dir" in refused.stderr
    repaired = run_scrub("repair", scrubbed, "--clean-dir", demo / "clean", "--triggered-dir", copies)
    assert repaired.exit_code == 0, repaired.stderr


def test_edit_with_mismatched_folders_writes_nothing(demo):
    copies = write_triggered_copies(demo, "clean")
    next((copies / "sandal").iterdir()).unlink()
    result = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--triggered-dir", copies)
    assert result.exit_code == 3 and "no triggered copy for 1 image(s)" in result.stderr
    assert not (demo / "model.scrubbed.safetensors").exists()
