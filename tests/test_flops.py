"""FLOPs per layer from torch's FlopCounterMode, checked against analytic MAC counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unitscope
from unitscope.analyses.flops import flops, flops_total


def test_single_conv_exact():
    table = flops(nn.Conv2d(3, 8, 3, padding=1), (3, 16, 16))
    assert table.flops.tolist() == [2 * (8 * 16 * 16) * (3 * 3 * 3)]  # a MAC counts 2
    assert table.parameters.tolist() == [8 * 27 + 8]
    assert flops_total(nn.Conv2d(3, 8, 3, padding=1), (3, 16, 16)) == {"flops": 110592, "parameters": 224}


def test_linear_per_sample_and_batch():
    assert flops(nn.Linear(10, 5), (10,)).flops.tolist() == [2 * 10 * 5]
    assert flops(nn.Linear(10, 5), (10,), batch_size=3).flops.tolist() == [3 * 2 * 10 * 5]


def test_leaf_rows_and_names():
    model = unitscope.load_model("digits-cnn").train()
    table = flops(model, (1, 8, 8))
    assert model.training  # mode restored
    leaves = [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    assert table.layer.tolist() == leaves
    assert table.parameters.sum() == sum(p.numel() for p in model.parameters())
    assert table.flops.sum() == flops_total(model, (1, 8, 8))["flops"]


def analytic_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Conv and Linear multiply-accumulates from layer shapes, counted independently of torch."""
    macs = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs.append(output.numel() * (module.in_channels // module.groups) * kh * kw)
        else:
            macs.append(output.numel() * module.in_features)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return sum(macs)


def test_resnet18_total():
    model = unitscope.load_model("resnet18")
    total = flops_total(model, (3, 224, 224))
    assert total["flops"] == 2 * analytic_macs(model, (3, 224, 224))
    assert total["flops"] == pytest.approx(2 * 1.814e9, rel=0.02)
    assert total["parameters"] == 11_689_512
    table = flops(model, (3, 224, 224))
    assert table.flops.sum() == total["flops"]  # every FLOP is inside a leaf
    assert table.set_index("layer").loc["fc", "flops"] == 2 * 512 * 1000


def test_bad_input_shape():
    with pytest.raises(ValueError, match="shape of one sample"):
        flops(nn.Linear(3, 2), 3)


def test_wrong_input_shape_names_the_expected_and_the_given_shape():
    model = unitscope.load_model("digits-cnn")
    with pytest.raises(unitscope.InputError, match=r"expects one sample of shape \(1, 8, 8\).*\(3, 8, 8\)"):
        flops(model, (3, 8, 8))
    with pytest.raises(ValueError, match="positive sizes"):
        flops(model, (1, -8, 8))
    # a model without a declared shape: torch's failure becomes one naming the shape given
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(unitscope.InputError, match=r"cannot run on samples of shape \(3, 9, 9\)"):
        flops(net, (3, 9, 9))
    assert flops(model, (1, 16, 16)).flops.sum() > flops(model, (1, 8, 8)).flops.sum()  # other sizes run


def test_attention_is_counted_and_its_own_parameters_have_a_row():
    """Eval mode under no_grad sends attention down a fused path the counter cannot see (0 FLOPs
    before); nn.MultiheadAttention's in-projection belongs to no leaf."""
    from torch.utils.flop_counter import FlopCounterMode

    from unitscope.analyses.flops import flops, flops_total

    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    with FlopCounterMode(display=False) as counter:
        layer.train()(torch.zeros(1, 5, 16))  # grad mode, train: the unfused path
    assert flops_total(layer, (5, 16))["flops"] == counter.get_total_flops() == 22080
    table = flops(layer, (5, 16)).set_index("layer")
    assert table.loc["self_attn", "parameters"] == 816 and table.loc["self_attn", "flops"] == 11840
    assert table["parameters"].sum() == sum(p.numel() for p in layer.parameters())
    assert table["flops"].sum() == 22080
    assert layer.training  # the model's mode is left as it was


def test_tied_weights_count_once_so_the_rows_add_up_to_the_model():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    table = flops(Tied(), (4,))
    assert table["parameters"].tolist() == [20, 4]  # a: weight + bias; b: its own bias only
    assert table["parameters"].sum() == flops_total(Tied(), (4,))["parameters"] == 24
