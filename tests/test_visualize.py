"""Feature visualisation: parameterisation facts from the spec, objectives, toy optimisations, hygiene."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unitscope
from tests.conftest import hook_counts
from unitscope.capture import LayerError
from unitscope.visualize import (
    COLOR_MATRIX,
    ImageParam,
    VisualizationError,
    fft_scale,
    plot_visualizations,
    standard_transforms,
    visualize,
)


class Filter(nn.Module):
    """One unit that is a fixed linear filter over the whole 8×8 image."""

    input_shape = (1, 8, 8)

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 8, bias=False)
        self.conv.weight.data[:] = w.view(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class RedMinusGreen(nn.Module):
    """The spec's toy: a 1×1 conv computing R − G."""

    input_shape = (3, 32, 32)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        self.conv.weight.data[:] = torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def edge() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    return torch.tanh(xx - 3.5 + 0.5 * (yy - 3.5))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 6, 3),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


# ------------------------------------------------------------------------------- parameterisation
def test_colour_matrix_is_normalised_lucid_matrix():
    assert float(COLOR_MATRIX.norm(dim=0).max()) == pytest.approx(1.0, abs=1e-12)
    assert COLOR_MATRIX[:, 0].tolist() == pytest.approx([0.5628, 0.5845, 0.5845], abs=1e-4)


