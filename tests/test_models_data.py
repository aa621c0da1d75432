"""The minimal model and data registries: names, weights files, the digits split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unitscope
from unitscope.models import WeightsError, load_weights, model_fingerprint
from unitscope.models.info import layer_info
from unitscope.registry import UnknownNameError


def test_unknown_names_list_the_known_ones():
    expected = "Did you mean 'digits-cnn'.*Known models: .*digits-cnn, googlenet"
    with pytest.raises(UnknownNameError, match=expected):
        unitscope.load_model("digit-cnn")
    with pytest.raises(UnknownNameError, match="Known datasets: cifar10, cifar100, digits, fashion-mnist"):
        unitscope.load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        unitscope.load_dataset("digits", split="val")


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = unitscope.load_dataset("digits", "train"), unitscope.load_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.input_shape == (1, 8, 8) and float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    counts = torch.bincount(test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    train_rows = {tuple(r) for r in train.x.flatten(1).tolist()}
    assert sum(tuple(r) in train_rows for r in test.x.flatten(1).tolist()) < 5  # sklearn has a few duplicates
    assert unitscope.load_dataset("digits", "test").fingerprint() == test.fingerprint() != train.fingerprint()


def test_weights_round_trip_and_checkpoint_dicts(tmp_path):
    a, b = unitscope.load_model("digits-cnn"), unitscope.load_model("digits-cnn")
    assert model_fingerprint(a) != model_fingerprint(b)
    torch.save(a.state_dict(), tmp_path / "w.pt")
    torch.save({"model": a.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    for f in ("w.pt", "ckpt.pt"):
        c = unitscope.load_model("digits-cnn", weights=tmp_path / f)
        assert model_fingerprint(c) == model_fingerprint(a)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(c.eval()(x), a.eval()(x), rtol=0, atol=0)


def test_bad_weight_files_say_what_is_wrong(tmp_path):
    model = unitscope.load_model("digits-cnn")
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(model, tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(WeightsError, match="corrupt.pt.*the file is corrupt"):
        load_weights(model, tmp_path / "corrupt.pt")
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="key 'conv1.weight' is missing"):
        load_weights(model, tmp_path / "other.pt")
    state = model.state_dict()
    state["fc.weight"] = torch.zeros(5, 64)
    torch.save(state, tmp_path / "shape.pt")
    before = model_fingerprint(model)
    with pytest.raises(WeightsError, match=r"'fc.weight' has shape \(5, 64\), the model expects \(10, 64\)"):
        load_weights(model, tmp_path / "shape.pt")
    assert model_fingerprint(model) == before, "a failed load must leave the model unchanged"


def test_layer_info_table():
    info = layer_info(unitscope.load_model("digits-cnn")).set_index("name")
    assert info.loc["conv1", "type"] == "Conv2d" and info.loc["conv1", "parameters"] == 1 * 16 * 9 + 16
    assert info.loc["pool2", "output_shape"] == "(32, 4, 4)" and info.loc["fc", "channels"] == 10
    bare = layer_info(nn.Sequential(nn.Linear(4, 2)))
    assert bare.loc[0, "output_shape"] == ""
    assert layer_info(nn.Sequential(nn.Linear(4, 2)), (4,)).loc[0, "output_shape"] == "(2,)"


def test_layer_info_and_flops_probe_a_float64_model_in_float64():
    """One helper (models.info.probe_dtype_device) picks the probe input's dtype and device for
    layer_info, flops and receptive_fields; layer_info used float32 for a float64 model and failed."""
    from unitscope.analyses.flops import flops_total
    from unitscope.models.info import layer_info

    model = unitscope.load_model("digits-cnn").double()
    info = layer_info(model, (1, 8, 8))
    assert info.set_index("name").loc["conv2", "output_shape"] == "(32, 8, 8)"
    assert flops_total(model, (1, 8, 8)) == flops_total(unitscope.load_model("digits-cnn"), (1, 8, 8))
