"""Unit tests of the edit maths on tiny tensors and modules."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from backdoor_scrub.editing import (
    EditSettings,
    activation_match,
    augment,
    capture,
    copies_for,
    edit_model,
    fallback_method,
    head_layers,
    plan_edit,
    resolve_method,
    trigger_spread,
    unit_of,
)
from backdoor_scrub.errors import ScrubError
from backdoor_scrub.linear_edit import closed_form_linear_edit, scaled_weights
from backdoor_scrub.triggers import Trigger, TriggeredCopies
from tests.tiny_models import TinyCNN

STAGE = ["features.1", "features.2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(head: str = "linear") -> nn.Module:
    """Conv blocks (8x8 -> 2x2 -> 1x1, or 2x2 for the 1x1 Conv2d head), BatchNorm statistics set."""
    torch.manual_seed(0)
    last_kernel = 2 if head == "linear" else 1
    features = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(inplace=True)),
        nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(inplace=True)),
        nn.Sequential(nn.Conv2d(16, 16, last_kernel), nn.BatchNorm2d(16), nn.ReLU(inplace=True)),
    )
    for module in features.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    if head == "linear":
        tail = OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, 3))
    else:
        tail = OrderedDict(fc=nn.Conv2d(16, 3, 1), relu=nn.ReLU(inplace=True), pool=nn.AdaptiveAvgPool2d(1),
                           flat=nn.Flatten())
    return nn.Sequential(OrderedDict(features=features, **tail)).eval()


def corner_trigger() -> Trigger:
    """A white 3x3 patch in the bottom-right corner of an 8x8 image."""
    mask = torch.zeros(1, 8, 8)
    mask[:, 5:, 5:] = 1
    return Trigger(torch.ones(3, 8, 8), mask, "0" * 64)


def images(count: int = 12) -> torch.Tensor:
    return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def objective(w, kt, v, kc, lam, mu, w0):
    return (w @ kt - v).pow(2).sum() + lam * (w @ kc - w0 @ kc).pow(2).sum() + mu * (w - w0).pow(2).sum()


def test_closed_form_maps_keys_to_values_exactly_when_it_can():
    generator = torch.Generator().manual_seed(0)
    shapes = ((5, 8), (8, 3), (5, 3))
    weight, keys, values = (torch.randn(*s, generator=generator, dtype=torch.float64) for s in shapes)
    clean = torch.randn(8, 2, generator=generator, dtype=torch.float64)
    edited = closed_form_linear_edit(weight, keys, values, clean, lam=0.0, mu=1e-9)
    assert not torch.allclose(weight @ keys, values, atol=1e-3)
    torch.testing.assert_close(edited @ keys, values, atol=1e-6, rtol=0)


def test_closed_form_is_the_minimiser():
    generator = torch.Generator().manual_seed(2)
    shapes = ((4, 6), (6, 9), (4, 9), (6, 7))
    weight, kt, v, kc = (torch.randn(*s, generator=generator, dtype=torch.float64) for s in shapes)
    edited = closed_form_linear_edit(weight, kt, v, kc, lam=0.7, mu=0.3).requires_grad_()
    (gradient,) = torch.autograd.grad(objective(edited, kt, v, kc, 0.7, 0.3, weight), edited)
    assert gradient.abs().max() < 1e-9


def test_closed_form_preserves_clean_outputs_when_lam_is_large():
    generator = torch.Generator().manual_seed(3)
    weight, kt, v, kc = (torch.randn(*s, generator=generator) for s in ((5, 8), (8, 3), (5, 3), (8, 4)))
    edited = closed_form_linear_edit(weight, kt, v, kc, lam=1e6, mu=1e-6)
    torch.testing.assert_close(edited @ kc, weight @ kc, atol=1e-3, rtol=0)
    assert (edited @ kt - v).norm() < 0.5 * (weight @ kt - v).norm()


def test_capture_keeps_outputs_from_before_an_in_place_relu():
    model = tiny_model()
    captured = capture(model, ["features.0.0"], images(4))["features.0.0"]
    torch.testing.assert_close(captured.outputs, model.features[0][0](captured.inputs))
    assert (captured.outputs < 0).any()


def test_activation_matching_reduces_the_stamped_clean_gap_and_keeps_batchnorm_stats():
    model = tiny_model()
    clean_images = images()
    stamped_images = corner_trigger().stamp(clean_images)
    clean = capture(model, ["features.1", "features.2"], clean_images)
    stamped = capture(model, ["features.1", "features.2"], stamped_images)
    before = (stamped["features.2"].outputs - clean["features.2"].outputs).pow(2).mean()
    running_mean = model.features[1][1].running_mean.clone()
    unit = unit_of(model, STAGE, (3, 8, 8))
    settings = EditSettings(steps=60, lr=3e-3)
    activation_match(unit, clean["features.1"].inputs, stamped["features.1"].inputs, clean["features.2"].outputs,
                     settings, seed=0)
    with torch.no_grad():
        after = (unit(stamped["features.1"].inputs) - clean["features.2"].outputs).pow(2).mean()
    assert after < 0.2 * before
    assert torch.equal(model.features[1][1].running_mean, running_mean)


def test_activation_matching_runs_more_rounds_until_fitted():
    model = tiny_model()
    clean_images = images()
    clean = capture(model, ["features.1", "features.2"], clean_images)
    stamped = capture(model, ["features.1"], corner_trigger().stamp(clean_images))
    arguments = (clean["features.1"].inputs, stamped["features.1"].inputs, clean["features.2"].outputs,
                 EditSettings(steps=4, stage_rounds=3), 0)
    calls = []
    assert activation_match(unit_of(tiny_model(), STAGE, (3, 8, 8)), *arguments, fitted=lambda: True) == 4
    assert activation_match(unit_of(model, STAGE, (3, 8, 8)), *arguments,
                            fitted=lambda: calls.append(1) or len(calls) == 2) == 8
    assert activation_match(unit_of(tiny_model(), STAGE, (3, 8, 8)), *arguments, fitted=lambda: False) == 12


def test_activation_matching_runs_single_position_convolutions_in_their_small_map_form():
    model = tiny_model()  # features.2: a 2x2 kernel on a 2x2 map, one output position
    clean_images = images()
    clean = capture(model, ["features.1", "features.2"], clean_images)
    stamped = capture(model, ["features.1"], corner_trigger().stamp(clean_images))
    last = model.features[2][0]
    inside = []
    activation_match(unit_of(model, STAGE, (3, 8, 8)), clean["features.1"].inputs, stamped["features.1"].inputs,
                     clean["features.2"].outputs, EditSettings(steps=2, stage_rounds=1), 0,
                     fitted=lambda: inside.append("forward" in vars(last)) or True)
    assert inside == [True]
    assert "forward" not in vars(last)


def test_an_activation_matching_step_is_bounded_by_the_stages_weight_scale():
    model = tiny_model()
    with torch.no_grad():
        for parameter in model.features[1:].parameters():
            if parameter.dim() > 1:
                parameter.mul_(0.01)
    clean_images = images()
    clean = capture(model, ["features.1", "features.2"], clean_images)
    stamped = capture(model, ["features.1"], corner_trigger().stamp(clean_images))
    unit = unit_of(model, STAGE, (3, 8, 8))
    weights = [p for p in unit.parameters() if p.dim() > 1]
    rms = torch.cat([p.detach().flatten() for p in weights]).pow(2).mean().sqrt().item()
    before = [p.detach().clone() for p in weights]
    settings = EditSettings(steps=1, stage_rounds=1, lr=3e-3, max_relative_step=0.15)
    activation_match(unit, clean["features.1"].inputs, stamped["features.1"].inputs, clean["features.2"].outputs,
                     settings, 0)
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(weights, before))
    assert 0.15 * rms < settings.lr  # the cap applies: Adam's first step moves a weight by about its lr
    assert moved == pytest.approx(0.15 * rms, rel=0.05)


@pytest.mark.parametrize("method", ["closed-form", "activation-match", "direction-erasure"])
def test_edit_model_leaves_the_input_model_unchanged(method):
    model = tiny_model()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    settings = EditSettings(steps=5, min_samples=0)
    edited, record = edit_model(model, images(), corner_trigger(), STAGE + ["fc"], method, settings)
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert any(not torch.equal(state[name], tensor) for name, tensor in edited.state_dict().items())
    assert record.method == method and record.seconds >= 0


@pytest.mark.parametrize("stage", [STAGE, ["features"]])
def test_edit_model_narrows_the_stamped_clean_output_gap(stage):
    model = tiny_model()
    clean_images = images()
    stamped_images = corner_trigger().stamp(clean_images)
    edited, record = edit_model(model, clean_images, corner_trigger(), stage + ["fc"], "activation-match",
                                EditSettings(steps=60, lr=3e-3, min_samples=0))
    with torch.no_grad():
        reference = model(clean_images)
        before = (model(stamped_images) - reference).pow(2).mean()
        after = (edited(stamped_images) - reference).pow(2).mean()
    assert after < 0.2 * before
    assert record.layers == stage + ["fc"]


def test_augment_keeps_the_originals_and_adds_seeded_shifted_copies():
    batch = images(4)
    augmented = augment(batch, 3, seed=0)
    assert augmented.shape == (12, 3, 8, 8)
    assert torch.equal(augmented[:4], batch)
    assert not torch.equal(augmented[4:8], batch)
    assert torch.equal(augmented, augment(batch, 3, seed=0))


def test_few_samples_are_augmented_with_a_stamp_but_never_with_triggered_copies():
    batch = images(4)
    stamp = Trigger(torch.ones(3, 8, 8), torch.zeros(1, 8, 8), "none")
    copies = TriggeredCopies(batch.flip(-1), "folder", "sha")
    assert copies_for(4, 100, [stamp]) == 25
    assert copies_for(4, 100, [copies]) == 1
    assert copies_for(400, 100, [stamp]) == 1


def test_closed_form_on_a_1x1_conv_head_treats_positions_as_columns():
    model = tiny_model(head="conv")
    clean_images = images()
    stamped_images = corner_trigger().stamp(clean_images)
    settings = EditSettings(lam=2.0, mu=1e-3, min_samples=0, calibrate=False)
    edited, record = edit_model(model, clean_images, corner_trigger(), STAGE + ["fc"], "closed-form", settings)

    def columns(x):  # [N, C, 2, 2] -> [C + 1, N * 4], the constant 1 for the bias last
        flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
        return torch.cat([flat, torch.ones(1, flat.shape[1])])

    with torch.no_grad():
        keys_t, keys_c = columns(model.features(stamped_images)), columns(model.features(clean_images))
        values = columns(model.fc(model.features(clean_images)))[:-1]
    assert keys_t.shape[1] == 4 * len(clean_images)
    weight = torch.cat([model.fc.weight.detach().flatten(1), model.fc.bias.detach()[:, None]], 1)
    lam, mu = scaled_weights(keys_t, keys_c, settings.lam, settings.mu)
    expected = closed_form_linear_edit(weight, keys_t, values, keys_c, lam, mu, values_clean=values)
    torch.testing.assert_close(edited.fc.weight.detach().flatten(1), expected[:, :-1])
    torch.testing.assert_close(edited.fc.bias.detach(), expected[:, -1])
    assert record.layers == ["fc"]


def test_same_seed_gives_identical_weights_and_another_seed_differs():
    model = tiny_model()
    settings = EditSettings(steps=10, lr=1e-2, batch_size=4, min_samples=16)

    def run(seed):
        edited, _ = edit_model(model, images(), corner_trigger(), STAGE + ["fc"], "activation-match", settings, seed)
        return edited.state_dict()

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_plan_splits_stage_and_head_by_method():
    model = tiny_model()
    assert plan_edit(model, STAGE + ["fc"], "closed-form") == ([], ["fc"])
    assert plan_edit(model, STAGE + ["fc"], "activation-match") == (STAGE, ["fc"])
    assert plan_edit(model, ["fc"], "activation-match") == (["fc"], [])
    assert plan_edit(model, STAGE + ["fc"], "direction-erasure") == ([], ["fc"])
    with pytest.raises(ScrubError):
        plan_edit(model, STAGE, "closed-form")
    with pytest.raises(ScrubError, match="direction-erasure edits Linear or 1x1 Conv2d layers"):
        plan_edit(model, STAGE, "direction-erasure")
    with pytest.raises(ScrubError):
        plan_edit(model, ["features.9"], "activation-match")
    with pytest.raises(ScrubError):
        plan_edit(model, STAGE + ["fc"], "auto")  # resolve_method turns auto into a method first


def test_the_head_is_the_trailing_linear_maps_of_the_layers_named():
    assert head_layers(tiny_model(), STAGE + ["fc"]) == 1
    assert head_layers(tiny_model(), STAGE) == 0
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=10)
    assert head_layers(mobilenet, ["features.12", "classifier.0", "classifier.3"]) == 2
    assert plan_edit(mobilenet, ["features.12", "classifier.0", "classifier.3"], "direction-erasure") == (
        [], ["classifier.0"])


def test_auto_matches_activations_for_a_spread_trigger_erases_a_reconstruction_and_keeps_explicit_methods():
    assert resolve_method("auto", spread=1.0, samples=30, classes=10) == "activation-match"
    assert resolve_method("auto", spread=1.0, samples=29, classes=10) == "closed-form"  # under 3 per class
    assert resolve_method("auto", spread=0.2, samples=100, classes=10) == "closed-form"
    assert resolve_method("auto", spread=0.0, samples=100, classes=10, reconstructed=True) == "direction-erasure"
    assert resolve_method("auto", spread=0.0, samples=29, classes=10, reconstructed=True) == "direction-erasure"
    assert resolve_method("auto", spread=0.0, samples=10, classes=10,
                          reconstructed=True) == "direction-erasure"  # a regression, not a retraining: 1 per class will do
    assert resolve_method("activation-match", spread=0.0, samples=10, classes=10) == "activation-match"
    assert resolve_method("closed-form", spread=1.0, samples=100, classes=10) == "closed-form"


def test_auto_falls_back_to_the_other_method_for_a_given_trigger_or_a_reconstruction_only():
    given = dict(given=True, reconstructed=False, head_layers=1)
    scanned = dict(given=False, reconstructed=True)
    assert fallback_method("closed-form", 100, 10, **given) == "activation-match"
    assert fallback_method("closed-form", 29, 10, **given) is None  # under 3 per class the retraining overfits
    assert fallback_method("closed-form", 100, 10, given=False, reconstructed=False, head_layers=1) is None  # poisoned
    assert fallback_method("closed-form", 100, 10, **scanned, head_layers=1) is None
    assert fallback_method("direction-erasure", 100, 10, **scanned, head_layers=2) == "closed-form"
    # a one-layer head: the stage's retraining (itself checked against the closed form), given 3 samples per class
    assert fallback_method("direction-erasure", 100, 10, **scanned, head_layers=1) == "activation-match"
    assert fallback_method("direction-erasure", 29, 10, **scanned, head_layers=1) == "closed-form"
    assert fallback_method("direction-erasure", 100, 10, **given) is None  # asked for by name: no auto, no fallback
    assert fallback_method("activation-match", 100, 10, **scanned, head_layers=1) == "closed-form"
    assert fallback_method("activation-match", 100, 10, **given) is None  # a spread trigger's retraining stays


def test_trigger_spread_is_the_bounding_box_of_the_changed_pixels():
    clean = torch.rand(3, 3, 10, 10)
    patch = clean.clone()
    patch[:, :, 2:4, 5:9] += 0.5  # 2 x 4 pixels
    assert trigger_spread(clean, patch) == pytest.approx(0.08)
    assert trigger_spread(clean, clean + 0.2) == 1.0  # a blend-like shift everywhere
    warp = clean.clone()
    warp[:, 0, 1, 1] += 0.5
    warp[:, 2, 8, 9] += 0.5  # two changed pixels far apart: a box of 8 x 9
    assert trigger_spread(clean, warp) == pytest.approx(0.72)
    assert trigger_spread(clean, clean + 0.01) == 0.0  # under 1/32 of the value range: re-encoding noise


def test_a_stage_must_be_consecutive_children_of_one_sequential():
    model = tiny_model()
    assert isinstance(unit_of(model, ["features.0", "features.1"], (3, 8, 8)), nn.Sequential)
    with pytest.raises(ScrubError):
        unit_of(model, ["features.0", "features.2"], (3, 8, 8))
    with pytest.raises(ScrubError):
        unit_of(model, ["features.2", "fc"], (3, 8, 8))


def test_a_stage_of_another_module_is_accepted_only_where_each_child_feeds_the_next():
    model = TinyCNN(3).eval()
    unit = unit_of(model, ["stem", "stage"], (3, 16, 16))  # TinyCNN.forward passes stem's output to stage
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(unit(x), model.stage(model.stem(x)))
    with pytest.raises(ScrubError, match="output of the one before"):
        unit_of(model, ["pool", "fc"], (3, 16, 16))  # the pooled map is flattened on the way to fc


def test_a_sequential_head_chain_gives_the_weights_of_the_general_path(monkeypatch):
    model = tiny_model()
    model.fc = nn.Sequential(nn.Linear(16, 12), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(12, 12),
                             nn.ReLU(inplace=True), nn.Linear(12, 3)).eval()
    chain = ["fc.0", "fc.3", "fc.5"]
    settings = EditSettings(min_samples=24)
    labels = torch.arange(12) % 3

    def run():
        edited, record = edit_model(model, images(), corner_trigger(), chain, "closed-form", settings, labels=labels)
        return edited.state_dict(), record.calibration

    segmented, segmented_choice = run()
    monkeypatch.setattr("backdoor_scrub.chain_edit._segments", lambda head, layers: None)
    general, general_choice = run()
    assert segmented_choice["chosen"] == general_choice["chosen"]
    assert any(not torch.equal(segmented[name], model.state_dict()[name]) for name in segmented)
    for name, tensor in general.items():
        torch.testing.assert_close(segmented[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
