"""A trigger given as a Python function (`--trigger-fn pkg.module:function`) instead of a stamp."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from backdoor_scrub.errors import input_error, usage_error
from backdoor_scrub.user_code import import_object, module_sha256

Space = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class FunctionTrigger:
    """x' = function(x) for float batches [N,C,H,W] in [0,1]: warps, sample-specific or any other trigger.

    `space` (mean, std) makes it work on normalized inputs: they are mapped to [0,1], triggered,
    and mapped back, so the edit can use it exactly as it uses a stamp.
    """

    function: Callable[[torch.Tensor], torch.Tensor]
    name: str
    module_sha256: str | None
    space: Space | None = None

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """The triggered batch, in the space of `images`."""
        if self.space is None:
            return self._apply(images)
        mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device).view(1, -1, 1, 1) for v in self.space)
        return (self._apply(images * std + mean) - mean) / std

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> FunctionTrigger:
        """The same trigger for inputs normalized with (x - mean) / std."""
        return dataclasses.replace(self, space=(tuple(mean), tuple(std)))

    def provenance(self) -> dict:
        """What the history and JSON record of it: its name and the sha256 of its module's file."""
        return {"function": self.name, "module_sha256": self.module_sha256}

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        try:
            triggered = self.function(images.clone())
        except Exception as exc:  # the user's code: any failure is an input error naming it
            raise input_error(f"--trigger-fn {self.name}: failed on a batch of shape {list(images.shape)} "
                              f"({type(exc).__name__}: {exc})") from exc
        if not isinstance(triggered, torch.Tensor) or triggered.shape != images.shape:
            got = list(triggered.shape) if isinstance(triggered, torch.Tensor) else type(triggered).__name__
            raise input_error(f"--trigger-fn {self.name}: must return a tensor of shape {list(images.shape)}, got {got}")
        if not torch.isfinite(triggered).all():
            raise input_error(f"--trigger-fn {self.name}: returned NaN or Inf values")
        return triggered.to(images.dtype)


def load_trigger_function(spec: str) -> FunctionTrigger:
    """Import `pkg.module:function` (given on the command line); a usage error when it is not a function."""
    function, module = import_object(spec, "--trigger-fn")
    if not callable(function):
        raise usage_error(f"--trigger-fn {spec}: not a function")
    return FunctionTrigger(function, spec, module_sha256(module))
