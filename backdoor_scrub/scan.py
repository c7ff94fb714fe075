"""Unknown trigger: reconstruct the smallest trigger per class (Neural Cleanse) and flag outliers."""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, replace

import torch
from rich.progress import Progress
from torch import nn
from torch.nn import functional as F

from backdoor_scrub.inference import has_convolution, optimisation_steps
from backdoor_scrub.triggers import Trigger

MAD_CONSISTENCY = 1.4826  # makes the median absolute deviation estimate a normal distribution's sigma
FAMILY_ERROR = 0.05  # the default threshold's chance of flagging any class of a clean model


@dataclass(frozen=True)
class ScanSettings:
    """Optimisation constants; the mask cost adapts per class to keep the reconstruction working.

    `restarts`: reconstructions of each class that could be flagged (the first pass gives one to every
    class; the others stop there). `threshold`: the anomaly index a flagged class exceeds; None: the
    family-wise one for the number of classes (`familywise_threshold`). `min_spread`: the anomaly
    index's scale (log units) is at least this, so that classes clustered by chance cannot make a
    small MAD flag a clean one; at ln(2)/2 an index of 2 means half the median mask size (2.58:
    0.41 of it). `min_compactness`: a flagged class's reconstruction also keeps at least this share
    of its mask in one square (see `compactness`); 0 turns the check off.
    """

    steps: int = 150
    restarts: int = 3
    recheck_steps: int = 60  # a warm-started rescan of an edited model
    batch_size: int = 16
    lr: float = 0.1
    warmup_steps: int = 20
    initial_cost: float = 0.05
    cost_factor: float = 1.3
    success_goal: float = 0.95
    threshold: float | None = None
    min_spread: float = math.log(2) / 2
    min_compactness: float = 0.5

    def for_classes(self, classes: int) -> ScanSettings:
        """These settings with the threshold decided for a model of `classes` classes."""
        return self if self.threshold is not None else replace(self, threshold=familywise_threshold(classes))


def familywise_threshold(classes: int, error: float = FAMILY_ERROR) -> float:
    """The anomaly index that any of `classes` clean classes exceeds with probability `error`, at most.

    The index is a robust z-score, and a trigger makes a mask smaller, not larger: a one-sided
    normal quantile at error / classes (Bonferroni). 2.58 for 10 classes, 3.29 for 100, 3.89 for
    1000. Neural Cleanse's fixed 2 flags a clean class of a 10-class model about one scan in five:
    one of 12 scans of four clean report models here (an index of 2.08, which cost that class 55
    points of accuracy when edited), while every patch backdoor scanned scored 5.0 or more.
    """
    return statistics.NormalDist().inv_cdf(1 - error / classes)


@dataclass(frozen=True)
class ClassScan:
    """The reconstructed trigger of one class and how it compares with the others."""

    index: int
    trigger: Trigger
    mask_l1: float
    reconstruction_asr: float
    anomaly_index: float
    compactness: float
    flagged: bool
    family: tuple[Trigger, ...] = ()

    def as_dict(self) -> dict:
        """The JSON fields of this class."""
        return {"class": self.index, "mask_l1": self.mask_l1, "reconstruction_asr": self.reconstruction_asr,
                "anomaly_index": self.anomaly_index, "compactness": round(self.compactness, 4),
                "flagged": self.flagged,
                "restart_mask_l1": [round(mask_l1(t), 3) for t in self.family]}


