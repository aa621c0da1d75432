"""Saturation: the spec's exact spectra, statistical cases, invariances, merge, training tracking."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import unitscope
from unitscope.results import merge_runs
from unitscope.stats.saturation import intrinsic_dimension, saturation

CASES = [  # spectrum, delta, textbook k, delve k (spec 1.4 and 1.8)
    ([0.5, 0.3, 0.15, 0.05], 0.99, 4, 4),
    ([0.5, 0.3, 0.15, 0.05], 0.95, 3, 3),
    ([0.99, 0.01], 0.99, 1, 1),
    ([0.98, 0.02], 0.99, 2, 1),
    ([0.6, 0.385, 0.015], 0.99, 3, 2),
    ([1.0] * 20 + [0.0] * 30, 0.99, 20, 20),
    ([1.0] * 50 + [0.0] * 14, 0.99, 50, 49),
    ([1.0] * 64, 0.99, 64, 63),
    ([1.0] * 100, 0.99, 99, 98),
    ([0.5 ** i for i in range(1, 65)], 0.99, 7, 6),
    ([0.9 ** i for i in range(1, 65)], 0.99, 43, 42),
]


def test_delta_one_is_the_numerical_rank_under_both_rules():
    for rule in ("textbook", "delve"):
        assert intrinsic_dimension(torch.ones(100, dtype=torch.float64), 1.0, rule=rule) == 100
        spectrum = torch.tensor([0.6, 0.39, 0.01, 0.0], dtype=torch.float64)
        assert intrinsic_dimension(spectrum, 1.0, rule=rule) == 3


def test_projection_at_delta_one_keeps_the_model_under_both_rules():
    from torch import nn
    from torch.utils.data import TensorDataset

    import unitscope

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with torch.no_grad():  # the smallest direction (variance 0.01) alone decides the class
        model[0].weight.copy_(torch.diag(torch.tensor([0.6, 0.39, 0.01]).sqrt()))
        model[0].bias.zero_()
        model[1].weight.copy_(torch.tensor([[0.0, 0.0, -100.0], [0.0, 0.0, 100.0]]))
        model[1].bias.zero_()
    x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, (x[:, 2] > 0).long())
    for rule in ("textbook", "delve"):
        table = unitscope.projected_accuracy(model, data, data, ["0"], deltas=[1.0], rule=rule, device="cpu")
        row = table[~table["baseline"]].iloc[0]
        assert row["sum_k"] == 3 and row["test_acc"] == table[table["baseline"]]["test_acc"].item() == 1.0


@pytest.mark.parametrize(("spectrum", "delta", "textbook", "delve"), CASES)
def test_exact_spectra(spectrum, delta, textbook, delve):
    vals = torch.tensor(spectrum, dtype=torch.float64)
    assert intrinsic_dimension(vals, delta) == textbook
    assert intrinsic_dimension(vals, delta, rule="delve") == delve
    # the same through a rotated covariance matrix
    q, _ = torch.linalg.qr(torch.randn(len(vals), len(vals), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(0)))
    assert saturation(q @ torch.diag(vals) @ q.T, samples=10_000, delta=delta).intrinsic_dim == textbook


def test_dead_layer_and_bad_delta():
    r = saturation(torch.zeros(5, 5), samples=10)
    assert r.intrinsic_dim == 0 and r.dead and r.saturation == 0.0
    for delta in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
            intrinsic_dimension(torch.ones(3), delta)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        unitscope.Saturation(delta=2.0)
    assert intrinsic_dimension(torch.tensor([3.0, 1.0, 0.0]), 1.0) == 2  # delta 1: numerical rank


def run_saturation(x, **kwargs):
    data = unitscope.ArrayDataset(x.float(), torch.zeros(len(x), dtype=torch.int64))
    model = nn.Sequential(nn.Identity())
    return unitscope.analyze(model, data, layers="0", analyses=[unitscope.Saturation(**kwargs)],
                             batch_size=kwargs.pop("batch_size", 500), progress=False, device="cpu")


@pytest.mark.parametrize("d", [16, 64])
def test_isotropic_gaussian_is_nearly_saturated(d):
    x = torch.randn(100 * d, d, generator=torch.Generator().manual_seed(d))
    row = run_saturation(x).table("saturation").iloc[0]
    assert row["width"] == d and row["samples"] == 100 * d and row["saturation"] >= 0.97


def test_subspace_data_has_its_dimension():
    g = torch.Generator().manual_seed(1)
    d, r = 128, 32
    x = torch.randn(20_000, r, generator=g) @ torch.randn(r, d, generator=g)
    k = run_saturation(x).table("saturation").iloc[0]["intrinsic_dim"]
    assert r - 3 <= k <= r


def test_invariant_to_rotation_scaling_and_shift():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 12, generator=g) * torch.linspace(0.1, 3, 12)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    base = run_saturation(x).table("saturation").iloc[0]["intrinsic_dim"]
    assert run_saturation(x @ q).table("saturation").iloc[0]["intrinsic_dim"] == base
    assert run_saturation(-3.0 * x + 1e3).table("saturation").iloc[0]["intrinsic_dim"] == base
    assert 1 < base < 12


def test_channelwise_covariance_equals_numpy_over_all_positions(digits_model, digits_test):
    # on the CPU, as the reference: cuDNN's convolutions round otherwise (3e-6 relative seen)
    run = unitscope.analyze(digits_model, digits_test, layers="conv2", batch_size=37,
                            analyses=[unitscope.Saturation()], progress=False, device="cpu")
    acc = run.analysis("saturation").accumulators["conv2"]
    x = torch.stack([digits_test[i][0] for i in range(len(digits_test))])
    with torch.no_grad(), unitscope.capture(digits_model.eval(), "conv2") as acts:
        digits_model(x)
    rows = acts["conv2"].permute(0, 2, 3, 1).reshape(-1, 32).double().numpy()
    r = acc.compute(ddof=0)
    assert int(r.count) == 360 * 8 * 8
    np.testing.assert_allclose(r.cov.numpy(), np.cov(rows, rowvar=False, bias=True), rtol=1e-9, atol=1e-12)


def test_channelwise_equals_mean_for_spatially_constant_maps():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 6, 1, 1, generator=g).expand(400, 6, 5, 5).contiguous()
    a = run_saturation(x, conv="channelwise").analysis("saturation").accumulators["0"].compute(ddof=0)
    b = run_saturation(x, conv="mean").analysis("saturation").accumulators["0"].compute(ddof=0)
    torch.testing.assert_close(a.cov, b.cov, rtol=1e-5, atol=1e-7)  # the mean is taken in float32


def test_shards_merged_equal_one_pass(tmp_path, digits_model, digits_test):
    kwargs = {"layers": ["conv*", "fc"], "analyses": [unitscope.Saturation()], "progress": False}
    whole = unitscope.analyze(digits_model, digits_test, **kwargs).table("saturation")
    dirs = [tmp_path / f"s{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        unitscope.analyze(digits_model, digits_test, shard=(i, 2), out=d,
                          **{**kwargs, "analyses": [unitscope.Saturation()]})
    merged = merge_runs(dirs).table("saturation")
    cols = ["layer", "width", "intrinsic_dim", "saturation", "samples"]
    assert merged[cols].equals(whole[cols])
    eig_whole = unitscope.analyze(digits_model, digits_test,
                                  **{**kwargs, "analyses": [unitscope.Saturation()]})
    eig_merged = merge_runs(dirs)
    for layer, vals in eig_whole.arrays["saturation"].items():
        torch.testing.assert_close(eig_merged.arrays["saturation"][layer], vals, rtol=1e-9, atol=1e-12)


def test_rank_deficient_layers_are_flagged(digits_model, digits_test, caplog):
    few = torch.utils.data.Subset(digits_test, range(5))
    table = unitscope.analyze(digits_model, few, layers="fc", analyses=[unitscope.Saturation()],
                              progress=False).table("saturation")
    row = table.iloc[0]
    assert row["rank_deficient"] and row["samples"] == 5 and row["intrinsic_dim"] <= 4
    assert "rank-deficient" in caplog.text


def test_as_many_samples_as_width_is_rank_deficient(caplog):
    """A covariance centred on n samples has rank <= n - 1: n == width is flagged too."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4))
    data = unitscope.ArrayDataset(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
                                  torch.zeros(4, dtype=torch.long))
    row = unitscope.analyze(net, data, layers="0", analyses=[unitscope.Saturation(delta=1.0)],
                            progress=False).table("saturation").iloc[0]
    assert row["samples"] == row["width"] == 4 and row["rank_deficient"] and row["intrinsic_dim"] == 3
    assert "rank at most 3" in caplog.text


