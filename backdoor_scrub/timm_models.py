"""Optional timm models: `timm:NAME` architectures, and folders saved the way timm saves them for a model hub."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from backdoor_scrub.contract import KEY_ARCH, KEY_CLASSES, KEY_INPUT_SIZE, KEY_MEAN, KEY_NUM_CLASSES, KEY_STD
from backdoor_scrub.errors import input_error

PREFIX = "timm:"
HUB_WEIGHTS, HUB_CONFIG = "model.safetensors", "config.json"


def is_timm_arch(value: str) -> bool:
    """True for an architecture named `timm:NAME`."""
    return value.startswith(PREFIX)


def check_timm_arch(path: Path, value: str) -> str:
    """`value` when NAME is a model in timm's registry (timm must be installed), else an input error."""
    name = value.removeprefix(PREFIX)
    if name not in _timm(path).list_models():
        raise input_error(f"{path}: arch {value!r}: {name!r} is not a model in timm's registry")
    return value


def build_timm_model(arch: str, num_classes: int) -> nn.Module:
    """An untrained timm model of that registry name."""
    return _timm(Path(arch)).create_model(arch.removeprefix(PREFIX), pretrained=False, num_classes=num_classes)


def is_hub_folder(path: Path) -> bool:
    """A folder holding model.safetensors and config.json, as timm's push_to_hf_hub / save_for_hf write it."""
    return path.is_dir() and (path / HUB_WEIGHTS).is_file() and (path / HUB_CONFIG).is_file()


def hub_folder(path: Path) -> tuple[Path, dict[str, str]]:
    """(weights file, scrub metadata) of a hub folder: architecture, classes and input from its config.json."""
    try:
        config = json.loads((path / HUB_CONFIG).read_text())
        pretrained = config.get("pretrained_cfg", {})
        metadata = {
            KEY_ARCH: PREFIX + str(config["architecture"]),
            KEY_NUM_CLASSES: str(config["num_classes"]),
            KEY_INPUT_SIZE: ",".join(str(int(v)) for v in pretrained["input_size"]),
            KEY_MEAN: ",".join(repr(float(v)) for v in pretrained["mean"]),
            KEY_STD: ",".join(repr(float(v)) for v in pretrained["std"]),
        }
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise input_error(f"{path / HUB_CONFIG}: not a readable timm config ({exc})") from exc
    except KeyError as exc:
        raise input_error(f"{path / HUB_CONFIG}: no {exc.args[0]!r} (a timm config has architecture, num_classes "
                          "and pretrained_cfg with input_size, mean and std)") from exc
    labels = config.get("label_names")
    if isinstance(labels, list) and all(isinstance(label, str) for label in labels):
        metadata[KEY_CLASSES] = json.dumps(labels)
    return path / HUB_WEIGHTS, metadata


def _timm(path: Path):
    try:
        import timm
    except ImportError:
        raise input_error(f"{path}: a timm model needs timm: pip install 'backdoor-scrub[timm]'") from None
    return timm
