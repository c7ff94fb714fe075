"""Faults of real data (issue 14): broken images among good ones, found all at once before any model work;
odd-but-valid image formats; half-precision and NaN checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_scrub


def plant_broken_images(test_dir: Path) -> list[Path]:
    """A truncated PNG, an empty file, a text file named .png and an oversized PNG (a bomb once the limit is low)."""
    good = next((test_dir / "bag").iterdir())
    truncated, empty, text, bomb = (test_dir / "coat" / name for name in ("cut.png", "empty.png", "text.png", "bomb.png"))
    truncated.write_bytes(good.read_bytes()[:60])
    empty.write_bytes(b"")
    text.write_text("not an image\n")
    Image.new("1", (600, 600)).save(bomb)
    return [truncated, empty, text, bomb]


def evaluate(demo: Path, *extra: str):
    return run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test", "--trigger",
                     demo / "trigger.png", *extra)


@pytest.mark.parametrize("streamed", [False, True])
def test_every_broken_image_is_named_in_one_error_or_skipped_and_counted(demo, monkeypatch, streamed):
    if streamed:
        monkeypatch.setattr("backdoor_scrub.commands.evaluate.KEEP_DECODED_BYTES", 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 600x600 is a decompression bomb now
    good = len(list((demo / "test").rglob("*.png")))
    broken = plant_broken_images(demo / "test")
    refused = evaluate(demo)
    assert refused.exit_code == 3 and len(refused.stderr.strip().splitlines()) == 1
    assert "4 unreadable images" in refused.stderr and all(str(path) in refused.stderr for path in broken)
    skipped = evaluate(demo, "--skip-bad-images", "--json")
    assert skipped.exit_code == 0, skipped.stderr
    entry = json.loads(skipped.stdout)["models"][0]
    assert entry["skipped_images"]["count"] == 4 and sorted(entry["skipped_images"]["paths"]) == sorted(map(str, broken))
    assert entry["images"] == good and sum(entry["per_class_images"]) == good
    assert skipped.stderr.count("scrub: warning:") == 4


def test_odd_but_valid_images_are_all_read_and_counted(demo):
    source = Image.open(next((demo / "test" / "bag").iterdir())).convert("RGB")
    folder = demo / "test" / "bag"
    source.convert("CMYK").save(folder / "cmyk.jpg")
    source.convert("I;16").save(folder / "gray16.png")
    palette = source.convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    source.convert("LA").save(folder / "la.png")
    source.save(folder / "image.webp")
    source.save(folder / "image.tiff")
    source.save(folder / "ünïcode name with spaces.png")
    total = len([p for p in (demo / "test").rglob("*") if p.is_file()])
    result = evaluate(demo, "--json")
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["models"][0]
    assert entry["images"] == total and entry["skipped_images"]["count"] == 0


def test_broken_images_are_found_before_any_model_is_loaded(demo, tmp_path):
    plant_broken_images(demo / "test")
    unloadable = tmp_path / "model.safetensors"
    unloadable.write_bytes(b"not a model")  # were it loaded first, this would be the error
    result = run_scrub("evaluate", unloadable, "--test-dir", demo / "test", "--json")
    assert result.exit_code == 3 and "unreadable images" in result.stderr and "not a safetensors" not in result.stderr
    assert json.loads(result.stdout)["models"][0]["status"] == "error"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_are_edited_in_their_dtype(demo, tmp_path, dtype, one_thread):
    import torch

    from backdoor_scrub.checkpoint import load_checkpoint
    from backdoor_scrub.safetensors_io import write_safetensors

    source = load_checkpoint(demo / "model.safetensors")
    half = {name: t.to(getattr(torch, dtype)) if t.is_floating_point() else t for name, t in source.model.state_dict().items()}
    path = tmp_path / f"{dtype}.safetensors"
    write_safetensors(path, half, source.metadata, overwrite=True)
    output = tmp_path / "edited.safetensors"
    result = run_scrub("edit", path, "--clean-dir", demo / "clean", "--trigger", demo / "trigger.png", "-o", output, "-q")
    assert result.exit_code == 0, result.stderr
    assert load_checkpoint(output).dtypes["classifier.3.weight"] == getattr(torch, dtype)


def test_nan_weights_are_one_line_through_the_cli(demo, tmp_path):
    from backdoor_scrub.checkpoint import load_checkpoint
    from backdoor_scrub.safetensors_io import write_safetensors

    source = load_checkpoint(demo / "model.safetensors")
    state = source.model.state_dict()
    state["classifier.3.bias"] = state["classifier.3.bias"].clone().fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    write_safetensors(path, state, source.metadata, overwrite=True)
    result = run_scrub("evaluate", path, "--test-dir", demo / "test")
    assert result.exit_code == 3 and len(result.stderr.strip().splitlines()) == 1
    assert "NaN or Inf weights in classifier.3.bias" in result.stderr and "Traceback" not in result.stderr
