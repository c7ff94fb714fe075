"""Self-calibration and the sample-space solve: folds, scores, choices, the head tail, exactness of both forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoor_scrub.calibration import (
    HeldOut,
    choose_edit,
    choose_repair,
    erases_target,
    fold_ids,
    held_out_errors,
    held_out_shortfall,
    score_held_out,
)
from backdoor_scrub.editing import EditSettings, edit_model
from backdoor_scrub.head import find_head
from backdoor_scrub.linear_edit import closed_form_linear_edit, ridge_update
from backdoor_scrub.repair import RepairSettings, repair_model
from tests.test_editing import corner_trigger, images, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def feature_space_edit(weight, kt, v, kc, lam, mu):
    """The textbook form (V Kt^T + lam W Kc Kc^T + mu W)(Kt Kt^T + lam Kc Kc^T + mu I)^-1."""
    system = kt @ kt.T + lam * kc @ kc.T + mu * torch.eye(weight.shape[1], dtype=weight.dtype)
    return (v @ kt.T + lam * weight @ kc @ kc.T + mu * weight) @ torch.linalg.inv(system)


def test_the_sample_space_form_gives_the_feature_space_weights_when_inputs_outnumber_columns():
    generator = torch.Generator().manual_seed(4)
    weight, kt, v, kc = (torch.randn(*s, generator=generator, dtype=torch.float64)
                         for s in ((6, 40), (40, 5), (6, 5), (40, 7)))
    assert ridge_update(torch.randn(6, 12, dtype=torch.float64), torch.cat([kt, kc], 1), 0.1).right is not None
    edited = closed_form_linear_edit(weight, kt, v, kc, lam=0.5, mu=0.1)
    torch.testing.assert_close(edited, feature_space_edit(weight, kt, v, kc, 0.5, 0.1), atol=1e-9, rtol=1e-9)


def test_the_feature_space_form_is_used_when_columns_outnumber_inputs():
    generator = torch.Generator().manual_seed(5)
    weight, kt, v, kc = (torch.randn(*s, generator=generator, dtype=torch.float64)
                         for s in ((3, 4), (4, 9), (3, 9), (4, 9)))
    assert ridge_update(torch.randn(3, 18, dtype=torch.float64), torch.cat([kt, kc], 1), 0.1).right is None
    edited = closed_form_linear_edit(weight, kt, v, kc, lam=2.0, mu=0.1)
    torch.testing.assert_close(edited, feature_space_edit(weight, kt, v, kc, 2.0, 0.1), atol=1e-9, rtol=1e-9)


def test_folds_are_stratified_and_one_sample_per_class_spreads_classes_over_folds():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    folds = fold_ids(labels, 5)
    for fold in range(5):
        assert sorted(labels[folds == fold].tolist()) == [0, 1, 2]
    single = fold_ids(torch.arange(10), 5)
    assert torch.bincount(single).tolist() == [2] * 5
    assert fold_ids(torch.tensor([0, 1]), 5).tolist() == [0, 1]


def test_held_out_scores_count_flips_changes_and_accuracy():
    before_clean = torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]])
    before_stamped = torch.tensor([[0, 0, 3.0]] * 4)
    after_clean = torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 0, 3], [0, 3, 0]])  # the last one changed
    after_stamped = torch.tensor([[3.0, 0, 0], [0, 0, 3], [0, 0, 3], [3, 0, 0]])
    labels = torch.tensor([0, 1, 2, 0])
    score = score_held_out(before_clean, before_stamped, after_clean, after_stamped, labels, target=2)
    assert (score.images, score.victims, score.flips, score.changed, score.correct) == (4, 3, 1, 1, 3)
    assert (score.target_images, score.target_correct) == (1, 1)
    assert score.divergence > 0 and 0 < score.residual < 3


def test_the_edit_choice_needs_the_fewest_flips_then_does_the_least_damage():
    scores = [HeldOut(victims=90, flips=0, residual=1.0, changed=5),   # strongest: removes, but damages
              HeldOut(victims=90, flips=0, residual=1.5, changed=1),   # removes, little damage
              HeldOut(victims=90, flips=0, residual=3.0, changed=0),   # leaves too much target probability
              HeldOut(victims=90, flips=4, residual=9.0, changed=0)]   # does not remove the flip
    assert choose_edit(scores) == 1
    assert choose_edit([HeldOut(flips=1, residual=1.0), HeldOut(flips=1, residual=1.0)]) == 1  # a tie: the weaker


def test_an_edit_erases_the_target_when_it_loses_half_its_held_out_samples_and_two_at_least():
    unedited = HeldOut(target_images=10, target_correct=10)
    assert erases_target(HeldOut(target_images=10, target_correct=5), unedited)  # a clean GoogLeNet's false flag
    assert not erases_target(HeldOut(target_images=10, target_correct=6), unedited)  # a real target's worst edit
    assert erases_target(HeldOut(target_images=10, target_correct=2), HeldOut(target_images=10, target_correct=4))
    assert not erases_target(HeldOut(target_images=1, target_correct=0), HeldOut(target_images=1, target_correct=1))
    assert not erases_target(HeldOut(target_images=10, target_correct=9), HeldOut(target_images=10, target_correct=8))


def test_an_edit_falls_short_where_too_many_held_out_samples_flip_or_are_fewer_right_than_unedited():
    def record(correct: int, flips: int = 0) -> dict:
        return {"held_out": HeldOut(images=100, victims=80, flips=flips, correct=correct).as_dict(),
                "held_out_unedited": HeldOut(images=100, victims=80, flips=80, correct=83).as_dict()}

    assert "fewer right" in held_out_shortfall(record(77), 0.05, 0.02)  # a MobileNetV3's retrained stage: 6 fewer
    assert held_out_shortfall(record(81), 0.05, 0.02) is None  # two fewer is within 2%
    assert held_out_shortfall(record(90, flips=4), 0.05, 0.02) is None  # 4 of 80 flips: within 5%
    assert "still flipped" in held_out_shortfall(record(90, flips=5), 0.05, 0.02)
    assert "fewer right" in held_out_shortfall(record(82), 0.05, 0.0)
    assert held_out_shortfall(None, 0.05, 0.02) is None and held_out_shortfall({"held_out": {}}, 0.05, 0.02) is None
    assert held_out_errors(record(80, flips=3)) == 3 + 20  # flips left plus clean samples not right


def test_the_repair_choice_is_none_unless_it_beats_no_repair_without_new_flips():
    unrepaired = HeldOut(correct=80, flips=1, target_correct=7)
    assert choose_repair([HeldOut(correct=80, flips=1, target_correct=7),
                          HeldOut(correct=79, flips=0, target_correct=7)], unrepaired) is None
    assert choose_repair([HeldOut(correct=85, flips=3, target_correct=9),
                          HeldOut(correct=82, flips=1, target_correct=8)], unrepaired) == 1


def test_the_repair_choice_is_none_when_only_other_classes_gain():
    unrepaired = HeldOut(correct=80, flips=1, target_correct=7)
    assert choose_repair([HeldOut(correct=84, flips=0, target_correct=7)], unrepaired) is None


def test_the_repair_choice_puts_the_target_class_first_but_never_below_no_repair():
    unrepaired = HeldOut(correct=80, flips=1, target_correct=6)
    more_overall = HeldOut(correct=84, flips=1, target_correct=6)
    more_on_target = HeldOut(correct=81, flips=1, target_correct=8)
    target_at_a_cost = HeldOut(correct=79, flips=1, target_correct=9)  # fewer held-out samples right than no repair
    assert choose_repair([more_overall, more_on_target, target_at_a_cost], unrepaired) == 1


def test_the_head_tail_reproduces_the_logits_and_an_unusual_forward_falls_back_to_the_whole_model():
    model = tiny_model()
    probe = images(4)
    head = find_head(model, "fc", probe)
    assert head.first == "fc" and head.module is model.fc
    with torch.no_grad():
        torch.testing.assert_close(head.logits(head.features(model, probe)), model(probe))

    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model()

        def forward(self, x):
            return 2 * self.inner(x)

    doubled = Doubled().eval()
    fallback = find_head(doubled, "inner.fc", probe)
    assert fallback.first is None and fallback.module is doubled


def test_a_calibrated_edit_records_its_choice_from_the_grid_and_held_out_counts():
    model = tiny_model()
    inputs = images(20)
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    settings = EditSettings(lams=(1.0, 10.0), mus=(1e-4, 1e-2), folds=4, min_samples=40)
    _, record = edit_model(model, inputs, corner_trigger(), ["fc"], "closed-form", settings, 0, labels, target=0)
    calibration = record.calibration
    assert calibration["folds"] == 4 and len(calibration["candidates"]) == 4
    assert calibration["chosen"] in [{"lam": c["lam"], "mu": c["mu"]} for c in calibration["candidates"]]
    assert calibration["held_out"]["images"] == len(inputs)
    unedited = calibration["held_out_unedited"]  # the model before the edit, on the same samples
    assert unedited["changed"] == 0 and unedited["target_images"] == calibration["held_out"]["target_images"]
    assert unedited["correct"] == len(inputs) and unedited["target_correct"] == int((labels == 0).sum())
    assert calibration["erases_target"] == erases_target(HeldOut(**{k: calibration["held_out"][k] for k in (
        "target_images", "target_correct")}), HeldOut(target_images=unedited["target_images"],
                                                      target_correct=unedited["target_correct"]))


def test_the_calibrated_edit_is_the_plain_edit_at_the_chosen_strength():
    model = tiny_model()
    inputs = images(20)
    calibrated, record = edit_model(model, inputs, corner_trigger(), ["fc"], "closed-form",
                                    EditSettings(min_samples=40, input_strengths=()), 0, target=0)
    chosen = record.calibration["chosen"]
    plain, _ = edit_model(model, inputs, corner_trigger(), ["fc"], "closed-form",
                          EditSettings(min_samples=40, calibrate=False, **chosen), 0)
    torch.testing.assert_close(calibrated.fc.weight, plain.fc.weight)


def test_a_calibrated_repair_is_never_worse_than_no_repair_on_held_out_samples():
    model = tiny_model()
    inputs = images(24)
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    labels[:6] = (labels[:6] + 1) % 3
    _, record = repair_model(model, inputs, labels, corner_trigger(), "fc", RepairSettings(min_samples=48), target=0)
    held, unrepaired = record.calibration["held_out"], record.calibration["held_out_unrepaired"]
    assert held["correct"] >= unrepaired["correct"] and held["flips"] <= unrepaired["flips"]


def test_a_repair_without_a_sample_of_the_target_class_leaves_the_weights_alone():
    model = tiny_model()
    inputs = images(12)
    labels = torch.tensor([1, 2] * 6)
    repaired, record = repair_model(model, inputs, labels, corner_trigger(), "fc", target=0)
    assert record.method.startswith("none")
    assert all(torch.equal(a, b) for a, b in zip(repaired.state_dict().values(), model.state_dict().values()))
