"""Shared fixtures: the embedded demo, small checkpoints and image folders written to tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from backdoor_scrub.checkpoint import ModelSpec, spec_metadata
from backdoor_scrub.cli import cli
from backdoor_scrub.safetensors_io import write_safetensors

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo"


def run_scrub(*args: str):
    """Invoke the real CLI in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def write_model(path: Path, model: torch.nn.Module, spec: ModelSpec, **extra: str) -> Path:
    """Save `model` as a scrub checkpoint with `spec` metadata."""
    write_safetensors(path, model.state_dict(), spec_metadata(spec) | extra, overwrite=True)
    return path


def write_images(root: Path, per_class: dict[str, list[torch.Tensor]]) -> Path:
    """Write uint8 [C,H,W] tensors as PNGs into class subfolders."""
    for name, images in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            array = image.permute(1, 2, 0).squeeze(-1).numpy()
            Image.fromarray(array).save(root / name / f"{index}.png")
    return root


@pytest.fixture
def one_thread():
    """Tiny tensors: extra threads only spin, and on a busy 2-core machine they made these tests 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A private copy of the embedded demo (model, trigger, clean/ and test/)."""
    target = tmp_path / "demo"
    shutil.copytree(DEMO, target)
    return target


@pytest.fixture
def tiny_spec() -> ModelSpec:
    """Spec of the tiny custom CNN at 3x16x16."""
    return ModelSpec("tests.tiny_models:tiny_cnn", 3, (3, 16, 16), (0.5,) * 3, (0.5,) * 3, ("a", "b", "c"))


@pytest.fixture
def tiny_model_file(tmp_path: Path, tiny_spec: ModelSpec) -> Path:
    """A tiny custom CNN checkpoint (random weights, fixed seed)."""
    from tests.tiny_models import tiny_cnn

    torch.manual_seed(0)
    return write_model(tmp_path / "tiny.safetensors", tiny_cnn(3), tiny_spec)


@pytest.fixture
def tiny_images(tmp_path: Path) -> Path:
    """Four random 16x16 RGB images for each of the classes a, b, c."""
    generator = torch.Generator().manual_seed(1)
    images = {name: [torch.randint(0, 256, (3, 16, 16), generator=generator, dtype=torch.uint8) for _ in range(4)]
              for name in ("a", "b", "c")}
    return write_images(tmp_path / "images", images)
