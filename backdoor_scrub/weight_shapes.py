"""What weights alone tell about a model: its number of classes, and the torchvision architectures they fit."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torchvision
from torch import nn

Shapes = dict[str, tuple[int, ...]]


def model_shapes(build: Callable[[int], nn.Module], num_classes: int) -> Shapes:
    """The state-dict shapes of build(num_classes), its weights kept on the meta device (no memory, no
    initialisation)."""
    with _weights_on_meta():
        model = build(num_classes)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@contextlib.contextmanager
def _weights_on_meta() -> Iterator[None]:
    """Modules built inside move each parameter and buffer to the meta device as it is registered.

    Unlike `torch.device("meta")` this lets a constructor compute with tensors (RegNet derives its
    widths that way), and the initialisation that follows registration runs on meta tensors: free.
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module, name, parameter):
        if parameter is not None:
            parameter = nn.Parameter(parameter.to("meta"), parameter.requires_grad)
        register_parameter(module, name, parameter)

    def buffer_on_meta(module, name, tensor, persistent=True):
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def infer_num_classes(build: Callable[[int], nn.Module], shapes: Shapes) -> int | None:
    """The class count the weights were saved with: the leading size of the tensors that follow it.

    The model is built with 2 and with 3 classes; the tensors whose shapes differ are the
    classifier's, and the file's size for them is the answer (None when they disagree or are absent).
    """
    two, three = model_shapes(build, 2), model_shapes(build, 3)
    varying = [name for name in two if two[name] != three.get(name) and two[name][:1] == (2,)]
    found = {shapes[name][0] for name in varying if shapes.get(name)}
    return found.pop() if len(found) == 1 else None


def matching_architectures(shapes: Shapes) -> list[tuple[str, int]]:
    """(torchvision architecture, class count) pairs whose state dict has exactly these names and shapes.

    Each architecture is built once on the meta device to compare names; only those with the same
    names are built again to read the class count and compare shapes.
    """
    matches = []
    for arch in torchvision.models.list_models(module=torchvision.models):
        def build(num_classes: int, arch: str = arch) -> nn.Module:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GoogLeNet and Inception warn about their initialisation
            if model_shapes(build, 1000).keys() != shapes.keys():
                continue
            num_classes = infer_num_classes(build, shapes)
            if num_classes is not None and model_shapes(build, num_classes) == shapes:
                matches.append((arch, num_classes))
    return matches
