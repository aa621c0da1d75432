"""Augmentations as variables: per-sample results equal torchvision's functionals, ranges are checked."""

from __future__ import annotations

import colorsys
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from unitscope.augment import (
    VARIABLES,
    Augmenter,
    AugmentError,
    Param,
    hsv_to_rgb,
    register_variable,
    rgb_to_hsv,
)


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(5, 3, 16, 16, generator=g)


def _apply(name, x, values):
    """Augment with the given parameter values (mapped back to design points)."""
    aug = Augmenter([name])
    vals = torch.as_tensor(values, dtype=torch.float64).reshape(len(x), -1)
    u = (vals - aug.low) / (aug.high - aug.low)
    return aug(x, u)


@pytest.mark.parametrize("name, tv", [
    ("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
    ("saturation", TF.adjust_saturation)])
def test_colour_factors_equal_torchvision_per_sample(images, name, tv):
    factors = [0.1, 0.7, 1.0, 1.9, 2.5]
    out = _apply(name, images, factors)
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], tv(images[i], f), atol=1e-5, rtol=0)


def test_contrast_on_gray_images_equals_torchvision():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = _apply("contrast", x, [0.2, 1.5, 3.0])
    for i, f in enumerate([0.2, 1.5, 3.0]):
        torch.testing.assert_close(out[i], TF.adjust_contrast(x[i], f), atol=1e-5, rtol=0)


def test_hue_equals_torchvision_per_sample(images):
    shifts = [-0.5, -0.2, 0.0, 0.13, 0.45]
    out = _apply("hue", images, shifts)
    for i, s in enumerate(shifts):
        torch.testing.assert_close(out[i], TF.adjust_hue(images[i], s), atol=1e-4, rtol=0)


def test_hsv_agrees_with_colorsys_and_pure_colours():
    x = torch.rand(3, 50, 1, generator=torch.Generator().manual_seed(2))
    hsv = rgb_to_hsv(x)
    ref = torch.tensor([colorsys.rgb_to_hsv(*x[:, i, 0].tolist()) for i in range(50)], dtype=torch.float64).T
    torch.testing.assert_close(hsv[:, :, 0].double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=1e-6, rtol=0)
    pure = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.4, 0.4, 0.4]]).T[:, :, None]
    out = rgb_to_hsv(pure)[:, :, 0].T
    torch.testing.assert_close(out[:3], torch.tensor([[0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1.0]]))
    assert out[3, 1].item() == 0 and out[3, 2].item() == pytest.approx(0.4)


def test_switches_apply_when_u_at_most_half(images):
    u = torch.tensor([[0.0], [0.5], [0.51], [1.0], [0.2]])
    for name, ref in [("hflip", images.flip(-1)), ("grayscale", TF.rgb_to_grayscale(images, 3)),
                      ("sharpness", TF.adjust_sharpness(images, 1.5))]:
        out = Augmenter([name])(images, u)
        on = (u[:, 0] <= 0.5)
        torch.testing.assert_close(out[on], ref[on], atol=1e-5, rtol=0)
        assert torch.equal(out[~on], images[~on])


def test_blur_equals_torchvision_per_sample(images):
    sigmas = [0.1, 0.5, 1.0, 1.5, 2.0]
    out = _apply("blur", images, sigmas)
    for i, s in enumerate(sigmas):
        torch.testing.assert_close(out[i], TF.gaussian_blur(images[i], [7, 7], [s, s]), atol=1e-5, rtol=0)


def test_roll_equals_torch_roll_per_sample(images):
    shifts = [(0.0, 0.0), (0.2, -0.2), (-0.125, 0.0625), (0.5, 0.25), (-0.2, 0.2)]
    out = _apply("roll", images, shifts)
    for i, (dy, dx) in enumerate(shifts):
        ref = torch.roll(images[i], (round(dy * 16), round(dx * 16)), dims=(-2, -1))
        assert torch.equal(out[i], ref)


def test_erasing_box_and_identity_past_the_edge():
    x = torch.ones(2, 1, 20, 20)
    # centre (10, 10), area 0.16·400 = 64 px, square: an 8×8 box at (6, 6); the second runs off the edge
    out = _apply("erasing", x, [[0.5, 0.5, 0.16, 0.0], [0.8, 0.5, 0.33, 1.0]])
    assert (out[0] == 0).sum().item() == 64
    assert torch.equal(out[0, 0, 6:14, 6:14], torch.zeros(8, 8))
    assert torch.equal(out[1], x[1])


