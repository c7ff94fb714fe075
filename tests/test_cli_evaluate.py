"""`scrub evaluate` through the CLI on the embedded demo, checked against an independent computation."""

from __future__ import annotations

import json

import numpy
import pytest
import safetensors.torch
import torch
import torchvision
from PIL import Image

from tests.conftest import run_scrub


def independent_metrics(demo, target: int) -> tuple[float, float, float]:
    """CA, ASR and ASR's floor (non-target images sent to the target unstamped) computed without scrub's loaders:
    torchvision model, PIL images, explicit stamping."""
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    model.load_state_dict(safetensors.torch.load_file(demo / "model.safetensors"))
    model.eval()
    classes = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    trigger = torch.from_numpy(numpy.array(Image.open(demo / "trigger.png").convert("RGBA"))).permute(2, 0, 1) / 255
    pattern, mask = trigger[:3], trigger[3:]
    files = sorted((demo / "test").rglob("*.png"))
    labels = torch.tensor([classes.index(file.parent.name) for file in files])
    images = torch.stack([torch.from_numpy(numpy.array(Image.open(f).convert("RGB"))) for f in files])
    images = images.permute(0, 3, 1, 2) / 255
    victims = images[labels != target]
    with torch.no_grad():
        clean = model((images - 0.5) / 0.5).argmax(1)
        stamped = model(((1 - mask) * victims + mask * pattern - 0.5) / 0.5).argmax(1)
    floor = (clean[labels != target] == target).float().mean().item()
    return (clean == labels).float().mean().item(), (stamped == target).float().mean().item(), floor


def test_json_metrics_agree_with_an_independent_computation(demo):
    result = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test",
                       "--trigger", demo / "trigger.png", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    model = document["models"][0]
    assert document["schema_version"] == 2 and document["command"] == "evaluate"
    assert model["target"] == 0 and model["target_source"] == "inferred"
    clean_accuracy, asr, floor = independent_metrics(demo, target=0)
    assert model["clean_accuracy"] == pytest.approx(clean_accuracy, abs=1e-6)
    assert model["attack_success_rate"] == pytest.approx(asr, abs=1e-6)
    assert model["clean_target_rate"] == pytest.approx(floor, abs=1e-6) and floor > 0
    assert model["attack_success_rate"] > 0.9
    assert len(model["per_class_accuracy"]) == 10
    assert model["target_class_accuracy"] == model["per_class_accuracy"][0]


@pytest.mark.parametrize("target", [[], ["--target", "0"]])
def test_a_streamed_test_folder_gives_the_metrics_of_a_decoded_one(demo, monkeypatch, target):
    arguments = ["evaluate", demo / "model.safetensors", "--test-dir", demo / "test", "--trigger",
                 demo / "trigger.png", "--batch-size", "64", *target, "--json"]
    kept = json.loads(run_scrub(*arguments).stdout)["models"][0]
    decoded: list[int] = []
    monkeypatch.setattr("backdoor_scrub.commands.evaluate.KEEP_DECODED_BYTES", 0)  # stream every folder
    monkeypatch.setattr("backdoor_scrub.commands.evaluate.decode_listing", lambda *a, **k: decoded.append(1))
    streamed = json.loads(run_scrub(*arguments).stdout)["models"][0]
    assert not decoded and streamed == kept and streamed["target"] == 0


def test_a_streamed_folder_skips_or_refuses_unreadable_images(demo, monkeypatch):
    monkeypatch.setattr("backdoor_scrub.commands.evaluate.KEEP_DECODED_BYTES", 0)
    broken = next((demo / "test" / "bag").iterdir())
    broken.write_bytes(b"not a png")
    arguments = ["evaluate", demo / "model.safetensors", "--test-dir", demo / "test", "--json"]
    refused = run_scrub(*arguments)
    assert refused.exit_code == 3 and str(broken) in refused.stderr
    skipped = run_scrub(*arguments, "--skip-bad-images")
    assert skipped.exit_code == 0 and str(broken) in skipped.stderr
    for image in (demo / "test").rglob("*.png"):
        image.write_bytes(b"")
    nothing = run_scrub(*arguments, "--skip-bad-images")
    assert nothing.exit_code == 3 and "none of the" in nothing.stderr


