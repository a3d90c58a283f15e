"""The fused augmentation ops against what each op means: identities when an op is off, exact
flips, colour changes that keep what they should keep, mixing weights in range."""

from __future__ import annotations

import pytest
import torch

from raydistill.fused_ops import ColorTwist, FusedWarp, GaussianNoise, MixUp, RandomErasing


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(8, 3, 20, 20)


def _op(op: str, **kw) -> dict:
    defaults = {"random_resized_crop": {"scale": [0.5, 1.0], "ratio": [0.75, 4 / 3]}, "flip": {"direction": "horizontal"},
                "rotation": {"degrees": 30.0}, "affine": {"degrees": 10.0, "translate": 0.1, "scale": [0.9, 1.1]}}
    return {"op": op, "p": 1.0, **defaults.get(op, {}), **kw}


def test_a_warp_whose_ops_are_off_or_neutral_leaves_the_image(images):
    off = FusedWarp([_op(name, p=0.0) for name in ("random_resized_crop", "flip", "rotation", "affine")])
    assert torch.allclose(off(images), images, atol=1e-5)
    neutral = FusedWarp([_op("random_resized_crop", scale=[1.0, 1.0], ratio=[1.0, 1.0]), _op("rotation", degrees=0.0),
                         _op("affine", degrees=0.0, translate=0.0, scale=[1.0, 1.0])])
    assert torch.allclose(neutral(images), images, atol=1e-5)


def test_flips_mirror_exactly_and_compose_into_one_warp(images):
    assert torch.allclose(FusedWarp([_op("flip")])(images), images.flip(3), atol=1e-5)
    assert torch.allclose(FusedWarp([_op("flip", direction="vertical")])(images), images.flip(2), atol=1e-5)
    both = FusedWarp([_op("flip"), _op("flip", direction="vertical")])
    assert torch.allclose(both(images), images.flip(2, 3), atol=1e-5)


def test_crops_zoom_in_and_every_sample_draws_its_own(images):
    one = images[:1].expand(8, -1, -1, -1)
    out = FusedWarp([_op("random_resized_crop", scale=[0.3, 0.5]), _op("rotation")])(one)
    assert out.shape == one.shape and len({v.numpy().tobytes() for v in out}) == 8


def test_colour_jitter_off_is_the_identity_and_hue_keeps_grey_pixels(images):
    off = ColorTwist({"p": 0.0, "brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.5})
    assert torch.allclose(off(images), images, atol=1e-5)
    hue_only = ColorTwist({"p": 1.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.5})
    grey = images[:, :1].expand(-1, 3, -1, -1)
    assert torch.allclose(hue_only(grey), grey, atol=1e-5)
    assert not torch.allclose(hue_only(images), images, atol=1e-3)


def test_brightness_scales_and_contrast_keeps_the_mean_grey_level(images):
    brightness = ColorTwist({"p": 1.0, "brightness": 0.3, "contrast": 0.0, "saturation": 0.0, "hue": 0.0})
    out, x = brightness(images).flatten(1), images.flatten(1)
    factor = (out * x).sum(1) / (x * x).sum(1)  # least squares: out = factor x per sample
    assert torch.allclose(out, factor[:, None] * x, atol=1e-5)
    assert ((factor >= 0.7 - 1e-6) & (factor <= 1.3 + 1e-6)).all() and factor.std() > 0
    contrast = ColorTwist({"p": 1.0, "brightness": 0.0, "contrast": 0.5, "saturation": 0.0, "hue": 0.0})
    weights = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    grey_mean = lambda x: (x * weights).sum(1).mean(dim=(1, 2))  # noqa: E731
    assert torch.allclose(grey_mean(contrast(images)), grey_mean(images), atol=1e-5)
    single = ColorTwist({"p": 1.0, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1})
    assert single(images[:, :1]).shape == (8, 1, 20, 20)  # grey: brightness and contrast only


def test_mixup_mixes_with_a_partner_at_a_weight_in_range(images):
    x, partner, lam = MixUp({"p": 1.0, "lambda_range": [0.1, 0.4]})(images.clone())  # it writes into its input
    assert ((lam >= 0.1) & (lam <= 0.4)).all() and sorted(partner.tolist()) == list(range(8))
    assert torch.allclose(x, (1 - lam)[:, None, None, None] * images + lam[:, None, None, None] * images[partner], atol=1e-6)
    _, _, none = MixUp({"p": 0.0, "lambda_range": [0.1, 0.4]})(images.clone())
    assert (none == 0).all()


def test_erasing_blanks_one_rectangle_of_the_asked_area_and_noise_has_its_std():
    ones = torch.ones(64, 3, 32, 32)
    erased = RandomErasing({"p": 1.0, "scale": [0.1, 0.2], "ratio": [0.5, 2.0]})(ones.clone())
    share = (erased[:, 0] == 0).flatten(1).float().mean(1)
    assert ((share > 0.05) & (share < 0.3)).all()
    assert torch.equal(erased[:, 0] == 0, erased[:, 2] == 0)  # every channel of the rectangle
    torch.manual_seed(1)
    noisy = GaussianNoise({"p": 1.0, "std": 0.1})(ones.clone())
    assert (noisy - ones).std().item() == pytest.approx(0.1, rel=0.05)
    assert torch.equal(GaussianNoise({"p": 0.0, "std": 0.1})(ones.clone()), ones)