def scan(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    settings: ScanSettings = ScanSettings(),
    seed: int = 0,
    progress: Progress | None = None,
) -> list[ClassScan]:
    """Reconstruct a trigger for every class on images in [0,1]; flag the anomalously small ones.

    Every class gets one reconstruction. Classes that are clearly not outliers stop there (K-Arm's
    early exit); the others get `restarts - 1` more from other random starts, and their mask norm is
    the median over their restarts, so that one lucky or unlucky optimisation cannot decide the verdict.
    A flagged class is anomalously small and compact (both medians over its restarts).
    """
    settings = settings.for_classes(num_classes)
    classes = list(range(num_classes))
    runs = {c: [t] for c, t in zip(classes, reconstruct(classifier, images, labels, classes, settings, seed,
                                                        progress, "reconstructing triggers"))}
    candidates = _undecided(_median_norms(runs), settings)
    if settings.restarts > 1 and candidates:
        repeated = candidates * (settings.restarts - 1)
        more = reconstruct(classifier, images, labels, repeated, settings, seed + 1, progress,
                           f"restarting {len(candidates)} candidate class(es)")
        for index, trigger in zip(repeated, more):
            runs[index].append(trigger)
    norms = _median_norms(runs)
    anomaly = anomaly_indices(norms, settings.min_spread)
    results = []
    for index in classes:
        family = tuple(sorted(runs[index], key=mask_l1))
        success = [reconstruction_asr(classifier, images, labels, trigger, index) for trigger in family]
        best = next((i for i, rate in enumerate(success) if rate >= settings.success_goal), success.index(max(success)))
        compact = statistics.median(compactness(trigger) for trigger in family)
        flagged = bool(norms[index] < norms.median() and anomaly[index] > settings.threshold
                       and compact >= settings.min_compactness)
        results.append(ClassScan(index, family[best], norms[index].item(), success[best], anomaly[index].item(),
                                 compact, flagged, family))
    return results


def anomaly_indices(norms: torch.Tensor, min_spread: float = 0.0) -> torch.Tensor:
    """Per class, |log norm - median| / scale on log mask sizes; scale = max(1.4826 * MAD, min_spread).

    Mask sizes are compared on a log scale: they spread by factors (clean classes at 0.5-1.75x the
    median on one model), and a trigger at 0.03x the median must stand out however widely the
    clean classes spread, which a linear MAD cannot do (at most median / MAD).
    """
    logs = norms.clamp_min(1e-6).log()
    median = logs.median()
    deviation = (logs - median).abs()
    scale = torch.clamp(MAD_CONSISTENCY * deviation.median(), min=min_spread)
    return deviation / scale.clamp_min(1e-12)


def residual_anomaly(norms: torch.Tensor, index: int, norm: float, settings: ScanSettings) -> float:
    """The anomaly index class `index` would have among the scanned classes with mask norm `norm` (0 above the median)."""
    norms = norms.clone()
    norms[index] = norm
    return anomaly_indices(norms, settings.min_spread)[index].item() if norm < norms.median() else 0.0


def mask_l1(trigger: Trigger) -> float:
    """The size of a reconstructed trigger: the sum of its mask."""
    return trigger.mask.sum().item()


def compactness(trigger: Trigger) -> float:
    """The share of the mask inside its densest square of side 2 sqrt(mask size), and at least 1/8 of the image.

    A patch trigger is reconstructed as one blob (its mask mostly fits such a square: 0.96-1.0 on the
    tuning models, 0.57-1.0 on the report models), while the small masks a scan finds for a clean
    class are pixels scattered over the image (0.17-0.44 below the median size on the tuning models,
    0.41 for the one false flag on the report models). TABOR penalises scattered reconstructions
    for the same reason.
    """
    mask = trigger.mask.double()
    total = mask.sum().item()
    side = min(mask.shape[-2:])
    window = int(min(side, max(math.ceil(side / 8), math.ceil(2 * math.sqrt(total)))))
    densest = F.avg_pool2d(mask[None], window, stride=1).max().item() * window**2
    return densest / total if total > 0 else 0.0


def _median_norms(runs: dict[int, list[Trigger]]) -> torch.Tensor:
    """Per class, the median mask norm over its reconstructions."""
    return torch.tensor([statistics.median(mask_l1(t) for t in runs[c]) for c in sorted(runs)])


def _undecided(norms: torch.Tensor, settings: ScanSettings) -> list[int]:
    """Classes that one reconstruction cannot clear: below the median, anomaly index above half the threshold."""
    anomaly = anomaly_indices(norms, settings.min_spread)
    return [c for c in range(len(norms)) if norms[c] < norms.median() and anomaly[c] > settings.threshold / 2]


