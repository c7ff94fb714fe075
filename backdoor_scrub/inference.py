"""Device selection and batched prediction with a progress bar on stderr."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from backdoor_scrub.data import to_unit_range
from backdoor_scrub.errors import input_error

Transform = Callable[[torch.Tensor], torch.Tensor]
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


def batch_for(batch_size: int, input_size: tuple[int, ...]) -> int:
    """`batch_size`, lowered for large inputs so that a batch holds at most MAX_BATCH_VALUES input values.

    Activations grow with the input: 256 images at 224 px took a ResNet-50 evaluate to 4.3 GB on CPU.
    """
    return max(1, min(batch_size, MAX_BATCH_VALUES // math.prod(input_size)))


def progress_bar(quiet: bool = False) -> Progress:
    """A rich progress bar on stderr, shown only on a terminal and when not quiet."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=quiet or not console.is_terminal,
    )


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int,
    transform: Transform | None = None,
    progress: Progress | None = None,
    description: str = "predicting",
) -> torch.Tensor:
    """Predicted class per uint8 image; `transform` (e.g. stamping) runs on the [0,1] batch."""
    model.to(device).eval()
    task = progress.add_task(description, total=len(images)) if progress else None
    predictions = []
    for batch in images.split(batch_size):
        inputs = to_unit_range(batch.to(device))
        if transform is not None:
            inputs = transform(inputs)
        predictions.append(model(inputs).argmax(1).cpu())
        if progress:
            progress.advance(task, len(batch))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
