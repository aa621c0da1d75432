"""CKA: closed forms against the spec's golden values, invariances, streaming, merging, torch-cka."""

from __future__ import annotations

import copy
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import unitscope
from tests.conftest import hook_counts
from unitscope.analyses.cka import CKA, cka_between, plot_cka
from unitscope.stats.base import load_states, save_states
from unitscope.stats.cka import (
    LinearCKA,
    MinibatchCKA,
    centre_gram,
    cka_from_grams,
    gram_linear,
    gram_rbf,
    hsic,
    linear_cka,
    rbf_cka,
)

F64 = torch.float64


def demo_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Kornblith et al.'s demo data: legacy RandomState(1337), X and X + noise."""
    rs = np.random.RandomState(1337)
    x = rs.randn(100, 10)
    y = rs.randn(100, 10) + x
    return torch.tensor(x), torch.tensor(y)


def orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q


def numpy_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook Gram form, written independently: <HKH, HLH> / (|HKH| |HLH|)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h  # noqa: E741
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def song_hsic1(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Song et al.'s unbiased HSIC formula, term by term (a slow reference)."""
    n = k.shape[0]
    kt, lt = k.clone(), l.clone()
    kt.fill_diagonal_(0)
    lt.fill_diagonal_(0)
    one = torch.ones(n, dtype=F64)
    value = (torch.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
             - 2 / (n - 2) * (one @ kt @ lt @ one))
    return float(value / (n * (n - 3)))


# ------------------------------------------------------------------------------- closed forms
def test_golden_values_of_the_reference_demo():
    x, y = demo_pair()
    assert float(linear_cka(x, y)) == pytest.approx(0.55761, abs=5e-6)
    assert float(cka_from_grams(gram_linear(x), gram_linear(y))) == pytest.approx(0.55761, abs=5e-6)
    assert float(rbf_cka(x, y, median_fraction=0.5)) == pytest.approx(0.65483, abs=5e-6)
    assert float(linear_cka(x, y, "unbiased")) == pytest.approx(0.51346, abs=5e-6)


def test_one_feature_is_pearson_r_squared():
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=F64)
    y = torch.tensor([[1.0], [2.0], [3.0], [5.0]], dtype=F64)
    assert float(linear_cka(x, y)) == pytest.approx(169 / 175, abs=1e-14)


def test_linear_cka_equals_the_closed_form_to_1e_10():
    g = torch.Generator().manual_seed(3)
    for n, p, q in [(50, 7, 12), (20, 40, 60)]:  # feature-space route, then the Gram route
        x = torch.randn(n, p, generator=g, dtype=F64) * 3 + 5
        y = torch.tanh(x @ torch.randn(p, q, generator=g, dtype=F64)) + 0.3 * torch.randn(n, q, generator=g,
                                                                                         dtype=F64)
        assert float(linear_cka(x, y)) == pytest.approx(numpy_linear_cka(x.numpy(), y.numpy()), abs=1e-10)


def test_feature_and_gram_routes_agree_for_both_estimators():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 5, generator=g, dtype=F64)
    y = x @ torch.randn(5, 4, generator=g, dtype=F64) + torch.randn(30, 4, generator=g, dtype=F64)
    for est in ("biased", "unbiased"):
        feature = float(linear_cka(x, y, est))
        gram = float(cka_from_grams(gram_linear(x), gram_linear(y), est))
        assert feature == pytest.approx(gram, abs=1e-12)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_invariant_to_orthogonal_maps_scaling_and_translation(kernel, estimator):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g, dtype=F64)
    f = linear_cka if kernel == "linear" else rbf_cka
    assert float(f(x, x @ orthogonal(6, 1), estimator=estimator)) == pytest.approx(1.0, abs=1e-10)
    assert float(f(x, -2.5 * x + 7.0, estimator=estimator)) == pytest.approx(1.0, abs=1e-10)
    # but not to a general invertible map
    a = torch.randn(6, 6, generator=g, dtype=F64)
    assert float(f(x, x @ a, estimator=estimator)) < 0.99


def test_symmetric_and_biased_in_unit_interval():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(25, 4, generator=g, dtype=F64), torch.randn(25, 9, generator=g, dtype=F64)
    assert float(linear_cka(x, y)) == pytest.approx(float(linear_cka(y, x)), abs=1e-14)
    assert 0.0 <= float(linear_cka(x, y)) <= 1.0


