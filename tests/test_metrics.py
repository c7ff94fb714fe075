"""Metric definitions on hand-made predictions (BackdoorBench definitions)."""

import math

import pytest
import torch

from backdoor_scrub.metrics import Metrics, compute_metrics, defense_effectiveness_rate, infer_target


def test_asr_and_ra_count_only_non_target_images():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    clean = torch.tensor([0, 1, 1, 1, 2, 0])
    stamped = torch.tensor([0, 0, 2, 0])  # images of classes 1, 1, 2, 2 after stamping; target 0
    metrics = compute_metrics(clean, labels, 3, stamped, target=0)
    assert metrics.clean_accuracy == pytest.approx(4 / 6)
    assert metrics.per_class_accuracy == pytest.approx([0.5, 1.0, 0.5])
    assert metrics.attack_success_rate == pytest.approx(3 / 4)
    assert metrics.robust_accuracy == pytest.approx(1 / 4)
    assert metrics.target_class_accuracy == pytest.approx(0.5)
    assert metrics.clean_target_rate == pytest.approx(1 / 4)  # the class-2 image predicted 0 without stamping


def test_class_without_images_has_no_accuracy():
    metrics = compute_metrics(torch.tensor([0, 0]), torch.tensor([0, 1]), 3)
    assert metrics.per_class_accuracy[:2] == [1.0, 0.0] and metrics.per_class_accuracy[2] is None
    assert metrics.attack_success_rate is None


def test_infer_target_is_the_most_predicted_class():
    assert infer_target(torch.tensor([2, 2, 1, 2, 0]), 4) == 2


def test_der_formula():
    baseline = Metrics(0.90, [], attack_success_rate=1.0)
    defended = Metrics(0.88, [], attack_success_rate=0.02)
    assert defense_effectiveness_rate(defended, baseline) == pytest.approx((0.98 - 0.02 + 1) / 2)
    better = Metrics(0.95, [], attack_success_rate=1.0)
    assert defense_effectiveness_rate(better, baseline) == pytest.approx(0.5)
    assert defense_effectiveness_rate(Metrics(0.9, []), baseline) is None
    assert not math.isnan(defended.clean_accuracy)
