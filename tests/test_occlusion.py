"""Occlusion discrepancy maps and empirical receptive fields: analytic units, a naive reference loop,
exactness of the local (pruned, cropped) sweep, and bad input."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import unitscope
from unitscope.analyses.occlusion import (
    LayerRF,
    UnreachableLayerError,
    _fill_values,
    _image_stats,
    average_centred,
    centre_maps,
    empirical_receptive_fields,
    layer_rf,
    occluder_positions,
    occlusion_maps,
    pixel_maps,
    summarize_layers,
    truncated_forward,
)
from unitscope.analyses.topk import TopK
from unitscope.capture import LayerError
from unitscope.data import ArrayDataset

from .toy_models import B, window_sum_model


class PixelUnit(nn.Module):
    """A "layer" whose single unit outputs the pixel x[c0, r0, q0] (spec C.3.1)."""

    def __init__(self, c0: int, r0: int, q0: int) -> None:
        super().__init__()
        self.c0, self.r0, self.q0 = c0, r0, q0
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x[:, self.c0:self.c0 + 1, self.r0:self.r0 + 1, self.q0:self.q0 + 1])


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def tiny_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(inplace=True), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(4, 6, 3, padding=1), relu2=nn.ReLU(inplace=True),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3)))


def naive_maps(model, layer, image, unit, loc, k, s, patches):
    """The seed's approach: one full forward per occluded copy, read the unit at its location."""
    pos = occluder_positions(image.shape[-2], image.shape[-1], k, s)
    with unitscope.capture(model, layer) as acts:
        model(image[None])
        a0 = acts[layer][0, unit][tuple(loc)] if loc is not None else acts[layer][0, unit]
        out = []
        for p, (a, b) in enumerate(pos.tolist()):
            x = image.clone()
            x[:, a:a + k, b:b + k] = patches[p]
            model(x[None])
            v = acts[layer][0, unit][tuple(loc)] if loc is not None else acts[layer][0, unit]
            out.append(float(a0 - v))
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------- analytic units
def test_pixel_identity_unit_grid_and_tent_profile():
    c0, r0, q0, k, v = 1, 6, 9, 3, 0.25
    model = nn.Sequential(OrderedDict(px=PixelUnit(c0, r0, q0)))
    image = torch.rand(1, 2, 12, 14, dtype=torch.float64)
    r = occlusion_maps(model, "px.out", image, torch.tensor([0]), occluder=k, stride=1, fill=v,
                       discrepancy="signed", device="cpu")
    expected = float(image[0, c0, r0, q0]) - v
    pos = occluder_positions(12, 14, k, 1)
    covers = ((pos[:, 0] <= r0) & (r0 < pos[:, 0] + k) & (pos[:, 1] <= q0) & (q0 < pos[:, 1] + k))
    grid = r.grid.reshape(-1)
    assert torch.equal(grid != 0, covers)
    assert torch.all(grid[covers] == expected)
    # on the window-centre grid the support is the k×k square centred on the pixel
    centres = pos + (k - 1) // 2
    square = ((centres[:, 0] - r0).abs() <= (k - 1) // 2) & ((centres[:, 1] - q0).abs() <= (k - 1) // 2)
    assert torch.equal(covers, square)
    # pixel space: (x - v) · #{windows ∋ y, pixel} / #{windows ∋ y}
    ref = torch.zeros(12, 14, dtype=torch.float64)
    for yy in range(12):
        for xx in range(14):
            mine = (pos[:, 0] <= yy) & (yy < pos[:, 0] + k) & (pos[:, 1] <= xx) & (xx < pos[:, 1] + k)
            ref[yy, xx] = expected * int((mine & covers).sum()) / int(mine.sum())
    torch.testing.assert_close(r.maps[0], ref, rtol=0, atol=1e-12)


def _bright_windows(n: int = 6, side: int = 20, seed: int = 0) -> ArrayDataset:
    """Dim noise in [0, 0.1) and one bright B×B window per image, away from the border."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, side, side, generator=g) * 0.1
    corners = torch.randint(3, side - B - 3, (n, 2), generator=g)
    for i, (a, b) in enumerate(corners.tolist()):
        x[i, 0, a:a + B, b:b + B] += 0.5 + i * 0.1
    return ArrayDataset(x, torch.zeros(n, dtype=torch.int64))


@pytest.mark.parametrize("local", [True, False])
def test_window_sum_unit_rf_is_exactly_the_window_grown_by_the_occluder(local):
    data, model, k = _bright_windows(), window_sum_model(), 3
    run = unitscope.analyze(model, data, layers="conv", analyses=[TopK(k=4)], progress=False, device="cpu")
    table, arrays = empirical_receptive_fields(model, data, "conv", [0, 1], run.table("topk"), k=4,
                                               occluder=k, stride=1, fill=0.0, threshold=1e-6,
                                               local=local, device="cpu")
    side = B + 2 * (k - 1)
    rf = arrays["conv:0"]
    h = (rf.shape[0] + 1) // 2
    square = torch.zeros_like(rf, dtype=torch.bool)
    half = side // 2
    square[h - 1 - half:h + half, h - 1 - half:h + half] = True
    # an occluder on the window moves the sum by a bright pixel, at least 5 % of the maximum; away
    # from it, float32 rounding of other batch sizes leaves about 1e-7 of it on some CPUs
    support = torch.nan_to_num(rf) > 1e-6 * torch.nan_to_num(rf).max()
    assert torch.equal(support, square)  # exactly the grown window, never a pixel outside
    assert torch.equal(arrays["conv:0:mask"].bool(), square)
    assert table["rf_size_empirical"][0] == side and bool(table["centred"][0])
    assert table["rf_size"][0] == B and table["ratio"][0] == pytest.approx(side / B)
    # the constant unit: every map is zero, no RF (NaN, not a field of size 0), so the layer's mean
    # is that of the unit with a field
    assert torch.nan_to_num(arrays["conv:1"]).abs().max() == 0
    assert math.isnan(table["rf_size_empirical"][1]) and math.isnan(table["ratio"][1])
    summary = summarize_layers(table)
    assert summary["rf_size_empirical"][0] == side and summary["no_field"][0] == 1
    assert summary["units"][0] == 2 and summary["ratio"][0] == pytest.approx(side / B)


def test_window_sum_threshold_mask_inside_support():
    data, model = _bright_windows(), window_sum_model()
    run = unitscope.analyze(model, data, layers="conv", analyses=[TopK(k=3)], progress=False)
    table, arrays = empirical_receptive_fields(model, data, "conv", [0], run.table("topk"), k=3,
                                               occluder=3, stride=1, fill="uniform", device="cpu")
    support = torch.nan_to_num(arrays["conv:0"]) > 0
    mask = arrays["conv:0:mask"].bool()
    assert mask.any() and not (mask & ~support).any()
    assert 0 < table["rf_size_empirical"][0] <= B + 4


@pytest.mark.parametrize("fill", ["uniform", "normal", "mean", 0.3])
def test_constant_response_unit_gives_a_zero_map(fill):
    image = torch.rand(3, 1, 16, 16)
    r = occlusion_maps(window_sum_model(), "relu", image, torch.tensor([1, 1, 1]), occluder=5,
                       stride=2, fill=fill, device="cpu")
    assert torch.count_nonzero(r.grid) == 0
    assert torch.nan_to_num(r.maps).abs().max() == 0
    assert torch.all(r.baseline == 1.0)


# ----------------------------------------------------------------------------- against the naive loop
@pytest.mark.parametrize("fill", [0.5, "uniform"])
@pytest.mark.parametrize("layer,unit", [("relu2", 4), ("fc", 2)])
def test_batched_equals_naive_loop(fill, layer, unit):
    model = tiny_cnn().eval()
    image = torch.randn(3, 20, 18)
    k, s = 5, 2
    pos = occluder_positions(20, 18, k, s)
    patches = _fill_values(fill, _image_stats(image[None]).expand(len(pos), -1, -1), torch.zeros(len(pos),
                           dtype=torch.int64), torch.arange(len(pos)), 0, k, image.dtype)
    for local in (True, False):
        r = occlusion_maps(model, layer, image[None], torch.tensor([unit]), occluder=k, stride=s,
                           fill=fill, discrepancy="signed", local=local, batch_size=7, device="cpu")
        loc = None if layer == "fc" else r.locations[0].tolist()
        ref = naive_maps(model, layer, image, unit, loc, k, s, patches)
        torch.testing.assert_close(r.grid.reshape(-1), ref, rtol=1e-5, atol=1e-6)
    assert hooks(model) == 0


def test_batch_size_and_pairs_do_not_change_the_maps():
    model = tiny_cnn()
    images = torch.randn(3, 3, 16, 16)
    units = torch.tensor([0, 5, 2])
    one = occlusion_maps(model, "conv2", images, units, occluder=4, stride=3, batch_size=1000, device="cpu")
    small = occlusion_maps(model, "conv2", images, units, occluder=4, stride=3, batch_size=5, device="cpu")
    torch.testing.assert_close(one.grid, small.grid, rtol=1e-6, atol=1e-7)
    alone = occlusion_maps(model, "conv2", images[1:2], units[1:2], occluder=4, stride=3, device="cpu",
                           image_ids=torch.tensor([1]))
    torch.testing.assert_close(one.grid[1:2], alone.grid, rtol=1e-6, atol=1e-7)


def test_alexnet_local_sweep_is_exact_and_prunes():
    torch.manual_seed(0)
    model = unitscope.load_model("alexnet").eval()
    images = torch.randn(2, 3, 99, 99)
    units = torch.tensor([7, 30])
    locs = torch.tensor([[0, 0], [5, 4]])  # a border cell and an interior cell of the 11×11 map
    kw = {"occluder": 11, "stride": 8, "fill": "uniform", "batch_size": 64, "device": "cpu",
          "discrepancy": "signed"}
    local = occlusion_maps(model, "features.4", images, units, locs, local=True, **kw)
    full = occlusion_maps(model, "features.4", images, units, locs, local=False, **kw)
    torch.testing.assert_close(local.grid, full.grid, rtol=1e-4, atol=1e-5)
    assert local.evaluated[1].sum() < local.evaluated.shape[1] * local.evaluated.shape[2]
    # windows outside the analytic RF (51 px) change nothing, exactly (spec C.3.4)
    assert torch.count_nonzero(full.grid[1][~local.evaluated[1]]) == 0
    assert torch.count_nonzero(full.grid[1][local.evaluated[1]]) > 0


# ----------------------------------------------------------------------------- centring and averaging
def test_centring_translation_consistency():
    # one map shifted: centred on the shifted centre, the canvases coincide and their mean is either
    base = torch.zeros(1, 9, 9, dtype=torch.float64)
    base[0, 3:6, 2:5] = torch.arange(9, dtype=torch.float64).reshape(3, 3) + 1
    shifted = torch.roll(base, (2, 3), (1, 2))
    canvas, valid = centre_maps(torch.cat([base, shifted]), torch.tensor([[4, 3], [6, 6]]))
    assert torch.equal(canvas[0], canvas[1])
    rf = average_centred(canvas, valid, torch.tensor([0, 0]), threshold=0.5)
    torch.testing.assert_close(torch.nan_to_num(rf.maps[0]) * valid.any(0), canvas[0])
    assert rf.masks[0].sum() == (canvas[0] >= 4.5).sum()
    assert rf.sizes[0] == pytest.approx(float((canvas[0] >= 4.5).sum()) ** 0.5)


def test_a_field_away_from_the_centre_is_flagged():
    canvas = torch.zeros(1, 9, 9, dtype=torch.float64)
    canvas[0, 0:2, 0:2] = 1.0  # the response sits in a corner; the centre (4, 4) is below threshold
    rf = average_centred(canvas, torch.ones_like(canvas, dtype=torch.bool), torch.tensor([0]), 0.5)
    assert not bool(rf.centred[0]) and rf.masks[0].sum() == 4


# ----------------------------------------------------------------------------- bad input and hooks
def test_bad_input():
    model = tiny_cnn()
    image = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"unit 6 is out of range: layer 'conv2' has 6 units \(0..5\)"):
        occlusion_maps(model, "conv2", image, torch.tensor([6]), device="cpu")
    with pytest.raises(LayerError, match="conv2"):
        occlusion_maps(model, "conv22", image, torch.tensor([0]), device="cpu")
    with pytest.raises(ValueError, match="selects 2 layers"):
        occlusion_maps(model, "conv*", image, torch.tensor([0]), device="cpu")
    with pytest.raises(ValueError, match=r"occluder \(11×11\) is larger than the image \(8×8\)"):
        occlusion_maps(model, "conv2", torch.randn(1, 3, 8, 8), torch.tensor([0]), device="cpu")
    with pytest.raises(ValueError, match="fill='noise'"):
        occlusion_maps(model, "conv2", image, torch.tensor([0]), fill="noise", device="cpu")
    with pytest.raises(ValueError, match="discrepancy"):
        occlusion_maps(model, "conv2", image, torch.tensor([0]), discrepancy="relative", device="cpu")
    with pytest.raises(ValueError, match="outside layer 'conv2'"):
        occlusion_maps(model, "conv2", image, torch.tensor([0]), torch.tensor([[8, 0]]), device="cpu")
    assert hooks(model) == 0


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_cnn()
        self.unused = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_unreachable_layer():
    model = WithUnused()
    with pytest.raises(UnreachableLayerError, match="never ran in the forward of WithUnused"):
        occlusion_maps(model, "unused", torch.randn(1, 3, 16, 16), torch.tensor([0]), device="cpu")
    assert hooks(model) == 0


def test_k_larger_than_the_top_list():
    data, model = _bright_windows(n=3), window_sum_model()
    run = unitscope.analyze(model, data, layers="conv", analyses=[TopK(k=3)], progress=False)
    with pytest.raises(ValueError, match="fewer than k=5"):
        empirical_receptive_fields(model, data, "conv", [0], run.table("topk"), k=5, occluder=3,
                                   device="cpu")


def test_truncated_forward_stops_at_the_layer_and_removes_its_hook():
    model = tiny_cnn()
    ran = []
    handle = model.fc.register_forward_hook(lambda *a: ran.append(1))
    out = truncated_forward(model, "relu1", torch.randn(2, 3, 8, 8))
    handle.remove()
    assert out.shape == (2, 4, 8, 8) and not ran
    assert hooks(model) == 0
    with pytest.raises(RuntimeError):
        truncated_forward(model, "conv2", torch.randn(2, 5, 8, 8))  # wrong channels: forward fails
    assert hooks(model) == 0


# ----------------------------------------------------------------------------- experiment and report
def test_receptive_field_empirical_experiment_and_report(tmp_path):
    from unitscope.experiments import ConfigError, run_config
    from unitscope.report import write_report

    config = tmp_path / "erf.toml"
    config.write_text('experiment = "receptive-field-empirical"\nmodel = "digits-cnn"\ndataset = "digits"\n'
                      'layers = ["relu1", "relu2"]\nunits = 2\nk = 3\noccluder = 3\nstride = 2\n')
    [(target, _)] = run_config(config, out=tmp_path / "runs", progress=False)
    run = unitscope.load_run(target)
    per_unit = run.table("receptive_field_empirical")
    assert per_unit["layer"].tolist() == ["relu1", "relu1", "relu2", "relu2"]
    assert (per_unit["rf_size_empirical"] > 0).all()
    assert run.table("receptive_field_empirical_layers")["rf_size"].tolist() == [3, 5]
    assert len(run.arrays["receptive_field_empirical"]) == 8  # map and mask per unit
    mosaics = run.arrays["receptive_field_empirical_mosaics"]
    assert set(mosaics) == {f"{la}:{u}" for la, u in zip(per_unit["layer"], per_unit["unit"])}
    assert mosaics["relu1:" + str(per_unit["unit"][0])].shape == (3, 2 * 10 + 2, 3 * 10 + 2)
    page = write_report(target).read_text()
    assert "id='receptive_field_empirical'" in page and "alt='receptive_field_empirical figure'" in page
    config.write_text('experiment = "receptive-field-empirical"\nmodel = "digits-cnn"\ndataset = "digits"\n'
                      'layers = ["fc"]\noccluder = 3\n')
    with pytest.raises(ConfigError, match="fc have no 2-D map"):
        run_config(config, out=tmp_path / "runs2", progress=False)
    config.write_text('experiment = "receptive-field-empirical"\nmodel = "digits-cnn"\ndataset = "digits"\n'
                      'occluder = 9\n')
    with pytest.raises(ConfigError, match=r"occluder \(9×9\) is larger than the image \(8×8\)"):
        run_config(config, out=tmp_path / "runs4", progress=False)
    config.write_text('experiment = "receptive-field-empirical"\nmodel = "digits-cnn"\ndataset = "digits"\n'
                      'layers = ["relu1"]\nunits = [16]\nk = 2\noccluder = 3\n')
    with pytest.raises(ConfigError, match="unit 16 is out of range: layer 'relu1' has 16 units"):
        run_config(config, out=tmp_path / "runs3", progress=False)


def test_argmax_centring_serves_a_linear_pixel_unit():
    r0, q0, k, side = 7, 4, 3, 12
    fc = nn.Linear(side * side, 2, bias=False)
    with torch.no_grad():
        fc.weight.zero_()
        fc.weight[0, r0 * side + q0] = 1.0  # unit 0 is pixel (r0, q0)
    ident = nn.Conv2d(1, 1, 1)  # lets the RF arithmetic see one input channel
    with torch.no_grad():
        ident.weight.fill_(1.0)
        ident.bias.zero_()
    model = nn.Sequential(OrderedDict(ident=ident, flat=nn.Flatten(), fc=fc))
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(5, 1, side, side, generator=g) + 0.5, torch.zeros(5, dtype=torch.int64))
    top = unitscope.analyze(model, data, layers="fc", analyses=[TopK(k=3)], progress=False).table("topk")
    table, arrays = empirical_receptive_fields(model, data, "fc", [0], top, k=3, occluder=k, stride=1,
                                               fill=0.0, threshold=1e-12, centre="argmax", device="cpu")
    assert table["rf_size_empirical"][0] == 2 * k - 1 and table["rf_size"].isna().all()
    mask = arrays["fc:0:mask"].bool()
    c = side - 1
    assert mask[c - k + 1:c + k, c - k + 1:c + k].all() and mask.sum() == (2 * k - 1) ** 2
    with pytest.raises(ValueError, match="no 2-D map"):
        empirical_receptive_fields(model, data, "fc", [0], top, k=3, occluder=k, device="cpu")
    with pytest.raises(ValueError, match="centre='middle'"):
        empirical_receptive_fields(model, data, "fc", [0], top, k=3, occluder=k, centre="middle",
                                   device="cpu")


def test_linear_conv_unit_discrepancy_is_the_kernel_weighted_change():
    # spec C.3.3: d_p = Σ_{y ∈ W_p} w(y)·(x(y) − v) for a single-channel conv read at an interior cell
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 5, bias=False).double()
    model = nn.Sequential(OrderedDict(conv=conv))
    image = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    v, k, s, (i, j) = -0.5, 3, 2, (4, 6)
    r = occlusion_maps(model, "conv", image, torch.tensor([0]), torch.tensor([[i, j]]), occluder=k,
                       stride=s, fill=v, discrepancy="signed", device="cpu")
    w = torch.zeros(16, 16, dtype=torch.float64)
    w[i:i + 5, j:j + 5] = conv.weight[0, 0].detach()  # the kernel placed over the cell's window
    pos = occluder_positions(16, 16, k, s)
    ref = torch.stack([(w[a:a + k, b:b + k] * (image[0, 0, a:a + k, b:b + k] - v)).sum()
                       for a, b in pos.tolist()])
    torch.testing.assert_close(r.grid.reshape(-1), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer,locs", [("fc", None), ("relu2", torch.tensor([[3, 4]] * 4))])
def test_units_on_one_image_share_a_sweep_with_the_same_result(layer, locs):
    model = tiny_cnn()
    image = torch.randn(1, 3, 16, 16).expand(4, -1, -1, -1)
    units = torch.tensor([0, 2, 1, 2])
    kw = {"occluder": 4, "stride": 3, "device": "cpu", "discrepancy": "signed", "batch_size": 9}
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    shared = occlusion_maps(model, layer, image, units, locs, image_ids=torch.zeros(4, dtype=torch.int64),
                            **kw)
    handle.remove()
    positions = int(shared.evaluated[0].sum())
    assert sum(seen) == 4 + 4 + positions  # baseline, crop check, then one sweep for all four units
    for i in range(4):
        alone = occlusion_maps(model, layer, image[i:i + 1], units[i:i + 1],
                               None if locs is None else locs[i:i + 1], image_ids=torch.tensor([0]), **kw)
        # other batch sizes may round the float32 convolutions differently: a few ulps of 1
        torch.testing.assert_close(shared.grid[i], alone.grid[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(shared.grid[1], shared.grid[3])  # the same unit twice
    assert not torch.equal(shared.grid[0], shared.grid[1])


def test_more_bad_input():
    model = tiny_cnn()
    image = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="no images"):
        occlusion_maps(model, "conv2", image[:0], torch.tensor([], dtype=torch.int64), device="cpu")
    with pytest.raises(ValueError, match="one unit per image"):
        occlusion_maps(model, "conv2", image, torch.tensor([0]), device="cpu")
    with pytest.raises(ValueError, match="one id per image"):
        occlusion_maps(model, "conv2", image, torch.tensor([0, 1]), image_ids=torch.tensor([0]), device="cpu")
    with pytest.raises(ValueError, match="float tensor"):
        occlusion_maps(model, "conv2", image.long(), torch.tensor([0, 1]), device="cpu")


def test_noise_draws_are_averaged():
    model = tiny_cnn()
    image = torch.randn(1, 3, 16, 16)
    kw = {"occluder": 4, "stride": 3, "device": "cpu", "fill": "normal"}
    two = occlusion_maps(model, "relu2", image, torch.tensor([1]), draws=2, **kw)
    a = occlusion_maps(model, "relu2", image, torch.tensor([1]), seed=0, **kw)
    b = occlusion_maps(model, "relu2", image, torch.tensor([1]), seed=1, **kw)
    torch.testing.assert_close(two.grid, (a.grid + b.grid) / 2)
    assert not torch.equal(a.grid, b.grid)
    with pytest.raises(ValueError, match="only with a noise fill"):
        occlusion_maps(model, "relu2", image, torch.tensor([1]), draws=3, occluder=4, fill=0.0, device="cpu")


@settings(max_examples=40, deadline=None)
@given(h=st.integers(3, 12), w=st.integers(3, 12), k=st.integers(1, 4), s=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_pixel_maps_are_the_mean_over_covering_windows(h, w, k, s, seed):
    k = min(k, h, w)
    pos = occluder_positions(h, w, k, s)
    ny, nx = len(range(0, h - k + 1, s)), len(range(0, w - k + 1, s))
    grid = torch.randn(1, ny, nx, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = pixel_maps(grid, k, s, (h, w))[0]
    flat = grid.reshape(-1)
    for yy in range(h):
        for xx in range(w):
            cover = (pos[:, 0] <= yy) & (yy < pos[:, 0] + k) & (pos[:, 1] <= xx) & (xx < pos[:, 1] + k)
            if cover.any():
                assert float(got[yy, xx]) == pytest.approx(float(flat[cover].mean()), abs=1e-12)
            else:
                assert torch.isnan(got[yy, xx])


def test_float64_model_local_sweep_is_exact_without_fallback(caplog):
    model = tiny_cnn().double()
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    units, locs = torch.tensor([0, 5, 2]), torch.tensor([[0, 0], [4, 3], [7, 7]])
    kw = {"occluder": 3, "stride": 1, "fill": "uniform", "device": "cpu", "discrepancy": "signed"}
    with caplog.at_level("WARNING", logger="unitscope.analyses.occlusion"):
        local = occlusion_maps(model, "conv2", images, units, locs, local=True, **kw)
    assert not caplog.records  # the analytic RF was found: no fallback to the full sweep
    assert local.evaluated[1].sum() < local.evaluated[1].numel()  # and it pruned
    full = occlusion_maps(model, "conv2", images, units, locs, local=False, **kw)
    torch.testing.assert_close(local.grid, full.grid, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local.maps, full.maps, rtol=1e-12, atol=1e-12, equal_nan=True)
    # float32 images are cast to the model's dtype instead of failing in its first convolution
    rounded = images.float()
    cast = occlusion_maps(model, "conv2", rounded, units, locs, local=True, **kw)
    same = occlusion_maps(model, "conv2", rounded.double(), units, locs, local=True, **kw)
    torch.testing.assert_close(cast.grid, same.grid, rtol=0, atol=0)


def test_float64_model_empirical_rf_centres_on_the_analytic_rf():
    data = _bright_windows()
    data64 = ArrayDataset(torch.stack([data[i][0] for i in range(len(data))]).double(),
                          torch.zeros(len(data), dtype=torch.int64))
    model, k = window_sum_model().double(), 3
    run = unitscope.analyze(model, data64, layers="conv", analyses=[TopK(k=4)], progress=False)
    table, _ = empirical_receptive_fields(model, data64, "conv", [0], run.table("topk"), k=4,
                                          occluder=k, stride=1, fill=0.0, threshold=1e-12, centre="rf",
                                          device="cpu")
    side = B + 2 * (k - 1)
    assert table["rf_size"][0] == B and table["rf_size_empirical"][0] == side
    assert bool(table["centred"][0])


def test_a_layer_after_upsampling_is_swept_whole(caplog):
    # its analytic RF is an average over unit positions (a unit's field can be half a unit off), so
    # local=True must not prune with it
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(down=nn.Conv2d(1, 2, 3, stride=2, padding=1),
                                      up=nn.Upsample(scale_factor=2), conv=nn.Conv2d(2, 2, 3, padding=1)))
    model = model.double()
    assert layer_rf(model, "conv", (16, 16)) == LayerRF(5.0, 1.0, 0.0, upsampled=True)
    assert not layer_rf(model, "down", (16, 16)).upsampled
    images = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    kw = {"occluder": 3, "stride": 1, "fill": 0.0, "device": "cpu", "discrepancy": "signed"}
    with caplog.at_level("WARNING", logger="unitscope.analyses.occlusion"):
        local = occlusion_maps(model, "conv", images, torch.tensor([0, 1]), torch.tensor([[5, 6], [8, 3]]),
                               local=True, **kw)
    assert "an upsampling step lies before conv" in caplog.text
    full = occlusion_maps(model, "conv", images, torch.tensor([0, 1]), torch.tensor([[5, 6], [8, 3]]),
                          local=False, **kw)
    assert torch.equal(local.grid, full.grid) and bool(local.evaluated.all())
