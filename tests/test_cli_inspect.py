"""`scrub inspect` and `--help` through the CLI."""

from __future__ import annotations

import json

from tests.conftest import run_scrub


def test_help_lists_every_subcommand():
    result = run_scrub("--help")
    assert result.exit_code == 0
    for command in ("inspect", "edit", "repair", "evaluate"):
        assert f"  {command}" in result.stdout


def test_inspect_json_describes_the_demo(demo):
    result = run_scrub("inspect", demo / "model.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    model = json.loads(result.stdout)["models"][0]
    assert model["arch"] == "mobilenet_v3_small" and model["num_classes"] == 10
    assert model["input_size"] == [3, 32, 32] and model["mean"] == [0.5, 0.5, 0.5]
    assert model["parameters"] == 1_528_106 and model["history"] == []
    layers = {layer["name"]: layer for layer in model["layers"]}
    assert layers["features.12"]["output_shape"] == [576, 1, 1]
    assert layers["classifier.3"]["output_shape"] == [10] and layers["classifier.3"]["editable"]
    assert layers["classifier.3"]["parameters"] == 10 * 1024 + 10
    assert not layers["features.0.2"]["editable"]
    assert model["auto_selected"] == [name for name, layer in layers.items() if layer["auto_selected"]]
    assert model["auto_selected"][-1] == "classifier.3"


def test_inspect_table_and_custom_arch(tiny_model_file):
    result = run_scrub("inspect", tiny_model_file, "--arch", "tests.tiny_models:tiny_cnn")
    assert result.exit_code == 0, result.stderr
    assert "TinyBlock" in result.stdout and "stage +" in result.stdout and "fc *" in result.stdout
