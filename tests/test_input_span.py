"""The input convolution restricted to the clean span: exact on clean images, blind to what they never contain."""

import torch
from torch import nn

from backdoor_scrub.input_span import clean_span_projector, within_clean_span
from tests.test_input_edit import grey_images, red_corner
from tests.tiny_models import TinyCNN


def colour_images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random colour images: every channel drawn on its own."""
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_grey_images_span_one_colour_direction_of_each_pixel_and_colour_images_span_all():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    grey = clean_span_projector(conv, grey_images(8))
    assert grey.shape == (27, 27) and round(float(grey.trace())) == 9
    assert torch.allclose(grey @ grey, grey, atol=1e-9)  # a projector
    assert round(float(clean_span_projector(conv, colour_images(8)).trace())) == 27


def test_the_restricted_model_gives_clean_images_the_same_logits_and_ignores_their_colour():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    clean = grey_images(20)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    restricted, record = within_clean_span(model, clean)
    assert record == {"layer": "stem.0", "receptive_field_dimensions": 27, "clean_span_dimensions": 9}
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())  # the input is untouched
    held_out = grey_images(10, seed=1)
    with torch.no_grad():
        assert torch.allclose(restricted(held_out), model(held_out), atol=1e-5)
        red = red_corner().stamp(held_out)
        grey_red = red.mean(1, keepdim=True).expand_as(red)  # the same stamp with its colour taken out
        assert not torch.allclose(model(red), model(grey_red), atol=1e-3)
        assert torch.allclose(restricted(red), restricted(grey_red), atol=1e-5)
    changed = [name for name, t in restricted.state_dict().items() if not torch.equal(t, before[name])]
    assert changed == ["stem.0.weight"]


def test_nothing_is_restricted_where_the_samples_span_the_input_or_the_model_does_not_start_with_a_convolution():
    model = TinyCNN().eval()
    assert within_clean_span(model, colour_images(20)) == (model, None)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).eval()
    assert within_clean_span(flat, grey_images(20)) == (flat, None)