def test_fft_scale_peaks_at_dc_and_decreases_with_frequency():
    s = fft_scale(16, 16)
    assert float(s[0, 0]) == pytest.approx(16.0) and float(s.max()) == float(s[0, 0])
    fy = torch.fft.fftfreq(16, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(16, dtype=torch.float64)[None, :]
    rho = torch.sqrt(fx ** 2 + fy ** 2).flatten()
    order = torch.argsort(rho)
    assert bool((s.flatten()[order].diff() <= 1e-12).all())


def test_image_in_unit_interval_grey_at_zero_and_linear_before_sigmoid():
    p = ImageParam(2, 3, 12, generator=torch.Generator().manual_seed(0))
    img = p()
    assert img.shape == (2, 3, 12, 12) and bool(((img > 0) & (img < 1)).all())
    before = p.pre_sigmoid().detach()
    with torch.no_grad():
        p.raw.mul_(2)
    assert torch.allclose(p.pre_sigmoid(), 2 * before, atol=1e-6)
    with torch.no_grad():
        p.raw.zero_()
    assert torch.equal(p(), torch.full_like(img, 0.5))


def test_standard_transforms_keep_the_padded_size():
    out = standard_transforms(64)(torch.rand(3, 3, 64, 64), torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 72, 72)


# ------------------------------------------------------------------------------- optimisation
def test_objective_rises_over_the_steps():
    vis = visualize(small_net(), ["2:1", "0:5"], size=24, steps=100, device="cpu")
    assert vis.trace.shape == (100, 2)
    smooth = vis.trace.unfold(0, 20, 20).mean(-1)  # means of 5 blocks of 20 steps
    assert bool((smooth.diff(dim=0) > 0).all())
    assert bool((smooth[-1] > smooth[0] + 0.03).all())


def test_unit_that_is_a_linear_filter_gives_an_image_correlated_with_it():
    w = edge()
    for param in ("fft", "pixel"):
        vis = visualize(Filter(w), ["conv:0"], steps=64, param=param, transforms="none", device="cpu")
        img = vis.images[0, 0].flatten()
        r = torch.corrcoef(torch.stack([img, w.flatten()]))[0, 1]
        assert float(r) > 0.85, param


def test_red_minus_green_unit_gives_a_red_image():
    vis = visualize(RedMinusGreen(), ["conv:0"], steps=512, device="cpu")
    red, green, _ = vis.images[0].mean((1, 2)).tolist()
    assert red > 0.75 and green < 0.2


def test_same_seed_same_image_other_seed_other_image():
    a = visualize(small_net(), ["2:0", "2:4"], size=16, steps=10, seed=3, device="cpu")
    b = visualize(small_net(), ["2:0", "2:4"], size=16, steps=10, seed=3, device="cpu")
    c = visualize(small_net(), ["2:0", "2:4"], size=16, steps=10, seed=4, device="cpu")
    assert torch.equal(a.images, b.images) and torch.equal(a.trace, b.trace)
    assert not torch.equal(a.images, c.images)


def test_a_callable_transform_drawing_from_torchs_generator_is_seeded_too():
    def jitter(img: torch.Tensor) -> torch.Tensor:  # draws from torch's global generator
        dy, dx = (int(v) for v in torch.randint(-2, 3, (2,)))
        return torch.roll(img, (dy, dx), (2, 3))

    net = small_net()
    runs = []
    for caller_seed in (1, 2):  # whatever state the caller's generator is in
        torch.manual_seed(caller_seed)
        runs.append(visualize(net, ["2:0"], size=16, steps=8, seed=3, transforms=jitter, device="cpu"))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    other = visualize(net, ["2:0"], size=16, steps=8, seed=4, transforms=jitter, device="cpu")
    assert torch.equal(runs[0].images, runs[1].images)
    assert not torch.equal(runs[0].images, other.images)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_runs_inside_a_callers_no_grad_or_inference_mode(context):
    net = small_net()
    free = visualize(net, ["2:0"], size=16, steps=3, device="cpu")
    with context():
        inside = visualize(net, ["2:0"], size=16, steps=3, device="cpu")
    assert torch.equal(free.images, inside.images)


def test_a_tuple_of_targets_is_several_targets():
    assert visualize(small_net(), ("2:0", "2:4"), size=16, steps=2, device="cpu").images.shape[0] == 2
    one = visualize(small_net(), ("2", 4), size=16, steps=2, device="cpu")
    assert one.images.shape[0] == 1 and one.targets == [("2", 4)]
    assert visualize(small_net(), "2:4", size=16, steps=2, device="cpu").targets == ["2:4"]


def test_targets_in_one_batch_do_not_interact():
    # without random transforms, image 0 of a batch equals the image of the same target alone
    alone = visualize(small_net(), ["2:1"], size=16, steps=15, transforms="none", device="cpu")
    batch = visualize(small_net(), ["2:1", "0:5", "6:2"], size=16, steps=15, transforms="none", device="cpu")
    assert torch.allclose(alone.images[0], batch.images[0], atol=1e-6)


def test_thresholds_keep_a_snapshot_each():
    vis = visualize(small_net(), ["2:1"], size=16, steps=[3, 8, 5], device="cpu")
    assert sorted(vis.snapshots) == [3, 5, 8] and vis.trace.shape == (8, 1)
    assert torch.equal(vis.images, vis.snapshots[8]) and not torch.equal(vis.snapshots[3], vis.snapshots[8])


def test_direction_along_a_channel_is_the_channel_objective():
    e = torch.zeros(6)
    e[2] = 1.0
    chan = visualize(small_net(), ["2:2"], size=16, steps=5, device="cpu")
    direc = visualize(small_net(), [("2", e)], size=16, steps=5, objective="direction", device="cpu")
    assert torch.allclose(chan.trace, direc.trace, atol=1e-6)
    cos = visualize(small_net(), [("2", e)], size=16, steps=5, objective="direction_cosine", device="cpu")
    assert bool((cos.trace <= 1 + 1e-6).all())
    neuron = visualize(small_net(), ["2:2"], size=16, steps=5, objective="neuron", device="cpu")
    assert neuron.trace.shape == (5, 1)


def test_one_channel_models_work(digits_model):
    vis = visualize(digits_model, ["conv2:3", "fc:7"], steps=5, device="cpu")
    assert vis.images.shape == (2, 1, 8, 8)


# ------------------------------------------------------------------------------- bad input, hygiene
def test_out_of_range_channel_is_a_clear_error():
    net = small_net()
    with pytest.raises(IndexError, match="channel 8 is out of range for layer '0', which has 8 channels"):
        visualize(net, ["0:8"], size=16, steps=2, device="cpu")
    assert hook_counts(net) == 0


def test_bad_targets_are_clear_errors():
    net = small_net()
    with pytest.raises(ValueError, match="layer:channel"):
        visualize(net, ["0"], size=16, steps=2)
    with pytest.raises(LayerError, match="matches no module"):
        visualize(net, ["conv9:0"], size=16, steps=2)
    with pytest.raises(ValueError, match="direction tensor"):
        visualize(net, ["0:1"], size=16, steps=2, objective="direction")
    with pytest.raises(ValueError, match="has 5 entries but the layer has 6 channels"):
        visualize(net, [("2", torch.ones(6)), ("2", torch.ones(5))], size=16, steps=2, objective="direction")


def test_nan_stops_the_run_with_a_clear_error():
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x - 2.0)  # x is in (0, 1): NaN everywhere

    net = nn.Sequential(nn.Conv2d(3, 2, 1), Broken())
    with pytest.raises(VisualizationError, match="not finite at step 1"):
        visualize(net, ["1:0"], size=8, steps=5, device="cpu")
    assert hook_counts(net) == 0