def test_rotation_zero_is_identity_and_keeps_constant_images_constant(images):
    out = _apply("rotation", images[:2], [0.0, 0.0])
    torch.testing.assert_close(out, images[:2], atol=1e-5, rtol=0)
    flat = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(_apply("rotation", flat, [-10.0, 10.0]), flat, atol=1e-6, rtol=0)
    rot = Augmenter([("rotation", None)])
    assert rot.ranges()["rotation.angle"] == (-10.0, 10.0)


def test_rotation_turns_the_way_torchvision_does():
    import torchvision.transforms.v2.functional as TF

    from unitscope.augment import _rotation

    # at ±90° on a square image the zoom is 1: a pure quarter turn, compared with torchvision's
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = _rotation(x, torch.tensor([[90.0], [-90.0]]))
    torch.testing.assert_close(out[0], TF.rotate(x[0], 90.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], TF.rotate(x[1], -90.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, (1, 2)), atol=1e-5, rtol=0)


def test_local_blur_changes_only_inside_the_ellipse(images):
    out = _apply("local_blur", images[:1], [[0.1, 0.1, 0.0, 0.0, 0.0]])
    changed = (out != images[:1]).any(1)[0]
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    inside = ((rows - 7.5) / 1.6) ** 2 + ((cols - 7.5) / 1.6) ** 2 <= 1
    assert not changed[~inside].any() and changed[inside].any()


def test_fixed_order_whatever_the_listing():
    a = Augmenter(["erasing", "brightness", "hflip"])
    b = Augmenter(["hflip", "erasing", "brightness"])
    assert a.names == b.names == ["brightness", "hflip", "erasing"]
    assert a.groups == [[0], [1], [2, 3, 4, 5]]
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    u = torch.rand(4, a.d, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a(x, u), b(x, u))


def test_ranges_are_validated():
    with pytest.raises(AugmentError, match="empty"):
        Augmenter([("brightness", (2.0, 1.0))])
    with pytest.raises(AugmentError, match="empty"):
        Augmenter([("brightness", (1.0, 1.0))])
    with pytest.raises(AugmentError, match="valid domain"):
        Augmenter([("brightness", (-1.0, 1.0))])
    with pytest.raises(AugmentError, match="valid domain"):
        Augmenter({"hue": (-0.7, 0.2)})
    with pytest.raises(AugmentError, match="as a mapping"):
        Augmenter([("roll", (0.0, 0.1))])
    with pytest.raises(AugmentError, match="no parameter"):
        Augmenter([("roll", {"dz": (0.0, 0.1)})])
    with pytest.raises(AugmentError, match="unknown variable 'brightnes'"):
        Augmenter(["brightnes"])
    aug = Augmenter([("brightness", (0.5, 1.5)), ("roll", {"dx": (-0.1, 0.1)})])
    assert aug.ranges() == {"brightness.factor": (0.5, 1.5), "roll.dy": (-0.2, 0.2), "roll.dx": (-0.1, 0.1)}


def test_colour_variables_need_three_channels():
    with pytest.raises(AugmentError, match="hue, saturation need RGB|saturation, hue need RGB"):
        Augmenter(["hue", "saturation", "brightness"], channels=1)
    aug = Augmenter(["hue"])
    with pytest.raises(AugmentError, match="need RGB"):
        aug(torch.rand(2, 1, 8, 8), torch.rand(2, 1))
    Augmenter(["brightness", "roll", "blur"], channels=1)


def test_user_variable_is_applied_after_the_builtins():
    @register_variable("test_invert", [Param("amount", 0.0, 1.0, (0.0, 1.0))])
    def _invert(x, v):
        a = v[:, 0].to(x.dtype)[:, None, None, None]
        return a * (1 - x) + (1 - a) * x
    try:
        aug = Augmenter(["test_invert", "brightness"])
        assert aug.names == ["brightness", "test_invert"]
        x = torch.full((1, 1, 4, 4), 0.2)
        # brightness 2.5 first (0.5), then a full inversion (0.5); the other order would give 1.0
        out = aug(x, torch.tensor([[1.0, 1.0]]))
        assert out.mean().item() == pytest.approx(0.5)
        with pytest.raises(AugmentError, match="already registered"):
            register_variable("test_invert", [Param("amount", 0.0, 1.0, (0.0, 1.0))])(_invert)
    finally:
        del VARIABLES["test_invert"]
    assert math.isfinite(Augmenter(["brightness"]).high.item())


def test_normalised_images_are_refused_not_clipped():
    from unitscope.augment import Augmenter, AugmentError

    aug = Augmenter(["brightness"], channels=3)
    x = torch.rand(2, 3, 8, 8) * 4 - 2  # e.g. ImageNet-normalised
    with pytest.raises(AugmentError, match=r"need images in \[0, 1\]"):
        aug(x, torch.full((2, 1), 0.5))
