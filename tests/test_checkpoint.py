"""Checkpoint loading and saving: metadata, arch registry, strict loading, deterministic atomic writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision

from backdoor_scrub.checkpoint import ModelSpec, SpecOverrides, load_checkpoint, save_checkpoint, spec_metadata
from backdoor_scrub.contract import ExitCode
from backdoor_scrub.errors import ScrubError
from backdoor_scrub.safetensors_io import serialize, write_safetensors
from tests.conftest import DEMO, write_model

SPEC = ModelSpec("squeezenet1_1", 4, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)


def squeezenet_file(tmp_path: Path, prefix: str = "", **metadata: str) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=4)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "m.safetensors"
    write_safetensors(path, state, spec_metadata(SPEC) | metadata, overwrite=True)
    return path


def test_load_builds_arch_and_weights_exactly(tmp_path):
    path = squeezenet_file(tmp_path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.spec == SPEC
    saved = safetensors.torch.load_file(path)
    for name, tensor in checkpoint.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    checkpoint = load_checkpoint(squeezenet_file(tmp_path, prefix))
    assert "features.0.weight" in checkpoint.model.state_dict()


def test_overrides_fill_in_missing_metadata(tmp_path):
    model = torchvision.models.squeezenet1_1(num_classes=4)
    path = tmp_path / "bare.safetensors"
    write_safetensors(path, model.state_dict(), {}, overwrite=True)
    every_key = "no 'arch', 'num_classes', 'input_size', 'mean', 'std'; pass --arch --num-classes --input-size"
    with pytest.raises(ScrubError, match=every_key):
        load_checkpoint(path)
    overrides = SpecOverrides("squeezenet1_1", "4", "3,32,32", "0.5", "0.25,0.25,0.25")
    assert load_checkpoint(path, overrides).spec == SPEC


def test_num_classes_is_read_from_the_weights_when_the_architecture_is_known(tmp_path):
    model = torchvision.models.squeezenet1_1(num_classes=4)
    path = tmp_path / "bare.safetensors"
    write_safetensors(path, model.state_dict(), {}, overwrite=True)
    with pytest.raises(ScrubError, match=r"no 'input_size', 'mean'; pass --input-size --mean$"):
        load_checkpoint(path, SpecOverrides(arch="squeezenet1_1", std="0.25"))
    overrides = SpecOverrides(arch="squeezenet1_1", input_size="3,32,32", mean="0.5", std="0.25,0.25,0.25")
    assert load_checkpoint(path, overrides).spec == SPEC


@pytest.mark.parametrize("arch, classes", [("resnet18", 7), ("regnet_y_400mf", 3)])
def test_pickles_are_refused_with_a_recipe_for_the_file_itself(tmp_path, arch, classes):
    model = torchvision.models.get_model(arch, num_classes=classes)
    state_file, wrapped_file, whole_file = tmp_path / "w.pt", tmp_path / "ckpt.pth", tmp_path / "whole.pt"
    torch.save(model.state_dict(), state_file)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, wrapped_file)
    torch.save(model, whole_file)
    for path, unwrap in ((state_file, ""), (wrapped_file, "['state_dict']")):
        with pytest.raises(ScrubError) as refused:
            load_checkpoint(path)
        message = str(refused.value)
        assert f"fit torchvision's {arch} with {classes} classes" in message
        assert f"torch.load('{path}', weights_only=True){unwrap}" in message and "\n" not in message
    with pytest.raises(ScrubError, match=f"pickled {type(model).__module__}.{type(model).__name__}, not a state dict"):
        load_checkpoint(whole_file)


@pytest.mark.parametrize("arch", ["os:system", "__import__('os')", "subprocess:run", "resnet19"])
def test_hostile_metadata_arch_is_refused_without_import(tmp_path, arch, monkeypatch):
    imported = []
    real_import = __import__
    monkeypatch.setattr("builtins.__import__", lambda name, *a, **k: imported.append(name) or real_import(name, *a, **k))
    path = squeezenet_file(tmp_path, arch=arch)
    imported.clear()
    with pytest.raises(ScrubError) as error:
        load_checkpoint(path)
    assert error.value.exit_code == ExitCode.INPUT
    assert "os" not in imported and "subprocess" not in imported


def test_custom_arch_only_from_command_line(tmp_path, tiny_model_file):
    with pytest.raises(ScrubError, match="only imported when given on the command line"):
        load_checkpoint(tiny_model_file)
    checkpoint = load_checkpoint(tiny_model_file, SpecOverrides(arch="tests.tiny_models:tiny_cnn"))
    assert type(checkpoint.model).__name__ == "TinyCNN"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("num_classes", "ten", "must be an integer"),
    ("num_classes", "2000000", "between 1 and"),
    ("input_size", "3,5000,5000", "out of range"),
    ("input_size", "3,32", "C,H,W"),
    ("mean", "0.5,0.5", "needs 3 finite values"),
    ("std", "0,0,0", "must be positive"),
    ("classes", '["a"]', "lists 1 classes"),
])
def test_bad_metadata_values(tmp_path, key, value, message):
    with pytest.raises(ScrubError, match=message):
        load_checkpoint(squeezenet_file(tmp_path, **{key: value}))


def test_wrong_arch_names_missing_and_unexpected_keys(tmp_path):
    path = squeezenet_file(tmp_path)
    with pytest.raises(ScrubError) as error:
        load_checkpoint(path, SpecOverrides(arch="resnet18"))
    message = str(error.value)
    assert "weights do not match arch resnet18" in message
    assert "missing conv1.weight, bn1.weight, bn1.bias (+" in message
    assert "unexpected classifier.1.bias, classifier.1.weight, features.0.bias (+49 more)" in message


def test_wrong_num_classes_names_the_shape(tmp_path):
    with pytest.raises(ScrubError, match=r"shape of classifier.1.weight \[4, 512, 1, 1\] vs \[7, 512, 1, 1\]"):
        load_checkpoint(squeezenet_file(tmp_path), SpecOverrides(num_classes="7"))


def test_nan_weights_are_reported(tmp_path):
    model = torchvision.models.squeezenet1_1(num_classes=4)
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    path = write_model(tmp_path / "nan.safetensors", model, SPEC)
    with pytest.raises(ScrubError, match="NaN or Inf weights in features.0.weight"):
        load_checkpoint(path)


def serialized(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    stream = io.BytesIO()
    serialize(tensors, metadata, stream)
    return stream.getvalue()


def test_serialize_is_deterministic_and_readable():
    tensors = {"b": torch.arange(5, dtype=torch.float16), "a": torch.ones(2, 3), "c": torch.tensor([1.5], dtype=torch.bfloat16),
               "empty": torch.zeros(0, 4)}
    metadata = {f"k{i}": str(i) for i in range(20)}
    first = serialized(tensors, metadata)
    assert all(serialized(tensors, dict(reversed(metadata.items()))) == first for _ in range(3))
    loaded = safetensors.torch.load(first)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    header_size = int.from_bytes(first[:8], "little")
    assert json.loads(first[8 : 8 + header_size])["__metadata__"] == dict(sorted(metadata.items()))


def test_save_keeps_metadata_adds_history_and_refuses_to_clobber(tmp_path):
    checkpoint = load_checkpoint(DEMO / "model.safetensors")
    output = tmp_path / "out.safetensors"
    save_checkpoint(checkpoint, checkpoint.model, output, [{"step": "edit", "target": 0}], overwrite=False)
    saved = load_checkpoint(output)
    assert saved.metadata["example.attack"] == "badnets"
    assert saved.metadata["scrub.source_sha256"] == checkpoint.sha256
    assert saved.history == [{"step": "edit", "target": 0}]
    before = output.read_bytes()
    with pytest.raises(ScrubError, match="already exists"):
        save_checkpoint(checkpoint, checkpoint.model, output, [{"step": "edit"}], overwrite=False)
    assert output.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
