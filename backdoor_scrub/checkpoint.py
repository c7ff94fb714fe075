"""safetensors checkpoint <-> nn.Module: metadata, architecture registry, provenance, atomic save."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from backdoor_scrub import __version__
from backdoor_scrub.contract import (
    KEY_ARCH,
    KEY_CLASSES,
    KEY_HISTORY,
    KEY_INPUT_SIZE,
    KEY_MEAN,
    KEY_NUM_CLASSES,
    KEY_SOURCE_SHA,
    KEY_STD,
    KEY_VERSION,
)
from backdoor_scrub.errors import input_error, usage_error
from backdoor_scrub.files import make_folder
from backdoor_scrub.safetensors_io import SafetensorsReader, open_safetensors, write_safetensors
from backdoor_scrub.timm_models import build_timm_model, check_timm_arch, hub_folder, is_hub_folder, is_timm_arch
from backdoor_scrub.user_code import OBJECT_NAME, import_object
from backdoor_scrub.weight_shapes import Shapes, infer_num_classes

STRIPPED_PREFIXES = ("module.", "_orig_mod.")
SPEC_KEYS = (KEY_ARCH, KEY_NUM_CLASSES, KEY_INPUT_SIZE, KEY_MEAN, KEY_STD)
MAX_SIDE, MAX_CLASSES = 4096, 1_000_000


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint's metadata says about the model it holds."""

    arch: str
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SpecOverrides:
    """Command-line values that fill in or replace checkpoint metadata (raw strings)."""

    arch: str | None = None
    num_classes: str | None = None
    input_size: str | None = None
    mean: str | None = None
    std: str | None = None


@dataclass
class Checkpoint:
    """A loaded model with the file's metadata and provenance."""

    path: Path
    spec: ModelSpec
    model: nn.Module
    metadata: dict[str, str]
    sha256: str
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def history(self) -> list[dict]:
        """The `scrub.history` provenance list (empty for a model never edited)."""
        return json.loads(self.metadata.get(KEY_HISTORY, "[]"))


def torchvision_architectures() -> list[str]:
    """Names of torchvision's classification models."""
    return torchvision.models.list_models(module=torchvision.models)


def load_checkpoint(path: Path, overrides: SpecOverrides = SpecOverrides()) -> Checkpoint:
    """Read a safetensors checkpoint, build its architecture and load the weights strictly.

    `path` may also be a folder saved the way timm saves a model for a hub (model.safetensors and
    config.json): the config fills in the metadata the file does not have.
    """
    weights, folder_metadata = hub_folder(path) if is_hub_folder(path) else (path, {})
    with open_safetensors(weights) as file:
        metadata = {**folder_metadata, **file.metadata}
        stored = strip_prefixes(file.names())
        shapes = {name: tuple(file.shape(source)) for name, source in stored.items()}
        spec = resolve_spec(path, metadata, overrides, shapes)
        model = build_model(spec)
        _check_names_and_shapes(path, spec, model, shapes)
        _fill(path, model, file, stored)
        digest = file.sha256()
    dtypes = {name: file.dtype(source) for name, source in stored.items()}
    return Checkpoint(path, spec, model.eval(), dict(metadata), digest, dtypes)


def save_checkpoint(
    checkpoint: Checkpoint, model: nn.Module, output: Path, history_entries: list[dict], overwrite: bool
) -> None:
    """Write `model` with the source's metadata, the resolved spec and the new history entries."""
    state = {
        name: tensor.detach().to("cpu", checkpoint.dtypes.get(name, tensor.dtype))
        for name, tensor in model.state_dict().items()
    }
    metadata = dict(checkpoint.metadata)
    metadata.update(spec_metadata(checkpoint.spec))
    metadata[KEY_VERSION] = __version__
    metadata[KEY_SOURCE_SHA] = checkpoint.sha256
    metadata[KEY_HISTORY] = json.dumps(checkpoint.history + history_entries, sort_keys=True)
    write_safetensors(output, state, metadata, overwrite)


