"""Functions that switch a caller's model to eval (or move it) give every module's flag back."""

from __future__ import annotations

import torch

import unitscope
from unitscope.analyses.mosaics import unit_segments
from unitscope.analyses.studies import accuracy
from unitscope.models.modes import preserved


def flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_model_modes_come_back_module_by_module():
    model = unitscope.load_model("shapes-cnn").train()
    model.bn2.eval()  # a frozen batch norm inside a model in train mode
    before = flags(model)
    x = torch.rand(4, 3, 32, 32)
    accuracy(model, x, torch.zeros(4, dtype=torch.long))
    assert flags(model) == before
    unit_segments(model, "relu2", x, torch.tensor([0, 1, 2, 3]))
    assert flags(model) == before
    running = model.bn1.running_mean.clone()
    unit_segments(model, "relu2", x, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(model.bn1.running_mean, running)  # ran in eval: batch statistics untouched
    try:
        with preserved(model):
            model.eval()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert flags(model) == before


def test_model_device_reads_parameters_then_buffers():
    from unitscope.models.modes import model_device

    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no tensors at all
    bn = torch.nn.BatchNorm1d(3, affine=False).to(torch.float64)  # buffers only
    assert model_device(bn) == bn.running_mean.device
    assert model_device(unitscope.load_model("digits-cnn")) == torch.device("cpu")


def test_engine_and_model_passes_restore_every_module_flag(tmp_path):
    from torch.utils.data import TensorDataset

    from unitscope.analyses.evaluation import evaluate_classifier
    from unitscope.analyses.occlusion import occlusion_maps
    from unitscope.features import extract_features

    model = unitscope.load_model("shapes-cnn").train()
    model.bn2.eval()  # model.train(flag) would switch this one back to train
    before = flags(model)
    x = torch.rand(6, 3, 64, 64)
    data = TensorDataset(x, torch.tensor([0, 1, 2, 3, 0, 1]))
    unitscope.analyze(model, data, layers="relu2", analyses=[unitscope.Saturation()], progress=False)
    assert flags(model) == before
    evaluate_classifier(model, data)
    assert flags(model) == before
    extract_features(model, data, ["relu2"], 2, out=tmp_path / "f")
    assert flags(model) == before
    occlusion_maps(model, "relu2", x[:1], torch.tensor([0]), occluder=9, stride=16)
    assert flags(model) == before
    unitscope.visualize(model, ["relu2:0"], size=64, steps=2)
    assert flags(model) == before
    unitscope.receptive_fields(model, 64)
    assert flags(model) == before
    unitscope.flops(model, (3, 64, 64))
    assert flags(model) == before
    from unitscope.models.info import layer_info
    from unitscope.train import evaluate

    evaluate(model, data)
    assert flags(model) == before
    layer_info(model)
    assert flags(model) == before


def test_cka_restores_the_other_models_flags():
    model = unitscope.load_model("digits-cnn").eval()
    other = unitscope.load_model("digits-cnn").train()
    other.conv2.eval()
    before = flags(other)
    data = unitscope.load_dataset("digits", "test")
    unitscope.analyze(model, data, layers=["conv2"], analyses=[unitscope.CKA(other=other)], progress=False)
    assert flags(other) == before
