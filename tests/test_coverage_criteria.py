"""The ten coverage criteria: the spec's hand-computed cases, peers, references and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unitscope.coverage.base import CRITERIA, criterion, nan_to, nonfinite_to, pack_rows, topk_mask
from unitscope.coverage.cluster import CC
from unitscope.coverage.neuron import KMNC, NBC, NC, SNAC, TKNC, TKNP
from unitscope.coverage.surprise import DSC, LSC, MDSC
from unitscope.stats.base import load_states, save_states

# spec coverage.md §5.1: one layer, three units, three test inputs, build range lo = 0, hi = [2, 1, 1]
X1, X2, X3 = [0.0, 0.5, 1.0], [2.0, 0.0, 1.0], [-0.5, 0.4, 1.5]
TEST = torch.tensor([X1, X2, X3])
BUILD = torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 1.0]])


# ---------------------------------------------------------------------- §5 exact examples
@pytest.mark.parametrize(("crit", "expected"), [
    (NC(threshold=0.0, scale="none"), 1.0),
    (NC(threshold=0.5, scale="none"), 2 / 3),
    (NC(threshold=0.5), 2 / 3),
    (NC(threshold=0.0), 1.0),
    (TKNC(k=1), 2 / 3),
    (TKNC(k=2), 1.0),
    (TKNP(k=1), 2.0),
    (TKNP(k=2), 2.0),
    (CC(threshold=1.0), 2.0),
    (CC(threshold=1.0, squared=True, count_first=False), 1.0),
])
def test_spec_5_1_without_profile(crit, expected):
    assert crit.update(TEST) == pytest.approx(expected, abs=1e-12)
    assert crit.value() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("crit", "expected"), [
    (KMNC(k=2), 5 / 6),
    (KMNC(k=2, boundary="ceil"), 0.5),
    (NBC(), 1 / 3),
    (SNAC(), 1 / 3),
])
def test_spec_5_1_with_range_profile(crit, expected):
    crit.fit(BUILD)
    assert crit.update(TEST) == pytest.approx(expected, abs=1e-12)


def test_spec_5_1_scaled_nc_after_first_input():
    nc_half, nc_zero = NC(threshold=0.5), NC(threshold=0.0)
    assert nc_half.update(TEST[:1]) == pytest.approx(1 / 3)
    assert nc_zero.update(TEST[:1]) == pytest.approx(2 / 3)
    assert nc_half.update(TEST[1:]) == pytest.approx(1 / 3)  # the gain: 1/3 -> 2/3


def test_spec_5_1_kmnc_sections_and_cc_orders():
    kmnc = KMNC(k=2).fit(BUILD)
    kmnc.update(TEST)
    # n1 {0, 1}, n2 {0, 1}, n3 {1}
    assert kmnc._st["layer"]["covered"].tolist() == [[True, True], [True, True], [False, True]]
    anchor = KMNC(k=2, boundary="ceil").fit(BUILD)
    anchor.update(TEST)
    assert anchor._st["layer"]["covered"].tolist() == [[False, True], [True, False], [False, True]]
    assert CC(threshold=1.0).update(TEST[[2, 0, 1]]) == 2.0


def test_spec_5_2_scaling_order_for_conv_maps():
    maps = torch.tensor([[[[0.0, 10.0]], [[4.0, 6.0]]]])  # channel A [0, 10], channel B [4, 6]
    for t in (0.0, 0.25, 0.5, 0.9):  # anchor: equal means -> 0/0 -> nothing covered
        assert NC(threshold=t).update(maps) == 0.0
    assert NC(threshold=0.25, scale="map_minmax").update(maps) == 1.0
    assert NC(threshold=0.5, scale="map_minmax").update(maps) == 0.0


def test_spec_5_3_lsa_one_point():
    lsc = LSC(bandwidth=1.0, min_var=0.0, var_scope="global").fit(torch.tensor([[0.0]]))
    sa = lsc.surprise(torch.tensor([[0.0], [1.0]]))
    assert sa.tolist() == pytest.approx([0.918939, 1.418939], abs=1e-6)
    assert sa[0].item() == pytest.approx(-math.log(1 / math.sqrt(2 * math.pi)), abs=1e-12)


DSA_TRAIN = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
DSA_CLASSES = torch.tensor([0, 0, 1])
DSA_TEST = torch.tensor([[0.2, 0.0], [2.0, 0.0]])


@pytest.mark.parametrize(("reference", "expected"), [("train", [1 / 15, 0.5]), ("test", [0.2 / 2.8, 1.0])])
def test_spec_5_3_dsa(reference, expected):
    dsc = DSC(reference=reference, min_var=0.0, var_scope="global").fit(DSA_TRAIN, DSA_CLASSES)
    assert dsc.surprise(DSA_TEST, torch.tensor([0, 0])).tolist() == pytest.approx(expected, abs=1e-7)


def test_spec_5_3_dsc_buckets():
    dsc = DSC(bounds=(0.0, 1.0), n_buckets=10, min_var=0.0, var_scope="global").fit(DSA_TRAIN, DSA_CLASSES)
    assert dsc.update(DSA_TEST, torch.tensor([0, 0])) == pytest.approx(0.2)
    assert dsc._sh["ids"].tolist() == [0, 5]


@pytest.mark.parametrize(("covariance", "expected"), [("population", 2.0), ("sample", math.sqrt(3))])
def test_spec_5_3_mdsa(covariance, expected):
    mdsc = MDSC(covariance=covariance).fit(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]))
    assert mdsc.surprise(torch.tensor([[1.0, 2.0], [0.0, 0.0]])).tolist() == pytest.approx([expected, 0.0],
                                                                                           abs=1e-12)


# ---------------------------------------------------------------------- peers and references
def test_lsa_equals_scipy_gaussian_kde():
    from scipy.stats import gaussian_kde

    g = torch.Generator().manual_seed(0)
    train = torch.randn(300, 4, generator=g) @ torch.randn(4, 4, generator=g)
    classes = torch.arange(300) % 3
    test = torch.randn(20, 4, generator=g) * 2
    test_cls = torch.arange(20) % 3
    lsc = LSC(min_var=0.0).fit(train[:100], classes[:100]).fit(train[100:], classes[100:])
    sa = lsc.surprise(test, test_cls).numpy()
    for c in range(3):
        kde = gaussian_kde(train[classes == c].double().numpy().T)
        rows = (test_cls == c).numpy()
        np.testing.assert_allclose(sa[rows], -kde.logpdf(test[rows].double().numpy().T), rtol=1e-9)


def test_lsa_isotropic_equals_sklearn_kernel_density():
    from sklearn.neighbors import KernelDensity

    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(50, 3, generator=g), torch.randn(7, 3, generator=g)
    lsc = LSC(bandwidth=0.2, min_var=0.0).fit(train)
    kd = KernelDensity(kernel="gaussian", bandwidth=0.2).fit(train.double().numpy())
    expected = -kd.score_samples(test.double().numpy())
    np.testing.assert_allclose(lsc.surprise(test).numpy(), expected, rtol=1e-9)


def test_mdsa_equals_scipy_mahalanobis_and_is_affine_invariant():
    from scipy.spatial.distance import mahalanobis

    g = torch.Generator().manual_seed(2)
    train = torch.randn(40, 3, generator=g, dtype=torch.float64)
    test = torch.randn(5, 3, generator=g, dtype=torch.float64)
    mdsc = MDSC(covariance="sample").fit(train[:13]).fit(train[13:])
    inv = np.linalg.inv(np.cov(train.numpy().T))
    ref = [mahalanobis(t, train.mean(0).numpy(), inv) for t in test.numpy()]
    np.testing.assert_allclose(mdsc.surprise(test).numpy(), ref, rtol=1e-10)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64) + 3 * torch.eye(3)
    b = torch.randn(3, dtype=torch.float64)
    moved = MDSC(covariance="sample").fit(train @ a.T + b)
    np.testing.assert_allclose(moved.surprise(test @ a.T + b).numpy(), ref, rtol=1e-8)


def test_dsa_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    train, classes = torch.randn(30, 2, generator=g), torch.arange(30) % 3
    test, test_cls = torch.randn(8, 2, generator=g), torch.arange(8) % 3
    sa = DSC(min_var=0.0).fit(train, classes).surprise(test, test_cls)
    t, tr = test.double().numpy(), train.double().numpy()
    for i in range(8):
        same = np.flatnonzero(classes.numpy() == test_cls[i].item())
        j = same[np.argmin(np.linalg.norm(tr[same] - t[i], axis=1))]
        other = tr[classes.numpy() != test_cls[i].item()]
        expected = np.linalg.norm(tr[j] - t[i]) / np.linalg.norm(other - tr[j], axis=1).min()
        assert sa[i].item() == pytest.approx(expected, rel=1e-5)
    on_train = DSC(min_var=0.0).fit(train, classes).surprise(train[:1], classes[:1])
    assert on_train.item() == pytest.approx(0, abs=1e-3)


def _reference_kmnc(build: np.ndarray, test: np.ndarray, k: int) -> float:
    """Slow reference in exact rational arithmetic: each value's section, one by one (DeepGauge)."""
    from fractions import Fraction

    lo, hi = build.min(0), build.max(0)
    hit = set()
    for u in range(build.shape[1]):
        low, high = Fraction(float(lo[u])), Fraction(float(hi[u]))
        if high <= low:
            continue
        for v in map(Fraction, test[:, u].tolist()):
            if low <= v <= high:
                hit.add((u, min(int((v - low) * k / (high - low)), k - 1)))
    return len(hit) / (k * build.shape[1])


