"""Device selection, thread count, batch sizes, batched prediction and the block optimisation loops run in."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from backdoor_scrub.data import to_unit_range
from backdoor_scrub.errors import input_error
from backdoor_scrub.native_memory import heap_for_repeated_steps
from backdoor_scrub.small_maps import small_map_convolutions

_RELAID: set[int] = set()  # ids of the models inside a fast_layout block

MAX_BATCH_VALUES = 1 << 21  # input values per forward pass: 13 images at 224 px, 256 at 32 px


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda[:N]` without CUDA is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise input_error(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise input_error(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise input_error(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise input_error(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def set_threads(threads: int | None) -> int:
    """Run torch on `threads` CPU threads; None: OMP_NUM_THREADS when set, else every core this process may use.

    Parallel runs on a small machine (`xargs -P`) should each get a share: --threads 1 with -P 2 on 2 cores.
    """
    if threads is None:
        configured = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(configured) if configured.isdigit() and int(configured) > 0 else available_cores()
    torch.set_num_threads(threads)
    return threads


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a container or taskset may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def batch_for(batch_size: int, input_size: tuple[int, ...]) -> int:
    """`batch_size`, lowered for large inputs so that a batch holds at most MAX_BATCH_VALUES input values.

    Activations grow with the input: 256 images at 224 px took a ResNet-50 evaluate to 4.3 GB on CPU.
    """
    return max(1, min(batch_size, MAX_BATCH_VALUES // math.prod(input_size)))


def has_grouped_convolution(model: nn.Module) -> bool:
    """Whether any convolution of the model is grouped (depthwise convolutions are)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def has_convolution(model: nn.Module) -> bool:
    """Whether the model has any 2-d convolution."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@contextmanager
def fast_layout(model: nn.Module, device: torch.device,
                faster_channels_last: Callable[[nn.Module], bool] = has_grouped_convolution) -> Iterator[nn.Module]:
    """`model` with its convolution weights channels-last inside the block where that is faster: on CPU,
    for models with grouped (depthwise) convolutions; restored to the usual layout afterwards.

    Measured with torch 2.14.1 on 2 cores, 32x32 inputs: a trained MobileNetV3-small predicts 256
    images 7x faster and runs a scan step (forward and backward) 2.7x faster; MobileNetV2,
    EfficientNet-B0, MNASNet, RegNetY and ShuffleNetV2 1.2-1.5x (forward); ResNet-18, which has no
    grouped convolution, within 6% either way, so it is left as it is. Results agree to float rounding.

    `faster_channels_last` is that rule (has_grouped_convolution), replaced where another is faster. The scan's
    steps (forward and backward through the whole network, 64 images here) run channels-last for any model with
    a convolution (`has_convolution`): randomly initialised torchvision families at their smallest input, a
    step 1.33x faster for GoogLeNet, 1.34x DenseNet-121, 1.37x SqueezeNet, 1.28x RegNetX, 1.16x ResNet-50,
    1.09x ResNet-18, 0.95x VGG-11-BN and 0.80x Wide ResNet-50 (the one clear loss); a no-trigger edit of a
    trained GoogLeNet 73-84 s -> 52-65 s. Every other pass keeps the grouped rule, as the given-trigger
    benchmark was measured: channels-last predictions (256 images) would gain 1.53x on GoogLeNet and 1.15x on
    DenseNet-121, 1.03x on ResNet-18, and lose on Wide ResNet-50 (0.85x).

    Re-entrant: inside an outer block for the same model, an inner one changes nothing, so a loop of
    passes (a calibration's candidates) relays the weights once, not once a pass.
    """
    if device.type != "cpu" or id(model) in _RELAID or not faster_channels_last(model):
        yield model
        return
    _relayout(model, torch.channels_last)
    _RELAID.add(id(model))
    try:
        yield model
    finally:
        _RELAID.discard(id(model))
        _relayout(model, torch.contiguous_format)


@contextmanager
def optimisation_steps(model: nn.Module, example: torch.Tensor,
                       faster_channels_last: Callable[[nn.Module], bool] = has_grouped_convolution) -> Iterator[nn.Module]:
    """The block an optimisation loop (activation matching, the scan) runs its steps in: `model` in its fast
    layout (fast_layout), its convolutions on tiny maps in their smaller form for inputs shaped like `example`
    (one row), and glibc's heap for the buffers every step allocates again."""
    with (fast_layout(model, example.device, faster_channels_last), small_map_convolutions(model, example),
          heap_for_repeated_steps()):
        yield model


def _relayout(model: nn.Module, memory_format: torch.memory_format) -> None:
    """Rewrite the model's 4-d weights in `memory_format` as ordinary tensors, even inside inference mode
    (weights made there could not be used by a later pass that needs gradients, such as the scan)."""
    with torch.inference_mode(False), torch.no_grad():
        model.to(memory_format=memory_format)


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """Predicted class per uint8 image."""
    model.to(device).eval()
    predictions = []
    with fast_layout(model, device):
        for batch in images.split(batch_size):
            predictions.append(model(to_unit_range(batch.to(device))).argmax(1).cpu())
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def forward_batched(module: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The module's outputs on float `inputs`, a batch at a time."""
    with fast_layout(module, inputs.device):
        return torch.cat([module(batch) for batch in inputs.split(batch_size)])