def test_model_is_left_as_it_was():
    net = small_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    visualize(net, ["2:1"], size=16, steps=3, device="cpu")
    assert net.training and hook_counts(net) == 0
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_grid_figure():
    fig = plot_visualizations(torch.rand(5, 3, 8, 8), ["a", "b", "c", "d", "e"], columns=3)
    assert len(fig.axes) == 6 and fig.axes[0].get_title() == "a"
    fig = plot_visualizations(torch.rand(2, 1, 8, 8))
    assert fig.axes[1].images[0].get_array().shape == (8, 8)


def test_works_on_a_torchvision_model_with_imagenet_preprocessing():
    net = unitscope.load_model("alexnet")
    vis = visualize(net, ["features.0:3"], size=32, steps=2, device="cpu")
    assert vis.images.shape == (1, 3, 32, 32)


def test_visualize_experiment_and_report_section(tmp_path):
    from unitscope.experiments import run_config
    from unitscope.report import write_report

    (tmp_path / "vis.toml").write_text(
        'experiment = "visualize"\nmodel = "digits-cnn"\n'  # no dataset: visualize reads none
        'targets = ["conv2:3", "fc:1"]\nsteps = [4, 6]\ndevice = "cpu"\n')
    [(target, _)] = run_config(tmp_path / "vis.toml", out=tmp_path / "runs", progress=False)
    run = unitscope.load_run(target)
    assert list(run.table("visualize").target) == ["conv2:3", "fc:1"]
    assert run.arrays["visualize"]["images"].shape == (2, 1, 8, 8)
    assert run.arrays["visualize"]["trace"].shape == (6, 2) and "step_4" in run.arrays["visualize"]
    page = write_report(target).read_text()
    assert "<section id='visualize'>" in page and page.count("<img") == 2


def test_visualize_experiment_needs_targets(tmp_path):
    from unitscope.experiments import ConfigError, run_config

    (tmp_path / "vis.toml").write_text('experiment = "visualize"\nmodel = "digits-cnn"\ndataset = "digits"\n')
    with pytest.raises(ConfigError, match="targets is required"):
        run_config(tmp_path / "vis.toml", out=tmp_path / "runs", progress=False)


def test_demo_part_adds_visualisations_of_shapes_cnn():
    from pathlib import Path

    from unitscope.demo import DemoContext
    from unitscope.families import similarity
    from unitscope.results import Run

    run = Run([], {"versions": {}, "created": ""}, tables={}, arrays={})
    ctx = DemoContext(name="shapes-cnn", model=unitscope.load_model("shapes-cnn").eval(), dataset="shapes",
                      train_data=None, test_data=None, run=run, out=Path("."), quick=True, progress=False)
    similarity.demo(ctx)
    assert run.arrays["visualize"]["images"].shape == (8, 3, 64, 64)
    assert len(similarity.SECTIONS["visualize"](run)) == 2


@pytest.mark.parametrize(("option", "value"), [("size", -3), ("size", 0), ("size", 2.5), ("channels", 0)])
def test_non_positive_size_is_refused_not_replaced_by_the_default(option, value):
    model = unitscope.load_model("digits-cnn")
    with pytest.raises(ValueError, match=f"{option} must be a positive size"):
        visualize(model, ["conv1:0"], steps=1, **{option: value})
