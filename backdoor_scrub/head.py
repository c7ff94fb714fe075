"""Run the backbone once up to the first edited layer, then only the head on the cached features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backdoor_scrub.inference import fast_layout


@dataclass
class Head:
    """A module that maps the input of the first edited layer to the logits, sharing the model's weights.

    When no such part of the model can be found (a forward that does more than call its children
    in order), `module` is the whole model and the features are the network inputs themselves:
    slower, never wrong.
    """

    module: nn.Module
    first: str | None

    @torch.no_grad()
    def features(self, model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The input of the first edited layer on `inputs` (the inputs themselves without a head)."""
        if self.first is None:
            return inputs
        layer = model.get_submodule(self.first)
        captured: list[torch.Tensor] = []
        handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
        try:
            with fast_layout(model, inputs.device):
                for batch in inputs.split(batch_size):
                    model.eval()(batch)
        finally:
            handle.remove()
        return torch.cat(captured)

    @torch.no_grad()
    def logits(self, features: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """The logits [N, classes] from cached features."""
        self.module.eval()
        return torch.cat([self.module(batch).flatten(1) for batch in features.split(batch_size)])


def find_head(model: nn.Module, first: str, probe: torch.Tensor) -> Head:
    """The shortest tail of the model that starts at `first` and reproduces its logits on `probe`."""
    model.eval()
    features = Head(model, first).features(model, probe)
    with torch.no_grad():
        expected = model(probe).flatten(1)
    for tail in _tails(model, first):
        with torch.no_grad():
            got = tail(features).flatten(1)
        if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * (1 + expected.abs().max())):
            return Head(tail, first)
    return Head(model, None)


def _tails(model: nn.Module, first: str) -> list[nn.Module]:
    """Candidate tails, shortest first: the layer alone, then the rest of each enclosing Sequential."""
    tails = [model.get_submodule(first)]
    tail: list[nn.Module] = [model.get_submodule(first)]
    name = first
    while name:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(parent, nn.Sequential):
            break
        siblings = list(parent.named_children())
        position = [n for n, _ in siblings].index(child)
        tail = tail + [module for _, module in siblings[position + 1 :]]
        tails.append(nn.Sequential(*tail))
        name = parent_name
    return tails
