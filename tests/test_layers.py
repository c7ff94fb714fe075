"""Layer description and the automatic choice of edit sites across torchvision families."""

from __future__ import annotations

import pytest
import torchvision
from torch import nn

from backdoor_scrub.layers import auto_select_layers, describe_layers, is_cut, is_linear_map
from tests.tiny_models import TinyCNN


@pytest.mark.parametrize(("arch", "expected"), [
    ("resnet18", ["layer4", "fc"]),
    ("mobilenet_v3_small", ["features.10", "features.11", "features.12", "classifier.0", "classifier.3"]),
    ("vgg11", ["features.16", "features.17", "features.18", "classifier.0", "classifier.3", "classifier.6"]),
    # conv5 is one pointwise convolution: the stage climbs to the model's stage4 and conv5.
    ("shufflenet_v2_x0_5", ["stage4", "conv5", "fc"]),
    ("squeezenet1_1", ["features.11", "features.12", "classifier.1"]),
    # GoogLeNet's blocks are plain attributes: the stage is the last ones, each fed by the one before.
    ("googlenet", ["inception4e", "maxpool4", "inception5a", "inception5b", "fc"]),
])
def test_auto_selection_is_the_last_stage_then_the_head(arch, expected):
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    assert auto_select_layers(model, (3, 32, 32)) == expected


def test_every_selected_stage_is_crossed_by_every_path_to_the_output():
    for arch in ("resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "vgg11"):
        model = torchvision.models.get_model(arch, weights=None, num_classes=10)
        stage = [n for n in auto_select_layers(model, (3, 32, 32)) if not is_linear_map(model.get_submodule(n))][-1]
        assert is_cut(model, model.get_submodule(stage), (3, 32, 32)), arch


def test_a_conv_inside_a_residual_block_is_not_a_cut():
    model = TinyCNN(3)
    assert not is_cut(model, model.stage[1].conv2, (3, 16, 16))
    assert is_cut(model, model.stage[1], (3, 16, 16))
    assert auto_select_layers(model, (3, 16, 16)) == ["stage", "fc"]


def test_describe_layers_lists_shapes_parameters_and_editability():
    layers = {layer.name: layer for layer in describe_layers(TinyCNN(3), (3, 16, 16))}
    assert layers["stem.0"].output_shape == [8, 8, 8] and layers["stem.0"].parameters == 8 * 3 * 9 + 8
    assert layers["fc"].output_shape == [3] and layers["fc"].editable and layers["fc"].auto_selected
    assert not layers["stem.1"].editable and not layers["pool"].editable
    assert isinstance(TinyCNN(3).get_submodule("stage.0"), nn.Module) and not layers["stage.0"].auto_selected