def _reference_tknc(test: np.ndarray, k: int) -> float:
    covered = set()
    for row in test:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        covered |= set(order[:k])
    return len(covered) / test.shape[1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6))
def test_kmnc_and_tknc_match_slow_references(seed, k):
    g = torch.Generator().manual_seed(seed)
    build = torch.randn(12, 5, generator=g, dtype=torch.float64)
    test = (torch.randn(9, 5, generator=g, dtype=torch.float64) * 4).round() / 4  # ties
    test = torch.cat([test, build.amin(0, keepdim=True), build.amax(0, keepdim=True)])  # lo and hi exactly
    kmnc = KMNC(k=k).fit(build)
    kmnc.update(test)
    assert kmnc.value() == _reference_kmnc(build.numpy(), test.numpy(), k)
    assert TKNC(k=k).update(test) == pytest.approx(_reference_tknc(test.numpy(), k))


# ---------------------------------------------------------------------- invariants (spec §4)
SET_UNION = ["nc", "kmnc", "nbc", "snac", "tknc", "tknp", "lsc", "dsc", "mdsc"]
OPTIONS = {"lsc": {"bounds": (-20.0, 20.0), "n_buckets": 40}, "dsc": {"n_buckets": 20},
           "mdsc": {"bounds": (0.0, 6.0), "n_buckets": 30}, "kmnc": {"k": 4}, "tknc": {"k": 2},
           "tknp": {"k": 2}, "nc": {"threshold": 0.3}}


