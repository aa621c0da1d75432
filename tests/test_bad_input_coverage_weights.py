"""Bad input to the coverage profiles and to set_weights: non-finite activations, partial writes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import unitscope
from unitscope.coverage.cluster import CC
from unitscope.coverage.neuron import KMNC, NBC, NC, SNAC
from unitscope.models import WeightsError

INF = math.inf
TRAIN = torch.linspace(0, 1, 101)[:, None] * torch.tensor([[1.0, 2.0, -3.0]])
TEST = torch.linspace(-0.5, 2.5, 61)[:, None] * torch.tensor([[1.0, 2.0, -3.0]])
NONFINITE = torch.tensor([[INF, INF, INF], [-INF, -INF, -INF], [INF, -INF, math.nan], [math.nan, INF, -INF]])


def _with_nonfinite(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[:40], NONFINITE, t[40:]])


@pytest.mark.parametrize("make", [lambda: KMNC(k=10), lambda: KMNC(k=10, boundary="ceil"),
                                  lambda: NBC(), lambda: NBC(margin=0.5), lambda: SNAC(margin=1.0)])
def test_range_profile_ignores_inf_rows(make):
    clean, dirty = make().fit(TRAIN), make().fit(_with_nonfinite(TRAIN))
    for (lo_c, hi_c), (lo_d, hi_d) in zip(clean.ranges().values(), dirty.ranges().values()):
        assert torch.equal(lo_c, lo_d) and torch.equal(hi_c, hi_d)
    for field in ("count", "mean", "m2"):
        assert torch.allclose(clean._st["layer"][field], dirty._st["layer"][field], rtol=1e-12, atol=1e-12)
    assert torch.allclose(clean.std()["layer"], dirty.std()["layer"], rtol=1e-12)
    assert clean.update(TEST) == dirty.update(TEST)
    assert clean.value() > 0


def test_kmnc_inf_training_row_keeps_full_coverage():
    train = torch.linspace(0, 1, 1000)[:, None]
    base = KMNC(k=10).fit(train)
    assert base.update(train) == 1.0
    for bad in (INF, -INF, math.nan):
        kmnc = KMNC(k=10).fit(torch.cat([train, torch.tensor([[bad]])]))
        assert kmnc.update(train) == 1.0, bad


def test_range_profile_of_a_unit_with_only_nonfinite_values_is_empty():
    kmnc = KMNC(k=4).fit(torch.tensor([[INF, 0.0], [-INF, 1.0]]))
    assert kmnc.update(torch.tensor([[5.0, 0.5], [-5.0, 0.1]])) == pytest.approx(2 / 8)
    assert kmnc.diagnostics()["degenerate"] == 1.0
    nbc = NBC().fit(torch.tensor([[INF, 0.0], [-INF, 1.0]]))
    assert nbc.update(torch.tensor([[5.0, 2.0], [-5.0, -1.0]])) == pytest.approx(2 / 4)


def test_nc_minmax_scale_leaves_inf_out():
    row = torch.tensor([[0.0, 1.0, 0.9, 0.2]])
    clean = NC(threshold=0.5).update(row)
    assert clean == pytest.approx(2 / 4)
    # the two finite units above 0.5 of the range still cover; the +inf unit is above every threshold
    nc = NC(threshold=0.5)
    assert nc.update(torch.tensor([[0.0, 1.0, 0.9, INF]])) == pytest.approx(3 / 4)
    assert NC(threshold=0.5).update(torch.tensor([[0.0, 1.0, 0.9, -INF]])) == pytest.approx(2 / 4)


def test_cc_inf_row_is_not_a_representative():
    points = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    clean = CC(threshold=1.0)
    clean.update(points)
    dirty = CC(threshold=1.0)
    dirty.update(torch.tensor([[INF, 0.0], [0.0, -INF]]))
    dirty.update(points)
    assert dirty.value() == clean.value() == 3.0
    assert torch.equal(dirty.representatives()["layer"], clean.representatives()["layer"])


# ---------------------------------------------------------------------- set_weights: all or nothing
def _bits(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("target", "value", "hint"), [
    ("conv1", torch.zeros(16, 1, 3, 3), "mode='weight'"),
    ("conv1:0", torch.zeros(1, 3, 3), "mode='weight'"),
    ("conv1", torch.zeros(16), "mode='bias'"),
    ("fc", torch.zeros(10, 5), "nothing was changed"),
])
def test_set_weights_tensor_that_fits_one_parameter_changes_nothing(target, value, hint):
    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    before = _bits(model)
    with pytest.raises(WeightsError, match=hint):
        unitscope.set_weights(model, target, value)
    assert _bits(model) == before


def test_set_weights_source_model_with_a_bad_bias_changes_nothing():
    torch.manual_seed(0)
    model, donor = unitscope.load_model("digits-cnn"), unitscope.load_model("digits-cnn")
    donor.conv1.bias = nn.Parameter(torch.zeros(8))
    before = _bits(model)
    with pytest.raises(WeightsError, match=r"conv1'.bias has shape \(8,\)"):
        unitscope.set_weights(model, "conv1", donor)
    assert _bits(model) == before


def test_set_weights_bad_source_type_changes_nothing():
    model = unitscope.load_model("digits-cnn")
    before = _bits(model)
    with pytest.raises(TypeError, match="a model, a number or a tensor, got list"):
        unitscope.set_weights(model, "conv1", [1.0, 2.0])
    assert _bits(model) == before


def test_set_weights_one_element_tensor_of_any_rank_sets_weight_and_bias():
    model = unitscope.load_model("digits-cnn")
    unitscope.set_weights(model, "conv1", torch.full((1, 1, 1, 1), 0.25))
    assert (model.conv1.weight == 0.25).all() and (model.conv1.bias == 0.25).all()
    unitscope.set_weights(model, "conv1", torch.zeros(16, 1, 3, 3), mode="weight")
    assert (model.conv1.weight == 0).all() and (model.conv1.bias == 0.25).all()
