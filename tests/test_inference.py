"""Batched passes: the channels-last layout used on CPU for models with grouped convolutions."""

from __future__ import annotations

import torch
from torch import nn

from backdoor_scrub.head import Head
from backdoor_scrub.inference import fast_layout, forward_batched

CPU = torch.device("cpu")


def _grouped() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_a_grouped_model_runs_channels_last_inside_the_block_and_gets_its_layout_back():
    model, images = _grouped(), torch.rand(5, 3, 12, 12)
    expected = model(images)
    with fast_layout(model, CPU):
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not model[0].weight.is_contiguous()
        inside = model(images)
    assert all(p.is_contiguous() for p in model.parameters())
    assert torch.allclose(inside, expected, atol=1e-5)


def test_a_model_without_grouped_convolutions_is_left_as_it_is():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(2)).eval()
    model(torch.rand(1, 3, 6, 6))
    with fast_layout(model, CPU):
        assert model[0].weight.is_contiguous()


def test_weights_relaid_in_inference_mode_still_serve_a_pass_with_gradients():
    model, images = _grouped(), torch.rand(5, 3, 12, 12)
    with torch.inference_mode():
        forward_batched(model, images, batch_size=2)
    assert not any(p.is_inference() for p in model.parameters())
    probe = images.clone().requires_grad_(True)
    model(probe).sum().backward()  # raised "Inference tensors cannot be saved for backward" before
    assert probe.grad.abs().sum() > 0


def test_an_inner_block_for_the_same_model_keeps_the_outer_layout_until_the_outer_block_ends():
    model, images = _grouped(), torch.rand(5, 3, 12, 12)
    with fast_layout(model, CPU):
        forward_batched(model, images, batch_size=2)  # a pass inside: its own block must not undo the outer one
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous() for p in model.parameters())


def test_the_heads_cached_features_come_from_a_pass_in_the_fast_layout():
    model, images = _grouped(), torch.rand(5, 3, 12, 12)
    layouts = []
    model[0].register_forward_pre_hook(
        lambda conv, _args: layouts.append(conv.weight.is_contiguous(memory_format=torch.channels_last)))
    features = Head(model[5], "5").features(model, images, batch_size=2)
    assert layouts == [True, True, True]  # every batch of the backbone's pass
    assert all(p.is_contiguous() for p in model.parameters())
    expected = model[:5](images)
    assert torch.allclose(features, expected, atol=1e-5)