def test_unbiased_is_near_zero_for_independent_wide_features_where_biased_is_near_one():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(100, 2000, generator=g, dtype=F64), torch.randn(100, 2000, generator=g, dtype=F64)
    assert abs(float(linear_cka(x, y, "unbiased"))) < 0.05
    assert float(linear_cka(x, y, "biased")) > 0.9


def test_u_centring_equals_songs_formula():
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(12, 3, generator=g, dtype=F64), torch.randn(12, 5, generator=g, dtype=F64)
    k, l = gram_linear(x), gram_rbf(y)  # noqa: E741
    assert float(hsic(k, l, "unbiased")) == pytest.approx(song_hsic1(k, l), rel=1e-12)


def test_biased_hsic_is_trace_formula():
    g = torch.Generator().manual_seed(9)
    k, l = gram_linear(torch.randn(10, 3, generator=g)), gram_linear(torch.randn(10, 4, generator=g))  # noqa: E741
    h = torch.eye(10, dtype=F64) - 1 / 10
    assert float(hsic(k, l)) == pytest.approx(float(torch.trace(k @ h @ l @ h)) / 81, rel=1e-12)
    assert torch.allclose(centre_gram(k), h @ k @ h, atol=1e-12)


def test_rbf_median_heuristic_uses_the_full_distance_matrix():
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=F64)
    d = torch.tensor([[0, 1, 9], [1, 0, 4], [9, 4, 0]], dtype=F64)
    expected = torch.exp(-d / (2 * 1.0))  # median of the 9 entries (zeros included) is 1
    assert torch.allclose(gram_rbf(x), expected, atol=1e-15)
    assert torch.allclose(gram_rbf(x, sigma=2.0), torch.exp(-d / 8), atol=1e-15)


def test_bad_input_is_a_clear_error():
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka(x, x, "unbiased")
    with pytest.raises(ValueError, match="at least 4 samples"):
        MinibatchCKA().update([torch.randn(1, 5)])
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="same batch"):
        LinearCKA(paired=True).update([torch.randn(5, 2)], [torch.randn(6, 2)])
    with pytest.raises(ValueError, match="estimator"):
        linear_cka(x, x, "debiased")
    with pytest.raises(ValueError, match="at least 2 inputs"):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_float32_features_with_a_large_offset_give_the_float64_value(estimator):
    g = torch.Generator().manual_seed(0)
    x = 300 + torch.randn(64, 4096, generator=g)  # p·q > n²: the Gram route
    y = x + 0.3 * torch.randn(64, 4096, generator=g)
    want = linear_cka(x.double(), y.double(), estimator)  # the product in float32 gave 0.75 for 0.92
    assert float(linear_cka(x, y, estimator)) == pytest.approx(float(want), abs=1e-5)
    assert float(rbf_cka(x, y, estimator=estimator)) == pytest.approx(
        float(rbf_cka(x.double(), y.double(), estimator=estimator)), abs=1e-5)


# ------------------------------------------------------------------------------- accumulators
def layers_of(seed: int, n: int = 60) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g, dtype=F64)
    xs = [base * 2 + 1, torch.tanh(base @ torch.randn(6, 9, generator=g, dtype=F64))]
    ys = [base @ orthogonal(6, seed), torch.randn(n, 3, generator=g, dtype=F64) + base[:, :3],
          torch.relu(base @ torch.randn(6, 4, generator=g, dtype=F64))]
    return xs, ys


def test_linear_accumulator_equals_closed_form_for_every_pair():
    xs, ys = layers_of(10)
    acc = LinearCKA(paired=True)
    for part in torch.arange(60).split(17):  # uneven batches
        acc.update([x[part] for x in xs], [y[part] for y in ys])
    got = acc.compute()
    want = torch.tensor([[float(linear_cka(x, y)) for y in ys] for x in xs], dtype=F64)
    assert got.shape == (2, 3)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    assert float(got[0, 0]) == pytest.approx(1.0, abs=1e-10)  # X vs XQ

    same = LinearCKA()
    same.update(xs + ys)
    full = same.compute()
    assert torch.allclose(torch.diagonal(full), torch.ones(5, dtype=F64), atol=1e-12)
    assert torch.allclose(full, full.T, atol=1e-14)
    assert float(full[0, 1]) == pytest.approx(float(linear_cka(xs[0], xs[1])), abs=1e-10)


@pytest.mark.parametrize("make", [lambda: LinearCKA(paired=True),
                                  lambda: MinibatchCKA(paired=True),
                                  lambda: MinibatchCKA(kernel="rbf", estimator="biased", paired=True)])
