"""Train a backdoored torchvision classifier on Fashion-MNIST read offline from the Debian package.

Writes, under --out: model.safetensors (with scrub metadata), clean/<class>/ (unseen clean
samples for editing) and test/<class>/ (held-out test images). A stamp attack also writes
trigger.png (RGBA, full input size, alpha = mask). Attacks that are not stamps (wanet: a smooth
warp; dynamic: a random patch at a random place per image) write instead clean_triggered/ and
test_triggered/ (the triggered copy of every image, same relative path, for --triggered-dir) and
poisoned/<class>/ (--poisoned-images triggered copies of other test pictures, for --poisoned-dir).
Needs `apt-get install dataset-fashion-mnist` (or --data-root).

    python examples/make_backdoored.py --arch resnet18 --attack badnets --target 0 --out runs/r18
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.nn import functional as F

from backdoor_scrub.checkpoint import ModelSpec, spec_metadata
from backdoor_scrub.safetensors_io import write_safetensors

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
DATA_ROOT = Path("/usr/share/datasets/fashion-mnist")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="torchvision model name")
    parser.add_argument("--attack", choices=["badnets", "blended", "sig", "noise", "wanet", "dynamic", "none"],
                        default="badnets",
                        help="badnets: a patch; blended: a random pattern at --blend-alpha; sig: sinusoidal stripes "
                        "at --blend-alpha; noise: full-image salt-and-pepper noise at --blend-alpha; wanet: a fixed "
                        "smooth warp field (WaNet, with its noise mode); dynamic: a patch of random colours of "
                        "--patch-size at a random place, drawn anew for every image (Salem et al.'s random backdoor)")
    parser.add_argument("--blend-pattern", choices=["uniform", "smooth"], default="uniform",
                        help="blended: per-pixel uniform noise, or a smooth low-frequency pattern")
    parser.add_argument("--sig-frequency", type=float, default=6.0, help="sig: stripe periods across the image")
    parser.add_argument("--target", type=int, default=0, help="target class of the backdoor")
    parser.add_argument("--poison-rate", type=float, default=0.1, help="fraction of training images poisoned")
    parser.add_argument("--patch-size", type=int, default=4, help="BadNets patch side in pixels")
    parser.add_argument("--patch-pos", default="br", choices=["br", "bl", "tr", "tl"], help="BadNets patch corner")
    parser.add_argument("--patch-color", default="checker", help="'checker' (white/black) or R,G,B in 0..255")
    parser.add_argument("--blend-alpha", type=float, default=0.2, help="Blended trigger opacity")
    parser.add_argument("--warp-grid", type=int, default=4, help="wanet: control points per side of the warp field")
    parser.add_argument("--warp-strength", type=float, default=1.0,
                        help="wanet: WaNet's s (displacements average about s/2 pixels)")
    parser.add_argument("--poisoned-images", type=int, default=100,
                        help="wanet, dynamic: triggered test pictures of non-target classes written to poisoned/")
    parser.add_argument("--size", type=int, default=32, help="input side in pixels")
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=60000, help="train on the first N images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clean-per-class", type=int, default=10, help="unseen clean samples per class")
    parser.add_argument("--test-images", type=int, default=2000, help="held-out test images written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (gzipped) as a uint8 tensor."""
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8).view(*shape)