def test_a_layer_without_one_finite_row_names_itself():
    class Nan(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float("nan")

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), Nan())
    data = unitscope.ArrayDataset(torch.randn(6, 3), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="layer '1': none of its output rows was finite"):
        unitscope.analyze(net, data, layers="1", analyses=[unitscope.Saturation()], progress=False)


def test_tracker_uses_every_batch_of_the_epoch(digits_model):
    from unitscope.train import train

    train_data = unitscope.load_dataset("digits", "train")
    test_data = unitscope.load_dataset("digits", "test")
    tracker = unitscope.SaturationTracker(digits_model, ["conv1", "fc"], test_data=test_data)
    train(digits_model, train_data, epochs=2, batch_size=100, callbacks=[tracker])
    t = tracker.table
    assert len(t) == 2 * 2 * 2  # epochs x splits x layers
    conv1 = t[(t["layer"] == "conv1")]
    assert set(conv1[conv1["split"] == "train"]["samples"]) == {1437 * 64}  # not the last batch's 37
    assert set(conv1[conv1["split"] == "test"]["samples"]) == {360 * 64}
    fc = t[(t["layer"] == "fc") & (t["split"] == "train")]
    assert set(fc["samples"]) == {1437}
    from .conftest import hook_counts

    assert hook_counts(digits_model) == 0