def spec_metadata(spec: ModelSpec) -> dict[str, str]:
    """The metadata strings that describe `spec`."""
    metadata = {
        KEY_ARCH: spec.arch,
        KEY_NUM_CLASSES: str(spec.num_classes),
        KEY_INPUT_SIZE: ",".join(map(str, spec.input_size)),
        KEY_MEAN: ",".join(map(repr, spec.mean)),
        KEY_STD: ",".join(map(repr, spec.std)),
    }
    if spec.classes is not None:
        metadata[KEY_CLASSES] = json.dumps(list(spec.classes))
    return metadata


def resolve_spec(path: Path, metadata: dict[str, str], overrides: SpecOverrides, shapes: Shapes | None = None) -> ModelSpec:
    """Combine metadata and overrides into a validated ModelSpec.

    A missing num_classes is read from the weights' `shapes` when the architecture is known; every
    other missing key is named in one error.
    """
    given = {key: override if override is not None else metadata.get(key)
             for key, override in zip(SPEC_KEYS, (overrides.arch, overrides.num_classes, overrides.input_size,
                                                  overrides.mean, overrides.std))}
    arch = None
    if given[KEY_ARCH] is not None:
        arch = _parse_arch(path, given[KEY_ARCH], from_command_line=overrides.arch is not None)
    if given[KEY_NUM_CLASSES] is None and arch is not None and shapes:
        inferred = infer_num_classes(lambda count: build_architecture(arch, count), shapes)
        given[KEY_NUM_CLASSES] = None if inferred is None else str(inferred)
    missing = [key for key, value in given.items() if value is None]
    if missing:
        flags = " ".join("--" + key.replace("_", "-") for key in missing)
        raise input_error(f"{path}: metadata has no {', '.join(map(repr, missing))}; pass {flags}")
    num_classes = _parse_int(path, KEY_NUM_CLASSES, given[KEY_NUM_CLASSES], MAX_CLASSES)
    input_size = _parse_input_size(path, given[KEY_INPUT_SIZE])
    channels = input_size[0]
    mean = _parse_floats(path, KEY_MEAN, given[KEY_MEAN], channels)
    std = _parse_floats(path, KEY_STD, given[KEY_STD], channels)
    if min(std) <= 0:
        raise input_error(f"{path}: std values must be positive, got {std}")
    classes = _parse_classes(path, metadata.get(KEY_CLASSES), num_classes)
    return ModelSpec(arch, num_classes, input_size, mean, std, classes)


def build_model(spec: ModelSpec) -> nn.Module:
    """An untrained instance of the spec's architecture."""
    return build_architecture(spec.arch, spec.num_classes)


def build_architecture(arch: str, num_classes: int) -> nn.Module:
    """An untrained instance of the architecture (torchvision name, timm:NAME or pkg.module:factory)."""
    if is_timm_arch(arch):
        return build_timm_model(arch, num_classes)
    if ":" in arch:
        factory, _ = import_object(arch, "--arch")
        return factory(num_classes=num_classes)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _parse_arch(path: Path, value: str, from_command_line: bool) -> str:
    if value in torchvision_architectures():
        return value
    if is_timm_arch(value):
        return check_timm_arch(path, value)
    if OBJECT_NAME.match(value) and from_command_line:
        return value
    if OBJECT_NAME.match(value):
        raise input_error(
            f"{path}: metadata arch {value!r} is a custom factory; these are only imported when "
            f"given on the command line (--arch {value})"
        )
    source = "--arch" if from_command_line else "metadata arch"
    raise input_error(
        f"{path}: {source} {value!r} is not a torchvision classification model "
        "(see torchvision.models.list_models), timm:NAME nor pkg.module:factory"
    )


