"""Attributions: LRP identities, agreement with zennit and captum, the model left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unitscope
from unitscope.attribution import METHODS, AttributionError, attribute, plot_heatmaps

from .conftest import hook_counts


def _relu_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(inplace=True), nn.Linear(8, 5, bias=False),
                         nn.ReLU(), nn.Linear(5, 3, bias=False))


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [id(p) for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "attrs": [sorted(vars(m)) for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert hook_counts(model) == 0
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k  # bitwise
    for key in ("params", "training", "inplace", "attrs"):
        assert after[key] == before[key], key
    assert all(g is None for g in after["grads"])


def test_lrp_epsilon_without_bias_equals_gradient_times_input():
    model = _relu_mlp()
    x = torch.randn(40, 6)
    with torch.no_grad():  # keep inputs whose pre-activations are all away from 0, where epsilon matters
        z1 = model[0](x)
        z2 = model[2](model[1](z1.clone()))
        far = torch.cat([z1, z2, model(x)], 1).abs().min(1).values > 1e-2
    x = x[far]
    assert len(x) >= 5
    target = torch.arange(len(x)) % 3
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)
    for rules, tol in (("epsilon", 1e-3), ("zero", 1e-6)):
        rel = attribute(model, x, target, composite=rules, canonizers=[])
        torch.testing.assert_close(rel, grad * x, rtol=tol, atol=tol)


def test_lrp_conserves_the_target_logit_on_a_bias_free_relu_net():
    model = _relu_mlp(1)
    x = torch.randn(5, 6)
    rel = attribute(model, x, target=2, composite="zero", canonizers=[])
    torch.testing.assert_close(rel.sum(1), model(x)[:, 2].detach(), rtol=1e-5, atol=1e-6)


def test_hidden_relevance_spec_example_5_4():
    """spec §5.4: hidden relevance a ⊙ w; summed [1.5, -2, 3]; top-2 signed [n3, n1], absolute [n3, n2]."""
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[2].weight.copy_(torch.tensor([[0.5, -1.0, 3.0], [1.0, 1.0, 1.0]]))
    x = torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.0, 1.0]])
    rel = attribute(model, x, target=0, layer="1", composite="zero", canonizers=[])
    torch.testing.assert_close(rel, torch.tensor([[0.5, -2.0, 0.0], [1.0, 0.0, 3.0]]))
    total = rel.sum(0)
    torch.testing.assert_close(total, torch.tensor([1.5, -2.0, 3.0]))
    assert total.argsort(descending=True)[:2].tolist() == [2, 0]
    assert total.abs().argsort(descending=True)[:2].tolist() == [2, 1]


@pytest.mark.parametrize("name", ["digits-cnn", "shapes-cnn"])
def test_lrp_equals_zennit_direct_exactly(name):
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    torch.manual_seed(0)
    model = unitscope.load_model(name).eval()
    x = torch.rand(3, *model.input_shape)
    target = torch.tensor([1, 0, 2])
    ours = attribute(model, x, target)

    def start(out: torch.Tensor) -> torch.Tensor:
        s = torch.zeros_like(out)
        return s.scatter_(1, target[:, None], out.gather(1, target[:, None]))

    with Gradient(model, EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])) as attributor:
        _, theirs = attributor(x, start)
    assert torch.equal(ours, theirs)
    assert hook_counts(model) == 0


def test_layer_relevance_of_every_layer_from_one_pass_matches_single_calls(digits_model):
    digits_model.eval()
    x = torch.rand(4, 1, 8, 8)
    both = attribute(digits_model, x, 3, layer=["conv2", "relu3"])
    assert set(both) == {"conv2", "relu3"}
    assert torch.equal(both["conv2"], attribute(digits_model, x, 3, layer="conv2"))
    assert both["relu3"].shape == (4, 64, 4, 4)


def test_saliency_is_the_signed_gradient(digits_model):
    x = torch.rand(3, 1, 8, 8)
    t = torch.tensor([4, 5, 6])
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(digits_model.eval()(xg).gather(1, t[:, None]).sum(), xg)
    torch.testing.assert_close(attribute(digits_model, x, t, method="saliency"), grad)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", [None, "conv2"])
def test_model_left_as_it_was_and_second_call_equal(method, layer):
    torch.manual_seed(0)
    model = unitscope.load_model("shapes-cnn" if method == "lrp" else "digits-cnn")
    model.train()  # the call switches to eval and back
    x = torch.rand(2, *model.input_shape)
    before = _snapshot(model)
    options = {"n_steps": 8} if method == "integrated_gradients" else {}
    first = attribute(model, x, 1, method=method, layer=layer, **options)
    _assert_unchanged(model, before)
    second = attribute(model, x, 1, method=method, layer=layer, **options)
    assert torch.equal(first, second)
    _assert_unchanged(model, before)


def test_target_out_of_range_is_a_clear_error_and_leaves_no_hooks(digits_model):
    x = torch.rand(2, 1, 8, 8)
    before = _snapshot(digits_model)
    for method in ("lrp", "saliency"):
        with pytest.raises(AttributionError, match="out of range.*10 outputs"):
            attribute(digits_model, x, 10, method=method)
        with pytest.raises(AttributionError, match="out of range"):
            attribute(digits_model, x, [-1, 2], method=method)
    with pytest.raises(AttributionError, match="3 entries for 2 inputs"):
        attribute(digits_model, x, [1, 2, 3])
    with pytest.raises(AttributionError, match="class indices"):
        attribute(digits_model, x, 1.7)  # not cut to class 1
    with pytest.raises(AttributionError, match="unknown attribution method"):
        attribute(digits_model, x, 1, method="lime")
    with pytest.raises(AttributionError, match="unknown LRP rule set"):
        attribute(digits_model, x, 1, composite="nope")
    _assert_unchanged(digits_model, before)


def test_target_none_is_the_predicted_class(digits_model):
    x = torch.rand(3, 1, 8, 8)
    pred = digits_model.eval()(x).argmax(1)
    assert torch.equal(attribute(digits_model, x), attribute(digits_model, x, pred))


def test_heatmap_figure(digits_model):
    x = torch.rand(3, 1, 8, 8)
    fig = plot_heatmaps(x, attribute(digits_model, x, 1), labels=[1, 1, 1])
    assert len(fig.axes) == 6


def test_lrp_with_inplace_relu_equals_a_copy_without(digits_model):
    import copy

    digits_model.eval()
    plain = copy.deepcopy(digits_model)
    for m in plain.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    x = torch.rand(3, 1, 8, 8)
    ours = attribute(digits_model, x, 2, layer=["conv1", "relu2", "conv3"])
    ref = attribute(plain, x, 2, layer=["conv1", "relu2", "conv3"])
    for k in ours:
        assert torch.equal(ours[k], ref[k]), k
    assert torch.equal(attribute(digits_model, x, 2), attribute(plain, x, 2))
    assert all(m.inplace for m in digits_model.modules() if hasattr(m, "inplace"))


@pytest.mark.parametrize("method", ["lrp", "saliency"])
def test_wrong_input_shape_names_the_expected_and_the_given_shape(digits_model, method):
    with pytest.raises(unitscope.InputError, match=r"expects one sample of shape \(1, 8, 8\).*\(3, 8, 8\)"):
        attribute(digits_model, torch.randn(4, 3, 8, 8), method=method)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(unitscope.InputError, match=r"cannot run on samples of shape \(3, 9, 9\)"):
        attribute(net, torch.randn(2, 3, 9, 9), method=method)