def test_merged_shards_equal_one_pass_and_states_round_trip(make, tmp_path):
    xs, ys = layers_of(11, n=80)
    parts = list(torch.arange(80).split(16))
    whole = make()
    for p in parts:
        whole.update([x[p] for x in xs], [y[p] for y in ys])
    shards = [make(), make(), make()]
    for i, p in enumerate(parts):
        shards[i % 3].update([x[p] for x in xs], [y[p] for y in ys])
    save_states(tmp_path / "s.safetensors", {"a": shards[2]})
    shards[2] = load_states(tmp_path / "s.safetensors")[0]["a"]
    merged = make().merge(shards[1]).merge(shards[0].merge(shards[2]))  # any grouping, empty identity
    assert torch.allclose(merged.compute(), whole.compute(), atol=1e-12, rtol=0)
    assert merged.count == whole.count == 80


def test_minibatch_with_one_batch_is_the_closed_form():
    xs, ys = layers_of(12, n=40)
    for kernel, est in [("linear", "unbiased"), ("linear", "biased"), ("rbf", "biased"), ("rbf", "unbiased")]:
        acc = MinibatchCKA(kernel=kernel, estimator=est, paired=True)
        acc.update(xs, ys)
        f = linear_cka if kernel == "linear" else rbf_cka
        want = torch.tensor([[float(f(x, y, estimator=est)) for y in ys] for x in xs], dtype=F64)
        assert torch.allclose(acc.compute(), want, atol=1e-10, rtol=0), (kernel, est)


def test_minibatch_self_similarity_is_one_for_any_batching():
    xs, _ = layers_of(13, n=50)
    acc = MinibatchCKA()
    for p in torch.arange(50).split(12):  # the last batch has 2 samples: too few, so stop before it
        if len(p) >= 4:
            acc.update([x[p] for x in xs])
    assert torch.allclose(torch.diagonal(acc.compute()), torch.ones(2, dtype=F64), atol=1e-12)


def test_linear_accumulator_is_exact_under_a_large_common_offset_and_drops_nonfinite_rows():
    xs, ys = layers_of(14, n=64)
    far = [x + 1e6 for x in xs]
    acc = LinearCKA(paired=True)
    for p in torch.arange(64).split(20):
        acc.update([x[p] for x in far], [y[p] for y in ys])
    want = torch.tensor([[float(linear_cka(x, y)) for y in ys] for x in xs], dtype=F64)
    assert torch.allclose(acc.compute(), want, atol=1e-8, rtol=0)
    bad = [x[:3].clone() for x in far]
    bad[1][0, 2] = float("nan")
    acc.update(bad, [y[:3] for y in ys])
    assert acc.count == 66 and int(acc.state_dict()["nonfinite_rows"]) == 1


def test_constant_layer_gives_nan_not_a_number():
    acc = LinearCKA()
    acc.update([torch.randn(10, 3), torch.ones(10, 2)])
    m = acc.compute()
    assert math.isnan(float(m[0, 1])) and float(m[0, 0]) == pytest.approx(1.0)


def test_linear_accumulator_refuses_states_too_large_to_hold():
    acc = LinearCKA()
    with pytest.raises(MemoryError, match="reduce='mean'"):
        acc.update([torch.zeros(2, 30000)])


# ------------------------------------------------------------------------------- the analysis
def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Flatten(), nn.Linear(512, 10))


