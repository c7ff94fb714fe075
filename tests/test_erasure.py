"""The direction erasure: its maths on planted directions, and the edit it makes through edit_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoor_scrub.editing import EditSettings, edit_model
from backdoor_scrub.erasure import _ridge, erasure_update, trigger_direction
from backdoor_scrub.linear_edit import apply_update
from backdoor_scrub.triggers import Trigger

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(features: int = 12, samples: int = 40, seed: int = 0):
    """Clean key columns whose coordinate along a unit direction is a linear function of the others, and that direction."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(features, generator=generator, dtype=torch.float64), dim=0)
    others = torch.randn(features, samples, generator=generator, dtype=torch.float64)
    others -= torch.outer(direction, direction @ others)  # orthogonal to the direction
    reading = torch.randn(features, generator=generator, dtype=torch.float64)
    reading -= direction * (direction @ reading)
    clean = others + torch.outer(direction, reading @ others + 0.5)
    return clean, direction


@pytest.mark.parametrize("samples", [8, 40])  # fewer columns than features, then more
def test_the_trigger_direction_is_the_one_the_stamped_keys_move_in_whatever_the_length(samples):
    clean, direction = planted(samples=samples)
    lengths = torch.linspace(1.0, 5.0, clean.shape[1], dtype=torch.float64)
    noise = 1e-3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    found = trigger_direction(clean, clean + torch.outer(direction, lengths) + noise)
    assert abs(float(found @ direction)) == pytest.approx(1.0, abs=1e-5)
    assert found.norm() == pytest.approx(1.0)


def test_the_erased_layer_ignores_any_step_along_the_direction_and_keeps_clean_outputs():
    clean, direction = planted()
    weight = torch.randn(5, clean.shape[0] + 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    edited = apply_update(weight, erasure_update(weight, clean, direction, ridge=1e-9, with_bias=True))
    with_bias = lambda keys: torch.cat([keys, keys.new_ones(1, keys.shape[1])])  # noqa: E731
    for length in (1.0, 30.0, -4.0):
        stamped = clean + length * direction[:, None]
        assert torch.allclose(edited @ with_bias(stamped), edited @ with_bias(clean), atol=1e-8)
    # the coordinate is the others' linear function here, so the regression reads it back exactly
    assert torch.allclose(edited @ with_bias(clean), weight @ with_bias(clean), atol=1e-5)
    assert not torch.allclose(weight @ with_bias(clean + 3 * direction[:, None]), weight @ with_bias(clean))


def test_a_larger_ridge_reads_the_clean_mean_along_the_direction():
    clean, direction = planted()
    weight = torch.randn(3, clean.shape[0] + 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    edited = apply_update(weight, erasure_update(weight, clean, direction, ridge=1e9, with_bias=True))
    mean_input = clean.mean(1)
    projected = clean - torch.outer(direction, direction @ clean) + torch.outer(direction, (direction @ clean).mean()
                                                                               .expand(clean.shape[1]))
    expected = weight[:, :-1] @ projected + weight[:, -1:]
    got = edited[:, :-1] @ clean + edited[:, -1:]
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(edited[:, :-1] @ mean_input + edited[:, -1], weight[:, :-1] @ mean_input + weight[:, -1],
                          atol=1e-6)


@pytest.mark.parametrize("samples", [5, 30])  # fewer columns than features: the sample-space system
def test_the_ridge_regression_is_the_same_in_either_system(samples):
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(12, samples, generator=generator, dtype=torch.float64)
    target = torch.randn(samples, generator=generator, dtype=torch.float64)
    direct = torch.linalg.solve(features @ features.T + 0.3 * torch.eye(12, dtype=torch.float64), features @ target)
    assert torch.allclose(_ridge(features, target, 0.3), direct, atol=1e-10)


def test_edit_model_erases_the_direction_in_the_first_head_layer_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    inputs = torch.rand(30, 3, 4, 4)
    inputs[:, :, :2, :2] = 0  # a dark corner: the patch moves every sample's input by the same step
    mask = torch.zeros(1, 4, 4)
    mask[:, :2, :2] = 1
    trigger = Trigger(torch.ones(3, 4, 4), mask, "")
    settings = EditSettings(folds=3, erasure_min_samples=0, input_strengths=())
    labels = torch.arange(30) % 3
    edited, record = edit_model(model, inputs, trigger, ["1", "3"], "direction-erasure", settings, 0, labels, 0)
    assert record.method == "direction-erasure" and record.layers == ["1"]
    assert set(record.calibration["chosen"]) == {"ridge"}
    assert [c["ridge"] for c in record.calibration["candidates"]] == list(settings.erasure_ridges)
    assert torch.equal(edited[3].weight, model[3].weight)
    unseen = torch.rand(20, 3, 4, 4)
    unseen[:, :, :2, :2] = 0
    with torch.no_grad():
        gap_before = (model(trigger.stamp(unseen)) - model(unseen)).abs().max()
        gap_after = (edited(trigger.stamp(unseen)) - edited(unseen)).abs().max()
    assert gap_after < 1e-3 * gap_before
