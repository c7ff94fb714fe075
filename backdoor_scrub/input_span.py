"""The input convolution restricted to what clean images contain: weights on directions no clean receptive field has are zeroed.

Each output of the convolution that reads the image is a dot product of its weights with one
receptive field (C x kh x kw pixel values). When the clean samples' receptive fields span only part
of that space (greyscale pictures stored as RGB span one colour direction of three), the weights'
component outside the span never acts on a clean image, so no clean behaviour constrains it, and a
trigger made of what clean images lack (a colour on greyscale pictures) is read through it alone.
Replacing W by W P, with P the orthogonal projector on the span, changes nothing for an image inside
the span and drops what any input outside it adds. On natural colour images the span is the whole
space and nothing changes.
"""

from __future__ import annotations

import torch
from torch import nn

from backdoor_scrub.editing import copy_for_edit
from backdoor_scrub.input_edit import input_convolution, receptive_fields

RELATIVE_TOLERANCE = 1e-6  # an eigenvalue of the receptive fields' Gram matrix below this times the largest is empty
FIELD_VALUES = 1 << 22  # receptive-field values unfolded at a time (32 MiB in float64)


@torch.no_grad()
def clean_span_projector(conv: nn.Conv2d, clean_inputs: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector (D x D, float64) on the span of the clean inputs' receptive fields of `conv`."""
    size = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    gram = torch.zeros(size, size, dtype=torch.float64, device=clean_inputs.device)
    batch = max(1, FIELD_VALUES // receptive_fields(conv, clean_inputs[:1]).numel())
    for start in range(0, len(clean_inputs), batch):
        fields = receptive_fields(conv, clean_inputs[start:start + batch]).flatten(0, 1)
        gram += fields.T @ fields
    values, vectors = torch.linalg.eigh(gram)
    inside = vectors[:, values > RELATIVE_TOLERANCE * values.max().clamp_min(torch.finfo(torch.float64).tiny)]
    return inside @ inside.T


def within_clean_span(model: nn.Module, clean_inputs: torch.Tensor) -> tuple[nn.Module, dict | None]:
    """A copy of `model` whose input convolution is restricted to the clean span, and what changed.

    `model` itself when the samples span the whole receptive field (natural colour images) or the
    model does not start with a plain convolution of its input (then the record is None).
    """
    name = input_convolution(model, clean_inputs[:1])
    if name is None:
        return model, None
    projector = clean_span_projector(model.get_submodule(name), clean_inputs)
    size, rank = projector.shape[0], round(float(projector.trace()))
    if rank == size:
        return model, None
    restricted = copy_for_edit(model, [name])
    conv = restricted.get_submodule(name)
    with torch.no_grad():
        weight = conv.weight.reshape(conv.out_channels, -1).double() @ projector
        conv.weight.copy_(weight.reshape(conv.weight.shape).to(conv.weight.dtype))
    return restricted, {"layer": name, "receptive_field_dimensions": size, "clean_span_dimensions": rank}
