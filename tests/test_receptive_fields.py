"""Receptive fields: the spec's exact cases (section 3.5), branches, border and unproductive layers."""

from __future__ import annotations

import warnings

import matplotlib
import pandas as pd
import pytest
import torch
from torch import nn

import unitscope
from unitscope.analyses.receptive_fields import plot_receptive_fields, receptive_fields, unproductive_layers

from .conftest import hook_counts


def rf(table, layer: str) -> int:
    return table.set_index("layer").loc[layer, "rf_size"]


def convs(n: int, **kwargs) -> nn.Sequential:
    layers = []
    for i in range(n):
        layers += [nn.Conv2d(3 if i == 0 else 4, 4, 3, **kwargs), nn.ReLU()]
    return nn.Sequential(*layers)


def test_stacked_3x3_convs():
    assert rf(receptive_fields(convs(1), 32), "0") == 3
    assert rf(receptive_fields(convs(2), 32), "2") == 5
    for n in (3, 5):
        table = receptive_fields(convs(n), 32)
        assert table[table.type == "Conv2d"].rf_size.tolist() == [2 * i + 1 for i in range(1, n + 1)]
        assert table.rf_size.iloc[-1] == 2 * n + 1  # ReLU passes through


def test_stride_and_dilation():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3))
    table = receptive_fields(net, 32)
    assert (rf(table, "1"), table.jump.iloc[-1]) == (7, 2)
    table = receptive_fields(convs(2, dilation=2), 32)
    assert table[table.type == "Conv2d"].rf_size.tolist() == [5, 9]


def test_start_is_centre_of_unit_zero():
    # padding moves the centre but not r; start_0 = 0.5
    table = receptive_fields(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2)), 16)
    assert table.start.tolist() == [0.5, 1.5]
    assert table.rf_size.tolist() == [3, 5]


def test_tuple_kernel_reports_max_axis():
    table = receptive_fields(nn.Sequential(nn.Conv2d(3, 4, (3, 7), padding=(1, 3))), (20, 10))
    assert table.rf_size.tolist() == [7]
    assert table.output_size.tolist() == [20]
    assert not table.border.iloc[0]


def test_alexnet():
    model = unitscope.load_model("alexnet")
    before = hook_counts(model)
    table = receptive_fields(model, 224)
    assert hook_counts(model) == before
    convs_pools = table[table.type.isin(["Conv2d", "MaxPool2d"]) & table.layer.str.startswith("features.")]
    assert convs_pools.rf_size.tolist() == [11, 19, 51, 67, 99, 131, 163, 195]
    assert rf(table, "features.10") == 163
    assert table.set_index("layer").loc["features.12", "jump"] == 32
    assert rf(table, "features") == 195
    assert not table.border.any()  # 195 < 224


def test_vgg16_and_unproductive_layers():
    model = unitscope.load_model("vgg16")
    table = receptive_fields(model.features, 224)
    assert table[table.type.isin(["Conv2d", "MaxPool2d"])].rf_size.tolist() == [
        3, 5, 6, 10, 14, 16, 24, 32, 40, 44, 60, 76, 92, 100, 132, 164, 196, 212]
    assert rf(table, "28") == 196
    assert unproductive_layers(table).empty  # at 224 none
    # rule (a): conv3_3 and conv4_1-conv5_3 at 32, conv4_3 and conv5_1-5_3 at 64
    at32 = receptive_fields(model.features, 32)
    assert unproductive_layers(at32, rule="a").layer.tolist() == ["14", "17", "19", "21", "24", "26", "28"]
    # rule (b): conv5_x see 32 // 16 = 2 pixel maps, smaller than their 3x3 kernels
    assert unproductive_layers(at32, rule="b").layer.tolist() == ["24", "26", "28"]
    assert unproductive_layers(at32).layer.tolist() == ["14", "17", "19", "21", "24", "26", "28"]
    at64 = unproductive_layers(receptive_fields(model.features, 64))
    assert at64.layer.tolist() == ["21", "24", "26", "28"]
    assert not at64.rule_b.any()  # 64 // 16 = 4 > 3
    with pytest.raises(ValueError, match="rule="):
        unproductive_layers(at64, rule="c")
    # invariance: r and j do not depend on the input resolution
    small = receptive_fields(model.features, 64)
    assert small.rf_size.tolist() == table.rf_size.tolist() and small.jump.tolist() == table.jump.tolist()
    full = receptive_fields(model, 224)
    assert rf(full, "features.28") == 196