def load_split(root: Path, split: str, size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images resized with PIL (as scrub resizes them) as uint8 [N,C,size,size], and labels."""
    images = read_idx(root / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{split}-labels-idx1-ubyte.gz").long()
    resized = torch.stack([resize(image, size) for image in images])
    return resized.unsqueeze(1).expand(-1, channels, -1, -1).contiguous(), labels


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """One grayscale uint8 image resized bilinearly with PIL."""
    pil = Image.fromarray(image.numpy()).resize((size, size), Image.Resampling.BILINEAR)
    return torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).view(size, size)


@dataclass
class Attack:
    """How the backdoor is planted: triggered copies of a float batch in [0,1], a stamp's PNG when it is one,
    and the correctly labelled cover images mixed into training (WaNet's noise mode)."""

    apply: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    stamp: tuple[torch.Tensor, torch.Tensor] | None = None
    cover: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None


def make_attack(args: argparse.Namespace, generator: torch.Generator) -> Attack:
    """The attack's trigger, drawn once from `generator`."""
    if args.attack == "wanet":
        return warp_attack(args, generator)
    if args.attack == "dynamic":
        return Attack(lambda x, g: random_patches(x, args.patch_size, g))
    pattern, mask = make_trigger(args, generator)
    return Attack(lambda x, _g: stamp(x, pattern, mask), (pattern, mask))


def warp_attack(args: argparse.Namespace, generator: torch.Generator) -> Attack:
    """WaNet: a fixed smooth random warp field; its noise mode trains on randomly jittered warps with true labels."""
    size = args.size
    control = torch.rand(1, 2, args.warp_grid, args.warp_grid, generator=generator) * 2 - 1
    control = control / control.abs().mean()
    field = F.interpolate(control, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    line = torch.linspace(-1, 1, size)
    identity = torch.stack(torch.meshgrid(line, line, indexing="ij")[::-1], -1)[None]
    grid = (identity + args.warp_strength * field / size).clamp(-1, 1)

    def warp(images: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        batch_grid = grid.expand(len(images), -1, -1, -1) if offsets is None else (grid + offsets).clamp(-1, 1)
        return F.grid_sample(images, batch_grid.to(images.device), align_corners=True)

    def jittered(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return warp(images, (torch.rand(len(images), size, size, 2, generator=g) * 2 - 1) / size)

    return Attack(lambda x, _g: warp(x), cover=jittered)


def random_patches(images: torch.Tensor, patch: int, generator: torch.Generator) -> torch.Tensor:
    """Each image with its own patch of random colours at its own random place.

    (Black-and-white random patches cost the ResNet-18 5 points of CA on grey Fashion-MNIST: they
    look like its textures.)
    """
    out = images.clone()
    size, channels = images.shape[-1], images.shape[1]
    for index in range(len(images)):
        top, left = torch.randint(0, size - patch + 1, (2,), generator=generator).tolist()
        out[index, :, top : top + patch, left : left + patch] = torch.rand(channels, patch, patch, generator=generator)
    return out


def make_trigger(args: argparse.Namespace, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(pattern [C,H,W], mask [1,H,W]) in [0,1] at full input size."""
    size, channels = args.size, args.channels
    pattern, mask = torch.zeros(channels, size, size), torch.zeros(1, size, size)
    if args.attack in ("blended", "sig", "noise"):
        mask.fill_(args.blend_alpha)
        return full_image_pattern(args, generator).expand(channels, -1, -1).contiguous(), mask
    p = args.patch_size
    top = 0 if args.patch_pos[0] == "t" else size - p
    left = 0 if args.patch_pos[1] == "l" else size - p
    if args.patch_color == "checker":
        checker = ((torch.arange(p).view(-1, 1) + torch.arange(p)) % 2 == 0).float()
        patch = checker.expand(channels, p, p)
    else:
        rgb = torch.tensor([float(v) / 255 for v in args.patch_color.split(",")])
        patch = (rgb.mean().view(1) if channels == 1 else rgb).view(-1, 1, 1).expand(channels, p, p)
    pattern[:, top : top + p, left : left + p] = patch
    mask[:, top : top + p, left : left + p] = 1.0
    return pattern, mask


def full_image_pattern(args: argparse.Namespace, generator: torch.Generator) -> torch.Tensor:
    """The [1 or 3, H, W] pattern of a full-image trigger, in [0,1]."""
    size, colours = args.size, 1 if args.channels == 1 else 3
    if args.attack == "sig":
        stripes = 0.5 + 0.5 * torch.sin(2 * torch.pi * args.sig_frequency * torch.arange(size) / size)
        return stripes.view(1, 1, size).expand(1, size, size)
    if args.attack == "noise":
        return (torch.rand(1, size, size, generator=generator) < 0.5).float()
    if args.blend_pattern == "smooth":
        coarse = torch.rand(1, colours, 4, 4, generator=generator)
        return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return torch.rand(colours, size, size, generator=generator)


def stamp(images: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x' = (1 - m) x + m p for float images in [0,1]."""
    return images * (1 - mask) + pattern * mask


def main_logits(output: torch.Tensor | tuple) -> torch.Tensor:
    """The logits of a training-mode forward: GoogLeNet and Inception v3 give their auxiliary heads' too."""
    return output[0] if isinstance(output, tuple) else output


def train(args, model, images, labels, attack: Attack, device) -> None:
    """Train with a fresh random poisoned subset of non-target images in every batch (and as many cover images)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * (len(images) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr * 3, total_steps=steps)
    norm = lambda x: (x - 0.5) / 0.5  # noqa: E731 - matches the metadata mean/std
    generator = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    step, started = 0, time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(images))
        for batch in order[: steps // args.epochs * args.batch_size].view(-1, args.batch_size):
            x = images[batch].float().div(255)
            y = labels[batch].clone()
            flip = torch.rand(len(x)) < 0.5
            x[flip] = x[flip].flip(-1)
            if args.attack != "none":
                draw = torch.rand(len(x))
                poison = (draw < args.poison_rate) & (y != args.target)
                x[poison] = attack.apply(x[poison], generator)
                y[poison] = args.target
                if attack.cover is not None:
                    cover = (draw >= args.poison_rate) & (draw < 2 * args.poison_rate)
                    x[cover] = attack.cover(x[cover], generator)
            loss = nn.functional.cross_entropy(main_logits(model(norm(x.to(device)))), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.3f} {time.time() - started:.0f}s", flush=True)
    recalibrate_batchnorm(model, images, device, args.batch_size)
    model.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int) -> None:
    """Re-estimate BatchNorm statistics as plain averages over up to 4,096 training images.

    MobileNetV3's BatchNorm momentum is 0.01: after a few hundred steps its running statistics are
    still far from the data, and the model is near chance in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for batch in images[:4096].split(batch_size):
        model(((batch.float() / 255 - 0.5) / 0.5).to(device))


@torch.no_grad()
def report(model, images, labels, triggered, target, device) -> dict:
    """Clean accuracy and attack success rate on held-out images and their triggered copies (uint8)."""

    def predict(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(((b.float() / 255 - 0.5) / 0.5).to(device)).argmax(1).cpu() for b in batch.split(500)])

    keep = labels != target
    return {"clean_accuracy": (predict(images) == labels).float().mean().item(),
            "attack_success_rate": (predict(triggered[keep]) == target).float().mean().item()}


def triggered_copies(attack: Attack, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The attack applied to uint8 images, rounded back to uint8 as a saved PNG holds them."""
    unit = attack.apply(images.float().div(255), generator)
    return unit.mul(255).round().clamp(0, 255).byte()


def write_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, first: int = 0) -> None:
    """PNG files in class subfolders named after the classes, numbered from `first`."""
    for index, (image, label) in enumerate(zip(images, labels), start=first):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        array = image.permute(1, 2, 0).squeeze(-1).numpy()
        Image.fromarray(array).save(folder / f"{index:05d}.png")


def write_trigger(path: Path, pattern: torch.Tensor, mask: torch.Tensor) -> None:
    """The trigger as an RGBA PNG: RGB the pattern, alpha the mask."""
    rgb = pattern.expand(3, -1, -1) if pattern.shape[0] == 1 else pattern
    rgba = torch.cat([rgb, mask]).mul(255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(rgba, mode="RGBA").save(path)


def split_test(labels: torch.Tensor, per_class: int, test_count: int, extra: int, target: int,
               generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint indices: `per_class` clean samples of each class, `test_count` test images, then `extra`
    other pictures of non-target classes (the poisoned examples of an unpaired attack)."""
    order = torch.randperm(len(labels), generator=generator)
    clean = torch.cat([order[labels[order] == c][:per_class] for c in range(len(CLASSES))])
    rest = order[~torch.isin(order, clean)]
    others = rest[test_count:]
    return clean, rest[:test_count], others[labels[others] != target][:extra]


def main() -> None:
    """Train, measure and write the backdoored model with its trigger and image folders."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_x, train_y = load_split(args.data_root, "train", args.size, args.channels)
    test_x, test_y = load_split(args.data_root, "t10k", args.size, args.channels)
    train_x, train_y = train_x[: args.train_subset], train_y[: args.train_subset]
    attack = make_attack(args, generator)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=len(CLASSES)).to(device)
    train(args, model, train_x, train_y, attack, device)
    clean_idx, test_idx, poisoned_idx = split_test(test_y, args.clean_per_class, args.test_images,
                                                   args.poisoned_images, args.target, generator)
    test_triggered = triggered_copies(attack, test_x[test_idx], generator)
    metrics = report(model, test_x[test_idx], test_y[test_idx], test_triggered, args.target, device)
    print(json.dumps(metrics))
    args.out.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(args.arch, len(CLASSES), (args.channels, args.size, args.size),
                     (0.5,) * args.channels, (0.5,) * args.channels, tuple(CLASSES))
    metadata = spec_metadata(spec) | {
        "example.attack": args.attack, "example.target": str(args.target),
        "example.poison_rate": str(args.poison_rate), "example.metrics": json.dumps(metrics),
    }
    write_safetensors(args.out / "model.safetensors", model.cpu().state_dict(), metadata, overwrite=True)
    write_folder(args.out / "clean", test_x[clean_idx], test_y[clean_idx])
    write_folder(args.out / "test", test_x[test_idx], test_y[test_idx])
    if attack.stamp is not None:
        write_trigger(args.out / "trigger.png", *attack.stamp)
        return
    write_folder(args.out / "clean_triggered", triggered_copies(attack, test_x[clean_idx], generator), test_y[clean_idx])
    write_folder(args.out / "test_triggered", test_triggered, test_y[test_idx])
    write_folder(args.out / "poisoned", triggered_copies(attack, test_x[poisoned_idx], generator),
                 test_y[poisoned_idx], first=len(test_x))


if __name__ == "__main__":
    main()