def test_tracker_ignores_forwards_between_training_batches(digits_model):
    from unitscope.train import Callback, train

    class Probe(Callback):  # runs after the tracker, like an evaluation inside a callback
        def on_batch_end(self, state) -> None:
            with torch.no_grad():
                digits_model(state.x[:7])

    train_data = unitscope.load_dataset("digits", "train")
    tracker = unitscope.SaturationTracker(digits_model, ["conv1", "fc"], buffer_rows=300)
    train(digits_model, train_data, epochs=1, batch_size=100, callbacks=[tracker, Probe()])
    samples = dict(zip(tracker.table["layer"], tracker.table["samples"]))
    assert samples == {"conv1": 1437 * 64, "fc": 1437}


def test_tracker_skips_evaluation_forwards_even_with_large_batches(digits_model):
    from unitscope.train import Callback, train

    class Evaluate(Callback):  # an inference-mode evaluation larger than the tracker's block
        def on_batch_end(self, state) -> None:
            with torch.inference_mode():
                digits_model(torch.cat([state.x] * 3))

    train_data = unitscope.load_dataset("digits", "train")
    tracker = unitscope.SaturationTracker(digits_model, ["conv1", "fc"], buffer_rows=300)
    train(digits_model, train_data, epochs=2, batch_size=100, callbacks=[Evaluate(), tracker])
    t = tracker.table
    assert set(t[t["layer"] == "conv1"]["samples"]) == {1437 * 64}