def _data(seed: int, n: int = 24):
    g = torch.Generator().manual_seed(seed)
    train = {"a": torch.randn(60, 3, generator=g), "b": torch.randn(60, 4, generator=g)}
    test = {"a": torch.randn(n, 3, generator=g) * 1.5, "b": (torch.randn(n, 4, generator=g) * 2).round() / 2}
    return train, torch.arange(60) % 2, test, torch.randint(0, 2, (n,), generator=g)


def _fitted(name: str, train, train_cls):
    crit = criterion(name, **OPTIONS.get(name, {}))
    if crit.needs_fit:
        crit.fit(train, train_cls)
    return crit


def _rows(acts, cls, idx):
    return {k: v[idx] for k, v in acts.items()}, cls[idx]


@pytest.mark.parametrize("name", [*SET_UNION, "cc"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cut=st.integers(1, 23))
def test_monotone_under_added_inputs(name, seed, cut):
    train, train_cls, test, test_cls = _data(seed)
    crit = _fitted(name, train, train_cls)
    values = []
    for part in (slice(0, cut), slice(cut, 24), slice(0, 24)):
        gain = crit.update(*_rows(test, test_cls, part))
        assert gain >= 0
        values.append(crit.value())
    assert values == sorted(values)
    assert values[2] == values[1]  # idempotent for set unions; CC: duplicates never add


@pytest.mark.parametrize("name", SET_UNION)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cut=st.integers(0, 24))
def test_merge_of_shards_equals_one_pass_and_order_and_batching_do_not_matter(name, seed, cut):
    train, train_cls, test, test_cls = _data(seed)
    whole = _fitted(name, train, train_cls)
    whole.update(test, test_cls)
    first, second = _fitted(name, train, train_cls), _fitted(name, train, train_cls)
    first.update(*_rows(test, test_cls, slice(0, cut)))
    second.update(*_rows(test, test_cls, slice(cut, 24)))
    merged = first.merge(second)
    assert merged.value() == whole.value()
    assert merged.layer_values() == whole.layer_values()
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(seed))
    shuffled = _fitted(name, train, train_cls)
    for chunk in perm.split(7):
        shuffled.update(*_rows(test, test_cls, chunk))
    assert shuffled.value() == whole.value()


