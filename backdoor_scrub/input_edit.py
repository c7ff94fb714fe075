"""The edit of the convolution that reads the image: a stamp's pixels -> the outputs the clean image gives there.

A patch trigger is most out of place where the model first sees it: in pixel space a coloured or
high-contrast square is a patch of values that clean images rarely contain, and one convolution,
treated as a linear map of each position's receptive field, can be solved to send those patches to
what the clean image gives at the same position while keeping every clean position's output. Later
layers then receive (nearly) the clean activations, whatever the network would have amplified. A
full-image trigger (a blend, stripes, noise) touches every position by little; there the solve would
have to undo it everywhere, and the layer is not tried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from backdoor_scrub.calibration import HeldOut, choose_edit, cross_validate, fold_ids, score_held_out
from backdoor_scrub.chain_edit import Strength
from backdoor_scrub.linear_edit import linear_weight, set_linear_weight


class _Found(Exception):
    """Raised by the probe's hook to stop the pass at the first convolution."""


@dataclass(frozen=True)
class PatchGrams:
    """Sums of key products over positions, one per fold: clean keys, stamped keys where the stamp changed
    the receptive field, and stamped x clean keys at those positions (the values are W times the latter)."""

    clean: torch.Tensor  # [folds, D, D]
    stamped: torch.Tensor  # [folds, D, D]
    cross: torch.Tensor  # [folds, D, D]
    clean_count: torch.Tensor  # [folds]
    stamped_count: torch.Tensor  # [folds]

    def total(self, folds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The sums over the given folds."""
        return tuple(t[folds].sum(0) for t in (self.clean, self.stamped, self.cross, self.clean_count,
                                               self.stamped_count))


@torch.no_grad()
def input_convolution(model: nn.Module, probe: torch.Tensor) -> str | None:
    """The name of the first convolution to run, when it is ungrouped and takes the model's input as it is.

    Found by running a probe up to that convolution (the pass stops there). None when the model
    transforms its input first (Inception's `transform_input`) or starts with something else.
    """
    seen: list[tuple[str, torch.Tensor]] = []

    def stop(name: str, args: tuple) -> None:
        seen.append((name, args[0]))
        raise _Found

    convolutions = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: stop(name, args)) for name, m in convolutions]
    try:
        model.eval()(probe)
    except _Found:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        return None
    name, first_input = seen[0]
    conv = model.get_submodule(name)
    takes_image = first_input.shape == probe.shape and torch.equal(first_input, probe)
    plain = conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    return name if takes_image and plain else None


@torch.no_grad()
def patch_grams(conv: nn.Conv2d, clean: torch.Tensor, stamped: torch.Tensor, row_folds: torch.Tensor, folds: int,
                batch_size: int) -> PatchGrams:
    """Key sums per fold over every position of `clean` and every stamp-changed position of `stamped`.

    `stamped` holds one or more stamped copies of `clean`, one after the other (a family of triggers);
    `row_folds` gives each row of `clean` its fold.
    """
    width = conv.weight[0].numel() + (conv.bias is not None)
    sums = [torch.zeros(folds, width, width, dtype=torch.float64, device=clean.device) for _ in range(3)]
    counts = [torch.zeros(folds, dtype=torch.float64, device=clean.device) for _ in range(2)]
    copies = len(stamped) // len(clean)
    step = max(1, batch_size // 8)
    for start in range(0, len(clean), step):
        stop = min(start + step, len(clean))
        rows = slice(start, stop)
        fold = row_folds[rows]
        keys_clean = _keys(conv, clean[rows])
        _accumulate(sums[0], counts[0], fold, keys_clean, keys_clean)
        for copy in range(copies):
            offset = copy * len(clean)
            keys_stamped = _keys(conv, stamped[offset + start : offset + stop])
            changed = (keys_stamped - keys_clean).abs().amax(-1) > 1e-6
            _accumulate(sums[1], counts[1], fold, keys_stamped, keys_stamped, changed)
            _accumulate(sums[2], None, fold, keys_stamped, keys_clean, changed)
    return PatchGrams(*sums, *counts)


def fit_input_edit(conv: nn.Conv2d, original: torch.Tensor, grams: PatchGrams, folds: torch.Tensor,
                   strength: Strength) -> None:
    """Write into `conv` the solve on the given folds' sums, from its original [W b] matrix.

    argmin_W' |W'Kt - W Kc|^2/nt + lam |W'Kc - W Kc|^2/nc + mu s |W' - W|^2, with Kt the stamped
    keys where the stamp changed the receptive field, Kc the clean keys at the same positions (in
    the first term) or at every position (in the second), s the mean squared clean key norm.
    """
    clean, stamped, cross, clean_count, stamped_count = grams.total(folds)
    if stamped_count < 1:
        set_linear_weight(conv, original.to(conv.weight.dtype))
        return
    weight = original.double()
    energy = clean.trace() / clean_count
    eye = torch.eye(len(clean), dtype=torch.float64, device=clean.device)
    system = stamped / stamped_count + strength.lam * clean / clean_count + strength.mu * energy * eye
    right = (cross / stamped_count + strength.lam * clean / clean_count + strength.mu * energy * eye) @ weight.T
    set_linear_weight(conv, torch.linalg.solve(system, right).T.to(conv.weight.dtype))


@torch.no_grad()
def calibrate_input_edit(
    model: nn.Module,
    name: str,
    clean: torch.Tensor,
    stamped: torch.Tensor,
    samples: int,
    labels: torch.Tensor,
    target: int,
    strengths: list[Strength],
    max_folds: int,
    batch_size: int,
    logits: Callable[[torch.Tensor], torch.Tensor],
    max_changed: float,
    max_remaining: float,
    max_lost: float,
) -> dict:
    """Edit `model`'s input convolution in place with the strength that held-out folds favour, or leave it;
    the report of what was chosen (`chosen` None: left alone) and why.

    Leaving it (None) is the last, weakest candidate and costs no pass: its held-out logits are the
    unedited model's. `clean` rows 0..samples-1 are the user's samples, later rows their augmented
    copies; the first `len(clean)` rows of `stamped` (the first trigger) score the candidates.
    A trigger that changes more than `max_changed` of the receptive fields is not a patch (a
    blend, stripes, noise, a warp), and one that flips none of the samples leaves nothing to stop:
    the layer is left alone without trying. Which strengths are eligible: see choose_input_edit.
    """
    conv = model.get_submodule(name)
    original = linear_weight(conv).clone()
    sample_folds = fold_ids(labels, max_folds)
    count = int(sample_folds.max()) + 1
    row_folds = sample_folds[torch.arange(len(clean)) % samples].to(clean.device)
    grams = patch_grams(conv, clean, stamped, row_folds, count, batch_size)
    changed = (grams.stamped_count.sum() / (grams.clean_count.sum() * (len(stamped) // len(clean)))).item()
    if changed > max_changed:
        reason = f"the trigger changes {changed:.0%} of the receptive fields: not a patch"
        return _left_alone(name, changed, reason)
    held_images = (clean[:samples], stamped[:samples])
    before = tuple(logits(images) for images in held_images)
    if score_held_out(*before, *before, labels, target).flips == 0:
        return _left_alone(name, changed, "the trigger flips none of the samples: nothing to stop")
    candidates: list[Strength | None] = [*strengths, None]
    current: list[Strength | None] = [None]

    def fit(train_rows: torch.Tensor, candidate: Strength | None) -> None:
        current[0] = candidate
        if candidate is not None:
            fit_input_edit(conv, original, grams, row_folds[train_rows].unique(), candidate)

    def logits_of(held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if current[0] is None:
            return before[0][held], before[1][held]
        return logits(held_images[0][held]), logits(held_images[1][held])

    scores, folds = cross_validate(labels, len(clean), candidates, fit, logits_of, before, target, max_folds)
    chosen = candidates[choose_input_edit(scores, max_remaining, max_lost)]
    if chosen is None:
        set_linear_weight(conv, original.to(conv.weight.dtype))
    else:
        fit_input_edit(conv, original, grams, torch.arange(count), chosen)
    return {
        "layer": name,
        "changed_positions": round(changed, 4),
        "folds": folds,
        "chosen": None if chosen is None else {"lam": chosen.lam, "mu": chosen.mu},
        "held_out": scores[candidates.index(chosen)].as_dict(),
        "candidates": [{"lam": None if c is None else c.lam, "mu": None if c is None else c.mu, "flips": s.flips,
                        "changed": s.changed, "residual": round(s.residual, 4)} for c, s in zip(candidates, scores)],
    }


def choose_input_edit(scores: list[HeldOut], max_remaining: float, max_lost: float) -> int:
    """The index of the input edit to keep among held-out scores whose last entry is leaving the layer alone.

    An input edit is there to stop the trigger where it enters, and the head's edit comes after it
    either way. So a strength is eligible only when it leaves at most `max_remaining` of the held-out
    flips that leaving the layer alone has (else its clean cost buys little), and gets at most
    `max_lost` of the held-out samples fewer right (a first convolution that cannot tell the stamp from
    clean edges: on a VGG-11-BN with a checkerboard, the strongest edit stopped 58% of the flips and
    cost 8 of 100 held-out samples, 13.6 points of test accuracy). Among the eligible, choose_edit.
    """
    left = scores[-1]
    eligible = [i for i, score in enumerate(scores) if score is left or (
        score.flips <= max_remaining * left.flips and left.correct - score.correct <= max_lost * score.images)]
    return eligible[choose_edit([scores[i] for i in eligible])]


def _left_alone(name: str, changed: float, reason: str) -> dict:
    """The report of an input convolution that was not tried, and why."""
    return {"layer": name, "changed_positions": round(changed, 4), "chosen": None, "reason": reason}


def receptive_fields(conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    """[N, positions, C x kh x kw] receptive fields of `conv` on the images, float64."""
    return F.unfold(images.double(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                    stride=conv.stride).transpose(1, 2)


def _keys(conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    """[N, positions, D] receptive fields of `conv` (with a constant 1 when it has a bias), float64."""
    patches = receptive_fields(conv, images)
    if conv.bias is None:
        return patches
    return torch.cat([patches, patches.new_ones(*patches.shape[:2], 1)], -1)


def _accumulate(sums: torch.Tensor, counts: torch.Tensor | None, fold: torch.Tensor, left: torch.Tensor,
                right: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Add left^T right over the selected positions of each row to the row's fold."""
    for row in range(len(left)):
        rows = slice(None) if where is None else where[row]
        a, b = left[row][rows], right[row][rows]
        sums[fold[row]] += a.T @ b
        if counts is not None:
            counts[fold[row]] += len(a)
