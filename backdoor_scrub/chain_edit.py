"""The head's edit (the closed form over its linear layers, or the erasure in its first), strength chosen on held-out folds."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

from backdoor_scrub.calibration import choose_edit, cross_validate, erases_target, score_held_out
from backdoor_scrub.erasure import erasure_update, trigger_direction
from backdoor_scrub.head import Head, find_head
from backdoor_scrub.inference import forward_batched
from backdoor_scrub.linear_edit import (
    LowRankUpdate,
    add_update_,
    as_columns,
    as_keys,
    residual_update,
    scaled_weights,
)


@dataclass(frozen=True)
class Strength:
    """lam weighs keeping clean outputs against fixing stamped ones; mu pulls towards the current weights."""

    lam: float
    mu: float


@dataclass(frozen=True)
class Erasure:
    """The direction erasure's strength (erasure.py): the ridge of the regression that replaces the direction."""

    ridge: float


@dataclass
class ChainProblem:
    """Features cached once at the first edited layer, and what each layer should output on clean samples.

    Index 0..n-1 of `clean` and `stamped` are the user's samples; later rows are their augmented copies
    (row i is a copy of sample i % n). While candidates are tried, each layer's edit is applied by a
    forward hook from its factors, so a 25,088-input layer is never rewritten per candidate. The first
    layer's inputs and own outputs are computed once; when the chain's layers are children of one Sequential head,
    `segments[p]` runs what lies after layer p (up to the next), so no fit or score re-runs the layers before.
    """

    head: Head
    layers: list[nn.Module]
    clean: torch.Tensor
    stamped: torch.Tensor
    first_inputs: tuple[torch.Tensor, torch.Tensor]
    first_outputs: tuple[torch.Tensor, torch.Tensor]
    values: list[torch.Tensor]
    samples: int
    segments: list[nn.Module] | None
    triggers: int = 1  # stamped copies of the clean rows, one block per trigger of a family
    updates: list[LowRankUpdate] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    @torch.no_grad()
    def fit(self, rows: torch.Tensor, strength: Strength | Erasure) -> None:
        """Edit every layer in turn on the given rows: stamped keys -> clean values, clean outputs kept.

        With an Erasure, the first layer alone: the direction the stamped rows move in is erased from its input.
        """
        self.clear()
        if isinstance(strength, Erasure):
            self._erase(rows, strength)
            return
        inputs = (self.first_inputs[0][rows], self.first_inputs[1][rows])
        outputs = (self.first_outputs[0][rows], self.first_outputs[1][rows])
        for position, layer in enumerate(self.layers):
            if position:
                outputs = (layer(inputs[0]), layer(inputs[1]))  # its own outputs: its hook is not set yet
            update = self._solve(position, layer, inputs, outputs, rows, strength)
            self.updates.append(update)
            self._hooks.append(layer.register_forward_hook(partial(_add_update, update=update)))
            if position + 1 < len(self.layers):
                edited = tuple(_add_update(layer, (x,), y, update) for x, y in zip(inputs, outputs))
                inputs = self._inputs(position + 1, rows, edited)

    def _erase(self, rows: torch.Tensor, erasure: Erasure) -> None:
        """The first layer's edit that erases the direction its stamped inputs move in (erasure.py)."""
        layer = self.layers[0]
        first = rows[rows < len(self.clean) // self.triggers]  # the first trigger's: another may move elsewhere
        clean, stamped = (as_columns(x[first]) for x in self.first_inputs)
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        update = erasure_update(weight, clean, trigger_direction(clean, stamped), erasure.ridge, layer.bias is not None)
        self.updates.append(update)
        self._hooks.append(layer.register_forward_hook(partial(_add_update, update=update)))

    def _inputs(self, position: int, rows: torch.Tensor, previous: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, stamped) inputs of layer `position`, from the previous layer's edited outputs when possible."""
        if self.segments is not None:
            return tuple(self.segments[position - 1](y) for y in previous)
        layer = self.layers[position]
        return tuple(layer_activations(self.head, layer, f[rows], inputs=True) for f in (self.clean, self.stamped))

    def _solve(self, position, layer, inputs, outputs, rows, strength) -> LowRankUpdate:
        """The layer's update: residuals are the clean values minus the layer's own outputs."""
        with_bias = layer.bias is not None
        keys_c, keys_t = as_keys(inputs[0], with_bias), as_keys(inputs[1], with_bias)
        lam, mu = scaled_weights(keys_t, keys_c, strength.lam, strength.mu)
        values = as_columns(self.values[position][rows]).double()
        residual_c, residual_t = (values - as_columns(y).double() for y in outputs)
        return residual_update(keys_t, residual_t, keys_c, residual_c, lam, mu)

    def commit(self) -> None:
        """Write the current edit into the layers' weights and drop the hooks."""
        updates = list(self.updates)
        self.clear()
        for layer, update in zip(self.layers, updates):
            add_update_(layer, update)

    def clear(self) -> None:
        """Back to the unedited layers."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.updates.clear()

    @torch.no_grad()
    def logits(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, stamped) logits of the given rows with the current edit, in one pass.

        With segments, the pass starts from the first layer's cached outputs: the largest layer of a
        VGG head (a 400 MB weight) is not read again for each candidate.
        """
        if self.segments is None:
            logits = self.head.logits(torch.cat([self.clean[rows], self.stamped[rows]]))
        else:
            inputs = torch.cat([self.first_inputs[0][rows], self.first_inputs[1][rows]])
            outputs = torch.cat([self.first_outputs[0][rows], self.first_outputs[1][rows]])
            if self.updates:
                outputs = _add_update(self.layers[0], (inputs,), outputs, self.updates[0])
            for layer, segment in zip(self.layers[1:], self.segments):
                outputs = layer(segment(outputs))
            logits = self.segments[-1](outputs).flatten(1)
        return logits[: len(rows)], logits[len(rows) :]


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
    first_inputs = tuple(layer_activations(head, layers[0], f, inputs=True) for f in (features_clean, features_stamped))
    first_outputs = tuple(forward_batched(layers[0], x, batch_size) for x in first_inputs)
    problem = ChainProblem(head, layers, features_clean, features_stamped, first_inputs, first_outputs, values,
                           samples, _segments(head, layers), copies)
    return problem, before


def _segments(head: Head, layers: list[nn.Module]) -> list[nn.Module] | None:
    """What runs after each chain layer up to the next one (after the last: up to the logits).

    Only when the chain's layers are children of one Sequential head, in order; else None.
    """
    children = list(head.module.children()) if isinstance(head.module, nn.Sequential) else []
    ids = [id(child) for child in children]
    if head.first is None or any(id(layer) not in ids for layer in layers):
        return None
    positions = [ids.index(id(layer)) for layer in layers]
    if positions != sorted(positions) or positions[0] != 0:
        return None
    return [nn.Sequential(*children[start + 1 : stop]) for start, stop in zip(positions, [*positions[1:], None])]


def _repeat(rows: torch.Tensor, copies: int) -> torch.Tensor:
    """The rows, `copies` times one after the other."""
    return rows.repeat(copies, *([1] * (rows.dim() - 1)))


def calibrate(
    problem: ChainProblem,
    before: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    target: int,
    strengths: list[Strength] | list[Erasure],
    max_folds: int,
    on_fit: Callable[[], None] | None = None,
) -> tuple[Strength | Erasure, dict]:
    """Score every strength on held-out folds of the samples; the chosen one and what was measured."""
    scores, folds = cross_validate(labels, len(problem.clean), strengths, problem.fit, problem.logits, before, target,
                                   max_folds, on_fit)
    chosen = choose_edit(scores)
    unedited = score_held_out(*before, *before, labels, target)
    report = {
        "folds": folds,
        "chosen": asdict(strengths[chosen]),
        "held_out": scores[chosen].as_dict(),
        "held_out_unedited": unedited.as_dict(),
        "erases_target": erases_target(scores[chosen], unedited),
        "candidates": [{**asdict(s), "flips": h.flips, "changed": h.changed,
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