@pytest.mark.parametrize("name", ["kmnc", "nbc", "lsc", "mdsc"])
def test_profiles_fitted_in_shards_merge_to_one_fit(name):
    train, train_cls, test, test_cls = _data(0)
    whole = _fitted(name, train, train_cls)
    parts = [criterion(name, **OPTIONS.get(name, {})).fit(*_rows(train, train_cls, s))
             for s in (slice(0, 25), slice(25, 60))]
    merged = parts[0].merge(parts[1])
    assert whole.update(test, test_cls) == pytest.approx(merged.update(test, test_cls), abs=1e-12)


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_state_round_trips_through_safetensors(name, tmp_path):
    train, train_cls, test, test_cls = _data(5)
    crit = _fitted(name, train, train_cls)
    crit.update(*_rows(test, test_cls, slice(0, 10)))
    save_states(tmp_path / "s.safetensors", {name: crit})
    back = load_states(tmp_path / "s.safetensors")[0][name]
    assert type(back) is type(crit) and back.config() == crit.config()
    assert back.value() == crit.value()
    rest = _rows(test, test_cls, slice(10, 24))
    assert back.update(*rest) == crit.update(*rest)
    assert back.value() == crit.value()


def test_propose_leaves_state_and_commit_adopts_it():
    nc = NC(threshold=0.5, scale="none")
    nc.update(TEST[:1])
    candidate = nc.propose(TEST[1:])
    assert nc.value() == pytest.approx(1 / 3) and candidate.value() == pytest.approx(2 / 3)
    assert nc.commit(candidate) == pytest.approx(1 / 3)
    assert nc.value() == pytest.approx(2 / 3)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k1=st.integers(1, 8), k2=st.integers(1, 8))
def test_tknc_monotone_in_k(seed, k1, k2):
    lo, hi = sorted((k1, k2))
    g = torch.Generator().manual_seed(seed)
    acts = {"a": torch.randn(6, 5, generator=g), "b": (torch.randn(6, 7, generator=g) * 2).round()}  # ties
    assert TKNC(k=lo).update(acts) <= TKNC(k=hi).update(acts)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t1=st.floats(-1, 1.2), t2=st.floats(-1, 1.2),
       scale=st.sampled_from(["layer_minmax", "none", "map_minmax"]))
def test_nc_higher_threshold_never_above_lower(seed, t1, t2, scale):
    lo, hi = sorted((t1, t2))
    acts = torch.randn(10, 4, 3, generator=torch.Generator().manual_seed(seed))
    assert NC(threshold=hi, scale=scale).update(acts) <= NC(threshold=lo, scale=scale).update(acts)


def test_nc_scaled_properties():
    acts = torch.randn(1, 6)
    assert NC(threshold=0.99).update(acts) >= 1 / 6  # the layer's max scales to 1
    assert NC(threshold=1.0).update(acts) == 0.0
    assert NC(threshold=-1.0).update(torch.ones(5, 1)) == 0.0  # a one-unit layer is never covered
    assert NC(threshold=-1.0, scale="none").update(torch.tensor([[math.nan, 0.0]])) == 0.5  # NaN: never