def test_minibatch_analysis_equals_torch_cka_on_the_same_batches(digits_test):
    from torch_cka import CKA as TorchCKA

    a, b = small_net(0), small_net(1)
    layers = ["0", "2", "4"]
    loader = torch.utils.data.DataLoader(digits_test, batch_size=40)
    peer = TorchCKA(copy.deepcopy(a), copy.deepcopy(b), "a", "b", model1_layers=layers, model2_layers=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer.compare(loader)
    want = peer.export()["CKA"].double()
    run = unitscope.analyze(a, digits_test, layers=layers, analyses=[CKA(other=b, estimator="unbiased")],
                            batch_size=40, progress=False)
    got = run.arrays["cka"]["matrix"]
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert hook_counts(a) == hook_counts(b) == 0
    table = run.table("cka")
    assert list(table.columns[:3]) == ["layer_x", "layer_y", "cka"]
    assert len(table) == 9 and set(table.n) == {360}


def test_exact_analysis_equals_closed_form_on_captured_features(digits_model, digits_test):
    other = unitscope.load_model("digits-cnn")
    layers = ["conv1", "conv3", "fc"]
    run = unitscope.analyze(digits_model, digits_test, layers=layers, analyses=[CKA(other=other)],
                            batch_size=64, progress=False)
    x = torch.stack([digits_test[i][0] for i in range(len(digits_test))])
    with unitscope.capture(digits_model, layers, reduce="mean") as fa, torch.no_grad():
        digits_model(x)
    with unitscope.capture(other, layers, reduce="mean") as fb, torch.no_grad():
        other(x)
    want = torch.tensor([[float(linear_cka(fa[p], fb[q])) for q in layers] for p in layers], dtype=F64)
    assert torch.allclose(run.arrays["cka"]["matrix"], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("estimator, batch_size", [("biased", 50), ("unbiased", 60)])
def test_analysis_merges_shards_and_reloads(digits_model, digits_test, tmp_path, estimator, batch_size):
    # exact CKA does not depend on batching; the minibatch estimator does, so its shards (180
    # inputs each) keep the batches of the single pass (batches of 60)
    def one(shard):
        return unitscope.analyze(digits_model, digits_test, layers="relu*", batch_size=batch_size,
                                 analyses=[CKA(estimator=estimator)], shard=shard, progress=False)

    whole = one(None).arrays["cka"]["matrix"]
    a, b = one((0, 2)), one((1, 2))
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    merged = unitscope.results.merge_runs([tmp_path / "a", tmp_path / "b"])
    assert torch.allclose(merged.arrays["cka"]["matrix"], whole, atol=1e-12, rtol=0)
    assert list(merged.table("cka").layer_x.unique()) == ["relu1", "relu2", "relu3"]


def test_the_other_model_gets_the_batch_in_its_own_dtype(digits_model, digits_test):
    data = torch.utils.data.Subset(digits_test, range(64))
    same = unitscope.analyze(digits_model, data, layers="fc", progress=False,
                             analyses=[CKA(other=copy.deepcopy(digits_model))]).table("cka")
    wide = unitscope.analyze(digits_model, data, layers="fc", progress=False,
                             analyses=[CKA(other=copy.deepcopy(digits_model).double())]).table("cka")
    assert same["cka"].iloc[0] == pytest.approx(1.0) and wide["cka"].iloc[0] == pytest.approx(1.0)


def test_models_that_see_different_input_sizes_are_an_error(digits_model, digits_test):
    other = unitscope.load_model("shapes-cnn")
    with pytest.raises(ValueError, match="different input sizes"):
        unitscope.analyze(digits_model, digits_test, layers="conv1", progress=False,
                          analyses=[CKA(other=other, layers="conv1")])
    assert hook_counts(other) == 0


def test_short_batch_for_unbiased_is_an_error_or_skipped(digits_model, digits_test, tmp_path, caplog):
    data = torch.utils.data.Subset(digits_test, range(34))  # batches of 16, 16 and 2
    with pytest.raises(ValueError, match="at least 4"):
        unitscope.analyze(digits_model, data, layers="fc", batch_size=16, progress=False,
                          analyses=[CKA(estimator="unbiased", short_batches="error")])
    run = unitscope.analyze(digits_model, data, layers="fc", batch_size=16, progress=False,
                            analyses=[CKA(estimator="unbiased")])
    assert int(run.table("cka").skipped.iloc[0]) == 2 and int(run.table("cka").n.iloc[0]) == 32
    # the skipped count is part of the state: it survives saving, reloading and merging
    again = unitscope.load_run(run.save(tmp_path / "run"))
    acc = again.analysis("cka").accumulators["cka"]
    assert acc.skipped == 2 and acc.merge(acc.clone()).skipped == 4

    # every batch too short: NaN, with a warning that says why (a small shard of a pass is valid)
    with caplog.at_level(logging.WARNING, logger="unitscope.stats.cka"):
        short = unitscope.analyze(digits_model, torch.utils.data.Subset(digits_test, range(6)),
                                  layers=["relu1", "fc"], batch_size=1, progress=False,
                                  analyses=[CKA(estimator="unbiased")])
    assert short.table("cka")["cka"].isna().all()
    assert "every batch was too short" in caplog.text and "batch size of at least 4" in caplog.text


def test_cka_between_averages_random_epochs(digits_model, digits_test):
    other = copy.deepcopy(digits_model)
    for p in other.fc.parameters():
        p.data.mul_(-3.0)  # fc of other = -3 × fc of the model: CKA exactly 1
    same = cka_between(digits_model, other, digits_test, "fc", n_iters=4, batch_size=16, epochs=3, seed=1)
    assert same.values == pytest.approx([1.0] * 3, abs=1e-9) and same.n == 64
    fresh = unitscope.load_model("digits-cnn")
    r = cka_between(digits_model, fresh, digits_test, "conv2", n_iters=2, batch_size=32, epochs=3)
    assert len(set(r.values)) == 3 and r.mean == pytest.approx(np.mean(r.values))
    again = cka_between(digits_model, fresh, digits_test, "conv2", n_iters=2, batch_size=32, epochs=3)
    assert again.values == r.values

    fresh.train()
    fresh.conv2.eval()  # a mixed mode: every module's own flag comes back
    cka_between(digits_model, fresh, digits_test, "conv2", n_iters=1, batch_size=8, epochs=1)
    assert fresh.training and not fresh.conv2.training and fresh.conv1.training


def test_heatmap_figure(digits_model, digits_test):
    run = unitscope.analyze(digits_model, digits_test, layers="conv*", analyses=[CKA()], progress=False)
    fig = plot_cka(run.table("cka"))
    assert fig.axes[0].images[0].get_array().shape == (3, 3)


# ------------------------------------------------------------------------------- experiment, report, demo
def test_cka_experiment_between_two_weight_files_and_its_report(tmp_path):
    from unitscope.experiments import run_config
    from unitscope.report import write_report

    torch.manual_seed(0)
    torch.save(unitscope.load_model("digits-cnn").state_dict(), tmp_path / "a.pt")
    torch.save(unitscope.load_model("digits-cnn").state_dict(), tmp_path / "b.pt")
    (tmp_path / "cka.toml").write_text(
        'experiment = "cka"\nmodel = "digits-cnn"\ndataset = "digits"\n'
        f'weights = "{tmp_path / "a.pt"}"\nother_weights = "{tmp_path / "b.pt"}"\n'
        'layers = ["relu1", "fc"]\nestimator = "unbiased"\nbatch_size = 60\n')
    [(target, status)] = run_config(tmp_path / "cka.toml", out=tmp_path / "runs", progress=False)
    assert status == "done"
    run = unitscope.load_run(target)
    table = run.table("cka")
    assert list(table.layer_x) == ["relu1", "relu1", "fc", "fc"]
    assert list(table.layer_y) == ["relu1", "fc"] * 2
    assert 0 < float(table.cka.iloc[0]) < 1  # different weights: not identical representations
    page = write_report(target).read_text()
    assert "<section id='cka'>" in page and page.count("<img") == 1


def test_demo_part_adds_cka_between_two_trainings(digits_test):
    from pathlib import Path

    from unitscope.demo import DemoContext
    from unitscope.families import similarity
    from unitscope.results import Run

    model = unitscope.load_model("digits-cnn").eval()
    run = Run([], {"versions": {}, "created": ""}, tables={}, arrays={})
    train = torch.utils.data.Subset(unitscope.load_dataset("digits", "train"), range(96))
    test = torch.utils.data.Subset(digits_test, range(120))
    ctx = DemoContext(name="digits-cnn", model=model, dataset="digits", train_data=train, test_data=test,
                      run=run, out=Path("."), quick=True, progress=False)
    similarity.demo(ctx)
    assert set(run.tables) == {"cka", "cka_within"}
    within = run.arrays["cka_within"]["matrix"]
    assert torch.allclose(torch.diagonal(within), torch.ones(4, dtype=F64), atol=1e-12)
    assert len(similarity.SECTIONS["cka"](run)) == 2


def test_paired_exact_state_keeps_only_the_blocks_it_needs():
    from unitscope.stats.cka import memory_bytes

    xs, ys = layers_of(15, n=20)
    acc = LinearCKA(paired=True)
    acc.update(xs, ys)
    held = sum(t.numel() * t.element_size() for k, t in acc.state_dict().items() if k != "nonfinite_rows"
               and not k.startswith("dims") and k != "count")
    dx, dy = [x.shape[1] for x in xs], [y.shape[1] for y in ys]
    assert held == memory_bytes(dx, dy) < memory_bytes(dx + dy)


def test_exact_route_counts_inputs_left_out_for_nonfinite_features(caplog):
    from unitscope.stats.cka import LinearCKA

    x = torch.randn(10, 3, dtype=torch.float64)
    x[4, 1] = float("nan")
    acc = LinearCKA()
    acc.update([x, x * 2])
    assert acc.count == 9 and acc.skipped == 1
    assert "left out" in caplog.text
