"""Unknown trigger: the scan flags the demo's target, not a clean model; edit without a trigger file."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from backdoor_scrub.checkpoint import ModelSpec, load_checkpoint
from backdoor_scrub.data import load_image_folder
from backdoor_scrub.scan import anomaly_indices
from tests.conftest import run_scrub, write_model
from tests.tiny_models import wide_cnn

CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SPEC = ModelSpec("tests.tiny_models:wide_cnn", 10, (3, 32, 32), (0.5,) * 3, (0.5,) * 3, CLASSES)


def test_anomaly_index_is_the_distance_from_the_median_in_mad_units():
    norms = torch.tensor([10.0, 11.0, 9.0, 10.0, 2.0])
    index = anomaly_indices(norms)
    # median 10, absolute deviations [0, 1, 1, 0, 8], MAD 1 * 1.4826
    assert index.tolist() == pytest.approx([0.0, 1 / 1.4826, 1 / 1.4826, 0.0, 8 / 1.4826])


@pytest.fixture
def clean_model(demo, tmp_path):
    """A small CNN trained without poison on the demo's test images (75% accuracy on the clean samples)."""
    images = load_image_folder(demo / "test", SPEC)
    torch.manual_seed(0)
    model = wide_cnn(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs = (images.images.float() / 255 - 0.5) / 0.5
    for _ in range(300):
        loss = F.cross_entropy(model(inputs), images.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return write_model(tmp_path / "clean.safetensors", model.eval(), SPEC)


def test_scan_flags_the_demo_target_and_saves_usable_triggers(demo, tmp_path):
    result = run_scrub("inspect", demo / "model.safetensors", "--scan", "--clean-dir", demo / "clean",
                       "--save-triggers", tmp_path / "triggers", "--fail-on-detect", "--json")
    assert result.exit_code == 1, result.stderr
    scan = json.loads(result.stdout)["models"][0]["scan"]
    assert scan["flagged"] == [0]
    rows = {row["class"]: row for row in scan["classes"]}
    assert rows[0]["anomaly_index"] > 2 and rows[0]["mask_l1"] < min(r["mask_l1"] for c, r in rows.items() if c)
    assert rows[0]["reconstruction_asr"] > 0.5
    assert sorted(p.name for p in (tmp_path / "triggers").iterdir()) == sorted(
        [f"class_{k}.png" for k in range(10)] + ["contact_sheet.png"])
    evaluation = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test",
                           "--trigger", tmp_path / "triggers" / "class_0.png", "--json")
    assert json.loads(evaluation.stdout)["models"][0]["target"] == 0


def test_clean_model_is_not_flagged_and_edit_without_trigger_writes_nothing(demo, clean_model):
    result = run_scrub("inspect", clean_model, "--arch", SPEC.arch, "--scan", "--clean-dir", demo / "clean",
                       "--fail-on-detect", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["models"][0]["scan"]["flagged"] == []
    edit = run_scrub("edit", clean_model, "--arch", SPEC.arch, "--clean-dir", demo / "clean", "--json")
    assert edit.exit_code == 0, edit.stderr
    entry = json.loads(edit.stdout)["models"][0]
    assert entry["output"] is None and entry["message"] == "no backdoor found; nothing edited"
    assert not list(clean_model.parent.glob("*.scrubbed.safetensors"))


def test_edit_without_trigger_removes_the_reconstructed_backdoor(demo):
    result = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--json")
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["models"][0]
    assert entry["scan"]["flagged"] == [0] and entry["target"] == 0 and entry["target_source"] == "reconstructed"
    for measured in (entry["before"], entry["after"]):  # never an attack_success_rate from a reconstruction
        assert measured["attack_success_rate"] is None and measured["held_out"] is False
        assert measured["images"] == 100
    assert entry["before"]["reconstructed_trigger_asr"] > 0.5 > entry["after"]["reconstructed_trigger_asr"]
    assert "reconstructed-trigger ASR" in run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean",
                                                    "-o", demo / "again.safetensors").stdout
    history = load_checkpoint(demo / "model.scrubbed.safetensors").history
    assert history[0]["trigger"]["anomaly_index"] > 2 and len(history[0]["trigger"]["sha256"]) == 64
    evaluation = run_scrub("evaluate", demo / "model.scrubbed.safetensors", "--test-dir", demo / "test",
                           "--trigger", demo / "trigger.png", "--target", "0", "--json")
    assert json.loads(evaluation.stdout)["models"][0]["attack_success_rate"] < 0.1


def test_dilated_grows_the_mask_by_one_pixel_and_keeps_the_pattern():
    from backdoor_scrub.scan import dilated
    from backdoor_scrub.triggers import Trigger

    mask = torch.zeros(1, 8, 8)
    mask[0, 3, 4] = 0.5
    pattern = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    grown = dilated(Trigger(pattern, mask, ""))
    assert grown.mask[0, 2:5, 3:6].eq(0.5).all() and grown.mask.sum().item() == 9 * 0.5
    assert torch.equal(grown.pattern, pattern) and len(grown.sha256) == 64