def test_range_properties():
    g = torch.Generator().manual_seed(4)
    build = torch.randn(50, 6, generator=g)
    build[:, 5] = 1.0  # degenerate unit
    for crit in (NBC(), SNAC()):
        assert crit.fit(build).update(build) == 0.0
    kmnc = KMNC(k=1).fit(build)
    assert kmnc.update(build) == pytest.approx(5 / 6)
    assert kmnc.diagnostics() == {"degenerate": 1.0}
    assert KMNC(k=1, degenerate="exclude").fit(build).update(build) == 1.0
    assert kmnc.update(build.amax(0, keepdim=True) + 1) == 0.0  # outside the range: no section
    refined = KMNC(k=8).fit(build)
    refined.update(build[:7])
    coarse = KMNC(k=4).fit(build)
    coarse.update(build[:7])
    assert int(refined._st["layer"]["covered"].sum()) >= int(coarse._st["layer"]["covered"].sum())
    snac, nbc = SNAC().fit(build), NBC().fit(build)
    snac.update(build)
    nbc.update(build)
    push = build[:1].clone()
    push[0, 2] = build[:, 2].max() + 1
    assert snac.update(push) == pytest.approx(1 / 6)
    assert nbc.update(push) == pytest.approx(1 / 12)


def test_boundary_margin_widens_the_corners_by_sigma():
    build = torch.tensor([[0.0, 0.0], [2.0, 4.0]])  # sigma (population) = [1, 2]
    test = torch.tensor([[2.5, -1.0], [3.5, 9.0]])
    assert NBC().fit(build).update(test) == pytest.approx(3 / 4)
    # margin 1: upper bounds [3, 6], lower bounds [-1, -2]: 3.5 > 3 and 9 > 6 hit, -1 is not < -1
    nbc = NBC(margin=1.0).fit(build[:1]).fit(build[1:])  # moments streamed over two fits
    assert nbc.std()["layer"].tolist() == [1.0, 2.0]
    assert nbc.update(test) == pytest.approx(2 / 4)
    assert SNAC(margin=1.0).fit(build).update(test) == 1.0
    assert SNAC(margin=2.0).fit(build).update(test) == 0.5  # upper bounds [4, 8]


def test_topk_properties():
    acts = {"a": torch.randn(1, 4), "b": torch.randn(1, 7)}
    assert TKNC(k=2).update(acts) == pytest.approx(4 / 11)
    assert TKNC(k=7).update(acts) == 1.0
    tknp = TKNP(k=2)
    assert tknp.update(acts) == 1.0 and tknp.update(acts) == 0.0
    flat = TKNP(k=5)
    assert flat.update(torch.randn(20, 5)) == 1.0  # k >= units: always the same pattern
    # set semantics: the same top-2 set in another order is the same pattern
    assert TKNP(k=2).update(torch.tensor([[3.0, 2.0, 0.0], [2.0, 3.0, 0.0]])) == 1.0
    assert topk_mask(torch.tensor([[1.0, 1.0, 1.0]]), 1).tolist() == [[True, False, False]]
    assert pack_rows(torch.tensor([[True] + [False] * 64, [False] * 63 + [True, True]])).tolist() == [
        [1, 0], [-(2**63), 1]]
    layered = TKNP(k=1, mode="layer")
    layered.update({"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[1.0, 0.0], [1.0, 0.0]])})
    assert layered.layer_values() == {"a": 2.0, "b": 1.0} and layered.value() == 3.0


def _topk_reference(row: list[float], k: int) -> list[bool]:
    """The k largest non-NaN values by (value desc, index asc); NaN ranks below -inf and is never kept."""
    key = [(math.isnan(v), -(-math.inf if math.isnan(v) else v), i) for i, v in enumerate(row)]
    chosen = {i for *_, i in sorted(key)[:k]} if k < len(row) else set(range(len(row)))
    return [i in chosen and not math.isnan(v) for i, v in enumerate(row)]


def test_topk_mask_matches_a_sorted_reference_with_ties_nan_and_inf():
    g = torch.Generator().manual_seed(3)
    for trial in range(200):
        units = int(torch.randint(1, 9, (1,), generator=g))
        pool = torch.tensor([0.0, -0.0, 1.0, 1.0, 2.0, math.inf, -math.inf, math.nan])
        v = pool[torch.randint(0, len(pool), (6, units), generator=g)]
        for k in (1, 2, 3, units, units + 1):
            want = [_topk_reference(row, k) for row in v.tolist()]
            assert topk_mask(v, k).tolist() == want, (trial, k, v)


def test_topk_mask_gives_a_slot_to_a_real_minus_inf_before_a_nan():
    assert topk_mask(torch.tensor([[math.nan, -math.inf, 1.0]]), 2).tolist() == [[False, True, True]]


def test_nonfinite_helpers_replace_exactly_what_they_say():
    t = torch.tensor([1.0, math.nan, math.inf, -math.inf, -2.0])
    assert nonfinite_to(t, 7.0).tolist() == [1.0, 7.0, 7.0, 7.0, -2.0]
    assert nonfinite_to(t, math.inf).tolist() == [1.0, math.inf, math.inf, math.inf, -2.0]
    assert nan_to(t, -math.inf).tolist() == [1.0, -math.inf, math.inf, -math.inf, -2.0]
    assert t[1].isnan()  # copies, the input is untouched


def test_cc_properties():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    assert CC(threshold=0.0).update(x) == 3.0  # distinct vectors
    assert CC(threshold=1e6).update({"a": x, "b": x}) == 2.0  # one per layer
    assert CC(threshold=1e6, count_first=False).update(x) == 0.0
    # order matters (greedy): 0, 1.5, 3 with tau = 2 keeps {0, 3}; 1.5 first keeps only {1.5}
    line = torch.tensor([[0.0], [1.5], [3.0]])
    assert CC(threshold=2.0).update(line) == 2.0
    assert CC(threshold=2.0).update(line[[1, 0, 2]]) == 1.0
    wide = torch.randn(40, 2048, generator=torch.Generator().manual_seed(8)) * 30  # rounding in the expansion
    tau0 = CC(threshold=0.0)
    assert tau0.update(torch.cat([wide, wide[:25]])) == 40.0 and tau0.update(wide.flip(0)) == 0.0
    one_by_one = CC(threshold=2.0)
    for row in line:
        one_by_one.update(row[None])
    assert one_by_one.value() == 2.0


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 2.0, 4.0, 9.0])
def test_cc_matches_a_one_by_one_greedy_reference(threshold, squared):
    """Few acceptances (one distance vector each) and many (past STEPS, the matrix path) both
    keep exactly the representatives of the plain input-by-input greedy loop."""
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    reps: list[torch.Tensor] = []
    for row in x:
        if all(float((row - r).norm()) ** (2 if squared else 1) > threshold for r in reps):
            reps.append(row)
    cc = CC(threshold=threshold, squared=squared)
    cc.update(x[:150])
    cc.update(x[150:])
    got = cc.representatives()["layer"]
    assert got.shape[0] == len(reps) and torch.allclose(got, torch.stack(reps))


