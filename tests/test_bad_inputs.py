"""Bad input through the CLI: one line on stderr, the documented exit code, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import run_scrub


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scrub: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def files_in(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def bad_model(demo, kind: str):
    path = demo / "bad.safetensors"
    good = (demo / "model.safetensors").read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickle":
        path = demo / "model.pt"
        path.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    elif kind == "header too large":
        path.write_bytes((10**9).to_bytes(8, "little") + good[8:100])
    return path


@pytest.mark.parametrize(("kind", "fragment"), [
    ("truncated", "wrong byte length (truncated?)"),
    ("random bytes", "not a safetensors file"),
    ("empty", "too short"),
    ("pickle", "pickle checkpoints are refused"),
    ("header too large", "exceeds the file"),
])
@pytest.mark.parametrize("command", ["inspect", "evaluate"])
def test_unreadable_model_files(demo, kind, fragment, command):
    path = bad_model(demo, kind)
    before = files_in(demo)
    extra = ["--test-dir", demo / "test"] if command == "evaluate" else []
    result = run_scrub(command, path, *extra)
    assert_one_line_error(result, 3, str(path), fragment)
    assert files_in(demo) == before


def test_arch_that_does_not_match_the_weights(demo):
    result = run_scrub("inspect", demo / "model.safetensors", "--arch", "resnet18")
    assert_one_line_error(result, 3, "weights do not match arch resnet18", "missing conv1.weight")


def test_missing_model_file(demo):
    assert_one_line_error(run_scrub("inspect", demo / "nope.safetensors"), 3, "cannot read")


@pytest.mark.parametrize("content", ["empty folder", "text files"])
def test_test_dir_without_images(demo, tmp_path, content):
    folder = tmp_path / "test"
    folder.mkdir()
    if content == "text files":
        (folder / "tshirt").mkdir()
        (folder / "tshirt" / "readme.txt").write_text("not an image")
    result = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", folder)
    assert_one_line_error(result, 3, "no images found")


def test_trigger_larger_than_the_input(demo, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    result = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test",
                       "--trigger", tmp_path / "big.png")
    assert_one_line_error(result, 3, "trigger is 64x64, larger than the 32x32 input")


def test_trigger_that_is_not_an_image(demo, tmp_path):
    (tmp_path / "t.png").write_text("hello")
    result = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test", "--trigger", tmp_path / "t.png")
    assert_one_line_error(result, 3, "not a readable trigger image")


def test_cuda_without_a_gpu_is_an_input_error(demo):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test", "--device", "cuda")
    assert_one_line_error(result, 3, "CUDA is not available")


def test_unknown_option_is_a_one_line_usage_error(demo):
    result = run_scrub("evaluate", demo / "model.safetensors", "--nonsense")
    assert_one_line_error(result, 2, "No such option '--nonsense'", "scrub evaluate --help")


def test_internal_error_is_one_line_with_debug_hint_and_traceback_with_debug(tiny_model_file):
    args = [sys.executable, "-m", "backdoor_scrub", "inspect", str(tiny_model_file),
            "--arch", "tests.tiny_models:not_there"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 2 and "cannot import" in result.stderr
    broken = [sys.executable, "-m", "backdoor_scrub", "inspect", str(tiny_model_file), "--arch", "tests.tiny_models:TinyBlock"]
    result = subprocess.run(broken, capture_output=True, text=True)
    assert result.returncode == 4
    assert result.stderr.count("\n") == 1 and "internal error: TypeError" in result.stderr and "--debug" in result.stderr
    result = subprocess.run(broken + ["--debug"], capture_output=True, text=True)
    assert result.returncode == 4 and "Traceback" in result.stderr


def test_skip_bad_images_warns_and_goes_on(demo):
    broken = demo / "test" / "tshirt" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    stopped = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test")
    assert_one_line_error(stopped, 3, "broken.png: not a readable image")
    result = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test", "--skip-bad-images",
                       "--json")
    assert result.exit_code == 0
    assert "scrub: warning:" in result.stderr and "broken.png" in result.stderr
    assert json.loads(result.stdout)["models"][0]["clean_accuracy"] > 0.5


def test_decompression_bomb_is_an_input_error_naming_the_file(demo, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # a 32x32 image now counts as a bomb
    result = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test")
    assert_one_line_error(result, 3, "not a readable image", ".png")
    assert "decompression bomb" in result.stderr.lower()
