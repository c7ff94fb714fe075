"""Convolutions on tiny maps run in their exact smaller form inside the block, and as before outside it."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from backdoor_scrub.small_maps import plan_small_map, small_map_convolutions

# (in, out, kernel, stride, padding, dilation, groups, bias, input side): dead taps, a single output
# position, both, neither, strided and dilated kernels, depthwise, and maps of 1-3 pixels.
CASES = [
    (8, 6, 3, 1, 1, 1, 1, False, 1),  # 1x1 map: only the centre tap lives, one position -> linear
    (8, 6, 3, 2, 1, 1, 1, True, 2),  # strided 2x2 -> 1x1: taps 1-2 live
    (8, 6, 5, 1, 2, 1, 1, False, 2),  # 2x2 map, 5x5 kernel: taps 1-3 live, four positions
    (8, 8, 5, 1, 2, 1, 8, False, 1),  # depthwise on 1x1: cut, stays a (grouped) convolution
    (8, 8, 3, 1, 1, 1, 8, True, 2),  # depthwise on 2x2: every tap lives -> no plan
    (8, 6, 1, 1, 0, 1, 1, True, 1),  # 1x1 kernel, one position -> linear
    (8, 6, 3, 1, 2, 2, 1, False, 2),  # dilated on 2x2: only the centre tap lives, four positions
    (8, 6, 3, 1, 1, 1, 1, False, 3),  # 3x3 map: nothing to cut, nine positions -> no plan
    (8, 6, 3, 1, 0, 2, 1, True, 5),  # dilated, one position, every tap live: gaps in the window -> no plan
]


@pytest.mark.parametrize("case", CASES)
def test_the_smaller_form_gives_the_same_outputs_and_gradients(case):
    channels, out, kernel, stride, padding, dilation, groups, bias, side = case
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, out, kernel, stride, padding, dilation, groups, bias)
    images = torch.randn(5, channels, side, side, requires_grad=True)
    expected = conv(images)
    expected_weight, expected_input = torch.autograd.grad(expected.pow(3).sum(), [conv.weight, images])

    plan = plan_small_map(conv, (side, side))
    live = (slice(None), slice(None), plan.rows, plan.cols) if plan else (...,)
    with small_map_convolutions(conv, images[:1]):
        assert ("forward" in vars(conv)) == (plan is not None)
        got = conv(images)
        weight_grad, input_grad = torch.autograd.grad(got.pow(3).sum(), [conv.weight, images])

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight_grad, expected_weight[live], rtol=1e-5, atol=1e-5)  # the live taps' gradient
    dead = torch.ones_like(expected_weight, dtype=torch.bool)
    dead[live] = False
    assert not expected_weight[dead].any()  # what was cut has no gradient
    torch.testing.assert_close(input_grad, expected_input, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(conv)


def test_plans_cut_dead_taps_and_make_single_positions_linear():
    centre = plan_small_map(nn.Conv2d(4, 4, 3, padding=1), (1, 1))
    assert (centre.rows, centre.cols, centre.padding, centre.linear) == (slice(1, 2), slice(1, 2), (0, 0, 0, 0), True)
    strided = plan_small_map(nn.Conv2d(4, 4, 3, stride=2, padding=1), (2, 2))
    assert (strided.rows, strided.padding, strided.linear) == (slice(1, 3), (0, 0, 0, 0), True)
    depthwise = plan_small_map(nn.Conv2d(4, 4, 5, padding=2, groups=4), (1, 1))
    assert (depthwise.rows, depthwise.linear) == (slice(2, 3), False)
    assert plan_small_map(nn.Conv2d(4, 4, 3, padding=1), (8, 8)) is None
    assert plan_small_map(nn.Conv2d(4, 4, 3, padding="same"), (1, 1)) is None
    assert plan_small_map(nn.Conv2d(4, 4, 1, stride=2, padding=1), (1, 1)) is None  # every tap reads padding


def test_a_cut_tap_is_left_exactly_as_it_was_by_adam():
    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 3, padding=1))
    reference = copy.deepcopy(unit)
    initial = [conv.weight.detach().clone() for conv in (unit[0], unit[2])]
    inputs = torch.randn(16, 6, 1, 1)
    for model, block in ((reference, contextlib.nullcontext()), (unit, small_map_convolutions(unit, inputs[:1]))):
        with block:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # inside: the live taps' parameters
            assert ("forward" in vars(model[0])) == (model is unit)
            for _ in range(20):
                optimizer.zero_grad()
                model(inputs).pow(2).mean().backward()
                optimizer.step()
    centre = torch.zeros(3, 3, dtype=torch.bool)
    centre[1, 1] = True
    for conv, before in zip((unit[0], unit[2]), initial):
        assert torch.equal(conv.weight.detach()[:, :, ~centre], before[:, :, ~centre])
        assert not torch.equal(conv.weight.detach()[:, :, centre], before[:, :, centre])
    for fast, slow in zip(unit.parameters(), reference.parameters()):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_inputs_of_another_size_take_the_usual_path_and_custom_convolutions_are_left_alone():
    class Doubled(nn.Conv2d):
        def forward(self, images):
            return 2 * super().forward(images)

    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), Doubled(4, 4, 3, padding=1))
    with small_map_convolutions(unit, torch.randn(1, 4, 1, 1)):
        assert "forward" in vars(unit[0]) and "forward" not in vars(unit[1])
        larger = torch.randn(2, 4, 5, 5)
        got = unit(larger)
    assert "forward" not in vars(unit[0])
    torch.testing.assert_close(got, unit(larger))


def test_inside_the_block_a_cut_kernel_is_its_live_taps_and_they_are_written_back():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    kernel = conv.weight
    before = kernel.detach().clone()
    larger = torch.randn(2, 4, 5, 5)
    with small_map_convolutions(conv, torch.randn(1, 4, 1, 1)):
        assert conv.weight.shape == (3, 4, 1, 1) and conv.weight is not kernel
        with torch.no_grad():
            conv.weight += 1.0
        on_larger = conv(larger)  # another size: the full kernel, with the live taps as they are now
    assert conv.weight is kernel
    centre = torch.zeros(3, 3, dtype=torch.bool)
    centre[1, 1] = True
    assert torch.equal(kernel.detach()[:, :, centre], before[:, :, centre] + 1)
    assert torch.equal(kernel.detach()[:, :, ~centre], before[:, :, ~centre])
    torch.testing.assert_close(on_larger, conv(larger))