def test_cc_leaves_out_rows_whose_squared_norm_overflows():
    """A row of about 1e200 has no finite float64 distance: it is left out like a NaN row. Taken
    as the first representative it was "close" to everything after it (its expanded distances
    overflowed and were snapped to 0), so CC stopped growing."""
    x = torch.tensor([[1e200, 0.0], [0.0, 0.0], [5.0, 0.0]], dtype=torch.float64)
    cc = CC(threshold=1.0)
    assert cc.update(x) == 2.0
    assert cc.representatives()["layer"].tolist() == [[0.0, 0.0], [5.0, 0.0]]


def test_surprise_bucket_edges_and_diagnostics():
    cross = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    mdsc = MDSC(bounds=(0.0, 2.0), n_buckets=4).fit(cross)
    # MDSA(mu) = 0 lands in bucket 0; MDSA = 4 overflows
    assert mdsc.update(torch.tensor([[0.0, 0.0], [2.0, 4.0]])) == 0.25
    expected = {"underflow": 0.0, "overflow": 1.0, "dropped": 0.0, "units": 2.0, "ridged": 0.0,
                "skipped_classes": 0.0}
    assert mdsc.diagnostics() == expected
    dsc_edge = DSC(bounds=(0.0, 0.5), n_buckets=5, min_var=0.0, var_scope="global")
    dsc_edge.fit(DSA_TRAIN, DSA_CLASSES)
    assert dsc_edge.update(DSA_TEST, torch.tensor([0, 0])) == 0.2  # DSA 0.0667 in bucket 0, DSA 0.5 = U
    assert dsc_edge.diagnostics()["overflow"] == 1.0
    under = DSC(bounds=(0.1, 0.5), n_buckets=5, min_var=0.0, var_scope="global").fit(DSA_TRAIN, DSA_CLASSES)
    assert under.update(DSA_TEST, torch.tensor([0, 0])) == 0.0
    assert under.diagnostics()["underflow"] == 1.0
    anchor = MDSC(buckets="anchor", width=0.5).fit(cross)
    assert anchor.update(torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.1, 0.0]])) == 2.0  # buckets {0, 4}
    assert anchor.kind == "count"
    dsc = DSC(min_var=0.0, var_scope="global").fit(DSA_TRAIN, DSA_CLASSES)
    dsc.update(DSA_TEST, torch.tensor([0, 5]))  # class 5 has no training traces: dropped, counted
    assert dsc.diagnostics()["dropped"] == 1.0