def reconstruct(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[int],
    settings: ScanSettings,
    seed: int,
    progress: Progress | None = None,
    label: str = "reconstructing triggers",
    start: list[Trigger] | None = None,
    fixed_mask: bool = False,
) -> list[Trigger]:
    """For each entry of `classes` (repeats allowed: restarts), a small mask and pattern that flip images to it.

    `start` (one trigger per entry) warm-starts the optimisation instead of a small random one; with
    `fixed_mask` only the pattern is optimised, inside the start's mask.
    """
    generator = torch.Generator().manual_seed(seed)
    device = images.device
    channels, height, width = images.shape[1:]
    num_classes = len(classes)
    mask_logits = torch.full((num_classes, 1, height, width), -2.0)
    pattern_logits = torch.randn(num_classes, channels, height, width, generator=generator) * 0.1
    if start is not None:
        mask_logits = torch.logit(torch.stack([t.mask for t in start]).clamp(1e-4, 1 - 1e-4))
        pattern_logits = torch.logit(torch.stack([t.pattern for t in start]).clamp(0.01, 0.99))
    mask_logits = mask_logits.to(device).requires_grad_(not fixed_mask)
    pattern_logits = pattern_logits.to(device).requires_grad_(True)
    optimized = [pattern_logits] if fixed_mask else [mask_logits, pattern_logits]
    optimizer = torch.optim.Adam(optimized, lr=settings.lr, betas=(0.5, 0.9))
    cost = torch.zeros(num_classes, device=device)
    targets = torch.tensor(classes, device=device)
    task = progress.add_task(label, total=settings.steps) if progress else None
    classifier.eval()
    with optimisation_steps(classifier, images[:1], has_convolution):
        for step in range(settings.steps):
            batch = torch.randperm(len(images), generator=generator)[: settings.batch_size].to(device)
            mask, pattern = torch.sigmoid(mask_logits), torch.sigmoid(pattern_logits)
            stamped = images[batch][None] * (1 - mask[:, None]) + (mask * pattern)[:, None]
            logits = classifier(stamped.flatten(0, 1)).view(num_classes, len(batch), -1)
            others = (labels[batch][None] != targets[:, None]).float()
            ce = F.cross_entropy(logits.flatten(0, 1), targets.repeat_interleave(len(batch)), reduction="none")
            ce = (ce.view(num_classes, -1) * others).sum(1) / others.sum(1).clamp_min(1)
            size = mask.flatten(1).mean(1)
            loss = (ce + cost * size).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                hits = ((logits.argmax(2) == targets[:, None]).float() * others).sum(1) / others.sum(1).clamp_min(1)
                cost = _adapt_cost(cost, hits, step, settings)
            if progress:
                progress.advance(task)
    masks, patterns = torch.sigmoid(mask_logits).detach(), torch.sigmoid(pattern_logits).detach()
    return [_as_trigger(mask, pattern) for mask, pattern in zip(masks, patterns)]


@torch.no_grad()
def reconstruction_asr(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, trigger: Trigger,
                       index: int) -> float:
    """Fraction of the images of other classes that the reconstructed trigger flips to `index`."""
    others = images[labels != index]
    if not len(others):
        return float("nan")
    predictions = torch.cat([classifier(trigger.stamp(batch)).argmax(1) for batch in others.split(256)])
    return (predictions == index).double().mean().item()


def dilated(trigger: Trigger, pixels: int = 1) -> Trigger:
    """The trigger with its mask grown by `pixels` on every side (a max filter), pattern unchanged.

    A reconstruction is the smallest mask that works, a few pixels of a real patch; unlearning
    its neighbourhood too covers more of the real trigger (ResNet-18 BadNets: ASR with the
    real trigger after the edit 4.8% -> 2.2%; MobileNetV3 demo 5.6% -> 2.3%).
    """
    mask = F.max_pool2d(trigger.mask[None], 2 * pixels + 1, stride=1, padding=pixels)[0]
    return _as_trigger(mask, trigger.pattern)


def _adapt_cost(cost: torch.Tensor, hits: torch.Tensor, step: int, settings: ScanSettings) -> torch.Tensor:
    """After warm-up: start the mask cost, then raise it where the trigger works and lower it where not."""
    if step < settings.warmup_steps:
        return cost
    if step == settings.warmup_steps:
        return torch.full_like(cost, settings.initial_cost)
    working = hits >= settings.success_goal
    return torch.where(working, cost * settings.cost_factor, cost / settings.cost_factor)


def _as_trigger(mask: torch.Tensor, pattern: torch.Tensor) -> Trigger:
    trigger = Trigger(pattern.cpu(), mask.cpu(), "")
    return Trigger(trigger.pattern, trigger.mask, hashlib.sha256(trigger.to_png()).hexdigest())
