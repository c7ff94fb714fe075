"""`--poisoned-dir`: unpaired poisoned examples, their clean versions unknown (issue 11)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from backdoor_scrub.checkpoint import load_checkpoint
from backdoor_scrub.poisoned import RUNNER_UP, TRUE_CLASS, assumed_classes, paired_twins, pseudo_pairs
from tests.conftest import run_scrub
from tests.test_triggered_dir import write_triggered_copies

DEMO_TARGET = "tshirt"  # class 0, the demo backdoor's target


def write_poisoned(demo: Path, flat: bool) -> Path:
    """Stamped copies of 10 test pictures of every non-target class (class folders or flat); the pictures leave
    test/, so that the ASR measured there is on other images than the ones the edit saw."""
    stamped = write_triggered_copies(demo, "test")
    poisoned = demo / "poisoned"
    for class_dir in sorted(d for d in stamped.iterdir() if d.name != DEMO_TARGET):
        for image in sorted(class_dir.iterdir())[:10]:
            destination = poisoned / (f"{class_dir.name}_{image.name}" if flat else Path(class_dir.name, image.name))
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(image, destination)
            (demo / "test" / class_dir.name / image.name).unlink()
    shutil.rmtree(stamped)
    return poisoned


def real_asr(demo: Path, model: Path) -> float:
    result = run_scrub("evaluate", model, "--test-dir", demo / "test", "--trigger", demo / "trigger.png", "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["models"][0]["attack_success_rate"]


@pytest.mark.parametrize("flat", [False, True])
def test_edit_from_unpaired_poisoned_examples_removes_the_backdoor(demo, flat):
    poisoned = write_poisoned(demo, flat)
    assert real_asr(demo, demo / "model.safetensors") > 0.9
    edited = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--poisoned-dir", poisoned,
                       "--json")
    assert edited.exit_code == 0, edited.stderr
    entry = json.loads(edited.stdout)["models"][0]
    assert entry["trigger"]["values"] == (RUNNER_UP if flat else TRUE_CLASS)
    assert entry["trigger"]["count"] == 90 and entry["target"] == 0
    assert entry["before"]["attack_success_rate"] > 0.9 > entry["after"]["attack_success_rate"]
    assert (entry["before"]["robust_accuracy"] is None) == flat
    scrubbed = demo / "model.scrubbed.safetensors"
    assert real_asr(demo, scrubbed) < 0.15
    assert load_checkpoint(scrubbed).history[-1]["trigger"]["poisoned_dir"] == str(poisoned)


def test_repair_needs_the_poisoned_examples_again_and_keeps_the_backdoor_out(demo):
    poisoned = write_poisoned(demo, flat=False)
    assert run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--poisoned-dir",
                     poisoned).exit_code == 0
    scrubbed = demo / "model.scrubbed.safetensors"
    refused = run_scrub("repair", scrubbed, "--clean-dir", demo / "clean")
    assert refused.exit_code == 3 and "--poisoned-dir" in refused.stderr and "Traceback" not in refused.stderr
    output = demo / "repaired.safetensors"
    repaired = run_scrub("repair", scrubbed, "--clean-dir", demo / "clean", "--poisoned-dir", poisoned, "-o", output)
    assert repaired.exit_code == 0, repaired.stderr
    assert real_asr(demo, output) < 0.15


def test_poisoned_dir_is_refused_beside_another_trigger_and_when_empty(demo):
    poisoned = write_poisoned(demo, flat=False)
    both = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--poisoned-dir", poisoned,
                     "--trigger", demo / "trigger.png")
    assert both.exit_code == 2 and "--poisoned-dir" in both.stderr
    empty = demo / "empty"
    empty.mkdir()
    refused = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--poisoned-dir", empty)
    assert refused.exit_code == 3 and str(empty) in refused.stderr and "Traceback" not in refused.stderr
    assert not (demo / "model.scrubbed.safetensors").exists()


def test_pseudo_pairs_use_every_sample_and_every_example_of_a_sampled_class():
    sample_labels = torch.tensor([0, 0, 1, 1, 2])
    classes = torch.tensor([1, 1, 1, 0, 3])  # three of class 1, one of class 0, one of a class without samples
    samples, examples = pseudo_pairs(sample_labels, classes)
    pairs = sorted(zip(samples.tolist(), examples.tolist()))
    assert pairs == [(0, 3), (1, 3), (2, 0), (2, 2), (3, 1), (4, -1)]
    inputs, poisoned = torch.arange(5.0).view(5, 1), torch.arange(10.0, 15.0).view(5, 1)
    twins = paired_twins(inputs, poisoned, samples, examples)
    assert twins.flatten().tolist() == [poisoned[e].item() if e >= 0 else inputs[s].item()
                                        for s, e in zip(samples.tolist(), examples.tolist())]


def test_a_flat_folder_assumes_the_best_class_after_the_target_among_sampled_ones():
    logits = torch.tensor([[9.0, 5.0, 1.0, 7.0], [9.0, 1.0, 2.0, 0.0]])
    sampled = torch.tensor([True, True, True, False])
    assert assumed_classes(None, logits, target=0, sampled=sampled).tolist() == [1, 2]
    assert assumed_classes(torch.tensor([3, 3]), logits, target=0, sampled=sampled).tolist() == [3, 3]
