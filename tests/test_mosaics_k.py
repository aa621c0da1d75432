"""The ``k`` of the mosaics and of the empirical receptive fields: an integer >= 1, checked early."""

from __future__ import annotations

import pytest
import torch

import unitscope
from unitscope.analyses.mosaics import render_mosaics, unit_mosaics
from unitscope.analyses.occlusion import empirical_receptive_fields
from unitscope.analyses.topk import TopK
from unitscope.cli import main
from unitscope.data import ArrayDataset

from .toy_models import B, window_sum_model

BAD_K = [0, -1, -2, 1.5, True]


@pytest.fixture(scope="module")
def ranked():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 16, 16, generator=g)
    data = ArrayDataset(x, torch.zeros(6, dtype=torch.int64))
    model = window_sum_model()
    run = unitscope.analyze(model, data, layers="conv", analyses=[TopK(k=4)], progress=False)
    return model, data, run.table("topk")


@pytest.mark.parametrize("k", BAD_K)
def test_unit_mosaics_refuses_k_below_one(ranked, k):
    model, data, table = ranked
    with pytest.raises(ValueError, match=r"k must be >= 1"):
        unit_mosaics(model, data, table, ["conv:0"], k=k, mode="crop")


def test_unit_mosaics_k_counts_the_tiles(ranked):
    model, data, table = ranked
    tile = B + 2
    whole = unit_mosaics(model, data, table, ["conv:0"], mode="crop", nrow=8)["conv:0"]
    two = unit_mosaics(model, data, table, ["conv:0"], k=2, mode="crop", nrow=8)["conv:0"]
    assert whole.shape[-1] == 4 * tile + 2 and two.shape[-1] == 2 * tile + 2
    assert torch.equal(two, whole[..., :two.shape[-1]])


@pytest.mark.parametrize("k", [0, -2])
def test_render_mosaics_and_cli_refuse_k_below_one_before_loading(tmp_path, capsys, k):
    missing = tmp_path / "no-such-run"
    with pytest.raises(ValueError, match=r"k must be >= 1"):
        render_mosaics(missing, ["relu3:0"], k=k)
    assert main(["mosaics", str(missing), "relu3:0", "--k", str(k)]) == 1
    assert "k must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("k", BAD_K)
def test_empirical_receptive_fields_refuses_k_below_one(ranked, k):
    model, data, table = ranked
    with pytest.raises(ValueError, match=r"k must be >= 1"):
        empirical_receptive_fields(model, data, "conv", [0], table, k=k, occluder=3, device="cpu")
