"""The edit: map stamped activations to clean ones (activation matching of a stage, closed form on the head)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from backdoor_scrub.chain_edit import Erasure, Strength, calibrate, chain_problem, strength_grid
from backdoor_scrub.errors import usage_error
from backdoor_scrub.inference import batch_for, fast_layout, forward_batched, optimisation_steps
from backdoor_scrub.input_edit import calibrate_input_edit, input_convolution
from backdoor_scrub.layers import feeds_in_turn, is_linear_map
from backdoor_scrub.triggers import Stamp, TriggeredCopies

METHODS = ("closed-form", "activation-match", "direction-erasure")


@dataclass(frozen=True)
class EditSettings:
    """Constants of the edit. The closed form's strength (lam, mu) is chosen per model from `lams` x `mus`
    on held-out folds of the samples; with `calibrate` off (or a single sample) `lam` and `mu` are used.
    """

    lam: float = 3.0
    mu: float = 1e-5
    calibrate: bool = True
    lams: tuple[float, ...] = (1.0, 10.0)
    mus: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    # direction-erasure's ridge (erasure.py), strongest change first; `erasure_ridge` without calibration
    erasure_ridges: tuple[float, ...] = (0.3, 1.0, 3.0)
    erasure_ridge: float = 1.0
    erasure_max_grown_asr: float = 0.1  # auto keeps it where the reconstruction grown by 2 pixels flips at most this
    erasure_min_samples: int = 500  # its regression keeps clean outputs only with more rows than 100 (CA -1.9 -> -0.2)
    input_strengths: tuple[Strength, ...] = (Strength(1.0, 1e-4), Strength(10.0, 1e-4))
    input_max_changed: float = 0.5  # a patch changes few of the first convolution's receptive fields
    input_max_remaining: float = 0.5  # an input edit must stop at least half of the held-out flips
    input_max_lost: float = 0.02  # ... and get at most 2% of the held-out samples fewer right
    folds: int = 5
    steps: int = 50  # activation matching runs this many steps a round, up to `stage_rounds` rounds,
    stage_rounds: int = 6  # until the stage alone stops all but `stage_residual` of the samples' flips
    stage_residual: float = 0.05
    # auto's first choice of method is checked on the held-out samples: where more than this share of them still
    # flips, or more than that share are fewer right than unedited, the other method is tried (fallback_method)
    check_max_flips: float = 0.05
    check_max_lost: float = 0.02
    lr: float = 3e-3
    max_relative_step: float = 0.15  # activation matching's lr is at most this times the stage's weight RMS
    preserve: float = 1.0
    batch_size: int = 256
    min_samples: int = 100


@dataclass(frozen=True)
class EditRecord:
    """What an edit did: its method, the layers it changed, how it chose its strength and how long it took."""

    method: str
    layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict | None = None


@dataclass(frozen=True)
class Captured:
    """A module's input and output on a batch of images, in sample order."""

    inputs: torch.Tensor
    outputs: torch.Tensor


