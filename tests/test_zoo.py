"""Every torchvision classification family through inspect, evaluate, edit (both methods) and repair (issue 10).

Randomly initialised models at the smallest input side each accepts, 2 random images per class.
The 224-pixel and the largest models are marked `zoo_slow` (deselect with `-m "not zoo_slow"`
while developing; CI runs them all).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torchvision
from PIL import Image

from backdoor_scrub.checkpoint import ModelSpec, load_checkpoint
from tests.conftest import run_scrub, write_images, write_model

# The smallest variant of every family, at the smallest input side it accepts.
FAMILIES = {
    "alexnet": 64, "convnext_tiny": 32, "densenet121": 32, "efficientnet_b0": 32, "efficientnet_v2_s": 32,
    "googlenet": 32, "inception_v3": 75, "maxvit_t": 224, "mnasnet0_5": 32, "mobilenet_v2": 32,
    "mobilenet_v3_small": 32, "regnet_x_400mf": 32, "regnet_y_400mf": 32, "resnet18": 32, "resnext50_32x4d": 32,
    "shufflenet_v2_x0_5": 32, "squeezenet1_1": 32, "swin_t": 32, "swin_v2_t": 32, "vgg11_bn": 32, "vit_b_32": 224,
    "wide_resnet50_2": 32,
}
SLOW = {"maxvit_t", "vit_b_32", "vgg11_bn", "wide_resnet50_2", "resnext50_32x4d", "efficientnet_v2_s", "alexnet"}
# Activation matching of MaxViT's last stage at 224 px ran for more than 5 minutes on 2 CPU cores
# (issue 10 is open on that): at 224 px the zoo test edits with the closed form only.
CLOSED_FORM_ONLY = {"maxvit_t", "vit_b_32"}
# Every other classification model of torchvision, at its family's side, 1 image per class (marked `zoo_variants`),
# with the closed form only: a variant differs from its family's model in widths and depths, not in the modules
# activation matching trains, and matching all of them (eight VGGs at about 4 minutes each) would double CI.
VARIANTS = sorted(set(torchvision.models.list_models(module=torchvision.models)) - set(FAMILIES))
# `make test` (and so CI) leaves all variants out (pyproject's addopts); `make test-variants` runs them but for
# ViT-H/14 (632M parameters, 167 GFLOPs an image at 224 px: 20 minutes here on one thread) and ViT-L/16, which
# `python -m pytest -m zoo_huge` runs.
HUGE = {"vit_h_14", "vit_l_16"}


def family(name: str) -> str:
    """resnet18 -> resnet, efficientnet_v2_s -> efficientnet, wide_resnet50_2 -> wide."""
    return re.sub(r"\d.*$", "", name.split("_")[0])


def representative(name: str) -> str:
    """The model of FAMILIES that stands for `name`'s family."""
    return next(known for known in FAMILIES if family(known) == family(name))


def test_every_torchvision_family_is_in_the_zoo_test():
    known = {family(name) for name in FAMILIES}
    missing = sorted(name for name in torchvision.models.list_models(module=torchvision.models)
                     if family(name) not in known)
    assert not missing, f"torchvision families without a zoo test: {missing}"
    assert set(FAMILIES) <= set(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.zoo_slow) if a in SLOW else a for a in FAMILIES])
def test_family_goes_through_inspect_evaluate_edit_and_repair(arch, tmp_path, one_thread):
    methods = ("closed-form",) if arch in CLOSED_FORM_ONLY else ("closed-form", "activation-match")
    scrub_through_every_command(arch, FAMILIES[arch], tmp_path, per_class=2, methods=methods)


@pytest.mark.zoo_variants
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.zoo_huge) if a in HUGE else a for a in VARIANTS])
def test_every_other_variant_goes_through_inspect_evaluate_edit_and_repair(arch, tmp_path, one_thread):
    scrub_through_every_command(arch, FAMILIES[representative(arch)], tmp_path, per_class=1, methods=("closed-form",))


