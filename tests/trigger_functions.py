"""Trigger functions for --trigger-fn tests: the demo's stamp as a function, and broken ones."""

from __future__ import annotations

from pathlib import Path

import torch

from backdoor_scrub.triggers import load_trigger

DEMO_TRIGGER = Path(__file__).resolve().parent.parent / "examples" / "demo" / "trigger.png"


def demo_stamp(images: torch.Tensor) -> torch.Tensor:
    """The demo's trigger PNG, stamped at its default place, as a function of a [0,1] batch."""
    return load_trigger(DEMO_TRIGGER, tuple(images.shape[1:])).stamp(images)


def wrong_shape(images: torch.Tensor) -> torch.Tensor:
    """Returns one image fewer than it was given."""
    return images[1:]


def crashes(images: torch.Tensor) -> torch.Tensor:
    """Raises, as buggy user code does."""
    raise RuntimeError("boom")


NOT_A_FUNCTION = 3
