"""Sobol' estimators: analytic test functions, SALib on the same rows, streaming and merge laws."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from unitscope.stats.base import load_states, save_states
from unitscope.stats.sobol import SobolAccumulator, poisson_weights, saltelli_sample, sobol_indices


def ishigami(x: torch.Tensor, a: float = 7.0, b: float = 0.1) -> torch.Tensor:
    x = x * 2 * math.pi - math.pi
    return torch.sin(x[..., 0]) + a * torch.sin(x[..., 1]) ** 2 + b * x[..., 2] ** 4 * torch.sin(x[..., 0])


def sobol_g(x: torch.Tensor, a: tuple[float, ...]) -> torch.Tensor:
    a_t = torch.tensor(a, dtype=x.dtype)
    return ((torch.abs(4 * x - 2) + a_t) / (1 + a_t)).prod(-1)


def evaluate(f, design, groups=None):
    """Outputs on the design rows: y_a, y_b, y_ab (d, n, ...), y_ba or None."""
    rows = design.rows(groups)
    y = f(rows)  # (n, R, ...)
    d = (rows.shape[1] - 2) // (2 if design.second_order else 1)
    y_ab = y[:, 1:1 + d].movedim(1, 0)
    y_ba = y[:, 1 + d:1 + 2 * d].movedim(1, 0) if design.second_order else None
    return y[:, 0], y[:, -1], y_ab, y_ba


# --------------------------------------------------------------------------- analytic values
def test_ishigami_matches_analytic_indices():
    design = saltelli_sample(3, 2 ** 14, seed=1, second_order=True)
    r = sobol_indices(*evaluate(ishigami, design))
    assert r.S1.numpy() == pytest.approx([0.31391, 0.44241, 0.0], abs=0.01)
    assert r.ST.numpy() == pytest.approx([0.55759, 0.44241, 0.24368], abs=0.01)
    assert r.S2[0, 2].item() == pytest.approx(0.24368, abs=0.01)
    assert r.S2[0, 1].item() == pytest.approx(0.0, abs=0.01)
    assert r.S2[1, 2].item() == pytest.approx(0.0, abs=0.01)
    assert torch.isnan(r.S2[1, 0]) and torch.isnan(r.S2[0, 0])


def test_ishigami_grouped_x1_x3():
    design = saltelli_sample(3, 2 ** 14, seed=2)
    r = sobol_indices(*evaluate(ishigami, design, groups=[[0, 2], [1]]))
    assert r.S1.shape == (2,)
    assert r.S1[0].item() == pytest.approx(0.55759, abs=0.01)
    assert r.ST[0].item() == pytest.approx(0.55759, abs=0.01)
    assert r.ST[1].item() == pytest.approx(0.44241, abs=0.01)


def test_sobol_g_matches_analytic_indices():
    a = (0.0, 1.0, 4.5, 9.0, 99.0, 99.0)
    design = saltelli_sample(6, 2 ** 14, seed=3)
    r = sobol_indices(*evaluate(lambda x: sobol_g(x, a), design))
    v = [1 / (3 * (1 + ai) ** 2) for ai in a]
    total = math.prod(1 + vi for vi in v) - 1
    s1 = [vi / total for vi in v]
    st = [vi * math.prod(1 + vk for k, vk in enumerate(v) if k != i) / total for i, vi in enumerate(v)]
    assert s1 == pytest.approx([0.71634, 0.17909, 0.02368, 0.00716, 0.00007, 0.00007], abs=1e-4)
    assert st == pytest.approx([0.78726, 0.24223, 0.03432, 0.01046, 0.00010, 0.00010], abs=1e-4)
    assert r.S1.numpy() == pytest.approx(s1, abs=0.01)
    assert r.ST.numpy() == pytest.approx(st, abs=0.01)


def test_pure_interaction_and_additive_model():
    design = saltelli_sample(2, 2 ** 13, seed=4, second_order=True)
    r = sobol_indices(*evaluate(lambda x: (2 * x[..., 0] - 1) * (2 * x[..., 1] - 1), design))
    assert r.S1.numpy() == pytest.approx([0, 0], abs=0.02)
    assert r.ST.numpy() == pytest.approx([1, 1], abs=0.02)
    assert r.S2[0, 1].item() == pytest.approx(1.0, abs=0.03)
    r = sobol_indices(*evaluate(lambda x: x[..., 0] + 2 * x[..., 1], design))
    assert r.S1.numpy() == pytest.approx([0.2, 0.8], abs=0.01)
    assert r.ST.numpy() == pytest.approx([0.2, 0.8], abs=0.01)


def test_non_influential_variable_gives_exact_zeros():
    design = saltelli_sample(3, 256, seed=5)
    r = sobol_indices(*evaluate(lambda x: torch.exp(x[..., 0]) * x[..., 1], design))
    assert r.S1[2].item() == 0.0 and r.ST[2].item() == 0.0
    # a function of one variable: every other index is exactly 0, its own total index is ~1
    r = sobol_indices(*evaluate(lambda x: torch.sin(5 * x[..., 1]), design))
    assert r.S1[0].item() == 0.0 and r.ST[2].item() == 0.0
    assert r.ST[1].item() == pytest.approx(1.0, abs=0.05)


def test_affine_invariance_and_output_shape():
    design = saltelli_sample(3, 512, seed=6)
    y = evaluate(ishigami, design)
    r1 = sobol_indices(*y)
    r2 = sobol_indices(*(3.5 * t - 100.0 for t in y[:3]))
    torch.testing.assert_close(r1.S1, r2.S1, rtol=0, atol=1e-10)
    torch.testing.assert_close(r1.ST, r2.ST, rtol=0, atol=1e-10)
    multi = sobol_indices(*(torch.stack([t, 2 * t, t * t], dim=-1).unsqueeze(-1) for t in y[:3]))
    assert multi.S1.shape == (3, 3, 1) and multi.V.shape == (3, 1)
    torch.testing.assert_close(multi.S1[:, 1, 0], r1.S1, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- SALib on the same rows
@pytest.mark.parametrize("second_order", [False, True])
def test_equals_salib_on_the_same_sample_matrix(second_order):
    from SALib.analyze import sobol

    d, n = 4, 512
    design = saltelli_sample(d, n, seed=7, second_order=second_order)
    x = design.salib_matrix()

    def f(x):
        return np.sin(3 * x[:, 0]) + x[:, 1] ** 2 * x[:, 2] + 0.3 * x[:, 3] + 5.0
    problem = {"num_vars": d, "names": list("abcd"), "bounds": [[0, 1]] * d}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sobol.analyze(problem, f(x), calc_second_order=second_order, num_resamples=10, seed=1)
    y = torch.from_numpy(f(x)).view(n, -1)
    y_ba = y[:, 1 + d:1 + 2 * d].T if second_order else None
    ours = sobol_indices(y[:, 0], y[:, -1], y[:, 1:1 + d].T, y_ba)
    np.testing.assert_allclose(ours.S1.numpy(), ref["S1"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours.ST.numpy(), ref["ST"], rtol=0, atol=1e-10)
    if second_order:
        np.testing.assert_allclose(ours.S2.numpy(), ref["S2"], rtol=0, atol=1e-10)


def test_bootstrap_half_widths_are_close_to_salib():
    from SALib.analyze import sobol

    design = saltelli_sample(3, 1024, seed=8)
    x = design.salib_matrix()
    y = ishigami(torch.from_numpy(x))
    problem = {"num_vars": 3, "names": list("abc"), "bounds": [[0, 1]] * 3}
    ref = sobol.analyze(problem, y.numpy(), calc_second_order=False, num_resamples=400, seed=2)
    y = y.view(1024, -1)
    ours = sobol_indices(y[:, 0], y[:, -1], y[:, 1:4].T, bootstrap=400, seed=3)
    # two bootstraps of the same estimator: the same spread to within resampling noise
    ratio_s1 = ours.S1_conf.numpy() / ref["S1_conf"]
    ratio_st = ours.ST_conf.numpy() / ref["ST_conf"]
    assert np.all((ratio_s1 > 0.7) & (ratio_s1 < 1.4)), ratio_s1
    assert np.all((ratio_st > 0.7) & (ratio_st < 1.4)), ratio_st


# --------------------------------------------------------------------------- streaming and merging
def _accumulate(y, parts, bootstrap=0, second_order=False, order=None):
    y_a, y_b, y_ab, y_ba = y
    n = y_a.shape[0]
    accs = []
    for idx in np.array_split(np.arange(n) if order is None else order, parts):
        idx = torch.from_numpy(idx)
        acc = SobolAccumulator(d=y_ab.shape[0], second_order=second_order, bootstrap=bootstrap, seed=9)
        acc.update(y_a[idx], y_b[idx], y_ab[:, idx], y_ba[:, idx] if second_order else None, index=idx)
        accs.append(acc)
    return accs


def _assert_same(r1, r2, tol=1e-12):
    """Indices to ``tol``; half-widths to 1e-5 relative (replicate sums are float32 per batch)."""
    for key in ("S1", "ST", "V"):
        torch.testing.assert_close(getattr(r1, key), getattr(r2, key), rtol=tol, atol=tol, equal_nan=True)
    for key in ("S1_conf", "ST_conf"):
        torch.testing.assert_close(getattr(r1, key), getattr(r2, key), rtol=1e-5, atol=1e-6, equal_nan=True)
    if r1.S2 is not None:
        torch.testing.assert_close(r1.S2, r2.S2, rtol=tol, atol=tol, equal_nan=True)
        torch.testing.assert_close(r1.S2_conf, r2.S2_conf, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("second_order", [False, True])
def test_streaming_in_batches_equals_one_pass(second_order):
    design = saltelli_sample(3, 1024, seed=10, second_order=second_order)
    y = evaluate(lambda x: torch.stack([ishigami(x), 1e4 + ishigami(x)], -1), design)
    whole = SobolAccumulator(3, second_order, bootstrap=20, seed=9)
    whole.update(*y[:3], y[3], index=torch.arange(1024))
    streamed = SobolAccumulator(3, second_order, bootstrap=20, seed=9)
    for lo in range(0, 1024, 100):
        sl = slice(lo, lo + 100)
        streamed.update(y[0][sl], y[1][sl], y[2][:, sl], y[3][:, sl] if second_order else None,
                        index=torch.arange(lo, min(lo + 100, 1024)))
    _assert_same(whole.compute(), streamed.compute())


@pytest.mark.parametrize("second_order", [False, True])
def test_shards_merged_equal_one_pass_in_any_grouping(second_order):
    design = saltelli_sample(3, 512, seed=11, second_order=second_order)
    y = evaluate(lambda x: torch.stack([ishigami(x), 50.0 + x[..., 0] * x[..., 2]], -1), design)
    one = _accumulate(y, 1, bootstrap=16, second_order=second_order)[0].compute()
    order = np.random.default_rng(0).permutation(512)  # shards see different first batches (shifts)
    parts = _accumulate(y, 3, bootstrap=16, second_order=second_order, order=order)
    left = parts[0].clone().merge(parts[1].clone().merge(parts[2]))
    right = parts[2].clone().merge(parts[0]).merge(parts[1])
    _assert_same(one, left.compute(), tol=1e-10)
    _assert_same(one, right.compute(), tol=1e-10)
    empty = SobolAccumulator(3, second_order, bootstrap=16, seed=9)
    _assert_same(one, empty.merge(left).compute(), tol=1e-10)


def test_state_round_trips_through_safetensors(tmp_path):
    design = saltelli_sample(2, 64, seed=12)
    y = evaluate(lambda x: x[..., 0] + x[..., 1] ** 2, design)
    acc = SobolAccumulator(2, bootstrap=4)
    acc.update(*y[:3])
    save_states(tmp_path / "s.safetensors", {"layer": acc})
    back, _ = load_states(tmp_path / "s.safetensors")
    _assert_same(acc.compute(), back["layer"].compute(), tol=0)


def test_poisson_weights_depend_only_on_seed_and_index():
    w = poisson_weights(torch.arange(20000), 3, seed=1)
    again = poisson_weights(torch.arange(10000, 20000), 3, seed=1)
    assert torch.equal(w[10000:], again)
    assert not torch.equal(w, poisson_weights(torch.arange(20000), 3, seed=2))
    assert w.mean().item() == pytest.approx(1.0, abs=0.02)
    assert w.var().item() == pytest.approx(1.0, abs=0.05)
    assert (w == 0).double().mean().item() == pytest.approx(math.exp(-1), abs=0.01)


# --------------------------------------------------------------------------- bad and degenerate input
def test_constant_output_gives_nan_and_flag():
    design = saltelli_sample(2, 128, seed=13)
    y = evaluate(lambda x: torch.stack([torch.full_like(x[..., 0], 0.1), x[..., 0]], -1), design)
    r = sobol_indices(*y[:3], bootstrap=8)
    assert r.constant.tolist() == [True, False]
    assert torch.isnan(r.S1[:, 0]).all() and torch.isnan(r.ST[:, 0]).all()
    assert torch.isnan(r.S1_conf[:, 0]).all()
    assert torch.isfinite(r.S1[:, 1]).all() and r.V[0].item() == 0.0


def test_non_power_of_two_warns_and_rounds_up():
    with pytest.warns(UserWarning, match="not a power of two"):
        a, b = saltelli_sample(2, 100, seed=0)
    assert a.shape == (128, 2) and b.shape == (128, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a2, _ = saltelli_sample(2, 128, seed=0)
    assert torch.equal(a, a2)


def test_design_bookkeeping():
    design = saltelli_sample(4, 16, seed=14, second_order=True)
    groups = [[0, 3], [1], [2]]
    rows = design.rows(groups)
    assert rows.shape == (16, 2 * 3 + 2, 4)
    a, b = design
    assert torch.equal(rows[:, 0], a) and torch.equal(rows[:, -1], b)
    for j, cols in enumerate(groups):
        other = [c for c in range(4) if c not in cols]
        assert torch.equal(rows[:, 1 + j, cols], b[:, cols])
        assert torch.equal(rows[:, 1 + j, other], a[:, other])
        assert torch.equal(rows[:, 4 + j, cols], a[:, cols])
    assert torch.equal(saltelli_sample(4, 16, seed=14).A, a)
    assert not torch.equal(saltelli_sample(4, 16, seed=15).A, a)
    with pytest.raises(ValueError, match="groups must split"):
        design.rows([[0], [1]])


def test_bad_shapes_and_options_are_errors():
    acc = SobolAccumulator(2)
    with pytest.raises(ValueError, match="y_ab of shape"):
        acc.update(torch.zeros(4), torch.zeros(4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="y_ba"):
        SobolAccumulator(2, second_order=True).update(torch.zeros(4), torch.zeros(4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="bootstrap"):
        SobolAccumulator(2, bootstrap=1)
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()


def test_aggregated_index_is_variance_weighted_and_skips_constants():
    design = saltelli_sample(3, 512, seed=16)

    def f(x):
        y = torch.stack([ishigami(x), 3 * x[..., 0], torch.ones_like(x[..., 0]), x[..., 1] * x[..., 2]], -1)
        return y.reshape(*y.shape[:-1], 2, 2)
    acc = SobolAccumulator(3, bootstrap=8)
    acc.update(*evaluate(f, design)[:3])
    per = acc.compute()
    agg = acc.compute(aggregate=1)
    assert agg.S1.shape == (3, 2) and agg.S1_conf.shape == (3, 2)
    v1 = torch.nan_to_num(per.V1).sum(-1)
    torch.testing.assert_close(agg.S1, v1 / per.V.sum(-1), rtol=1e-12, atol=0)
    # the second row holds a constant: its aggregate is the other element's index
    torch.testing.assert_close(agg.ST[:, 1], per.ST[:, 1, 1], rtol=1e-12, atol=0)
    whole = acc.compute(aggregate=2)
    assert whole.S1.shape == (3,) and not whole.constant.item()
    with pytest.raises(ValueError, match="aggregate"):
        acc.compute(aggregate=3)


# --------------------------------------------------------------------------- Shapley effects
def test_shapley_effects_of_ishigami_and_simple_models():
    from unitscope.stats.shapley import shapley_effects

    r = shapley_effects(lambda x: ishigami(x), 3, n_outer=16000, n_inner=4, seed=1)
    assert r.effects.numpy() == pytest.approx([0.43575, 0.44241, 0.12184], abs=0.015)
    assert r.effects.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert r.evaluations == 6 * 3 * 16000 * 4  # 3! <= 64: every permutation once
    inter = shapley_effects(lambda x: (2 * x[:, 0] - 1) * (2 * x[:, 1] - 1), 2, n_outer=4000, seed=2)
    assert inter.effects.numpy() == pytest.approx([0.5, 0.5], abs=0.02)
    # additive model: Shapley = S1; several outputs at once; an input that does nothing gets 0
    multi = shapley_effects(lambda x: torch.stack([x[:, 0] + 2 * x[:, 1], 0 * x[:, 2] + 1.0], -1), 3,
                            n_outer=4000, seed=3)
    assert multi.effects[:, 0].numpy() == pytest.approx([0.2, 0.8, 0.0], abs=0.02)
    assert torch.isnan(multi.effects[:, 1]).all()  # a constant output has no effects
    with pytest.raises(ValueError, match="n_inner"):
        shapley_effects(lambda x: x[:, 0], 2, n_inner=1)
    # the group {X1, X3} of Ishigami as one player: no interaction with X2, so Sh = S_T = S1 = 0.55759
    grouped = shapley_effects(lambda x: ishigami(x), 3, n_outer=8000, n_inner=4, seed=4, groups=[[0, 2], [1]])
    assert grouped.effects.numpy() == pytest.approx([0.55759, 0.44241], abs=0.015)


# --------------------------------------------------------------------------- Wilcoxon and FDR
def test_signed_rank_matches_scipy_and_known_effect_sizes():
    from scipy.stats import wilcoxon

    from unitscope.stats.wilcoxon import fdr_bh, signed_rank

    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 3, generator=g, dtype=torch.float64)
    diffs = torch.stack([torch.zeros(40, dtype=torch.float64), base[:, 0].abs() + 0.1, base[:, 1]], 1)
    r = signed_rank(diffs)
    assert r.rank_biserial[0].item() == 0.0 and r.p_value[0].item() == 1.0  # unchanged unit
    assert r.rank_biserial[1].item() == 1.0  # Y_aug = Y + c, c > 0
    ref = wilcoxon(diffs[:, 2].numpy(), zero_method="zsplit", correction=True, method="approx")
    assert r.p_value[2].item() == pytest.approx(ref.pvalue, rel=1e-12)
    # rank-biserial from its definition on the third unit
    x = diffs[:, 2]
    ranks = torch.from_numpy(__import__("scipy.stats").stats.rankdata(x.abs().numpy()))
    plus, minus = ranks[x > 0].sum(), ranks[x < 0].sum()
    assert r.rank_biserial[2].item() == pytest.approx(((plus - minus) / (plus + minus)).item(), abs=1e-12)
    p = torch.tensor([0.001, 0.2, float("nan"), 0.04, 0.03], dtype=torch.float64)
    q = fdr_bh(p)
    assert torch.isnan(q[2])
    ref_q = [0.004, 0.2, 0.16 / 3, 0.16 / 3]  # BH over the 4 finite values: p·4/rank, made monotone
    assert q[[0, 1, 3, 4]].numpy() == pytest.approx(ref_q, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        signed_rank(torch.zeros(1, 3))


def test_rarely_active_output_has_stable_half_widths_across_shards():
    """A ReLU-like output that fires for a few base samples only: some bootstrap replicates see it
    constant; they are left out, and the half-widths still agree however the stream is split."""
    design = saltelli_sample(2, 512, seed=17)

    def f(x):
        return torch.relu(x[..., 0] - 0.98) * 100 + torch.relu(x[..., 1] - 0.99) * 50 + 3.0
    y = evaluate(f, design)
    one = _accumulate(y, 1, bootstrap=50)[0].compute()
    order = np.random.default_rng(1).permutation(512)
    parts = _accumulate(y, 4, bootstrap=50, order=order)
    merged = parts[0].merge(parts[1]).merge(parts[2]).merge(parts[3]).compute()
    _assert_same(one, merged, tol=1e-10)
    assert torch.isfinite(one.S1_conf).all() and torch.isfinite(one.ST_conf).all()
