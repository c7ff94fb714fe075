"""The least-squares edit of one linear layer, solved in feature space or in sample space, whichever is smaller."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LowRankUpdate:
    """An edit D = left @ right of an [out, in] weight, kept factored while it is cheaper that way."""

    left: torch.Tensor  # [out, r]
    right: torch.Tensor | None  # [r, in]; None: `left` is D itself

    def dense(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """D (or its output rows start:stop) as a float64 matrix."""
        left = self.left[start:stop]
        return left if self.right is None else left @ self.right

    def apply(self, keys: torch.Tensor) -> torch.Tensor:
        """D @ keys for key rows [N, in] -> [N, out] in float64, without forming D.

        float64 matters: with nearly collinear keys the factors are large and cancel, and in
        float32 a MobileNetV3 head edit came out 134x off its values.
        """
        if self.right is None:
            return keys.double() @ self.left.T
        return (keys.double() @ self.right.T) @ self.left.T


def closed_form_linear_edit(
    weight: torch.Tensor,
    keys_triggered: torch.Tensor,
    values: torch.Tensor,
    keys_clean: torch.Tensor,
    lam: float,
    mu: float,
    values_clean: torch.Tensor | None = None,
) -> torch.Tensor:
    """argmin_W' |W'Kt - V|^2 + lam |W'Kc - Vc|^2 + mu |W' - W|^2 (Vc = W Kc unless given); keys are columns."""
    update = linear_edit_update(weight, keys_triggered, values, keys_clean, lam, mu, values_clean)
    return apply_update(weight, update)


def apply_update(weight: torch.Tensor, update: LowRankUpdate) -> torch.Tensor:
    """W + D, formed in float64, in W's dtype."""
    return (weight.double() + update.dense()).to(weight.dtype)


def linear_edit_update(
    weight: torch.Tensor,
    keys_triggered: torch.Tensor,
    values: torch.Tensor,
    keys_clean: torch.Tensor,
    lam: float,
    mu: float,
    values_clean: torch.Tensor | None = None,
) -> LowRankUpdate:
    """The change D = W' - W of closed_form_linear_edit, factored when there are fewer columns than inputs."""
    # Shapes: weight [out, in]; keys [in, n], one column per sample or position; values [out, n].
    w = weight.detach().double()
    kt, kc = keys_triggered.detach().double(), keys_clean.detach().double()
    vc = w @ kc if values_clean is None else values_clean.detach().double()
    return residual_update(kt, values.detach().double() - w @ kt, kc, vc - w @ kc, lam, mu)


def residual_update(
    keys_triggered: torch.Tensor,
    residual_triggered: torch.Tensor,
    keys_clean: torch.Tensor,
    residual_clean: torch.Tensor,
    lam: float,
    mu: float,
) -> LowRankUpdate:
    """argmin_D |D Kt - Rt|^2 + lam |D Kc - Rc|^2 + mu |D|^2, in float64; R are the values minus W K.

    Callers that already hold W K (a layer's own output) pass the residuals and never touch W.
    """
    # With K = [Kt, sqrt(lam) Kc] and R = [Rt, sqrt(lam) Rc] the edit is D = R K^T (K K^T + mu I)^-1.
    keys, residuals = keys_triggered.double(), residual_triggered.double()
    if lam > 0 and keys_clean.shape[1]:
        keys = torch.cat([keys, math.sqrt(lam) * keys_clean.double()], 1)
        residuals = torch.cat([residuals, math.sqrt(lam) * residual_clean.double()], 1)
    return ridge_update(residuals, keys, mu)


def ridge_update(residuals: torch.Tensor, keys: torch.Tensor, mu: float) -> LowRankUpdate:
    """D = R K^T (K K^T + mu I)^-1, through the n x n system R (K^T K + mu I)^-1 K^T when n < features.

    Both are the same matrix (push-through identity); the sample-space form needs O(features x n)
    memory, which is what makes a 25,088-input VGG classifier layer editable.
    """
    features, columns = keys.shape
    if columns < features:
        gram = keys.T @ keys + mu * torch.eye(columns, dtype=keys.dtype, device=keys.device)
        return LowRankUpdate(torch.linalg.solve(gram, residuals.T).T, keys.T)
    gram = keys @ keys.T + mu * torch.eye(features, dtype=keys.dtype, device=keys.device)
    return LowRankUpdate(torch.linalg.solve(gram, (residuals @ keys.T).T).T, None)


def scaled_weights(
    keys_triggered: torch.Tensor, keys_clean: torch.Tensor, lam: float, mu: float
) -> tuple[float, float]:
    """Raw lam, mu for |W'Kt-V|^2/nt + lam |W'Kc-Vc|^2/nc + mu s |W'-W|^2, s the mean |clean key|^2."""
    # Means over columns make lam and mu mean the same for 10 or 1000 samples; s makes mu scale-free.
    n_t, n_c = keys_triggered.shape[1], keys_clean.shape[1]
    key_energy = keys_clean.double().pow(2).sum(0).mean().item()
    return lam * n_t / n_c, mu * n_t * key_energy


@torch.no_grad()
def add_update_(layer: nn.Module, update: LowRankUpdate, block: int = 64) -> None:
    """W += D in the layer itself, D formed in float64 a block of output rows at a time (no full copy of W)."""
    weight = layer.weight.view(layer.weight.shape[0], -1)
    columns = weight.shape[1]
    for start in range(0, weight.shape[0], block):
        rows = slice(start, start + block)
        change = update.dense(start, start + block)
        weight[rows] = (weight[rows].double() + change[:, :columns]).to(weight.dtype)
        if layer.bias is not None:
            layer.bias[rows] = (layer.bias[rows].double() + change[:, columns]).to(layer.bias.dtype)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """[W b] of a Linear or 1x1 Conv2d as one [out, in(+1)] matrix."""
    weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    return weight if layer.bias is None else torch.cat([weight, layer.bias.detach()[:, None]], 1)


@torch.no_grad()
def set_linear_weight(layer: nn.Module, matrix: torch.Tensor) -> None:
    """Write an [out, in(+1)] matrix back into the layer's weight (and bias)."""
    columns = layer.weight[0].numel()
    layer.weight.copy_(matrix[:, :columns].reshape(layer.weight.shape))
    if layer.bias is not None:
        layer.bias.copy_(matrix[:, columns])


def as_columns(activations: torch.Tensor) -> torch.Tensor:
    """[N, F] or [N, C, H, W] activations -> [F or C, columns]: one column per sample (and position)."""
    if activations.dim() == 2:
        return activations.T
    return activations.transpose(0, 1).reshape(activations.shape[1], -1)


def as_keys(activations: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """Key columns of a layer's inputs, with a constant 1 appended when the layer has a bias."""
    keys = as_columns(activations)
    return torch.cat([keys, keys.new_ones(1, keys.shape[1])]) if with_bias else keys
