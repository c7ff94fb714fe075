"""The repair maths: margin restoration and the constrained head update."""

from __future__ import annotations

import torch

from backdoor_scrub.repair import RepairSettings, repair_model, restore_margins
from tests.test_editing import corner_trigger, images, tiny_model


def test_restore_margins_raises_only_short_margins_half_each_way():
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.5, 0.0], [0.0, 0.2, 5.0]])
    labels = torch.tensor([0, 0, 2])
    values = restore_margins(logits, labels, margin=1.0)
    assert torch.equal(values[0], logits[0]) and torch.equal(values[2], logits[2])
    # sample 1: margin -0.5, shortfall 1.5 -> class 0 up 0.75, rival class 1 down 0.75
    assert torch.allclose(values[1], torch.tensor([1.75, 0.75, 0.0]))
    assert values[1, 0] - values[1].clone().index_fill_(0, torch.tensor([0]), -1e9).max() >= 1.0 - 1e-6


def test_repair_widens_margins_on_the_samples_and_leaves_the_input_unchanged():
    model = tiny_model()
    inputs = images(24)
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    labels[:6] = (labels[:6] + 1) % 3  # six samples the model gets wrong
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    repaired, record = repair_model(model, inputs, labels, corner_trigger(), "fc", RepairSettings(mu=1e-3, min_samples=0))
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert record.layers == ["fc"]
    rows = torch.arange(len(labels))

    def own_minus_rival(net):
        with torch.no_grad():
            logits = net(inputs)
        rivals = logits.clone()
        rivals[rows, labels] = float("-inf")
        return logits[rows, labels] - rivals.max(1).values

    assert own_minus_rival(repaired)[:6].mean() > own_minus_rival(model)[:6].mean()
    changed = [name for name, tensor in repaired.state_dict().items() if not torch.equal(tensor, state[name])]
    assert changed == ["fc.weight", "fc.bias"]


def test_a_strong_pull_keeps_the_head_almost_unchanged():
    model = tiny_model()
    inputs = images(12)
    labels = torch.zeros(12, dtype=torch.long)
    repaired, _ = repair_model(model, inputs, labels, corner_trigger(), "fc", RepairSettings(mu=1e6, min_samples=0))
    assert torch.allclose(repaired.fc.weight, model.fc.weight, atol=1e-4)


def test_with_a_target_only_its_margins_are_restored_and_other_classes_logits_are_kept():
    model = tiny_model()
    inputs = images(6)  # few samples for the head's 17 weights per class: the solve comes close to its values
    with torch.no_grad():
        labels = model(inputs).argmax(1)
        before = model(inputs)
    labels[:4] = (labels[:4] + 1 + torch.arange(4) % 2) % 3  # four samples the model gets wrong, of two classes
    target = int(labels[0])
    others = labels != target
    assert (labels[:4] != target).any()
    settings = RepairSettings(mu=1e-6, min_samples=0, calibrate=False)
    every_class, _ = repair_model(model, inputs, labels, corner_trigger(), "fc", settings)
    target_only, _ = repair_model(model, inputs, labels, corner_trigger(), "fc", settings, target=target)
    with torch.no_grad():
        moved = {name: net(inputs) - before for name, net in [("all", every_class), ("target", target_only)]}
    rows = torch.arange(len(labels))
    assert moved["target"][rows[~others], target].min() > 0  # the target class's samples gain
    wrong = others & (before.argmax(1) != labels)  # other classes' samples the model gets wrong
    own_gain = {name: change[rows[wrong], labels[wrong]] for name, change in moved.items()}
    assert own_gain["all"].min() > 0.01  # restoring every class raises theirs
    assert (own_gain["target"] < 0.5 * own_gain["all"]).all()  # restoring the target leaves them (only their
    # stamped twins still keep their true class)
