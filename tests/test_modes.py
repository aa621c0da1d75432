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