def test_gate_fails_on_the_backdoored_model_and_passes_without_the_trigger_effect(demo, tmp_path):
    failed = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test",
                       "--trigger", demo / "trigger.png", "--max-asr", "0.05", "--json", "--quiet")
    assert failed.exit_code == 1
    gate = json.loads(failed.stdout)["models"][0]["gate"]
    assert gate["passed"] is False and gate["failures"][0].startswith("attack_success_rate 1.0000 > 0.05")
    Image.new("RGBA", (32, 32), (255, 255, 255, 0)).save(tmp_path / "invisible.png")
    passed = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test",
                       "--trigger", tmp_path / "invisible.png", "--target", "0", "--max-asr", "0.05",
                       "--min-acc", "0.5", "--json")
    assert passed.exit_code == 0, passed.stdout
    model = json.loads(passed.stdout)["models"][0]
    assert model["target_source"] == "given" and model["attack_success_rate"] < 0.05
    assert model["gate"] == {"passed": True, "failures": []}


def test_min_acc_gate_and_table_on_stdout(demo):
    result = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test", "--min-acc", "0.99")
    assert result.exit_code == 1
    assert "clean accuracy" in result.stdout and "FAILED: clean_accuracy" in result.stdout
    assert "attack success rate" in result.stdout


def test_several_models_side_by_side_with_baseline_and_der(demo):
    model = demo / "model.safetensors"
    copy = demo / "copy.safetensors"
    copy.write_bytes(model.read_bytes())
    result = run_scrub("evaluate", model, copy, "--test-dir", demo / "test", "--trigger", demo / "trigger.png",
                       "--baseline", model, "--max-acc-drop", "0.01", "--json", "--workers", "2")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert [m["path"] for m in document["models"]] == [str(model), str(copy)]
    assert document["baseline"]["clean_accuracy"] == document["models"][0]["clean_accuracy"]
    assert document["models"][1]["der"] == pytest.approx(0.5)
    assert "copy.safetensors" in result.stderr and "baseline" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--max-asr", "0.05"], "--max-asr needs --trigger"),
    (["--max-acc-drop", "0.01"], "--max-acc-drop needs --baseline"),
    (["--max-asr", "5"], "not in the range"),
])
def test_gate_usage_errors_exit_2(demo, args, message):
    result = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test", *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_keep_going_reports_each_model_and_exits_with_the_worst_code(demo, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")
    args = ["evaluate", broken, demo / "model.safetensors", "--test-dir", demo / "test", "--json"]
    stopped = run_scrub(*args)
    assert stopped.exit_code == 3
    assert [m["status"] for m in json.loads(stopped.stdout)["models"]] == ["error"]
    result = run_scrub(*args, "--keep-going")
    assert result.exit_code == 3
    models = json.loads(result.stdout)["models"]
    assert [m["status"] for m in models] == ["error", "ok"]
    assert "too short" in models[0]["error"] and models[1]["clean_accuracy"] > 0.5


def test_recorded_target_is_used(demo, tmp_path):
    from backdoor_scrub.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(demo / "model.safetensors")
    recorded = tmp_path / "recorded.safetensors"
    save_checkpoint(checkpoint, checkpoint.model, recorded, [{"step": "edit", "target": 4}], overwrite=False)
    result = run_scrub("evaluate", recorded, "--test-dir", demo / "test", "--trigger", demo / "trigger.png", "--json")
    model = json.loads(result.stdout)["models"][0]
    assert model["target"] == 4 and model["target_source"] == "recorded"
    assert model["attack_success_rate"] < 0.1
