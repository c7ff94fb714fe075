"""The edit of the input convolution: the solve is the least-squares edit, it finds the right layer, and it
removes a trigger that the first convolution detects without touching clean outputs."""

import torch
from torch import nn
from torch.nn import functional as F

from backdoor_scrub.calibration import HeldOut
from backdoor_scrub.chain_edit import Strength
from backdoor_scrub.editing import EditSettings, edit_model
from backdoor_scrub.input_edit import choose_input_edit, fit_input_edit, input_convolution, patch_grams
from backdoor_scrub.linear_edit import linear_weight
from backdoor_scrub.triggers import Trigger
from tests.tiny_models import TinyCNN


def red_corner(size: int = 16, side: int = 3) -> Trigger:
    """A pure red square in the top-left corner."""
    mask = torch.zeros(1, size, size)
    mask[:, :side, :side] = 1
    return coloured(0, mask, "red-corner")


def coloured(channel: int, mask: torch.Tensor, name: str) -> Trigger:
    """A trigger of one pure colour channel under `mask`."""
    pattern = torch.zeros(3, *mask.shape[-2:])
    pattern[channel] = 1
    return Trigger(pattern, mask, name)


def grey_images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random grey images (the three channels equal), as Fashion-MNIST is fed to an RGB model."""
    grey = torch.rand(count, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return grey.repeat(1, 3, 1, 1)


def test_the_solve_from_per_fold_sums_is_the_stacked_least_squares_edit():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    clean = torch.randn(5, 3, 8, 8)
    # A family of two triggers; 5 rows in batches of 2, so the last batch is short.
    stamped = torch.cat([red_corner(8, 3).stamp(clean), red_corner(8, 2).stamp(clean.flip(-1)).flip(-1)])
    original = linear_weight(conv).clone()
    grams = patch_grams(conv, clean, stamped, torch.tensor([0, 1, 0, 1, 0]), 2, batch_size=16)
    strength = Strength(lam=3.0, mu=1e-3)
    fit_input_edit(conv, original, grams, torch.arange(2), strength)

    unfold = lambda x: F.unfold(x.double(), 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)  # noqa: E731
    with_one = lambda k: torch.cat([k, torch.ones(len(k), 1, dtype=k.dtype)], 1)  # noqa: E731
    keys_clean, keys_stamped = with_one(unfold(clean.repeat(2, 1, 1, 1))), with_one(unfold(stamped))
    changed = (keys_stamped - keys_clean).abs().amax(1) > 1e-6
    w = original.double().T
    energy = keys_clean.pow(2).sum(1).mean()
    lam = (strength.lam / len(keys_clean)) ** 0.5  # a mean over positions: the repeat leaves it as it is
    rows = [keys_stamped[changed] / changed.sum().sqrt(), keys_clean * lam,
            torch.eye(28, dtype=torch.float64) * (strength.mu * energy).sqrt()]
    targets = [keys_clean[changed] @ w / changed.sum().sqrt(), keys_clean @ w * lam,
               w * (strength.mu * energy).sqrt()]
    expected = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    assert 0 < changed.sum() < len(changed)
    torch.testing.assert_close(linear_weight(conv).double(), expected, rtol=1e-4, atol=1e-5)


def test_the_input_convolution_is_found_only_where_it_reads_the_image_itself():
    probe = torch.rand(2, 3, 16, 16)
    assert input_convolution(TinyCNN(3), probe) == "stem.0"

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinyCNN(3)

        def forward(self, x):
            return self.inner(2 * x)

    grouped = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.Flatten(), nn.LazyLinear(3))
    assert input_convolution(Scaled(), probe) is None
    assert input_convolution(grouped, probe) is None


def backdoored_in_the_stem(target: int) -> TinyCNN:
    """A random tiny CNN whose stem channel 0 (the detector) fires only on red, carried by the skips to a
    large target weight."""
    torch.manual_seed(1)
    model = TinyCNN(4).eval()
    with torch.no_grad():
        stem = model.stem[0]
        stem.weight[0] = 0
        stem.weight[0, :, 1, 1] = torch.tensor([1.0, -0.5, -0.5])
        stem.bias[0] = -0.2
        for block in model.stage:
            block.conv1.weight[:, 0] = 0
            block.conv2.weight[0] = 0
            block.conv2.bias[0] = 0
        model.fc.weight[:, 0] = 0
        model.fc.weight[target, 0] = 100.0
    return model


@torch.no_grad()
def test_a_trigger_the_first_convolution_detects_is_unlearned_there_and_clean_outputs_are_kept():
    target = 2
    model = backdoored_in_the_stem(target)
    samples, test = grey_images(40, seed=0), grey_images(200, seed=1)
    trigger = red_corner()
    clean_before = model(test).argmax(1)
    assert (model(trigger.stamp(test)).argmax(1) == target).float().mean() == 1

    settings = EditSettings(folds=4, min_samples=40)
    edited, record = edit_model(model, samples, trigger, ["fc"], "closed-form", settings, 0,
                                model(samples).argmax(1), target)

    assert record.layers[0] == "stem.0" and record.calibration["input_layer"]["chosen"] is not None
    detector_before = model.stem(trigger.stamp(test))[:, 0]
    detector_after = edited.stem(trigger.stamp(test))[:, 0]
    assert detector_after.max() < 0.05 * detector_before.max()
    torch.testing.assert_close(edited.stem(test), model.stem(test), atol=0.01, rtol=0)
    flips = (edited(trigger.stamp(test)).argmax(1) == target) & (clean_before != target)
    assert flips.float().mean() < 0.02
    assert (edited(test).argmax(1) == clean_before).float().mean() > 0.97


def edit_planted(trigger: Trigger) -> tuple[nn.Module, nn.Module, dict]:
    """(the red-detector model, its edit with `trigger` from 40 grey samples, the input layer's report)."""
    model = backdoored_in_the_stem(target=2)
    samples = grey_images(40)
    edited, record = edit_model(model, samples, trigger, ["fc"], "closed-form", EditSettings(folds=4, min_samples=40),
                                0, model(samples).argmax(1), 2)
    assert record.layers == ["fc"]
    return model, edited, record.calibration["input_layer"]


@torch.no_grad()
def test_a_trigger_over_the_whole_image_is_not_a_patch_and_the_input_convolution_is_left_alone():
    model, edited, first = edit_planted(coloured(0, torch.full((1, 16, 16), 0.2), "red-blend"))
    assert first["chosen"] is None and first["changed_positions"] == 1.0 and "not a patch" in first["reason"]
    torch.testing.assert_close(edited.stem[0].weight, model.stem[0].weight, rtol=0, atol=0)


@torch.no_grad()
def test_a_trigger_that_flips_nothing_leaves_the_input_convolution_alone_without_trying():
    mask = torch.zeros(1, 16, 16)
    mask[:, :3, :3] = 1
    _, _, first = edit_planted(coloured(1, mask, "green-corner"))
    assert first["chosen"] is None and "flips none" in first["reason"] and "candidates" not in first


def held_out(flips: int, correct: int, changed: int) -> HeldOut:
    """Held-out scores of 100 samples, 85 of which the trigger could flip."""
    return HeldOut(images=100, victims=85, flips=flips, residual=float(flips), changed=changed, correct=correct)


def test_an_input_edit_that_costs_held_out_accuracy_is_not_kept_however_many_flips_it_stops():
    left = held_out(flips=85, correct=85, changed=0)
    # VGG-11-BN with a checkerboard: the strong edit stops 58% of the flips and gets 8 samples fewer right.
    assert choose_input_edit([held_out(36, 77, 28), held_out(83, 84, 10), left], 0.5, 0.02) == 2
    # Two samples fewer right is within 2% of 100: the edit that stops every flip is kept.
    assert choose_input_edit([held_out(0, 83, 3), held_out(1, 85, 1), left], 0.5, 0.02) == 0
    # Free, but it leaves more than half of the flips: not an edit of the trigger's entry.
    assert choose_input_edit([held_out(50, 85, 0), left], 0.5, 0.02) == 1
    assert choose_input_edit([held_out(36, 77, 28), left], 0.5, 0.1) == 0
