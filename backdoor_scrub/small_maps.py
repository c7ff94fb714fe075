"""Convolutions on feature maps of a pixel or two, run as the smaller exact computation they are.

At the input sizes these models are often trained at (32x32), the last stage works on 1x1 and 2x2
maps: a 3x3 convolution on a 1x1 map reads zero padding with eight of its nine taps, and oneDNN's
weight gradient for it took 9 ms where the one live tap's matrix product needs 1 ms (ResNet-18's
`layer4`, 200 rows). Cutting the taps that read only padding, and running a convolution with a single
output position as the linear map of its window, gives the same outputs and gradients to float
rounding (a cut tap's gradient is exactly zero either way, so Adam leaves it as it was).

Inside the block a cut convolution's `weight` is a Parameter of its live taps alone, written back into
the full kernel on leaving: slicing the full kernel every step made autograd zero-fill and copy a
full-size gradient (ResNet-18's `layer4`: 15 of a step's 25 ms) and Adam update nine taps for one.
So an optimiser must take its parameters inside the block.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class SmallMapPlan:
    """How one convolution runs on inputs of `input_size`: the live taps of its kernel, the padding
    (left, right, top, bottom) that places them, and whether its one output position is a linear map."""

    input_size: tuple[int, int]
    rows: slice
    cols: slice
    padding: tuple[int, int, int, int]
    cut: bool
    linear: bool


@contextmanager
def small_map_convolutions(unit: nn.Module, example: torch.Tensor) -> Iterator[nn.Module]:
    """Inside the block, the plain convolutions of `unit` that a pass on `example` shows to have dead
    taps or a single output position run as their exact smaller form, a cut one's `weight` being its
    live taps (see the module docstring); inputs of another spatial size take the usual path. Outside
    it, the convolutions are as they were, with what the live taps became."""
    plans = {conv: plan for conv, size in _input_sizes(unit, example).items()
             if (plan := plan_small_map(conv, size)) is not None}
    kernels = {conv: conv.weight for conv in plans}
    for conv, plan in plans.items():
        if plan.cut:
            conv.weight = nn.Parameter(conv.weight.detach()[:, :, plan.rows, plan.cols].clone(),
                                       requires_grad=conv.weight.requires_grad)
        conv.forward = functools.partial(_small_map_forward, conv, plan, kernels[conv])
    try:
        yield unit
    finally:
        for conv, plan in plans.items():
            del conv.forward
            if plan.cut:
                with torch.no_grad():
                    kernels[conv][:, :, plan.rows, plan.cols] = conv.weight
                conv.weight = kernels[conv]


def plan_small_map(conv: nn.Conv2d, input_size: tuple[int, int]) -> SmallMapPlan | None:
    """The smaller form of `conv` on inputs of `input_size`, or None when it has none or is not a plain convolution."""
    plain = (type(conv).forward is nn.Conv2d.forward and "forward" not in vars(conv)
             and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))
    if not plain:
        return None
    axes = [_live_taps(*axis) for axis in zip(input_size, conv.kernel_size, conv.stride, conv.padding, conv.dilation)]
    if None in axes:  # no tap reads the input at all: nothing to gain, and no window to cut
        return None
    (first_row, last_row, out_rows, top, bottom), (first_col, last_col, out_cols, left, right) = axes
    cut = (last_row - first_row + 1, last_col - first_col + 1) != tuple(conv.kernel_size)
    # A single output position is the linear map of its window when the window holds the taps and
    # nothing between them (no dilation gaps).
    gapless = all(dilation == 1 or first == last for dilation, first, last in
                  zip(conv.dilation, (first_row, first_col), (last_row, last_col)))
    linear = conv.groups == 1 and out_rows * out_cols == 1 and gapless
    if not (cut or linear):
        return None
    return SmallMapPlan(tuple(input_size), slice(first_row, last_row + 1), slice(first_col, last_col + 1),
                        (left, right, top, bottom), cut, linear)


def _live_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, ...] | None:
    """Along one axis: (first live tap, last live tap, output length, padding before, padding after) for the
    cut kernel, or None when no tap reads the input.

    A tap is live when some output position reads an input position (not padding) with it; the live
    taps are consecutive, since the position a tap reads grows with the tap.
    """
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    live = [tap for tap in range(kernel)
            if any(0 <= position * stride - padding + tap * dilation < size for position in range(outputs))]
    if not live:
        return None
    first, last = live[0], live[-1]
    before = padding - first * dilation
    reach = (outputs - 1) * stride + (last - first) * dilation + 1
    return first, last, outputs, before, reach - size - before


def _small_map_forward(conv: nn.Conv2d, plan: SmallMapPlan, kernel: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """`conv(images)` through the plan (`conv.weight` holds the live taps), or the usual way with the full
    `kernel` for inputs of another size."""
    weight = conv.weight
    if tuple(images.shape[-2:]) != plan.input_size:
        if plan.cut:
            weight = kernel.detach().clone()
            weight[:, :, plan.rows, plan.cols] = conv.weight
        return F.conv2d(images, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if any(plan.padding):
        images = F.pad(images, plan.padding)
    if plan.linear:
        return F.linear(images.flatten(1), weight.flatten(1), conv.bias)[:, :, None, None]
    return F.conv2d(images, weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


@torch.no_grad()
def _input_sizes(unit: nn.Module, example: torch.Tensor) -> dict[nn.Conv2d, tuple[int, int]]:
    """The spatial size of every convolution's input in one pass of `unit` on `example`."""
    sizes: dict[nn.Conv2d, tuple[int, int]] = {}

    def record(conv: nn.Conv2d, args: tuple) -> None:
        sizes.setdefault(conv, tuple(args[0].shape[-2:]))

    handles = [module.register_forward_pre_hook(record) for module in unit.modules() if isinstance(module, nn.Conv2d)]
    try:
        unit(example)
    finally:
        for handle in handles:
            handle.remove()
    return sizes
