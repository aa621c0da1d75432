"""Model registry breadth, weight views, unit surgery and switching state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unitscope
from unitscope.models import MODELS, WeightsError, default_input_shape, layer_info, model_fingerprint

TORCHVISION = ["alexnet", "vgg11", "vgg16", "resnet18", "googlenet"]


@pytest.mark.parametrize("name", [*TORCHVISION, "digits-cnn", "shapes-cnn"])
def test_every_registered_model_builds_runs_and_lists_layers(name):
    assert name in MODELS
    model = unitscope.load_model(name).eval()
    shape = default_input_shape(name)
    small = shape if name.endswith("-cnn") else (3, 64, 64)
    with torch.no_grad():
        out = model(torch.zeros(2, *small))
    assert out.shape == (2, getattr(model, "num_classes", 1000))
    info = layer_info(model, small)
    assert len(info) > 5 and info["parameters"].sum() == sum(p.numel() for p in model.parameters())
    assert (info[info["type"] == "Conv2d"]["output_shape"] != "").all()


def test_weights_file_for_torchvision_model(tmp_path):
    a = unitscope.load_model("resnet18")
    torch.save(a.state_dict(), tmp_path / "r.pt")
    b = unitscope.load_model("resnet18", weights=tmp_path / "r.pt")
    assert model_fingerprint(a) == model_fingerprint(b)
    with pytest.raises(WeightsError, match="does not fit AlexNet: key 'features.0.weight' is missing"):
        unitscope.load_model("alexnet", weights=tmp_path / "r.pt")


def test_weight_views_by_name_attribute_and_index():
    model = unitscope.load_model("resnet18")
    w = unitscope.weights(model)
    assert w["layer1.0.conv1"].w.data_ptr() == model.layer1[0].conv1.weight.data_ptr()
    assert torch.equal(w.layer1[0].conv1.w, model.layer1[0].conv1.weight)
    assert torch.equal(w["layer1"][0]["bn1"].b, model.layer1[0].bn1.bias)
    assert w.conv1.b is None
    assert "layer4.1.bn2" in w.names()
    with pytest.raises(unitscope.LayerError, match="layer 'layer1.9'"):
        _ = w["layer1.9"]
    with pytest.raises(AttributeError, match="has no weight"):
        _ = w.relu.w
    with pytest.raises(AttributeError, match="read-only"):
        w.conv1 = None


def test_set_weights_changes_exactly_the_addressed_values():
    torch.manual_seed(0)
    model, donor = unitscope.load_model("digits-cnn"), unitscope.load_model("digits-cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unitscope.set_weights(model, "conv2:5", donor, mode="weight")
    after = model.state_dict()
    for key, value in before.items():
        if key == "conv2.weight":
            assert torch.equal(after[key][5], donor.conv2.weight[5])
            assert torch.equal(torch.cat([after[key][:5], after[key][6:]]),
                               torch.cat([value[:5], value[6:]]))
        else:
            assert torch.equal(after[key], value), key
    unitscope.set_weights(model, "fc", 0.5, mode="bias")
    assert (model.fc.bias == 0.5).all() and torch.equal(model.fc.weight, before["fc.weight"])
    unitscope.set_weights(model, "conv1", donor)
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    assert torch.equal(model.conv1.bias, donor.conv1.bias)
    unitscope.set_weights(model, "conv3:1", torch.ones(32, 3, 3), mode="weight")
    assert (model.conv3.weight[1] == 1).all()


def test_set_weights_bad_targets():
    model = unitscope.load_model("digits-cnn")
    with pytest.raises(unitscope.LayerError, match="relu1"):
        unitscope.set_weights(model, "relu", 0.0)
    with pytest.raises(ValueError, match="has no weight or bias"):
        unitscope.set_weights(model, "relu1", 0.0)
    with pytest.raises(IndexError, match="16 units; unit 16"):
        unitscope.set_weights(model, "conv1:16", 0.0)
    with pytest.raises(ValueError, match="must be an integer"):
        unitscope.set_weights(model, "conv1:a", 0.0)
    with pytest.raises(ValueError, match="mode="):
        unitscope.set_weights(model, "conv1", 0.0, mode="all")
    with pytest.raises(WeightsError, match="shape"):
        unitscope.set_weights(model, "conv1:0", torch.ones(2, 2), mode="weight")
    with pytest.raises(unitscope.LayerError, match="source model has no layer 'conv1'"):
        unitscope.set_weights(model, "conv1", nn.Linear(2, 2))


def test_switching_weights_and_back_restores_outputs_bit_for_bit(tmp_path):
    torch.manual_seed(1)
    a, b = unitscope.load_model("digits-cnn").eval(), unitscope.load_model("digits-cnn").eval()
    x = torch.randn(8, 1, 8, 8)
    out_a, out_b = a(x), b(x)
    old = unitscope.switch_weights(a, b)
    assert torch.equal(a(x), out_b)
    unitscope.switch_weights(a, old)
    assert torch.equal(a(x), out_a)
    torch.save(b.state_dict(), tmp_path / "b.pt")
    unitscope.switch_weights(a, tmp_path / "b.pt")
    assert torch.equal(a(x), out_b)
    fingerprint = model_fingerprint(a)
    with pytest.raises(WeightsError, match="key 'conv1.weight' is missing"):
        unitscope.switch_weights(a, nn.Linear(2, 2).state_dict())
    assert model_fingerprint(a) == fingerprint


@pytest.mark.parametrize("groups", [1, 2])
def test_set_weights_addresses_the_output_channel_of_a_transposed_conv(groups):
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, groups=groups)  # weight (4, 6 / groups, 3, 3)
    x = torch.randn(2, 4, 5, 5)
    before = conv(x).detach()
    unitscope.set_weights(nn.Sequential(conv), "0:4", 0.0)
    after = conv(x).detach()
    assert after[:, 4].abs().max() == 0  # the unit is silenced
    others = [c for c in range(6) if c != 4]
    assert torch.equal(after[:, others], before[:, others])  # and no other unit changed
    with pytest.raises(IndexError, match="6 units; unit 6"):
        unitscope.set_weights(nn.Sequential(conv), "0:6", 0.0)
    donor = nn.ConvTranspose2d(4, 6, 3, groups=groups)
    unitscope.set_weights(nn.Sequential(conv), "0:1", nn.Sequential(donor))
    torch.testing.assert_close(conv(x)[:, 1], donor(x)[:, 1])


def test_set_weights_refuses_a_target_with_an_empty_unit():
    model = unitscope.load_model("digits-cnn")
    before = model.conv1.weight.detach().clone()
    with pytest.raises(ValueError, match="names no unit"):
        unitscope.set_weights(model, "conv1:", 0.0)
    assert torch.equal(model.conv1.weight, before)
