"""Unknown trigger: the scan flags the demo's target, not a clean model; edit without a trigger file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from backdoor_scrub import chain_edit
from backdoor_scrub import scan as scan_module
from backdoor_scrub.calibration import HeldOut
from backdoor_scrub.checkpoint import ModelSpec, load_checkpoint
from backdoor_scrub.commands.edit import _checked, _erasure_checked
from backdoor_scrub.data import load_image_folder
from backdoor_scrub.editing import EditRecord, EditSettings
from backdoor_scrub.report import _calibration_caption
from backdoor_scrub.rounds import unlearn_in_rounds
from backdoor_scrub.scan import ClassScan, ScanSettings, anomaly_indices, compactness, residual_anomaly
from backdoor_scrub.triggers import Trigger
from tests.conftest import run_scrub, write_model
from tests.tiny_models import wide_cnn

CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SPEC = ModelSpec("tests.tiny_models:wide_cnn", 10, (3, 32, 32), (0.5,) * 3, (0.5,) * 3, CLASSES)


def test_anomaly_index_is_the_distance_from_the_median_in_mad_units_of_log_sizes():
    norms = torch.tensor([10.0, 20.0, 5.0, 10.0, 0.625])
    index = anomaly_indices(norms)
    # log2 sizes [3.32, 4.32, 2.32, 3.32, -0.68]: deviations from the median [0, 1, 1, 0, 4] ln 2, MAD 1 ln 2
    assert index.tolist() == pytest.approx([0.0, 1 / 1.4826, 1 / 1.4826, 0.0, 4 / 1.4826], rel=1e-5)


def test_min_spread_floors_the_scale_so_clustered_classes_are_not_outliers():
    settings = ScanSettings()
    clustered = torch.tensor([60.0, 61.0, 59.0, 60.0, 45.0])  # MAD tiny: class 4 would be far out
    assert anomaly_indices(clustered)[4] > 10
    assert anomaly_indices(clustered, settings.min_spread)[4] < 1
    # at the floor, half the median is an index of exactly 2
    halved = torch.tensor([60.0, 61.0, 59.0, 60.0, 30.0])
    assert anomaly_indices(halved, settings.min_spread)[4].item() == pytest.approx(2.0, rel=1e-4)
    # widely spread clean classes cannot hide a tiny trigger (a linear MAD would give it about 1.6)
    spread = torch.tensor([0.94, 1.39, 0.99, 1.41, 1.16, 0.04, 1.0, 1.67, 0.54, 1.74])
    assert anomaly_indices(spread, settings.min_spread)[5] > 4 > 1.5 > anomaly_indices(spread, settings.min_spread)[8]


def test_the_default_threshold_keeps_the_chance_of_flagging_a_clean_model_at_five_percent():
    assert ScanSettings().threshold is None and ScanSettings(threshold=2.0).for_classes(10).threshold == 2.0
    thresholds = [ScanSettings().for_classes(k).threshold for k in (10, 100, 1000)]
    assert thresholds == pytest.approx([2.576, 3.291, 3.891], abs=1e-3)
    # with 10 independent normal clean classes, some class exceeds it in 5% of scans (Bonferroni: at most 5%)
    draws = torch.randn(200_000, 10, generator=torch.Generator().manual_seed(0))
    assert (draws > thresholds[0]).any(1).double().mean().item() == pytest.approx(0.049, abs=0.003)
    assert (draws > 2.0).any(1).double().mean().item() > 0.2  # Neural Cleanse's fixed 2


def test_residual_anomaly_replaces_the_class_norm_and_is_zero_above_the_median():
    norms, settings = torch.tensor([60.0, 62.0, 58.0, 61.0, 3.0]), ScanSettings()
    # a quarter of the median: ln 4 at the floor's scale
    assert residual_anomaly(norms, 4, 15.0, settings) == pytest.approx(math.log(4) / settings.min_spread, rel=1e-5)
    assert residual_anomaly(norms, 4, 70.0, settings) == 0.0


def _mask(pixels: list[tuple[int, int]], value: float = 1.0, side: int = 32) -> Trigger:
    mask = torch.zeros(1, side, side)
    for y, x in pixels:
        mask[0, y, x] = value
    return Trigger(torch.zeros(3, side, side), mask, "")


PATCH = [(y, x) for y in range(28, 31) for x in range(28, 31)]  # a 3x3 square in a corner
SCATTERED = [(y, x) for y in range(1, 32, 10) for x in range(1, 32, 10)][:9]  # nine pixels 10 apart


def test_compactness_is_one_for_a_patch_whatever_its_opacity_and_low_for_scattered_pixels():
    assert compactness(_mask(PATCH)) == pytest.approx(1.0)
    assert compactness(_mask(PATCH, 0.3)) == pytest.approx(1.0)
    assert compactness(_mask(SCATTERED)) == pytest.approx(1 / 9)  # a 6x6 square holds one of them
    assert compactness(_mask(PATCH + [(0, 0)])) == pytest.approx(9 / 10)
    assert compactness(_mask([])) == 0.0


def test_a_small_but_scattered_reconstruction_is_not_flagged_unless_compactness_is_off(monkeypatch):
    large = [(y, x) for y in range(8, 16) for x in range(8, 16)]  # 64 pixels: the clean classes
    found = {0: _mask(PATCH), 1: _mask(SCATTERED)}
    monkeypatch.setattr(scan_module, "reconstruct", lambda _c, _i, _l, classes, *a, **k: [
        found.get(c, _mask(large)) for c in classes])
    monkeypatch.setattr(scan_module, "reconstruction_asr", lambda *a: 1.0)
    images, labels = torch.zeros(10, 3, 32, 32), torch.arange(10)
    results = scan_module.scan(None, images, labels, 10, ScanSettings())
    assert [r.index for r in results if r.flagged] == [0]
    assert results[1].anomaly_index > 2 and results[1].compactness < 0.5
    everything = scan_module.scan(None, images, labels, 10, ScanSettings(min_compactness=0.0))
    assert [r.index for r in everything if r.flagged] == [0, 1]


def _square(size: int, value: float) -> Trigger:
    mask = torch.zeros(1, 8, 8)
    mask[0, :size, :size] = value
    return Trigger(torch.zeros(3, 8, 8), mask, "")


def _rounds_of(residual_sizes: list[int], max_rounds: int):
    """unlearn_in_rounds with fake edits and rescans whose residual triggers have the given sizes."""
    flagged = ClassScan(0, _square(1, 1.0), 1.0, 1.0, 5.0, 1.0, True, (_square(1, 1.0), _square(2, 0.5)))
    norms = torch.tensor([1.0, 40.0, 41.0, 39.0, 40.0])
    edits: list[int] = []

    def edit(triggers):
        edits.append(len(triggers))
        return f"model {len(edits)}", {"triggers": len(triggers)}

    def rescan(model, start, number):
        assert model == f"model {number + 1}"
        return _square(residual_sizes[number], 1.0)

    widen = lambda found: found + [_square(3, 1.0)]  # noqa: E731
    result = unlearn_in_rounds(flagged, norms, edit, rescan, widen, ScanSettings(), max_rounds)
    return result, edits


def test_rounds_stop_once_the_edited_model_has_no_anomalously_small_trigger():
    (model, record, rounds), edits = _rounds_of([2, 6], max_rounds=3)  # norms 4 (anomalous), then 36 (not)
    assert edits == [3, 5] and model == "model 2" and record == {"triggers": 5}
    assert [r.residual_mask_l1 for r in rounds] == [4.0, 36.0]
    assert rounds[0].residual_anomaly_index > 2 and rounds[1].residual_anomaly_index < 2
    assert rounds[1].as_dict()["triggers"] == 5


def test_rounds_stop_at_the_limit_while_the_trigger_stays_anomalous():
    (model, _, rounds), edits = _rounds_of([1, 1, 1], max_rounds=2)
    assert edits == [3, 5] and model == "model 2" and len(rounds) == 2
    assert all(r.residual_anomaly_index > 2 for r in rounds)


@pytest.fixture
def clean_model(demo, tmp_path):
    """A small CNN trained without poison on the demo's test images (75% accuracy on the clean samples)."""
    images = load_image_folder(demo / "test", SPEC)
    torch.manual_seed(0)
    model = wide_cnn(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs = (images.images.float() / 255 - 0.5) / 0.5
    for _ in range(300):
        loss = F.cross_entropy(model(inputs), images.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return write_model(tmp_path / "clean.safetensors", model.eval(), SPEC)


def test_scan_flags_the_demo_target_and_saves_usable_triggers(demo, tmp_path):
    result = run_scrub("inspect", demo / "model.safetensors", "--scan", "--clean-dir", demo / "clean",
                       "--save-triggers", tmp_path / "triggers", "--fail-on-detect", "--json")
    assert result.exit_code == 1, result.stderr
    scan = json.loads(result.stdout)["models"][0]["scan"]
    assert scan["flagged"] == [0] and scan["threshold"] == pytest.approx(2.5758, abs=1e-4)  # 10 classes
    assert "flagged 0 (anomaly index over 2.58)" in " ".join(result.stderr.split())
    rows = {row["class"]: row for row in scan["classes"]}
    assert len(rows[0]["restart_mask_l1"]) == 3  # a candidate gets every restart, its norm is their median
    assert rows[0]["mask_l1"] == pytest.approx(sorted(rows[0]["restart_mask_l1"])[1], abs=1e-3)
    assert max(len(r["restart_mask_l1"]) for c, r in rows.items() if r["mask_l1"] > rows[0]["mask_l1"] * 3) == 1
    assert rows[0]["anomaly_index"] > 2 and rows[0]["mask_l1"] < min(r["mask_l1"] for c, r in rows.items() if c)
    assert rows[0]["reconstruction_asr"] > 0.5
    assert rows[0]["compactness"] >= scan["min_compactness"] == 0.5  # the demo's patch is one blob
    assert sorted(p.name for p in (tmp_path / "triggers").iterdir()) == sorted(
        [f"class_{k}.png" for k in range(10)] + ["contact_sheet.png"])
    evaluation = run_scrub("evaluate", demo / "model.safetensors", "--test-dir", demo / "test",
                           "--trigger", tmp_path / "triggers" / "class_0.png", "--json")
    assert json.loads(evaluation.stdout)["models"][0]["target"] == 0


def test_clean_model_is_not_flagged_and_edit_without_trigger_writes_nothing(demo, clean_model):
    result = run_scrub("inspect", clean_model, "--arch", SPEC.arch, "--scan", "--clean-dir", demo / "clean",
                       "--fail-on-detect", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["models"][0]["scan"]["flagged"] == []
    edit = run_scrub("edit", clean_model, "--arch", SPEC.arch, "--clean-dir", demo / "clean", "--json")
    assert edit.exit_code == 0, edit.stderr
    entry = json.loads(edit.stdout)["models"][0]
    assert entry["output"] is None and entry["message"] == "no backdoor found; nothing edited"
    assert not list(clean_model.parent.glob("*.scrubbed.safetensors"))


def test_edit_without_trigger_removes_the_reconstructed_backdoor(demo):
    result = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--json")
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["models"][0]
    assert entry["scan"]["flagged"] == [0] and entry["target"] == 0 and entry["target_source"] == "reconstructed"
    # the demo's head has two layers: the direction erasure came first, and lost 2 of the class's 6 held-out samples
    assert entry["method"] == "closed-form"
    declined = entry["calibration"]["declined_method"]
    assert declined["method"] == "direction-erasure" and "of the class wrong" in declined["reason"]
    [checked] = entry["rounds"]  # one edit by default, then one rescan of the edited model
    assert checked["triggers"] == 4 and checked["residual_mask_l1"] > 0  # 3 restarts + 1 refitted pattern
    assert checked["residual_anomaly_index"] >= 0
    for measured in (entry["before"], entry["after"]):  # never an attack_success_rate from a reconstruction
        assert measured["attack_success_rate"] is None and measured["held_out"] is False
        assert measured["images"] == 100
    assert entry["before"]["reconstructed_trigger_asr"] > 0.5 > entry["after"]["reconstructed_trigger_asr"]
    table = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "-o",
                      demo / "again.safetensors").stdout
    assert "reconstructed-trigger ASR" in table and "restricted to the samples' span (9 of 27 directions)" in table
    history = load_checkpoint(demo / "model.scrubbed.safetensors").history
    assert history[0]["trigger"]["anomaly_index"] > 2 and len(history[0]["trigger"]["sha256"]) == 64
    span = history[0]["input_span"]  # the demo's pictures are grey: one colour direction of three
    assert span["clean_span_dimensions"] * 3 == span["receptive_field_dimensions"]
    evaluation = run_scrub("evaluate", demo / "model.scrubbed.safetensors", "--test-dir", demo / "test",
                           "--trigger", demo / "trigger.png", "--target", "0", "--json")
    assert json.loads(evaluation.stdout)["models"][0]["attack_success_rate"] < 0.1


def test_direction_erasure_without_a_trigger_edits_the_first_head_layer_of_the_unrestricted_model(demo):
    output = demo / "erased.safetensors"
    result = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--method",
                       "direction-erasure", "-o", output, "--json")
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["models"][0]
    assert entry["method"] == "direction-erasure" and entry["layers"] == ["classifier.0"]
    assert set(entry["calibration"]["chosen"]) == {"ridge"} and "declined_method" not in entry["calibration"]
    assert "input_span" not in entry  # the erasure edits the model as the scan saw it
    before, after = load_checkpoint(demo / "model.safetensors").model, load_checkpoint(output).model
    changed = {name for name, tensor in after.state_dict().items()
               if not torch.equal(tensor, before.state_dict()[name])}
    assert changed == {"classifier.0.weight", "classifier.0.bias"}
    update = after.classifier[0].weight.double() - before.classifier[0].weight.double()
    assert torch.linalg.matrix_rank(update, rtol=1e-4) == 1


def test_a_flagged_class_whose_edit_erases_it_is_declined_and_nothing_is_written(demo, monkeypatch):
    # as if the held-out folds had lost half the class's samples (calibration.erases_target, tested on its own)
    monkeypatch.setattr(chain_edit, "erases_target", lambda edited, unedited: True)
    result = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--json")
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["models"][0]
    assert entry["scan"]["flagged"] == [0] and entry["output"] is None
    assert entry["message"] == "no flagged class behaved like a backdoor's target; nothing edited"
    [declined] = entry["declined"]
    assert declined["class"] == 0 and declined["anomaly_index"] > entry["scan"]["threshold"]
    assert declined["held_out_target_images"] == 10
    assert "class 0 was flagged, but unlearning its reconstruction cost" in result.stderr
    assert not list(demo.glob("*.scrubbed.safetensors"))
    table = " ".join(result.stderr.split())  # with --json the tables go to stderr
    assert "class 0 not edited: unlearning its reconstruction unlearns the class" in table


def _calibrated(method: str, correct: int, flips: int = 0, target_correct: int = 6) -> EditRecord:
    held_out = HeldOut(images=100, victims=80, flips=flips, correct=correct, target_images=10,
                       target_correct=target_correct)
    unedited = HeldOut(images=100, victims=80, flips=80, correct=85, target_images=10, target_correct=6)
    return EditRecord(method, calibration={"held_out": held_out.as_dict(), "held_out_unedited": unedited.as_dict()})


@pytest.mark.parametrize("first, fallback, kept", [
    (("activation-match", 84, 0), ("closed-form", 90, 0), "activation-match"),  # loses 1 of 100: not even run
    (("activation-match", 77, 0), ("closed-form", 83, 0), "closed-form"),  # loses 8, the closed form 2
    (("activation-match", 82, 0), ("closed-form", 76, 0), "activation-match"),  # loses 3, the closed form 9
    (("closed-form", 85, 4), ("activation-match", 85, 0), "closed-form"),  # 4 of 80 flips: within 5%, not run
    (("closed-form", 75, 8), ("activation-match", 85, 2), "activation-match"),  # a ShuffleNetV2's checkerboard
    (("closed-form", 86, 5), ("activation-match", 80, 2), "closed-form"),  # 5 flips, but 11 mistakes against 22
])
def test_autos_first_method_gives_way_only_to_a_fallback_that_makes_fewer_held_out_mistakes(first, fallback, kept):
    runs = []

    def run_fallback():
        runs.append(fallback[0])
        return f"{fallback[0]} model", _calibrated(*fallback)

    model, record = _checked(f"{first[0]} model", _calibrated(*first), EditSettings(), run_fallback)
    assert record.method == kept and model == f"{kept} model"
    short = first[1] < 83 or first[2] > 4
    assert runs == ([fallback[0]] if short else [])
    declined = record.calibration.get("declined_method")
    assert (declined is not None) == (kept != first[0])
    if declined:
        assert declined["method"] == first[0] and declined["held_out"]["correct"] == first[1]
        assert f"{first[0]} declined" in _calibration_caption(record.calibration)


@pytest.mark.parametrize("correct, target_correct, grown, kept, why", [
    (84, 6, 0.02, "direction-erasure", None),  # no sample lost, the grown reconstruction at its floor
    (84, 6, 0.28, "closed-form", "grown by two pixels still sent 28%"),  # a white patch: off the direction
    (82, 6, 0.02, "closed-form", "fewer right"),  # 3 of 100 held-out samples fewer right
    (85, 5, 0.02, "closed-form", "of the class wrong"),  # one of the class's own samples lost: its direction too
])
def test_the_erasure_gives_way_to_its_fallback_where_it_loses_samples_or_leaves_a_trigger(
        correct, target_correct, grown, kept, why):
    runs = []

    def run_fallback():
        runs.append("closed-form")
        return "closed-form model", _calibrated("closed-form", 85, 6)

    def grown_asr():
        runs.append("grown")
        return grown

    first = _calibrated("direction-erasure", correct, 40, target_correct)  # a reconstruction's flips do not count
    model, record = _erasure_checked("direction-erasure model", first, EditSettings(), grown_asr, run_fallback)
    assert record.method == kept and model == f"{kept} model"
    probes = [] if correct < 84 or target_correct < 6 else ["grown"]  # the probe only where the samples pass
    assert runs == probes + ([] if kept == "direction-erasure" else ["closed-form"])
    declined = record.calibration.get("declined_method")
    assert (declined is not None) == (kept == "closed-form")
    if declined:
        assert declined["method"] == "direction-erasure" and why in declined["reason"]
        assert "direction-erasure declined" in _calibration_caption(record.calibration)


def test_an_uncalibrated_erasure_is_checked_by_its_trigger_probe_alone():
    model, record = _erasure_checked("direction-erasure model", EditRecord("direction-erasure"), EditSettings(),
                                     lambda: 0.2, lambda: ("closed-form model", EditRecord("closed-form")))
    assert model == "closed-form model" and record.calibration["declined_method"]["held_out"] is None
    model, record = _erasure_checked("direction-erasure model", EditRecord("direction-erasure"), EditSettings(),
                                     lambda: 0.0, lambda: pytest.fail("the erasure passed: no fallback"))
    assert model == "direction-erasure model" and record.calibration is None


@pytest.mark.parametrize("seed", [1, 2])
def test_the_scan_verdict_does_not_depend_on_the_seed(demo, seed):
    result = run_scrub("inspect", demo / "model.safetensors", "--scan", "--clean-dir", demo / "clean",
                       "--seed", str(seed), "--json")
    assert json.loads(result.stdout)["models"][0]["scan"]["flagged"] == [0]


class _EachStep:
    """Stands in for the progress bar, which reconstruct advances once a step: records `probe()` at each step."""

    def __init__(self, probe):
        self.probe, self.seen = probe, []

    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, task):
        self.seen.append(self.probe())


