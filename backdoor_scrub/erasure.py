"""Erase a trigger's direction from a linear layer's input: its coordinate is predicted from the other features."""

from __future__ import annotations

import torch

from backdoor_scrub.linear_edit import LowRankUpdate


def trigger_direction(clean: torch.Tensor, stamped: torch.Tensor) -> torch.Tensor:
    """The unit vector along which stamped key columns [F, n] move most from their clean twins (same columns).

    A patch backdoor moves a layer's features along one direction, however strong the patch: on two
    tuning MobileNetV3s and a ResNet-18 the scan's reconstruction and the real patch moved the head's
    input along directions with a cosine of 0.99-1.00, the real patch 1.06-1.65 times as far.
    """
    shifts = stamped.double() - clean.double()
    if shifts.shape[1] > shifts.shape[0]:  # the top eigenvector of the smaller Gram matrix (F x F, or n x n)
        return torch.linalg.eigh(shifts @ shifts.T)[1][:, -1]
    top = shifts @ torch.linalg.eigh(shifts.T @ shifts)[1][:, -1]
    return top / top.norm().clamp_min(1e-300)


def erasure_update(weight: torch.Tensor, clean: torch.Tensor, direction: torch.Tensor, ridge: float,
                   with_bias: bool) -> LowRankUpdate:
    """The rank-one change of `weight` [out, F(+1)] (a bias column is not read) that reads the input's coordinate
    along `direction` as its ridge regression on the other coordinates, fitted on the clean key columns [F, n].

    A shift along the direction, of any length, then changes nothing; a clean input, whose coordinate
    the other features predict, keeps its output (the target class keeps the part of it that is its
    own). `ridge` scales the regression's penalty by the keys' mean squared norm: larger, nearer to
    reading the clean mean, which costs the target class (a tuning MobileNetV3: -3.8 points at 3, none at 1).
    """
    direction = direction.double()
    centred = clean.to(torch.float64, copy=True)  # the other coordinates, centred, in place: one float64 copy
    coordinate = direction @ centred  # [n]
    centred -= torch.outer(direction, coordinate)  # orthogonal to the direction
    mean_others = centred.mean(1, keepdim=True) if with_bias else torch.zeros_like(centred[:, :1])
    mean_coordinate = coordinate.mean() if with_bias else coordinate.new_zeros(())
    centred -= mean_others
    target = coordinate - mean_coordinate
    coefficients = _ridge(centred, target, ridge * centred.pow(2).sum(0).mean().clamp_min(1e-12))
    coefficients -= direction * (direction @ coefficients)  # orthogonal in exact arithmetic; made so in floating point
    # what the layer makes of a unit step along it; in the weight's dtype, never a float64 copy of a 25,088-input layer
    gain = (weight[:, : len(direction)] @ direction.to(weight.dtype)).double()
    right = coefficients - direction
    if with_bias:
        right = torch.cat([right, (mean_coordinate - coefficients @ mean_others[:, 0]).reshape(1)])
    return LowRankUpdate(gain[:, None], right[None])


def _ridge(features: torch.Tensor, target: torch.Tensor, penalty: float) -> torch.Tensor:
    """b minimising |target - b @ features|^2 + penalty |b|^2 for columns [F, n], in the smaller of the two systems."""
    size, columns = features.shape
    if columns < size:
        gram = features.T @ features + penalty * torch.eye(columns, dtype=features.dtype, device=features.device)
        return features @ torch.linalg.solve(gram, target)
    gram = features @ features.T + penalty * torch.eye(size, dtype=features.dtype, device=features.device)
    return torch.linalg.solve(gram, features @ target)
