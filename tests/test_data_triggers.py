"""Image folders (class mapping, channels, resizing) and triggers (mask, placement, stamping)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from backdoor_scrub.checkpoint import ModelSpec
from backdoor_scrub.contract import ExitCode
from backdoor_scrub.data import class_indices, load_image_folder, read_image
from backdoor_scrub.errors import ScrubError
from backdoor_scrub.triggers import load_trigger
from tests.conftest import write_images

SPEC = ModelSpec("resnet18", 3, (3, 8, 8), (0.5,) * 3, (0.5,) * 3, ("cat", "dog", "fox"))


def test_class_mapping_by_name_number_then_sorted(tmp_path):
    assert class_indices(["fox", "cat"], SPEC, tmp_path) == ({"fox": 2, "cat": 0}, "by class name")
    assert class_indices(["2", "0"], SPEC, tmp_path) == ({"2": 2, "0": 0}, "by number")
    assert class_indices(["zeta", "alpha"], SPEC, tmp_path) == ({"alpha": 0, "zeta": 1}, "by sorted order")
    with pytest.raises(ScrubError, match="class folder '7'"):
        class_indices(["7"], SPEC, tmp_path)
    with pytest.raises(ScrubError, match="4 class folders"):
        class_indices(["a", "b", "c", "d"], SPEC, tmp_path)


def test_folder_loads_labels_resizes_and_converts_channels(tmp_path):
    gray = torch.full((1, 4, 4), 200, dtype=torch.uint8)
    color = torch.zeros(3, 8, 8, dtype=torch.uint8)
    color[0] = 255
    root = write_images(tmp_path / "imgs", {"dog": [gray], "fox": [color, color]})
    images = load_image_folder(root, SPEC)
    assert images.images.shape == (3, 3, 8, 8) and images.images.dtype == torch.uint8
    assert images.labels.tolist() == [1, 2, 2]
    assert torch.all(images.images[0] == 200)
    assert images.images[1, 0].min() == 255 and images.images[1, 1:].max() == 0
    gray_spec = ModelSpec("resnet18", 3, (1, 8, 8), (0.5,), (0.5,), SPEC.classes)
    assert load_image_folder(root, gray_spec).images.shape == (3, 1, 8, 8)


def test_flat_folder_only_when_unlabeled_is_allowed(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(ScrubError, match="class subfolders"):
        load_image_folder(tmp_path, SPEC)
    images = load_image_folder(tmp_path, SPEC, allow_unlabeled=True)
    assert images.labels is None and len(images) == 1


@pytest.mark.parametrize("content", ["empty", "text"])
def test_folder_without_images_is_an_input_error(tmp_path, content):
    if content == "text":
        (tmp_path / "cat").mkdir()
        (tmp_path / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(ScrubError, match="no images found") as error:
        load_image_folder(tmp_path, SPEC)
    assert error.value.exit_code == ExitCode.INPUT


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ScrubError, match="broken.png: not a readable image"):
        load_image_folder(tmp_path, SPEC)


def test_read_image_resizes_like_pil_bilinear(tmp_path):
    source = Image.radial_gradient("L").convert("RGB")
    source.save(tmp_path / "g.png")
    expected = source.resize((8, 8), Image.Resampling.BILINEAR)
    image = read_image(tmp_path / "g.png", (3, 8, 8))
    assert image.permute(1, 2, 0).flatten().tolist() == list(expected.tobytes())


def test_rgba_trigger_alpha_is_the_mask_and_stamp_blends(tmp_path):
    patch = Image.new("RGBA", (2, 2), (255, 0, 0, 51))
    patch.save(tmp_path / "t.png")
    trigger = load_trigger(tmp_path / "t.png", (3, 8, 8), position="br")
    assert trigger.mask.shape == (1, 8, 8)
    assert trigger.mask[0, 6:, 6:].allclose(torch.tensor(0.2)) and trigger.mask[0, :6].sum() == 0
    images = torch.full((1, 3, 8, 8), 0.5)
    stamped = trigger.stamp(images)
    assert stamped[0, 0, 7, 7].item() == pytest.approx(0.8 * 0.5 + 0.2 * 1.0)
    assert stamped[0, 1, 7, 7].item() == pytest.approx(0.8 * 0.5)
    assert torch.equal(stamped[0, :, :6], images[0, :, :6])


@pytest.mark.parametrize(("position", "corner"), [("tl", (0, 0)), ("tr", (0, 5)), ("bl", (5, 0)),
                                                  ("br", (5, 5)), ("center", (2, 2)), ("1,4", (4, 1))])
def test_rgb_trigger_uses_alpha_flag_and_position(tmp_path, position, corner):
    Image.new("RGB", (3, 3), (0, 0, 255)).save(tmp_path / "t.png")
    trigger = load_trigger(tmp_path / "t.png", (3, 8, 8), alpha=0.5, position=position)
    top, left = corner
    assert trigger.mask.sum().item() == pytest.approx(9 * 0.5)
    assert trigger.mask[0, top : top + 3, left : left + 3].min().item() == pytest.approx(0.5)
    assert trigger.pattern[2, top, left] == 1.0


def test_trigger_larger_than_input_and_bad_position(tmp_path):
    Image.new("RGB", (9, 4)).save(tmp_path / "big.png")
    with pytest.raises(ScrubError, match="larger than the 8x8 input") as error:
        load_trigger(tmp_path / "big.png", (3, 8, 8))
    assert error.value.exit_code == ExitCode.INPUT
    Image.new("RGB", (2, 2)).save(tmp_path / "small.png")
    with pytest.raises(ScrubError, match="does not fit") as error:
        load_trigger(tmp_path / "small.png", (3, 8, 8), position="7,7")
    with pytest.raises(ScrubError, match="--trigger-pos") as error:
        load_trigger(tmp_path / "small.png", (3, 8, 8), position="middle")
    assert error.value.exit_code == ExitCode.USAGE


def test_trigger_converts_to_grayscale_models(tmp_path):
    Image.new("RGBA", (8, 8), (255, 255, 255, 255)).save(tmp_path / "t.png")
    trigger = load_trigger(tmp_path / "t.png", (1, 8, 8))
    assert trigger.pattern.shape == (1, 8, 8) and trigger.pattern.min() == 1.0
