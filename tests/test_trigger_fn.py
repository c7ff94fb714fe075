"""`--trigger-fn pkg.module:function`: a trigger given as code, on evaluate, edit and repair (issue 11)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from backdoor_scrub.checkpoint import load_checkpoint
from tests.conftest import run_scrub

FUNCTIONS = "tests.trigger_functions"
MODULE_FILE = Path(__file__).with_name("trigger_functions.py")


def evaluate(demo, model, *trigger) -> dict:
    result = run_scrub("evaluate", model, "--test-dir", demo / "test", *trigger, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["models"][0]


def test_a_function_giving_the_demo_stamp_measures_what_the_png_does(demo):
    from_png = evaluate(demo, demo / "model.safetensors", "--trigger", demo / "trigger.png")
    from_function = evaluate(demo, demo / "model.safetensors", "--trigger-fn", f"{FUNCTIONS}:demo_stamp")
    assert from_png["attack_success_rate"] > 0.9
    for key in ("target", "attack_success_rate", "robust_accuracy", "clean_accuracy"):
        assert from_function[key] == from_png[key], key


def test_edit_with_a_function_removes_the_backdoor_records_it_and_repair_asks_for_it_again(demo):
    edited = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--trigger-fn",
                       f"{FUNCTIONS}:demo_stamp", "--json")
    assert edited.exit_code == 0, edited.stderr
    scrubbed = demo / "model.scrubbed.safetensors"
    after = evaluate(demo, scrubbed, "--trigger", demo / "trigger.png", "--target", "0")
    assert after["attack_success_rate"] < 0.06
    recorded = load_checkpoint(scrubbed).history[-1]["trigger"]
    assert recorded == {"function": f"{FUNCTIONS}:demo_stamp",
                        "module_sha256": hashlib.sha256(MODULE_FILE.read_bytes()).hexdigest()}

    refused = run_scrub("repair", scrubbed, "--clean-dir", demo / "clean")
    assert refused.exit_code == 3 and "--trigger-fn tests.trigger_functions:demo_stamp" in refused.stderr
    assert not (demo / "model.repaired.safetensors").exists()
    repaired = run_scrub("repair", scrubbed, "--clean-dir", demo / "clean", "--trigger-fn", f"{FUNCTIONS}:demo_stamp")
    assert repaired.exit_code == 0, repaired.stderr


@pytest.mark.parametrize(("trigger", "code", "message"), [
    (["--trigger-fn", f"{FUNCTIONS}:demo_stamp", "--trigger", "TRIGGER"], 2, "use one of --trigger, --trigger-fn"),
    (["--trigger-fn", "tests.no_such_module:f"], 2, "cannot import"),
    (["--trigger-fn", f"{FUNCTIONS}:missing"], 2, "cannot import"),
    (["--trigger-fn", f"{FUNCTIONS}:NOT_A_FUNCTION"], 2, "not a function"),
    (["--trigger-fn", "os.system"], 2, "use pkg.module:name"),
    (["--trigger-fn", f"{FUNCTIONS}:wrong_shape"], 3, "must return a tensor of shape"),
    (["--trigger-fn", f"{FUNCTIONS}:crashes"], 3, "RuntimeError: boom"),
])
def test_bad_trigger_functions_are_one_line_errors_and_write_nothing(demo, trigger, code, message):
    trigger = [str(demo / "trigger.png") if part == "TRIGGER" else part for part in trigger]
    result = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", *trigger)
    assert result.exit_code == code and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (demo / "model.scrubbed.safetensors").exists()


def test_a_function_reproducing_the_patch_gives_the_same_edit_as_the_png(demo, tmp_path):
    common = ["edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--seed", "2"]
    assert run_scrub(*common, "--trigger", demo / "trigger.png", "-o", tmp_path / "png.safetensors").exit_code == 0
    assert run_scrub(*common, "--trigger-fn", f"{FUNCTIONS}:demo_stamp", "-o", tmp_path / "fn.safetensors").exit_code == 0
    from_png = load_checkpoint(tmp_path / "png.safetensors").model.state_dict()
    from_function = load_checkpoint(tmp_path / "fn.safetensors").model.state_dict()
    for name, tensor in from_png.items():
        torch.testing.assert_close(from_function[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