class _NoGrad(torch.nn.Module):
    """A frozen part of a network, run under no_grad while the rest trains."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.inner(x)


def test_tracker_records_layers_that_run_under_no_grad():
    from unitscope.train import train

    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    model.conv1 = _NoGrad(model.conv1)
    tracker = unitscope.SaturationTracker(model, ["conv1.inner", "fc"])
    train(model, unitscope.load_dataset("digits", "train"), epochs=1, batch_size=100, callbacks=[tracker])
    samples = dict(zip(tracker.table["layer"], tracker.table["samples"]))
    assert samples == {"conv1.inner": 1437 * 64, "fc": 1437}


def test_folds_ignore_the_callers_autocast():
    from unitscope.stats import Covariance

    g = torch.Generator().manual_seed(2)
    x = torch.randn(5_000, 6, generator=g) * 2.0 + 1.0
    plain, inside = Covariance("float32"), Covariance("float32")
    plain.update_shifted(x - 1.0, torch.ones(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside.update_shifted(x - 1.0, torch.ones(6))
    assert torch.equal(plain.compute().cov, inside.compute().cov)



def test_product_dtype_follows_the_products_option():
    from unitscope.stats import Covariance

    cheap, exact = Covariance("float32"), Covariance("float64")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert cheap.product_dtype(dtype) == torch.float32
        assert exact.product_dtype(dtype) == torch.float64
    assert cheap.product_dtype(torch.float64) == torch.float64  # never lowered
    assert cheap.product_dtype(torch.int64) == torch.float64


def test_tracker_buffering_does_not_change_the_result():
    from unitscope.train import train

    train_data = unitscope.load_dataset("digits", "train")
    tables, covs = [], []
    for rows in (1, 5000, 1 << 20):  # fold every batch, every few batches, once per epoch (92k rows)
        torch.manual_seed(0)
        model = unitscope.load_model("digits-cnn")
        tracker = unitscope.SaturationTracker(model, ["conv2", "fc"], buffer_rows=rows, products="float64")
        # on the CPU: a GPU's training is not bitwise repeatable (cuDNN's backward uses atomics)
        train(model, train_data, epochs=1, batch_size=64, seed=0, callbacks=[tracker], device="cpu")
        tables.append(tracker.table)
        covs.append({k: a.compute().cov for k, a in tracker.analysis.accumulators.items()})
    for other, cov in zip(tables[1:], covs[1:]):
        assert (other["samples"] == tables[0]["samples"]).all()
        assert (other["intrinsic_dim"] == tables[0]["intrinsic_dim"]).all()
        for key in ("conv2", "fc"):
            assert torch.allclose(cov[key], covs[0][key], rtol=1e-10, atol=1e-12)


def test_float32_products_match_float64_covariance():
    from unitscope.stats import Covariance

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(40_000, 24, generator=g) @ torch.randn(24, 24, generator=g) + 50.0).float()
    exact, fast = Covariance(), Covariance("float32")
    for chunk in x.split(9_000):
        exact.update(chunk)
        fast.update(chunk)
    a, b = exact.compute(), fast.compute()
    assert a.count == b.count and torch.allclose(a.mean, b.mean, rtol=1e-8, atol=0)  # float32 sums
    scale = a.cov.abs().max()
    assert float((a.cov - b.cov).abs().max() / scale) < 1e-6  # float32 products, large offset
    assert Covariance("float32").config() == {"products": "float32"}
    with pytest.raises(ValueError, match="products="):
        Covariance("float16")
    with pytest.raises(ValueError, match="products="):
        unitscope.Saturation(products="half")


@pytest.mark.parametrize("products", ["float64", "float32"])
def test_update_shifted_equals_update(products):
    from unitscope.stats import Covariance

    g = torch.Generator().manual_seed(1)
    dtype = torch.float64 if products == "float64" else torch.float32  # so chunk - shift is exact
    x = (torch.randn(3_000, 5, generator=g, dtype=torch.float64) * 3.0 + 20.0).to(dtype)
    x[7, 2] = float("nan")  # a non-finite row is left out either way
    near = torch.tensor([19.0, 21.0, 17.0, 23.0, 20.5], dtype=dtype)  # the mean is 20, sd 3
    # products of xs lose eps · (offset / sd)² relative: a shift 7 sd away is still fine in float64
    far = torch.zeros(5, dtype=dtype) if products == "float64" else near - 2.0
    plain, shifted = Covariance(products), Covariance(products)
    for chunk, s in zip(x.split(1_000), (near, near + 1.0, far)):
        plain.update(chunk)
        shifted.update_shifted(chunk - s, s)
    a, b = plain.compute(), shifted.compute()
    assert int(a.nonfinite_rows) == int(b.nonfinite_rows) == 1 and a.count == b.count == 2_999
    tol = 1e-12 if products == "float64" else 1e-6
    torch.testing.assert_close(b.mean, a.mean, rtol=tol, atol=0)
    torch.testing.assert_close(b.cov, a.cov, rtol=tol * 10, atol=tol * float(a.cov.abs().max()))
    with pytest.raises(ValueError, match="shift must be finite"):
        shifted.update_shifted(x[:3], torch.full((5,), float("inf")))


def test_tracker_with_float32_products_gives_the_same_saturation():
    from unitscope.train import train

    train_data = unitscope.load_dataset("digits", "train")
    tables = []
    for products in ("float64", "float32"):
        torch.manual_seed(0)
        model = unitscope.load_model("digits-cnn")
        tracker = unitscope.SaturationTracker(model, ["conv*", "fc"], products=products)
        train(model, train_data, epochs=2, batch_size=64, seed=0, callbacks=[tracker])
        tables.append(tracker.table)
    cols = ["layer", "intrinsic_dim", "samples"]
    assert tables[0][cols].equals(tables[1][cols])


def test_projected_accuracy_keeps_accuracy_at_delta_one(digits_model):
    from unitscope.train import train

    train_data = unitscope.load_dataset("digits", "train")
    test_data = unitscope.load_dataset("digits", "test")
    train(digits_model, train_data, epochs=3, lr=5e-3, batch_size=32)
    table = unitscope.projected_accuracy(digits_model, train_data, test_data, ["conv2", "conv3"],
                                         deltas=[0.5, 0.99, 1.0])
    base = table[table["baseline"]].iloc[0]
    full = table[table["delta"] == 1.0].iloc[0]
    assert full["test_acc"] == pytest.approx(base["test_acc"], abs=1e-9)
    low = table[table["delta"] == 0.5].iloc[0]
    assert low["sum_k"] < full["sum_k"] <= full["sum_width"] == 32 + 64
    assert low["test_acc"] < base["test_acc"]
    assert not math.isnan(table["mean_saturation"].iloc[1])
    with pytest.raises(ValueError, match="delta=1.5"):  # every delta is checked before the pass
        unitscope.projected_accuracy(digits_model, train_data, test_data, ["conv2"], deltas=[0.9, 1.5])
    with pytest.raises(ValueError, match="use conv='channelwise'"):
        unitscope.projected_accuracy(digits_model, train_data, test_data, ["conv2"], conv="mean")
    delve = unitscope.projected_accuracy(digits_model, train_data, test_data, ["conv2", "conv3"],
                                         deltas=[0.99], rule="delve")
    assert delve[delve["delta"] == 0.99]["sum_k"].item() <= table[table["delta"] == 0.99]["sum_k"].item()


def test_cli_saturation_and_training_tracking(tmp_path):
    from unitscope.cli import main
    from unitscope.report import write_report

    cfg = tmp_path / "sat.toml"
    cfg.write_text('experiment = "saturation"\nmodel = "digits-cnn"\ndataset = "digits"\n'
                   'project_deltas = [0.9, 1.0]\ndelta = [0.9, 0.99]\n')
    assert main(["-q", "run", str(cfg), "--out", str(tmp_path / "runs")]) == 0
    dirs = sorted((tmp_path / "runs" / "sat").iterdir())
    assert [d.name for d in dirs] == ["digits-cnn_digits-test_delta=0.9", "digits-cnn_digits-test_delta=0.99"]
    low, high = (unitscope.load_run(d).table("saturation") for d in dirs)
    assert list(low["layer"]) == ["conv1", "conv2", "conv3", "fc"]
    assert (low["intrinsic_dim"] <= high["intrinsic_dim"]).all() and (low["samples"] == high["samples"]).all()
    projection = unitscope.load_run(dirs[0]).table("saturation_projection")
    assert list(projection["delta"].fillna(-1)) == [-1, 0.9, 1.0]
    page = write_report(dirs[0]).read_text()
    assert page.count("data:image/png;base64,") >= 2

    train_cfg = tmp_path / "train.toml"
    train_cfg.write_text('model = "digits-cnn"\ndataset = "digits"\nepochs = 2\ntrack_saturation = true\n')
    assert main(["-q", "train", str(train_cfg), "--out", str(tmp_path / "runs")]) == 0
    epochs = pd.read_parquet(tmp_path / "runs" / "train" / "digits-cnn_digits" / "saturation_epochs.parquet")
    assert set(epochs["epoch"]) == {1, 2} and set(epochs["split"]) == {"train", "test"}
    assert set(epochs[epochs["split"] == "train"]["samples"][epochs["layer"] == "fc"]) == {1437}