def edit_model(
    model: nn.Module,
    clean_inputs: torch.Tensor,
    trigger: Stamp | TriggeredCopies | Sequence[Stamp | TriggeredCopies],
    layer_names: list[str],
    method: str = "closed-form",
    settings: EditSettings = EditSettings(),
    seed: int = 0,
    labels: torch.Tensor | None = None,
    target: int | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[nn.Module, EditRecord]:
    """An edited copy of `model` and its record; `model` itself is not changed.

    `clean_inputs` are what the model takes and `trigger` stamps in that same space (see
    Stamp.normalized); several triggers (a family of reconstructions) are unlearned together, the
    first one scoring the calibration. `layer_names` are a stage (one module, or consecutive children of one
    Sequential) followed by the linear layers of the head, as layers.auto_select_layers gives them.
    Few samples are augmented up to settings.min_samples. `labels` (class per sample, for stratified
    folds) and `target` (else the class the model gives most stamped samples) serve the calibration;
    `on_step` is called after each activation-matching step and each calibration fit (progress; see edit_steps).
    """
    start = time.perf_counter()
    stage, chain = plan_edit(model, layer_names, method)
    triggers = list(trigger) if isinstance(trigger, Sequence) else [trigger]
    erasing = method == "direction-erasure"
    copies = copies_for(len(clean_inputs), settings.erasure_min_samples if erasing else settings.min_samples, triggers)
    clean = augment(clean_inputs, copies, seed)
    stamped = torch.cat([triggered_twins(t, clean) for t in triggers])
    calibrating = settings.calibrate and len(clean_inputs) >= 2
    first = input_convolution(model, clean_inputs[:1]) if calibrating and settings.input_strengths else None
    edited = copy_for_edit(model, stage + chain + ([first] if first else []))
    batch_size = batch_for(settings.batch_size, clean_inputs.shape[1:])
    calibration: dict = {}
    if first or stage:
        labels, target = _labels_and_target(model, clean_inputs, triggers[0], labels, target, batch_size)
    if first:
        with fast_layout(edited, clean.device):  # once for all of the calibration's passes
            calibration["input_layer"] = _edit_input_convolution(edited, first, clean, stamped, len(clean_inputs),
                                                                 labels, target, settings, batch_size)
        first = first if calibration["input_layer"]["chosen"] is not None else None
    if stage:
        calibration["stage"] = match_stage(edited, stage, clean.repeat(len(triggers), 1, 1, 1), stamped, target,
                                           settings, seed, batch_size, on_step)
    if chain:
        reference = model if stage else edited
        problem, before = chain_problem(reference, edited, chain, clean, stamped, len(clean_inputs), batch_size)
        strength = Erasure(settings.erasure_ridge) if erasing else Strength(settings.lam, settings.mu)
        if calibrating:
            labels = before[0].argmax(1) if labels is None else labels.to(before[0].device)
            target = int(before[1].argmax(1).mode().values) if target is None else target
            grid = [Erasure(r) for r in settings.erasure_ridges] if erasing else strength_grid(settings.lams, settings.mus)
            strength, chain_report = calibrate(problem, before, labels, target, grid, settings.folds, on_step)
            calibration.update(chain_report)
        problem.fit(torch.arange(len(clean)), strength)
        problem.commit()
    layers = ([first] if first else []) + stage + chain
    return edited, EditRecord(method, layers, round(time.perf_counter() - start, 3), calibration or None)


def _edit_input_convolution(edited: nn.Module, name: str, clean: torch.Tensor, stamped: torch.Tensor, samples: int,
                            labels: torch.Tensor, target: int, settings: EditSettings, batch_size: int) -> dict:
    """Edit `edited`'s input convolution in place where held-out folds favour it; what was chosen and why."""
    return calibrate_input_edit(
        edited, name, clean, stamped, samples, labels, target, list(settings.input_strengths), settings.folds,
        batch_size, lambda x: forward_batched(edited, x, batch_size), settings.input_max_changed,
        settings.input_max_remaining, settings.input_max_lost)


@torch.no_grad()
def _labels_and_target(model: nn.Module, clean_inputs: torch.Tensor, trigger: Stamp | TriggeredCopies,
                       labels: torch.Tensor | None, target: int | None, batch_size: int) -> tuple[torch.Tensor, int]:
    """The samples' labels and the target, where not given: the model's own clean predictions, and the class
    it gives most stamped samples."""
    if labels is None:
        labels = forward_batched(model, clean_inputs, batch_size).argmax(1)
    if target is None:
        target = int(forward_batched(model, triggered_twins(trigger, clean_inputs), batch_size).argmax(1).mode().values)
    return labels.to(clean_inputs.device), target


def edit_steps(model: nn.Module, layer_names: list[str], method: str, samples: int,
               settings: EditSettings = EditSettings()) -> int:
    """How many times an edit from `samples` samples calls `on_step` at most: activation matching's steps (the
    rounds it may need), then the calibration's fits."""
    stage, chain = plan_edit(model, layer_names, method)
    matching = settings.steps * settings.stage_rounds if stage else 0
    if not chain or not settings.calibrate or samples < 2:
        return matching
    candidates = len(settings.erasure_ridges) if method == "direction-erasure" else len(settings.lams) * len(settings.mus)
    return matching + min(settings.folds, samples) * candidates


def copy_for_edit(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of `model` in eval mode in which the named modules own fresh weights; all else shares `model`'s.

    Editing the copy's named modules leaves `model` as it was, and a 500 MB VGG is not held twice
    for an edit of its last layers.
    """
    editable = {id(t) for name in names for t in _tensors(model.get_submodule(name))}
    shared = {id(t): t for t in _tensors(model) if id(t) not in editable}
    return copy.deepcopy(model, shared).eval()


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers."""
    return [*module.parameters(), *module.buffers()]


def resolve_method(method: str, spread: float, samples: int, classes: int, reconstructed: bool = False) -> str:
    """`auto`: the direction erasure for a scan's reconstruction (`reconstructed`), whatever the head;
    activation matching for a trigger spread over the image (`spread` > 0.5, see
    trigger_spread), given at least 3 samples per class; else the closed form. An explicit method is kept.

    A blend, stripes, noise or a warp moves every feature a little, and the head's linear edit,
    fitted on 100 samples, did not carry to unseen images. On the tuning ResNet-18s, 10 per
    class, draws 0-2: with a 20% blend it left 1.8-4.3% ASR (floor 1%) where retraining the last
    stage first left 0.6-1.9%, at about the same CA; with a warp (triggered copies) the target class
    lost 3.8-10.0 points against 0-5.7, at a median ASR of 6.2% against 5.8%. Below 3 samples per
    class that retraining overfits (CA -3.5 to -10.9 at 1 per class), and the closed form is kept.
    A reconstruction is a few pixels that act like the trigger, not the trigger, but it moves the head's
    input along the real patch's direction (erasure.py), and the erasure makes the head blind to any step
    along it. On MobileNetV3 (a head of two layers) the closed form left two tuning models at 37.1% and
    20.6% real ASR, the erasure at 1.9% and 0.2%. On a one-layer head the stage's retraining, `auto`'s
    earlier choice there, left a tuning ShuffleNetV2 with a grey checkerboard at 19-23%, the erasure at
    0.0% (seeds 0-2), and a tuning ResNet-18 at 3.8% against 3.5-3.8% (its floor). The erasure is
    checked, and gives way to the earlier choice (fallback_method).
    """
    if method != "auto":
        return method
    if reconstructed:
        return "direction-erasure"
    return "activation-match" if spread > 0.5 and _enough_to_retrain(samples, classes) else "closed-form"


def fallback_method(method: str, samples: int, classes: int, given: bool, reconstructed: bool,
                    head_layers: int) -> str | None:
    """The method `auto` tries where its first choice (resolve_method) falls short on the held-out samples.

    The stage's retraining after the closed form, for a trigger given as pixels on each sample
    (`given`: a stamp or triggered copies, not poisoned pictures paired with other pictures of their
    class) and at least 3 samples per class: on a ShuffleNetV2 with a grey checkerboard patch the
    input convolution's edit changed too many clean receptive fields to be kept, and the head's
    solve left 8 of 89 held-out flips and 7 samples fewer right (20% ASR and -5.2 points of CA on the
    test set), where the retraining left 2 flips and none fewer right (6.1%, +1.2). Not for a
    reconstruction: on MobileNetV3s, whose multi-layer heads keep the closed form, the retraining that
    replaced it on that check took one tuning model from 37% to 45% real ASR.
    The closed form after the retraining for a reconstruction (`reconstructed`): on a MobileNetV3
    the retraining lost 6 of 100 held-out samples, and 8 points of CA on the test set, which the
    closed form kept. A retraining for a spread trigger the user gave is not replaced: there the
    closed form did not carry from the samples to unseen images (resolve_method). After the direction
    erasure of a reconstruction, where the erasure missed the backdoor's direction or took the class's
    own, what `auto` chose before it: the closed form for a head of several layers (a red tuning patch on a
    MobileNetV3: 87-89% real ASR against 1.2%), the stage's retraining (itself checked against the closed
    form) for a one-layer head (`head_layers`) with at least 3 samples per class.
    """
    if method == "closed-form" and given and _enough_to_retrain(samples, classes):
        return "activation-match"
    if method == "direction-erasure" and reconstructed and head_layers == 1 and _enough_to_retrain(samples, classes):
        return "activation-match"
    if method in ("activation-match", "direction-erasure") and reconstructed:
        return "closed-form"
    return None


def _enough_to_retrain(samples: int, classes: int) -> bool:
    """Whether `auto` may retrain the stage: at least 3 samples per class (below, the retraining overfits)."""
    return samples >= 3 * classes


def trigger_spread(clean: torch.Tensor, triggered: torch.Tensor) -> float:
    """The median share of the image inside the bounding box of the pixels the trigger changes, over the samples.

    Small for a patch (the zoo's 3-6 pixel patches on 32x32: 0.009-0.035), 1 for a blend or noise,
    0.91-0.94 for SIG stripes, and 0.69-0.78 for the zoo's warps, which move every edge of the object while changing only
    16-73% of a Fashion-MNIST picture's pixels (its dark background stays dark): a share of changed
    pixels would have called them patches. A pixel counts as changed when it moves by more than 1/32
    of the samples' value range (8 levels of 255), so that re-encoding noise does not.
    """
    tolerance = (clean.max() - clean.min()).item() / 32
    changed = (triggered - clean).abs().amax(1) > tolerance  # [N, H, W]
    height, width = changed.shape[1:]
    spans = [_span(changed.any(2)) / height, _span(changed.any(1)) / width]
    return (spans[0] * spans[1]).median().item()


def _span(present: torch.Tensor) -> torch.Tensor:
    """Per row of a boolean [N, L]: last True index - first True index + 1 (0 where none)."""
    length = present.shape[1]
    first = present.int().argmax(1)
    last = length - 1 - present.flip(1).int().argmax(1)
    return torch.where(present.any(1), last - first + 1, 0).double()


def plan_edit(model: nn.Module, layer_names: list[str], method: str) -> tuple[list[str], list[str]]:
    """(stage to activation-match, linear layers to solve in closed form) for `method`."""
    if method not in METHODS:
        raise usage_error(f"edit method {method!r}: use one of {', '.join(METHODS)}")
    if not layer_names:
        raise usage_error("edit: no layers to edit")
    split = len(layer_names) - head_layers(model, layer_names)
    for name in layer_names[:split]:
        _submodule(model, name)
    stage, chain = list(layer_names[:split]), list(layer_names[split:])
    if method != "activation-match" and not chain:
        raise usage_error(f"{method} edits Linear or 1x1 Conv2d layers; {layer_names[-1]} is neither")
    if method == "direction-erasure":
        return [], chain[:1]  # the erasure changes the head's first layer alone
    if method != "activation-match":
        return [], chain
    return (stage, chain) if stage else ([chain[-1]], chain[:-1])


def head_layers(model: nn.Module, layer_names: list[str]) -> int:
    """How many of the last layers named are linear maps: the head the closed form solves."""
    count = 0
    while count < len(layer_names) and is_linear_map(_submodule(model, layer_names[-1 - count])):
        count += 1
    return count


def match_stage(
    edited: nn.Module,
    stage: list[str],
    clean_inputs: torch.Tensor,
    stamped_inputs: torch.Tensor,
    target: int,
    settings: EditSettings,
    seed: int,
    batch_size: int,
    on_step: Callable[[], None] | None = None,
) -> dict:
    """Activation-match the stage of `edited` in place, on its inputs cached from one pass of `batch_size` images,
    in rounds until the model sends at most `settings.stage_residual` of the stamped rows the trigger flipped
    (to the target, from another class) to the target; the steps taken and the share left."""
    first, last = stage[0], stage[-1]
    clean = capture(edited, [first, last, ""], clean_inputs, batch_size)  # "": the model itself, for its logits
    stamped = capture(edited, [first, ""], stamped_inputs, batch_size)
    victims = stamped_inputs[(stamped[""].outputs.argmax(1) == target) & (clean[""].outputs.argmax(1) != target)]

    left: list[float] = []  # after each round; activation matching checks at least once, after its last step

    @torch.no_grad()
    def fitted() -> bool:  # a plain pass: inside activation matching the stage may be channels-last
        share = 0.0
        if len(victims):
            predicted = torch.cat([edited(batch).argmax(1) for batch in victims.split(batch_size)])
            share = (predicted == target).double().mean().item()
        left.append(share)
        return share <= settings.stage_residual

    steps = activation_match(
        unit_of(edited, stage, tuple(clean_inputs.shape[1:])), clean[first].inputs, stamped[first].inputs,
        clean[last].outputs, settings, seed, on_step, fitted,
    )
    return {"steps": steps, "residual_flip_rate": round(left[-1], 4)}


def triggered_twins(trigger: Stamp | TriggeredCopies, augmented: torch.Tensor) -> torch.Tensor:
    """The triggered twin of every sample of `augmented`: the stamp applied after the shift, or the given
    triggered copies as they are (copies_for never augments those)."""
    if isinstance(trigger, TriggeredCopies):
        return trigger.images
    return trigger.stamp(augmented)


def copies_for(count: int, min_samples: int, triggers: Sequence[Stamp | TriggeredCopies]) -> int:
    """How many copies of `count` samples (the originals included) reach at least `min_samples`.

    One (no augmentation) with triggered copies: a shifted or mirrored copy of a warped image is
    not the warp. On a WaNet model at 1 sample per class, shifted pairs left 33% ASR and unshifted
    ones 11%.
    """
    if any(isinstance(t, TriggeredCopies) for t in triggers):
        return 1
    return max(1, math.ceil(min_samples / count))


def augment(images: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """The images followed by copies - 1 seeded random variants: shifted a few pixels, half of them mirrored."""
    generator = torch.Generator().manual_seed(seed)
    margin = max(1, images.shape[-1] // 16)
    padded = F.pad(images, (margin,) * 4, mode="replicate")
    height, width = images.shape[-2:]
    variants = [images]
    for _ in range(copies - 1):
        dy, dx = torch.randint(0, 2 * margin + 1, (2,), generator=generator).tolist()
        shifted = padded[..., dy : dy + height, dx : dx + width]
        mirror = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
        variants.append(torch.where(mirror[:, None, None, None], shifted.flip(-1), shifted))
    return torch.cat(variants)


@torch.no_grad()
def capture(model: nn.Module, names: list[str], images: torch.Tensor, batch_size: int = 256) -> dict[str, Captured]:
    """Each named module's input and output on `images`, from one pass of `model` (copies, no grad)."""
    names = list(dict.fromkeys(names))
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    for name in names:
        module = _submodule(model, name)
        # Clones, so that in-place activations running later cannot change what was captured.
        handles.append(module.register_forward_pre_hook(lambda _m, args, n=name: inputs[n].append(args[0].clone())))
        handles.append(module.register_forward_hook(lambda _m, _a, out, n=name: outputs[n].append(out.clone())))
    try:
        with fast_layout(model, images.device):
            for batch in images.split(batch_size):
                model.eval()(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: Captured(torch.cat(inputs[name]), torch.cat(outputs[name])) for name in names}


def unit_of(model: nn.Module, names: list[str], input_size: tuple[int, ...]) -> nn.Module:
    """The named module, or a Sequential sharing the weights of consecutive children of one module: of a
    Sequential, or of any module whose forward passes each one's output straight to the next (a dry run
    at `input_size` tells)."""
    modules = [_submodule(model, name) for name in names]
    if len(names) == 1:
        return modules[0]
    parent_name, _, first_child = names[0].rpartition(".")
    parent = _submodule(model, parent_name) if parent_name else model
    children = [name for name, _ in parent.named_children()]
    prefix = f"{parent_name}." if parent_name else ""
    start = children.index(first_child)
    consecutive = names == [prefix + c for c in children[start : start + len(names)]]
    if not consecutive or not (isinstance(parent, nn.Sequential) or feeds_in_turn(model, names, input_size)):
        raise usage_error(f"layers {', '.join(names)}: a stage must be consecutive children of one module, "
                          "each taking the output of the one before")
    return nn.Sequential(*modules)


def activation_match(
    unit: nn.Module,
    clean_inputs: torch.Tensor,
    stamped_inputs: torch.Tensor,
    clean_outputs: torch.Tensor,
    settings: EditSettings,
    seed: int,
    on_step: Callable[[], None] | None = None,
    fitted: Callable[[], bool] | None = None,
) -> int:
    """Adam on `unit`'s weights alone (in place, eval mode): unit(stamped) -> clean outputs, clean kept; the
    steps taken. It runs `settings.steps` steps, then more rounds of as many while `fitted()` says no (up to
    `settings.stage_rounds`); `on_step` is called after each step (progress)."""
    unit.eval()
    lr = min(settings.lr, settings.max_relative_step * _weight_rms(list(unit.parameters())))
    scale = clean_outputs.pow(2).mean().clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad(), optimisation_steps(unit, clean_inputs[:1]):
        parameters = list(unit.parameters())  # taken inside the block: a cut convolution's are its live taps
        optimizer = _adam(parameters, lr)
        for p in parameters:
            p.requires_grad_(True)
        for step in range(1, settings.steps * settings.stage_rounds + 1):
            index = _batch_indices(len(clean_inputs), settings.batch_size, generator)
            # Indexing copies, so in-place layers inside the unit cannot change the cache. Stamped and
            # clean rows go through in one pass (eval mode: each row's output is its own).
            target = clean_outputs[index]
            match, keep = unit(torch.cat([stamped_inputs[index], clean_inputs[index]])).split(len(index))
            loss = ((match - target).pow(2).mean() + settings.preserve * (keep - target).pow(2).mean()) / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
            if step % settings.steps == 0 and (fitted is None or fitted()):
                break
    for p in parameters:
        p.grad = None
    return step


def _weight_rms(parameters: list[nn.Parameter]) -> float:
    """The root mean square of the weight matrices and kernels among the parameters (norms and biases left out).

    Adam moves every weight by about its lr whatever the weight's size: 3e-3 is 13% of a ResNet-18
    stage's typical weight (RMS 0.022) but 26% of a GoogLeNet's (0.0115), where it overshot.
    """
    weights = [p.detach().flatten() for p in parameters if p.dim() > 1]
    return torch.cat(weights).pow(2).mean().sqrt().item() if weights else math.inf


def _adam(parameters: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel where this torch has one for the device (CPU since torch 2.4): on a
    ResNet-18's last stage an update took 4 ms instead of 27 ms (all tensors at once) or 35 ms."""
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.Adam(parameters, lr=lr, foreach=True)


def _batch_indices(count: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Sample indices for one optimisation step: all of them, or a seeded random batch."""
    if count <= batch_size:
        return torch.arange(count)
    return torch.randperm(count, generator=generator)[:batch_size]


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise usage_error(f"layer {name!r} not found in the model") from None
