"""Layer selection, reductions, in-place safety, repeated calls and hook hygiene of capture."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import unitscope
from unitscope.capture import Capture, CaptureError, LayerError, make_reduction, resolve_layers

from .conftest import hook_counts


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def test_select_by_name_glob_type_and_list(digits_model, resnet):
    assert resolve_layers(digits_model, "conv2") == ["conv2"]
    assert resolve_layers(digits_model, "relu*") == ["relu1", "relu2", "relu3"]
    assert resolve_layers(digits_model, nn.Conv2d) == ["conv1", "conv2", "conv3"]
    assert resolve_layers(digits_model, "Linear") == ["fc"]
    # a list mixes kinds; the result follows module order and has no duplicates
    assert resolve_layers(digits_model, ["fc", "conv1", nn.Linear]) == ["conv1", "fc"]
    relus = resolve_layers(resnet, "layer?.?.relu")
    assert relus[0] == "layer1.0.relu" and relus[-1] == "layer4.1.relu" and len(relus) == 8
    assert len(resolve_layers(resnet, [nn.Conv2d])) == 20


def test_none_selects_every_leaf(digits_model):
    assert resolve_layers(digits_model, None) == [n for n, m in digits_model.named_children()]


def test_unknown_layer_lists_closest_names(digits_model):
    with pytest.raises(LayerError) as err:
        resolve_layers(digits_model, "relu")
    msg = str(err.value)
    assert "'relu'" in msg and "relu1" in msg and "unitscope layers" in msg
    with pytest.raises(LayerError, match="pattern 'layer\\*' matches no module"):
        resolve_layers(digits_model, "layer*")
    with pytest.raises(LayerError, match="module type BatchNorm2d"):
        resolve_layers(digits_model, nn.BatchNorm2d)
    with pytest.raises(LayerError, match="empty layer selection"):
        resolve_layers(digits_model, [])


@pytest.mark.parametrize("name", ["mean", "max", "flatten", "pool:2", "none"])
def test_reductions_match_direct_computation(name):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3)
    net = nn.Sequential(conv)
    x = torch.randn(4, 3, 9, 9)
    full = conv(x).detach()
    expected = {
        "mean": full.mean(dim=(2, 3)), "max": full.amax(dim=(2, 3)),
        "flatten": full.reshape(4, -1), "none": full,
        "pool:2": nn.functional.adaptive_avg_pool2d(full, 2),
    }[name]
    with torch.no_grad(), unitscope.capture(net, "0", reduce=name) as acts:
        net(x)
    torch.testing.assert_close(acts["0"], expected)


def test_reductions_of_2d_outputs_keep_them():
    x = torch.randn(6, 4)
    for name in ("mean", "max"):
        assert torch.equal(make_reduction(name)(x), x)


def test_bad_reduction_names():
    with pytest.raises(ValueError, match="unknown reduction"):
        make_reduction("median")
    with pytest.raises(ValueError, match="positive integer"):
        make_reduction("pool:0")


@pytest.mark.parametrize("reduce", ["none", "mean", "min_is_negative"])
def test_inplace_relu_does_not_change_captured_conv_output(reduce):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(inplace=True))
    x = torch.randn(3, 2, 7, 7)
    pre_relu = net[0](x).detach()
    spec = "none" if reduce == "min_is_negative" else reduce
    with torch.no_grad(), unitscope.capture(net, ["0", "1"], reduce=spec) as acts:
        net(x)
    if reduce == "mean":
        torch.testing.assert_close(acts["0"], pre_relu.mean(dim=(2, 3)))
        torch.testing.assert_close(acts["1"], pre_relu.clamp(min=0).mean(dim=(2, 3)))
    else:
        assert (acts["0"] < 0).any(), "the conv output was overwritten by the in-place ReLU"
        torch.testing.assert_close(acts["0"], pre_relu)
        torch.testing.assert_close(acts["1"], pre_relu.clamp(min=0))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(self.act(x)) - 1.0)


def test_module_called_twice_errors_by_default():
    net = Twice()
    with pytest.raises(CaptureError, match="called 2 times.*calls='all'"):
        with unitscope.capture(net, "act"):
            net(torch.randn(2, 3))
    assert hook_counts(net) == 0


def test_module_called_twice_each_call_addressed():
    torch.manual_seed(3)
    net = Twice()
    x = torch.randn(5, 3)
    first = torch.relu(x)
    second = torch.relu(net.lin(first) - 1.0).detach()
    with torch.no_grad(), unitscope.capture(net, "act", calls="all") as acts:
        net(x)
    assert sorted(acts) == ["act", "act#1"]
    torch.testing.assert_close(acts["act"], first)
    torch.testing.assert_close(acts["act#1"], second)
    for mode, expected in (("first", first), ("last", second)):
        with torch.no_grad(), unitscope.capture(net, "act", calls=mode) as acts:
            net(x)
        assert list(acts) == ["act"]
        torch.testing.assert_close(acts["act"], expected)


def test_every_forward_replaces_the_previous_one(digits_model):
    with torch.no_grad(), unitscope.capture(digits_model, "fc") as acts:
        digits_model(torch.zeros(2, 1, 8, 8))
        digits_model(torch.zeros(7, 1, 8, 8))
    assert acts["fc"].shape == (7, 10)


def test_hooks_removed_after_normal_exit_and_exception(resnet):
    before = hook_counts(resnet)
    with torch.no_grad(), unitscope.capture(resnet, [nn.Conv2d, nn.ReLU], calls="all"):
        resnet(torch.randn(1, 3, 32, 32))
    assert hook_counts(resnet) == before
    with pytest.raises(ZeroDivisionError), unitscope.capture(resnet, "layer1.*"):
        raise ZeroDivisionError
    assert hook_counts(resnet) == before
    with pytest.raises(RuntimeError), unitscope.capture(resnet, "conv1"):
        resnet(torch.randn(1, 5, 32, 32))  # wrong channel count: the forward raises
    assert hook_counts(resnet) == before


def test_stop_skips_the_rest_of_the_network():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("ran past the last captured layer")

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), Boom())
    with unitscope.capture(net, ["0", "1"], stop=True, calls="first") as acts:
        net(torch.randn(2, 3))
    assert set(acts) == {"0", "1"}
    assert hook_counts(net) == 0
    # with calls="error" (or "last") a captured module may run again later: the forward goes on
    with pytest.raises(AssertionError, match="ran past"), unitscope.capture(net, ["0", "1"], stop=True):
        net(torch.randn(2, 3))
    assert hook_counts(net) == 0


def test_resnet_all_conv_and_relu_calls(resnet):
    cap = Capture(resnet, [nn.Conv2d, nn.ReLU], {"mean": "mean"}, calls="all")
    with torch.no_grad(), cap:
        resnet(torch.randn(2, 3, 64, 64))
    keys = cap.outputs["mean"]
    assert "layer1.0.relu" in keys and "layer1.0.relu#1" in keys
    assert len(keys) == 20 + 1 + 8 * 2  # convs, stem relu, two relu calls per block
    assert keys["layer4.1.relu#1"].shape == (2, 512)


def test_targets_restrict_reductions_to_their_layers(digits_model):
    cap = Capture(digits_model, ["conv1", "fc"], {"mean": "mean", "none": "none"},
                  targets={"mean": {"conv1", "fc"}, "none": {"fc"}})
    with torch.no_grad(), cap:
        digits_model(torch.zeros(2, 1, 8, 8))
    assert set(cap.outputs["mean"]) == {"conv1", "fc"}
    assert set(cap.outputs["none"]) == {"fc"}


def test_tuple_outputs_use_the_first_tensor():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x

    net = nn.Sequential(Pair())
    with unitscope.capture(net, "0") as acts:
        net(torch.ones(2, 3))
    assert torch.equal(acts["0"], torch.full((2, 3), 2.0))


def test_capture_objects_are_freed_after_exit(digits_model):
    import gc
    import weakref

    cap = Capture(digits_model, "relu*", {"mean": "mean"})
    with torch.no_grad(), cap:
        digits_model(torch.zeros(3, 1, 8, 8))
    ref, out_ref = weakref.ref(cap), weakref.ref(cap.outputs["mean"]["relu1"])
    del cap
    gc.collect()
    assert ref() is None and out_ref() is None, "the model still holds the capture after exit"