def _parse_int(path: Path, key: str, value: str, maximum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise input_error(f"{path}: {key} must be an integer, got {value!r}") from None
    if not 1 <= number <= maximum:
        raise input_error(f"{path}: {key} must be between 1 and {maximum}, got {number}")
    return number


def _parse_input_size(path: Path, value: str) -> tuple[int, int, int]:
    parts = value.replace("x", ",").split(",")
    try:
        channels, height, width = (int(part) for part in parts)
    except ValueError:
        raise input_error(f"{path}: input_size must be C,H,W (e.g. 3,32,32), got {value!r}") from None
    if channels not in (1, 3) or not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise input_error(
            f"{path}: input_size {value!r} out of range (1 or 3 channels, sides 1..{MAX_SIDE})"
        )
    return channels, height, width


def _parse_floats(path: Path, key: str, value: str, channels: int) -> tuple[float, ...]:
    try:
        numbers = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise input_error(f"{path}: {key} must be comma-separated numbers, got {value!r}") from None
    if len(numbers) == 1:
        numbers = numbers * channels
    if len(numbers) != channels or not all(math.isfinite(n) for n in numbers):
        raise input_error(f"{path}: {key} needs {channels} finite values, got {value!r}")
    return numbers


def _parse_classes(path: Path, value: str | None, num_classes: int) -> tuple[str, ...] | None:
    if value is None:
        return None
    try:
        classes = json.loads(value)
    except json.JSONDecodeError:
        classes = None
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise input_error(f"{path}: metadata classes must be a JSON list of strings")
    if len(classes) != num_classes:
        raise input_error(f"{path}: metadata lists {len(classes)} classes but num_classes is {num_classes}")
    return tuple(classes)


def strip_prefixes(names: list[str]) -> dict[str, str]:
    """Model state names (wrapper prefixes such as `module.` removed) -> the names stored in the file."""

    def strip(name: str) -> str:
        while name.startswith(STRIPPED_PREFIXES):
            name = name.split(".", 1)[1]
        return name

    return {strip(name): name for name in names}


def _check_names_and_shapes(path: Path, spec: ModelSpec, model: nn.Module, shapes: dict[str, torch.Size]) -> None:
    """Refuse weights whose names or shapes differ from the architecture's, naming the first few."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in shapes]
    unexpected = sorted(name for name in shapes if name not in expected)
    mismatched = [
        f"{name} {list(shapes[name])} vs {list(tensor.shape)}"
        for name, tensor in expected.items()
        if name in shapes and shapes[name] != tensor.shape
    ]
    problems = [
        f"{label} {_first(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape of", mismatched))
        if names
    ]
    if problems:
        raise input_error(
            f"{path}: weights do not match arch {spec.arch} with {spec.num_classes} classes: "
            + "; ".join(problems)
        )


@torch.no_grad()
def _fill(path: Path, model: nn.Module, file: SafetensorsReader, stored: dict[str, str]) -> None:
    """Read every tensor straight into the model's own parameters and buffers; refuse NaN or Inf weights.

    The model's state dict shares memory with its parameters, so no second copy of the weights is
    made. The names and shapes match exactly (checked before), so this is what a strict
    load_state_dict of the same-version architecture does.
    """
    broken = []
    for name, target in model.state_dict().items():
        file.read_into(stored[name], target)
        if target.is_floating_point() and not _all_finite(target):
            broken.append(name)
    if broken:
        raise input_error(f"{path}: NaN or Inf weights in {', '.join(broken[:3])}")


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN or Inf, checked a chunk at a time (isfinite of a whole 400 MB tensor made 700 MB of temporaries)."""
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(chunk))


def _first(names: list[str], shown: int = 3) -> str:
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@dataclass(frozen=True)
class Destination:
    """Where edited models go: -o for one model, --output-dir for several, else beside the input."""

    output: Path | None = None
    output_dir: Path | None = None
    force: bool = False

    def check(self, model_count: int) -> None:
        """Refuse option combinations that cannot name one output per model (usage error)."""
        if self.output is not None and self.output_dir is not None:
            raise usage_error("use either -o/--output or --output-dir, not both")
        if self.output is not None and model_count > 1:
            raise usage_error("-o/--output names one file; with several models use --output-dir")

    def path_for(self, source: Path, suffix: str) -> Path:
        """The output path for `source` (`<stem>.<suffix>.safetensors` by default), checked up front."""
        stem = source.name.removesuffix(".safetensors").removesuffix(".scrubbed")
        default_name = f"{stem}.{suffix}.safetensors"
        if self.output is not None:
            path = self.output
        elif self.output_dir is not None:
            make_folder(self.output_dir)
            path = self.output_dir / default_name
        else:
            path = source.parent / default_name
        if path.resolve() == source.resolve():
            raise usage_error(f"{path}: the output would overwrite the input model")
        if path.exists() and not self.force:
            raise input_error(f"{path}: already exists (use --force to overwrite)")
        if not path.parent.is_dir():
            raise input_error(f"{path.parent}: output folder does not exist")
        return path