def test_rule_b_flags_a_kernel_as_large_as_its_map():
    from torch import nn

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(4), nn.Conv2d(2, 2, 3, padding=1),
                        nn.Conv2d(2, 2, 1))
    table = receptive_fields(net, 12)  # the pool's jump is 4: its maps count 12 // 4 = 3 pixels
    # the 3x3 conv after it covers a whole map; the 1x1 conv does not, nor does the first conv
    assert unproductive_layers(table, rule="b").layer.tolist() == ["2"]


def test_resnet18_longest_path():
    table = receptive_fields(unitscope.load_model("resnet18"), 224)
    assert rf(table, "conv1") == 7 and rf(table, "maxpool") == 11
    expected = {"layer1": [19, 27, 35, 43], "layer2": [51, 67, 83, 99], "layer3": [115, 147, 179, 211],
                "layer4": [243, 307, 371, 435]}
    for stage, values in expected.items():
        got = [rf(table, f"{stage}.{b}.conv{c}") for b in (0, 1) for c in (1, 2)]
        assert got == values
    assert rf(table, "layer4") == 435
    assert table.set_index("layer").loc["layer4", "jump"] == 32
    # the 1x1 downsample branch is shorter: the add takes the longest input
    assert rf(table, "layer4.0.downsample.0") == 211
    assert rf(table, "layer4.0") == 307
    assert table.set_index("layer").loc["layer4", "border"]
    assert not table.set_index("layer").loc["layer3", "border"]


def test_global_pool_covers_input_and_branches_concatenate():
    table = receptive_fields(unitscope.load_model("googlenet"), 224)
    pool = table.set_index("layer").loc["avgpool"]
    assert pool.output_size == 1 and pool.rf_size >= 224 and pool.border
    # an Inception block takes its largest branch
    block = table.set_index("layer")
    branches = [block.loc[f"inception3a.branch{i}", "rf_size"] for i in (1, 2, 3, 4)]
    assert block.loc["inception3a", "rf_size"] == max(branches)
    assert table.layer.is_unique


def test_fallback_warns_and_chains():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.b(self.a(x))
            return self.b(self.a(x))

    model = Untraceable()
    with pytest.warns(UserWarning, match="fx could not trace"):
        table = receptive_fields(model, 16)
    assert table.rf_size.tolist() == [3, 5]
    assert hook_counts(model) == 0


def test_bad_input_size():
    with pytest.raises(ValueError, match=r"int or \(H, W\)"):
        receptive_fields(convs(1), (1, 2, 3, 4))
    with pytest.raises(ValueError, match="pass an input_size the model accepts"):
        receptive_fields(convs(3), 4)


def test_other_registry_models():
    # rfa_toolbox README: ResNet-50 upper bound 427
    assert rf(receptive_fields(unitscope.load_model("resnet50"), 224), "layer4") == 427
    table = receptive_fields(unitscope.load_model("mobilenet_v2"), 224)
    assert table.layer.is_unique and table.border.iloc[-1]
    table = receptive_fields(unitscope.load_model("digits-cnn"), 8)
    assert table.rf_size.is_monotonic_increasing