def test_variance_mask_drops_constant_units():
    g = torch.Generator().manual_seed(6)
    train = torch.cat([torch.randn(40, 2, generator=g), torch.full((40, 1), 3.0)], dim=1)
    mdsc = MDSC().fit(train)
    mdsc.update(torch.randn(3, 3, generator=g))
    assert mdsc.mask().tolist() == [True, True, False]


# ---------------------------------------------------------------------- bad input
def test_unknown_criterion_lists_known_ones():
    known = "known criteria: cc, dsc, kmnc, lsc, mdsc, nbc, nc, snac, tknc, tknp"
    with pytest.raises(ValueError, match=known):
        criterion("ncx")


def test_kde_and_covariance_with_too_few_samples():
    spread = torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 0.0], [4.0, 2.0], [5.0, 1.0]])
    lsc = LSC(min_var=0.0, few_samples="error").fit(spread, torch.tensor([0, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match=r"classes \{1: 1\}.*fewer than 2.*bandwidth=<float>.*few_samples"):
        lsc.update(torch.zeros(1, 2), torch.tensor([0]))
    # by default the class is skipped, reported, and its test inputs are dropped (counted)
    for crit in (LSC(min_var=0.0), MDSC()):
        crit.fit(spread, torch.tensor([0, 0, 0, 0, 1]))
        crit.update(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
        assert crit.usable_classes() == [0]
        assert crit.diagnostics()["skipped_classes"] == 1.0 and crit.diagnostics()["dropped"] == 2.0
    with pytest.raises(ValueError, match="no class has 2 training inputs"):
        MDSC().fit(spread[:2], torch.tensor([0, 1])).update(torch.zeros(1, 2), torch.tensor([0]))
    line = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    for crit in (LSC(min_var=0.0, ridge=0.0), MDSC(ridge=0.0)):
        with pytest.raises(ValueError, match="singular.*ridge"):
            crit.fit(line).update(torch.zeros(1, 2))
    for crit in (LSC(min_var=0.0), MDSC()):  # the default ridge is added, and reported
        crit.fit(line).update(torch.zeros(1, 2))
        assert math.isfinite(crit.surprise(torch.zeros(1, 2)).item())
        assert crit.diagnostics()["ridged"] == 1.0
    with pytest.raises(ValueError, match="fewer than 2, which a covariance needs"):
        MDSC(few_samples="error").fit(torch.ones(1, 2) * torch.tensor([1.0, 2.0])).update(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="at least two classes"):
        DSC(min_var=0.0).fit(DSA_TRAIN).update(DSA_TEST)
    with pytest.raises(ValueError, match="max_train"):
        LSC(max_train=5).fit(torch.randn(6, 2))
    with pytest.raises(ValueError, match="surprise_layers"):  # 40000² float64 > 4 GiB: refused up front
        MDSC().fit(torch.zeros(1, 40000, dtype=torch.float16))


def test_shape_mismatch_between_fit_and_update():
    kmnc = KMNC(k=2).fit({"a": torch.randn(4, 3)})
    with pytest.raises(ValueError, match="shape mismatch with fit.*a: 5 units, expected 3"):
        kmnc.update({"a": torch.randn(2, 5)})
    with pytest.raises(ValueError, match="got layers \\['b'\\]"):
        kmnc.update({"b": torch.randn(2, 3)})
    nc = NC()
    nc.update(torch.randn(2, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        nc.update(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"expected \(n, units\)"):
        NC().update(torch.randn(3))


def test_phases_are_enforced():
    with pytest.raises(ValueError, match="call fit"):
        KMNC().update(torch.randn(2, 3))
    kmnc = KMNC(k=2).fit(BUILD)
    kmnc.update(TEST)
    with pytest.raises(ValueError, match="reset"):
        kmnc.fit(BUILD)
    with pytest.raises(ValueError, match="needs no profile"):
        NC().fit(TEST)
    with pytest.raises(ValueError, match="classes must be an integer tensor"):
        MDSC().fit(BUILD, torch.tensor([0.5, 1.0]))
    other = KMNC(k=2).fit(BUILD * 2)
    other.update(TEST)
    with pytest.raises(ValueError, match="different training data"):
        kmnc.merge(other)
    with pytest.raises(ValueError, match="different configuration"):
        kmnc.merge(KMNC(k=3))


def test_all_criteria_registered():
    assert set(CRITERIA) == {"nc", "kmnc", "nbc", "snac", "tknc", "tknp", "cc", "lsc", "dsc", "mdsc"}
    assert all(CRITERIA[k].key == k for k in CRITERIA)


def test_lsc_default_lower_bound_is_the_smallest_training_lsa():
    g = torch.Generator().manual_seed(7)
    train = torch.randn(30, 2, generator=g)
    lsc = LSC().fit(train)
    lsc.update(train[:3])
    lower = math.floor(float(lsc.surprise(train).min()))
    assert lsc._sh["bounds"].tolist() == [lower, 2000.0]
    assert lsc.diagnostics()["underflow"] == 0.0


def test_class_wise_profiles_refuse_inputs_without_classes():
    from unitscope.coverage.surprise import MDSC

    g = torch.Generator().manual_seed(0)
    train = torch.cat([torch.randn(20, 2, generator=g), torch.randn(20, 2, generator=g) + 10])
    classes = torch.tensor([0] * 20 + [1] * 20)
    mdsc = MDSC().fit(train, classes)
    with pytest.raises(ValueError, match="pass the class of every input"):
        mdsc.update(train[:3])
    with pytest.raises(ValueError, match="pass the class of every input"):
        mdsc.surprise(train[:3])
    assert mdsc.update(train[:3], classes[:3]) >= 0
    one_class = MDSC().fit(train[:20])  # fitted without classes: every input is class 0
    assert one_class.update(train[:3]) >= 0


def test_cc_batch_of_only_non_finite_rows_adds_nothing():
    cc = CC(threshold=1.0)
    assert cc.update({"a": torch.zeros(2, 2)}) == 1.0
    assert cc.update({"a": torch.tensor([[math.inf, 0.0], [math.nan, 1.0]])}) == 0.0  # it raised
    assert cc.value() == 1.0 and len(cc.representatives()["a"]) == 1


def test_cc_infinite_threshold_keeps_one_representative_per_layer():
    # spec §2.7: τ = ∞ gives 1 per layer (the anchor, which does not count the first: 0)
    x = torch.tensor([[0.0, 0.0], [1e200, -1e200], [5.0, 5.0]], dtype=torch.float64)  # an infinite distance
    cc = CC(threshold=math.inf)
    assert cc.update({"a": x, "b": x[[2, 0, 1]]}) == 2.0
    assert cc.update({"a": x.flip(0), "b": -x}) == 0.0
    torch.testing.assert_close(cc.representatives()["a"], x[:1])
    torch.testing.assert_close(cc.representatives()["b"], x[2:])
    assert CC(threshold=math.inf, squared=True, count_first=False).update(x) == 0.0
    one_by_one = CC(threshold=math.inf)
    for row in x:
        one_by_one.update(row[None])
    assert one_by_one.value() == 1.0
    other = CC(threshold=math.inf)
    other.update(x.flip(0))
    assert one_by_one.merge(other).value() == 1.0
    for bad in (math.nan, -1.0, -math.inf):
        with pytest.raises(ValueError, match=r"threshold must be >= 0"):
            CC(threshold=bad)


def test_lsc_too_few_inputs_names_the_rule_that_needs_them():
    one = (torch.tensor([[0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="Scott's bandwidth"):
        LSC().fit(*one).surprise(*one)
    with pytest.raises(ValueError, match="per-class variance filter"):  # an isotropic KDE needs no covariance
        LSC(bandwidth=1.0).fit(*one).surprise(*one)
    with pytest.raises(ValueError, match="more varied training inputs or lower min_var$"):
        LSC(bandwidth=1.0, var_scope="global").fit(*one).surprise(*one)
