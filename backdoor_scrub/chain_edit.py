"""The closed-form edit of the head's linear layers, its strength chosen on held-out folds of the samples."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from backdoor_scrub.calibration import choose_edit, cross_validate
from backdoor_scrub.head import Head, find_head
from backdoor_scrub.linear_edit import (
    LowRankUpdate,
    apply_update,
    as_columns,
    as_keys,
    linear_edit_update,
    linear_weight,
    scaled_weights,
    set_linear_weight,
)


@dataclass(frozen=True)
class Strength:
    """lam weighs keeping clean outputs against fixing stamped ones; mu pulls towards the current weights."""

    lam: float
    mu: float


@dataclass
class ChainProblem:
    """Features cached once at the first edited layer, and what each layer should output on clean samples.

    Index 0..n-1 of `clean` and `stamped` are the user's samples; later rows are their augmented copies
    (row i is a copy of sample i % n). While candidates are tried, each layer's edit is applied by a
    forward hook from its factors, so a 25,088-input layer is never rewritten per candidate.
    """

    head: Head
    layers: list[nn.Module]
    weights: list[torch.Tensor]
    clean: torch.Tensor
    stamped: torch.Tensor
    values: list[torch.Tensor]
    samples: int
    updates: list[LowRankUpdate] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def fit(self, rows: torch.Tensor, strength: Strength) -> None:
        """Edit every layer in turn on the given rows: stamped keys -> clean values, clean outputs kept."""
        self.clear()
        for position, layer in enumerate(self.layers):
            with_bias = layer.bias is not None
            keys_t = as_keys(layer_activations(self.head, layer, self.stamped[rows], inputs=True), with_bias)
            keys_c = as_keys(layer_activations(self.head, layer, self.clean[rows], inputs=True), with_bias)
            lam, mu = scaled_weights(keys_t, keys_c, strength.lam, strength.mu)
            values = as_columns(self.values[position][rows])
            update = linear_edit_update(self.weights[position], keys_t, values, keys_c, lam, mu, values)
            self.updates.append(update)
            self._hooks.append(layer.register_forward_hook(partial(_add_update, update=update)))

    def commit(self) -> None:
        """Write the current edit into the layers' weights and drop the hooks."""
        updates = list(self.updates)
        self.clear()
        for layer, weight, update in zip(self.layers, self.weights, updates):
            set_linear_weight(layer, apply_update(weight, update))

    def clear(self) -> None:
        """Back to the unedited layers."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.updates.clear()

    def logits(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, stamped) logits of the given rows with the current edit."""
        return self.head.logits(self.clean[rows]), self.head.logits(self.stamped[rows])


def _add_update(layer: nn.Module, args: tuple, output: torch.Tensor, update: LowRankUpdate) -> torch.Tensor:
    """Forward hook: the layer's output plus D @ [input; 1], position by position for a 1x1 convolution."""
    inputs = args[0]
    rows = inputs.movedim(1, -1).reshape(-1, inputs.shape[1])
    if layer.bias is not None:
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
    delta = update.apply(rows).view(*inputs.movedim(1, -1).shape[:-1], -1).movedim(-1, 1)
    return output + delta.to(output.dtype)


def chain_problem(
    reference: nn.Module, edited: nn.Module, chain: list[str], clean: torch.Tensor, stamped: torch.Tensor,
    samples: int, batch_size: int,
) -> tuple[ChainProblem, tuple[torch.Tensor, torch.Tensor]]:
    """The problem for `edited`'s chain, with values and before-logits from `reference` (the unedited model).

    `stamped` may hold several stamped copies of `clean` (one per trigger of a family), one after
    the other: the clean features are computed once and repeated to match. When the two models
    share their backbone (no stage was edited), the backbone runs once per image set.
    """
    copies = len(stamped) // len(clean)
    head = find_head(edited, chain[0], clean[:2])
    layers = [edited.get_submodule(name) for name in chain]
    features_clean = _repeat(head.features(edited, clean, batch_size), copies)
    features_stamped = head.features(edited, stamped, batch_size)
    if reference is edited:
        ref_head, ref_clean, ref_stamped = head, features_clean, features_stamped[:samples]
    else:
        ref_head = find_head(reference, chain[0], clean[:2])
        ref_clean = _repeat(ref_head.features(reference, clean, batch_size), copies)
        ref_stamped = ref_head.features(reference, stamped[:samples], batch_size)
    ref_layers = [reference.get_submodule(name) for name in chain]
    values = [layer_activations(ref_head, layer, ref_clean, inputs=False) for layer in ref_layers]
    before = (ref_head.logits(ref_clean[:samples]), ref_head.logits(ref_stamped[:samples]))
    weights = [linear_weight(layer).double() for layer in layers]  # float64 once, not per candidate
    return ChainProblem(head, layers, weights, features_clean, features_stamped, values, samples), before


def _repeat(rows: torch.Tensor, copies: int) -> torch.Tensor:
    """The rows, `copies` times one after the other."""
    return rows.repeat(copies, *([1] * (rows.dim() - 1)))


def calibrate(
    problem: ChainProblem,
    before: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    target: int,
    strengths: list[Strength],
    max_folds: int,
) -> tuple[Strength, dict]:
    """Score every strength on held-out folds of the samples; the chosen one and what was measured."""
    scores, folds = cross_validate(labels, len(problem.clean), strengths, problem.fit, problem.logits, before, target,
                                   max_folds)
    chosen = choose_edit(scores)
    report = {
        "folds": folds,
        "chosen": {"lam": strengths[chosen].lam, "mu": strengths[chosen].mu},
        "held_out": scores[chosen].as_dict(),
        "candidates": [{"lam": s.lam, "mu": s.mu, "flips": h.flips, "changed": h.changed,
                        "residual": round(h.residual, 4), "divergence": round(h.divergence, 4)}
                       for s, h in zip(strengths, scores)],
    }
    return strengths[chosen], report


def strength_grid(lams: tuple[float, ...], mus: tuple[float, ...]) -> list[Strength]:
    """Every (lam, mu) pair, strongest edit first: small mu, then small lam."""
    return [Strength(lam, mu) for mu, lam in itertools.product(sorted(mus), sorted(lams))]


@torch.no_grad()
def layer_activations(head: Head, layer: nn.Module, features: torch.Tensor, inputs: bool) -> torch.Tensor:
    """The input (or output) of one layer of the head when it runs on `features`.

    The input of the head's first module is the features themselves: no pass is run for it.
    """
    first = head.module[0] if isinstance(head.module, nn.Sequential) else head.module
    if inputs and layer is first:
        return features
    captured: list[torch.Tensor] = []
    if inputs:
        handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
    else:
        handle = layer.register_forward_hook(lambda _m, _a, out: captured.append(out.detach().clone()))
    try:
        head.logits(features)
    finally:
        handle.remove()
    return torch.cat(captured)