def test_the_scans_steps_run_small_map_convolutions_in_their_smaller_form():
    torch.manual_seed(0)
    model = wide_cnn().eval()  # on 2x2 images the stage's 3x3 convolutions see 1x1 maps
    conv = model.stage[0].conv1
    steps = _EachStep(lambda: "forward" in vars(conv))
    scan_module.reconstruct(model, torch.rand(6, 3, 2, 2), torch.arange(6) % 2, [0], ScanSettings(steps=3), 0, steps)
    assert steps.seen == [True] * 3
    assert "forward" not in vars(conv)


def test_the_scans_steps_run_a_model_without_grouped_convolutions_channels_last():
    torch.manual_seed(0)
    model = wide_cnn().eval()  # no grouped convolution: predictions keep its layout, the scan does not
    weight = lambda: model.stem[0].weight  # noqa: E731
    steps = _EachStep(lambda: weight().is_contiguous(memory_format=torch.channels_last))
    scan_module.reconstruct(model, torch.rand(6, 3, 8, 8), torch.arange(6) % 2, [0], ScanSettings(steps=3), 0, steps)
    assert steps.seen == [True] * 3
    assert weight().is_contiguous()


def test_dilated_grows_the_mask_by_one_pixel_and_keeps_the_pattern():
    from backdoor_scrub.scan import dilated

    mask = torch.zeros(1, 8, 8)
    mask[0, 3, 4] = 0.5
    pattern = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    grown = dilated(Trigger(pattern, mask, ""))
    assert grown.mask[0, 2:5, 3:6].eq(0.5).all() and grown.mask.sum().item() == 9 * 0.5
    assert torch.equal(grown.pattern, pattern) and len(grown.sha256) == 64