def test_plot_is_agg_safe():
    matplotlib.use("Agg")
    table = receptive_fields(convs(3, padding=1), 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_receptive_fields(table)
    assert type(fig).__name__ == "Figure"
    assert table.border.tolist() == [False, False, False, False, True, True]


@pytest.mark.parametrize("size", [-5, 0, (0, 8), (1, -3, 3)])
def test_non_positive_input_size_is_refused(size):
    with pytest.raises(ValueError, match="must be a positive size"):
        receptive_fields(convs(1), size)


def test_fractional_input_size_is_refused_not_rounded():
    with pytest.raises(ValueError, match="whole pixels"):
        receptive_fields(convs(1), (8.5, 8))
    with pytest.raises(ValueError, match="an int or"):
        receptive_fields(convs(1), 8.5)
    assert receptive_fields(convs(1), (8.0, 8)).attrs["input_size"] == (8, 8)


def test_float64_model_gives_the_float32_table():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(2, 2, 3))
    single = receptive_fields(net, 16)
    double = receptive_fields(net.double(), 16)  # the trace input is built in float64
    pd.testing.assert_frame_equal(double, single)
    assert double.rf_size.tolist() == [3, 3, 5, 13] and next(net.parameters()).dtype == torch.float64


def measured_rf(net: nn.Module, size: int, rows: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §3.4: positive weights, one backward pass per unit (rows of a middle column of
    channel 0); the rows of input pixels with a non-zero gradient give each unit's RF size and
    centre (pixel index), returned with the rows measured: units that no input reaches are left out."""
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p.dim() > 1 else torch.zeros_like(p))
    x = torch.ones(1, net[0].in_channels, size, size, dtype=torch.float64, requires_grad=True)
    out = net(x)
    column = next(c for c in range(out.shape[3] // 2, out.shape[3])  # one that some input reaches
                  if torch.autograd.grad(out[0, 0, :, c].sum(), x, retain_graph=True)[0].any())
    kept, sizes, centres = [], [], []
    for i in rows:
        (grad,) = torch.autograd.grad(out[0, 0, i, column], x, retain_graph=True)
        hit = torch.nonzero(grad[0].abs().sum((0, 2)) > 0).flatten()
        if not len(hit):  # a unit that reads no input (a transposed conv with gaps): no RF
            continue
        assert 0 < hit.min() and hit.max() < size - 1, "pick units away from the border"
        kept.append(float(i))
        sizes.append(float(hit.max() - hit.min() + 1))
        centres.append((hit.max() + hit.min()).item() / 2)
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (kept, sizes, centres))  # type: ignore[return-value]


def test_upsample_divides_the_jump_spec_example():
    # spec saturation_probes_lucid §3.1: a stride-s upsampling step gives j_out = j_in / s
    net = nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.Upsample(scale_factor=2),
                        nn.Conv2d(2, 2, 3, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the upsampling step is modelled, not passed through
        table = receptive_fields(net, 16)
    assert table.rf_size.tolist() == [3, 3, 5] and table.jump.tolist() == [2, 1, 1]
    assert table.start.tolist() == [0.5, 0.0, 0.0] and table.attrs["upsampled"] == ["1", "2"]
    _, sizes, _ = measured_rf(net, 16, range(4, 12))
    assert sizes.tolist() == [5.0] * 8  # every unit reads two units of the first conv: 3 + 2


def test_transposed_convolution_divides_the_jump():
    def chain(up: nn.Module) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1), up, nn.Conv2d(2, 2, 3, padding=1))

    table = receptive_fields(chain(nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1)), 16)
    assert table.rf_size.tolist() == [3, 5, 7] and table.jump.tolist() == [2, 1, 1]
    assert table.start.tolist() == [0.5, 0.0, 0.0]
    _, sizes, centres = measured_rf(chain(nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1)), 16, range(4, 12))
    assert sizes.tolist() == [7.0] * 8
    assert centres.mean() == 0.0 - 0.5 + 1 * (4 + 11) / 2  # start − ½ + j·i, on average over units
    # k = 3, s = 2: units read one or two input units in turn; r is their mean, 3 + 0.5·2 = 4
    odd = chain(nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1))
    table = receptive_fields(odd, 16)
    assert table.rf_size.tolist() == [3, 4, 6] and table.jump.tolist() == [2, 1, 1]
    _, sizes, centres = measured_rf(odd, 16, range(4, 12))
    assert sorted(set(sizes.tolist())) == [5.0, 7.0] and sizes.mean() == 6.0
    assert centres.mean() == table.start.iloc[-1] - 0.5 + (4 + 11) / 2
    # a stride-2 transposed convolution of the input: a fractional jump
    first = receptive_fields(nn.Sequential(nn.ConvTranspose2d(1, 1, 2, stride=2)), 8)
    assert first.jump.tolist() == [0.5] and first.rf_size.tolist() == [1] and first.start.tolist() == [0.25]


@pytest.mark.parametrize("up,tail", [
    (nn.Upsample(scale_factor=2), True), (nn.Upsample(scale_factor=3, mode="nearest-exact"), True),
    (nn.Upsample(scale_factor=2, mode="bilinear"), True),
    (nn.Upsample(scale_factor=3, mode="bilinear"), True),
    (nn.Upsample(scale_factor=2, mode="bicubic"), True), (nn.Upsample(size=24, mode="area"), True),
    (nn.Upsample(scale_factor=1.5), True), (nn.ConvTranspose2d(2, 2, 5, stride=3, padding=2), True),
    # kernels that leave some output units reading nothing: exact for the layer itself
    (nn.ConvTranspose2d(2, 2, 3, stride=2, dilation=2), False),
    (nn.ConvTranspose2d(2, 2, 2, stride=3), False),
], ids=repr)
def test_upsampling_rf_is_the_mean_of_the_measured_unit_rfs(up, tail):
    # cross-check with the gradient RF (spec §3.4): over a whole period of unit positions the
    # recurrence's r and start are the means of the measured sizes and centres
    # (average pooling: a max pool's gradient reaches only its maximum)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AvgPool2d(2), up,
                        *([nn.Conv2d(2, 2, 3, padding=1)] if tail else []))
    table = receptive_fields(net, 32).set_index("layer")
    last = table.iloc[-1]
    period = 6  # a multiple of every factor here
    rows = range(last.output_size // 2 - period, last.output_size // 2 + period)
    units, sizes, centres = measured_rf(net, 32, rows)
    predicted = last.start - 0.5 + last.jump * units
    assert table.attrs["upsampled"] == ["2", "3"][:len(net) - 2]
    assert last.rf_size == pytest.approx(float(sizes.mean()), abs=1e-12)
    assert float(predicted.mean()) == pytest.approx(float(centres.mean()), abs=1e-12)


def test_functional_interpolate_and_pixel_shuffle_divide_the_jump():
    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.head = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(nn.functional.pixel_shuffle(self.down(x), 2))
            return self.head(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = receptive_fields(Decoder(), 16).set_index("layer")
    assert table.rf_size.tolist() == [3, 5, 6] and table.jump.tolist() == [2, 1, 0.5]
    assert table.start.tolist() == [0.5, 0.0, -0.25]
    # the chain with modules gives the same numbers
    modules = receptive_fields(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.PixelShuffle(2),
                                             nn.Conv2d(2, 2, 3, padding=1), nn.Upsample(scale_factor=2),
                                             nn.Conv2d(2, 2, 3, padding=1)), 16)
    assert modules[modules.type == "Conv2d"].rf_size.tolist() == [3, 5, 6]


def test_upsampling_with_an_unknown_scale_warns():
    # an Upsample(size=...) on a 3-D (N, C, L) tensor: no 2-D map to read the scale from
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)
            self.up = nn.Upsample(size=12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.up(self.conv(x).flatten(2))

    with pytest.warns(UserWarning, match="up .Upsample. resamples by a scale"):
        receptive_fields(Flat(), 8)


def test_align_corners_places_units_on_the_corner_grid():
    # unit o of an 8 -> 16 align_corners upsampling sits at o·7/15; units 0 and 15 fall on an input
    # unit (one tap), the 14 others read two: r = 3 + 14/16, j = 7/15, start unchanged
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.UpsamplingBilinear2d(scale_factor=2))
    table = receptive_fields(net, 8)
    assert table.rf_size.tolist() == [3, 3.875] and table.start.tolist() == [0.5, 0.5]
    assert table.jump.tolist() == [1, pytest.approx(7 / 15)]


def test_a_jump_that_returns_to_whole_pixels_is_an_int():
    # 1 / 5 / 5 · 25 is 1.0000000000000002 in floats; the table reports 1
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Upsample(scale_factor=5), nn.Upsample(scale_factor=5),
                        nn.Conv2d(1, 1, 25, stride=25))
    table = receptive_fields(net, 4)
    assert table.jump.tolist() == [1, pytest.approx(0.2), pytest.approx(0.04), 1]
    assert table.jump.iloc[-1] == 1 and table.input_jump.iloc[1] == 1
    assert receptive_fields(nn.Sequential(net[0], net[3]), 100).jump.dtype == "int64"


def test_pixel_unshuffle_is_a_stride_s_kernel_s_layer():
    first, last = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)
    unshuffled = nn.Sequential(first, nn.PixelUnshuffle(2), last)
    strided = nn.Sequential(first, nn.Conv2d(1, 4, 2, stride=2), last)
    a, b = receptive_fields(unshuffled, 16), receptive_fields(strided, 16)
    assert a[["rf_size", "jump", "start"]].values.tolist() == b[["rf_size", "jump", "start"]].values.tolist()
    assert a["rf_size"].tolist() == [3, 4, 8] and a["jump"].tolist() == [1, 2, 2]


def test_functional_convolutions_and_pools_count_like_their_modules():
    """F.max_pool2d, torch.max_pool2d, F.avg_pool2d (keywords), F.conv2d with a weight of its own,
    F.lp_pool2d and F.pixel_unshuffle between the modules: the table equals the all-module twin."""
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(16, 4, 1)
            self.weight = nn.Parameter(torch.randn(4, 4, 5, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
            x = nn.functional.conv2d(x, self.weight, padding=2, dilation=2)
            x = self.c2(torch.max_pool2d(x, 3, 1, 1))
            x = nn.functional.avg_pool2d(x, kernel_size=3, stride=2, padding=1)
            x = nn.functional.lp_pool2d(x, 2, 2)
            return self.c3(nn.functional.pixel_unshuffle(x, 2))

    twin = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 5, padding=2, dilation=2), nn.MaxPool2d(3, 1, 1), nn.Conv2d(4, 4, 3),
                         nn.AvgPool2d(3, 2, 1), nn.LPPool2d(2, 2), nn.PixelUnshuffle(2), nn.Conv2d(16, 4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = receptive_fields(Functional(), 64).set_index("layer")
    want = receptive_fields(twin, 64).set_index("layer").loc[["0", "5", "9"]]
    cols = ["rf_size", "jump", "start"]
    assert got[cols].values.tolist() == want[cols].values.tolist()
    assert got.rf_size.tolist() == [3, 28, 44] and got.jump.tolist() == [1, 2, 16]


def test_a_pool_size_computed_at_run_time_warns_and_passes_through():
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            return self.head(nn.functional.max_pool2d(x, x.shape[-1] // 3))

    with pytest.warns(UserWarning, match="max_pool2d.*computed at run time"):
        table = receptive_fields(Dynamic(), 14)
    assert table.rf_size.tolist() == [3, 5]


def test_a_global_pool_sized_at_run_time_covers_the_input():
    """``F.avg_pool2d(x, x.shape[2:])`` (squeeze-and-excitation style): the kernel is computed at
    run time, but the output is 1×1, so the layer after it sees the whole image, as after
    ``F.adaptive_avg_pool2d(x, 1)``; no warning."""
    class Squeeze(nn.Module):
        def __init__(self, adaptive: bool) -> None:
            super().__init__()
            self.c1, self.squeeze, self.adaptive = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), adaptive

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.c1(x)
            pooled = (nn.functional.adaptive_avg_pool2d(x, 1) if self.adaptive
                      else nn.functional.avg_pool2d(x, x.shape[2:]))
            return self.squeeze(pooled)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sized = receptive_fields(Squeeze(False), 32)
    adaptive = receptive_fields(Squeeze(True), 32)
    cols = ["rf_size", "jump", "start"]
    assert sized[cols].values.tolist() == adaptive[cols].values.tolist()
    assert sized.set_index("layer").loc["squeeze", "rf_size"] == 32