def scrub_through_every_command(arch: str, side: int, tmp_path, per_class: int, methods: tuple[str, ...]) -> None:
    """inspect, evaluate, edit with each method and repair a random `arch` at `side` pixels through the CLI."""
    spec = ModelSpec(arch, 10, (3, side, side), (0.5,) * 3, (0.5,) * 3, None)
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    path = write_model(tmp_path / "model.safetensors", model, spec)
    del model
    generator = torch.Generator().manual_seed(0)
    images = write_images(tmp_path / "samples", {str(c): [torch.randint(0, 256, (3, side, side), generator=generator,
                                                                        dtype=torch.uint8) for _ in range(per_class)]
                                                 for c in range(10)})
    trigger = tmp_path / "trigger.png"
    Image.new("RGBA", (max(3, side // 8),) * 2, (255, 255, 0, 255)).save(trigger)

    inspected = run_scrub("inspect", path, "--json")
    assert inspected.exit_code == 0, inspected.stderr
    assert any(layer["auto_selected"] for layer in json.loads(inspected.stdout)["models"][0]["layers"])
    evaluated = run_scrub("evaluate", path, "--test-dir", images, "--trigger", trigger, "--target", "0", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert 0 <= json.loads(evaluated.stdout)["models"][0]["clean_accuracy"] <= 1

    for method in methods:
        edited = tmp_path / f"{method}.safetensors"
        result = run_scrub("edit", path, "--clean-dir", images, "--trigger", trigger, "--target", "0",
                           "--method", method, "-o", edited, "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["models"][0]["layers"]
        assert_loads_with_finite_logits(edited, side)
    repaired = tmp_path / "repaired.safetensors"
    result = run_scrub("repair", tmp_path / "closed-form.safetensors", "--clean-dir", images, "-o", repaired, "--json")
    assert result.exit_code == 0, result.stderr
    assert_loads_with_finite_logits(repaired, side)


def assert_loads_with_finite_logits(path, side: int, changed_from: torch.nn.Module | None = None) -> None:
    """The written checkpoint loads by its own metadata, records the step and gives finite logits.

    (A random model's features may ignore a small corner patch, so an edit need not change weights;
    `changed_from` asks that it did.)
    """
    checkpoint = load_checkpoint(path)
    assert checkpoint.history and checkpoint.history[-1]["layers"]
    with torch.no_grad():
        logits = checkpoint.model(torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1)))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    if changed_from is not None:
        original = changed_from.state_dict()
        assert any(not torch.equal(tensor, original[name]) for name, tensor in checkpoint.model.state_dict().items())


def test_a_timm_hub_folder_edits_and_evaluates_without_arch(tmp_path, one_thread):
    timm = pytest.importorskip("timm")
    import safetensors.torch

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    folder = tmp_path / "hub_model"
    folder.mkdir()
    # What timm's save_for_hf writes for a hub: the weights, and a config with the model's pretrained_cfg.
    config = {"architecture": "resnet18", "num_classes": 10, "num_features": model.num_features,
              "global_pool": "avg", "label_names": [f"c{i}" for i in range(10)],
              "pretrained_cfg": {k: v for k, v in model.pretrained_cfg.items() if k in ("input_size", "mean", "std",
                                                                                      "crop_pct", "interpolation")}}
    (folder / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(model.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(0)
    images = write_images(tmp_path / "samples", {f"c{c}": [torch.randint(0, 256, (3, 48, 48), generator=generator,
                                                                         dtype=torch.uint8)] for c in range(10)})
    trigger = tmp_path / "trigger.png"
    Image.new("RGBA", (112, 112), (255, 255, 0, 255)).save(trigger)  # a random model may ignore a small corner

    inspected = json.loads(run_scrub("inspect", folder, "--json").stdout)["models"][0]
    assert inspected["arch"] == "timm:resnet18" and inspected["input_size"] == [3, 224, 224]
    assert inspected["classes"] == [f"c{i}" for i in range(10)]
    evaluated = run_scrub("evaluate", folder, "--test-dir", images, "--trigger", trigger, "--target", "0", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    edited = run_scrub("edit", folder, "--clean-dir", images, "--trigger", trigger, "--target", "0", "--json")
    assert edited.exit_code == 0, edited.stderr
    output = tmp_path / "hub_model.scrubbed.safetensors"
    assert json.loads(edited.stdout)["models"][0]["output"] == str(output)
    assert load_checkpoint(output).spec.arch == "timm:resnet18"  # the output carries its metadata: no folder needed
    assert_loads_with_finite_logits(output, 224, changed_from=model)
