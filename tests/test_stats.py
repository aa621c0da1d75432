"""Streaming accumulators against slow, obviously-right full-batch references.

Every accumulator must (a) equal a float64 reference on the whole data, (b) give the one-pass
state for any split of the data into shards merged in any order or grouping, (c) round-trip
through state dicts and safetensors files, and (d) count non-finite values instead of letting
them in.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from unitscope.stats import (
    ACCUMULATORS,
    Accumulator,
    Covariance,
    Histogram,
    MergeError,
    Moments,
    TopK,
    load_states,
    save_states,
)
from unitscope.stats.topk import EMPTY

F64 = torch.float64
HIST_ARGS = {"bins": 7, "low": -1.5, "high": 2.0}


# --------------------------------------------------------------------------- data and helpers
def make_data(seed: int, n: int, units: int, *, ties: bool = False,
              nonfinite: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """(n, units) float64; ``ties`` draws small integers (many exact ties and values on edges)."""
    rng = np.random.default_rng(seed)
    if ties:
        x = rng.integers(-3, 4, size=(n, units)).astype(np.float64)
    else:
        x = rng.normal(size=(n, units)) * scale + rng.normal(size=units)
    if nonfinite > 0:
        mask = rng.random((n, units)) < nonfinite
        x[mask] = rng.choice([np.nan, np.inf, -np.inf], size=int(mask.sum()))
    return torch.from_numpy(x)


def feed(acc: Accumulator, x: torch.Tensor, start: int = 0) -> None:
    """Update ``acc`` with ``x`` whose first row has global index ``start``."""
    if isinstance(acc, TopK):
        acc.update(x, index=torch.arange(start, start + x.shape[0]))
    else:
        acc.update(x)


FACTORIES: dict[str, Callable[[], Accumulator]] = {
    "moments": Moments,
    "covariance": Covariance,
    "topk": lambda: TopK(k=3),
    "histogram": lambda: Histogram(**HIST_ARGS),
}
EXACT = {"topk", "histogram"}


def streamed(kind: str, x: torch.Tensor, batch: int) -> Accumulator:
    acc = FACTORIES[kind]()
    for start in range(0, max(x.shape[0], 1), batch):
        feed(acc, x[start:start + batch], start)
    return acc


def assert_states_equal(a: Accumulator, b: Accumulator, exact: bool) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        ta, tb = sa[name], sb[name]
        assert ta.shape == tb.shape and ta.dtype == tb.dtype, name
        if exact or not ta.dtype.is_floating_point:
            assert torch.equal(ta, tb), name
        else:
            assert torch.allclose(ta, tb, rtol=1e-9, atol=1e-9, equal_nan=True), name


def snapshot(acc: Accumulator) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in acc.state_dict().items()}


# --------------------------------------------------------------------------- references
def ref_moments(x: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, list[float]] = {k: [] for k in ("count", "mean", "var", "min", "max", "nf")}
    for u in range(x.shape[1]):
        col = x[:, u]
        fin = col[torch.isfinite(col)]
        out["count"].append(float(fin.numel()))
        out["mean"].append(float(fin.mean()) if fin.numel() else math.nan)
        out["var"].append(float(torch.var(fin, correction=1)) if fin.numel() > 1 else math.nan)
        out["min"].append(float(fin.min()) if fin.numel() else math.nan)
        out["max"].append(float(fin.max()) if fin.numel() else math.nan)
        out["nf"].append(float(col.numel() - fin.numel()))
    return {k: torch.tensor(v, dtype=F64) for k, v in out.items()}


def ref_topk(x: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, units = x.shape
    values = torch.full((units, k), -math.inf, dtype=F64)
    indices = torch.full((units, k), EMPTY, dtype=torch.int64)
    for u in range(units):
        cand = sorted((-float(x[i, u]), int(index[i])) for i in range(n)
                      if not math.isnan(float(x[i, u])))
        for j, (negv, i) in enumerate(cand[:k]):
            values[u, j], indices[u, j] = -negv, i
    return values, indices


def ref_hist(x: torch.Tensor, bins: int, low: float, high: float) -> dict[str, np.ndarray]:
    edges = np.linspace(low, high, bins + 1)
    xs = x.numpy()
    counts, under, over, nf = [], [], [], []
    for u in range(xs.shape[1]):
        col = xs[:, u]
        fin = col[np.isfinite(col)]
        counts.append(np.histogram(fin, bins=edges)[0])
        under.append((fin < low).sum())
        over.append((fin > high).sum())
        nf.append((~np.isfinite(col)).sum())
    return {"counts": np.array(counts).reshape(xs.shape[1], bins), "underflow": np.array(under),
            "overflow": np.array(over), "nonfinite": np.array(nf), "edges": edges}


# --------------------------------------------------------------------------- vs references
@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_moments_match_reference(batch: int) -> None:
    x = make_data(0, 200, 5, nonfinite=0.05, scale=3.0)
    r = streamed("moments", x, batch).compute()
    ref = ref_moments(x)
    assert torch.equal(r.count, ref["count"])
    assert torch.equal(r.nonfinite, ref["nf"].to(torch.int64))
    for name in ("mean", "var", "min", "max"):
        assert torch.allclose(getattr(r, name), ref[name], rtol=1e-12, atol=1e-12), name
    assert torch.allclose(r.std, ref["var"].sqrt(), rtol=1e-12)


def test_moments_too_few_values_give_nan() -> None:
    m = Moments()
    m.update(torch.tensor([[1.0, math.nan], [math.nan, math.nan]]))
    r = m.compute()
    assert r.count.tolist() == [1.0, 0.0]
    assert r.mean[0] == 1.0 and r.mean[1].isnan()
    assert r.var.isnan().all() and r.min[1].isnan() and r.max[1].isnan()
    assert r.nonfinite.tolist() == [1, 2]


@pytest.mark.parametrize("batch", [1, 9, 1000])
def test_covariance_matches_reference(batch: int) -> None:
    x = make_data(1, 150, 4, scale=2.0)
    x[:, 3] = 0.5 * x[:, 0] - x[:, 1]  # correlated units
    x[[3, 40, 41], 2] = torch.tensor([math.nan, math.inf, -math.inf], dtype=F64)
    acc = streamed("covariance", x, batch)
    r = acc.compute()
    good = x[torch.isfinite(x).all(1)]
    assert r.count.item() == good.shape[0] == 147
    assert r.nonfinite_rows.item() == 3
    assert torch.allclose(r.mean, good.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(r.cov, torch.cov(good.T), rtol=1e-10, atol=1e-12)
    assert torch.allclose(acc.compute(ddof=0).cov, torch.cov(good.T, correction=0), rtol=1e-10)
    assert torch.allclose(r.correlation(), torch.corrcoef(good.T), rtol=1e-10, atol=1e-12)


def test_covariance_correlation_nan_for_constant_unit_and_too_few_rows() -> None:
    c = Covariance()
    c.update(torch.tensor([[1.0, 5.0], [2.0, 5.0], [4.0, 5.0]]))
    corr = c.compute().correlation()
    assert corr[0, 0] == 1.0
    assert corr[0, 1].isnan() and corr[1, 0].isnan() and corr[1, 1].isnan()
    one = Covariance()
    one.update(torch.tensor([[1.0, 2.0]]))
    assert one.compute().cov.isnan().all()
    assert torch.equal(one.compute(ddof=0).cov, torch.zeros(2, 2, dtype=F64))


@pytest.mark.parametrize("batch", [1, 6, 1000])
def test_topk_matches_reference(batch: int) -> None:
    x = make_data(2, 90, 6, ties=True)  # many exact duplicates
    x[5, 0], x[6, 1], x[7, 2] = math.nan, math.inf, -math.inf
    r = streamed("topk", x, batch).compute()
    values, indices = ref_topk(x, torch.arange(90), 3)
    assert torch.equal(r.values, values)
    assert torch.equal(r.indices, indices)
    assert r.aux is None
    assert r.count.tolist() == [3] * 6


def test_topk_carries_aux_payload_and_flattens_unit_shape() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 2, 3, generator=g)
    aux = torch.randint(0, 100, (40, 2, 3, 2), generator=g)
    index = torch.randperm(1000, generator=g)[:40]
    t = TopK(k=4, aux_dim=2)
    for s in range(0, 40, 11):
        t.update(x[s:s + 11], index=index[s:s + 11], aux=aux[s:s + 11])
    r = t.compute()
    flat, flat_aux = x.reshape(40, 6).to(F64), aux.reshape(40, 6, 2)
    values, indices = ref_topk(flat, index, 4)
    assert torch.equal(r.values, values) and torch.equal(r.indices, indices)
    assert r.aux is not None and r.aux.shape == (6, 4, 2)
    row_of = {int(i): j for j, i in enumerate(index)}
    for u in range(6):
        for j in range(4):
            assert torch.equal(r.aux[u, j], flat_aux[row_of[int(r.indices[u, j])], u])


@pytest.mark.parametrize("per_unit", [False, True])
@pytest.mark.parametrize("batch", [1, 13, 1000])
def test_histogram_matches_numpy(batch: int, per_unit: bool) -> None:
    x = make_data(4, 300, 3, nonfinite=0.03)
    x[:20] = make_data(5, 20, 3, ties=True) * 0.5  # values exactly on bin edges
    if per_unit:
        lows, highs = [-1.5, -0.5, 0.0], [2.0, 0.5, 3.0]
        h = Histogram(bins=7, low=torch.tensor(lows), high=torch.tensor(highs))
        assert h.config() == {"bins": 7, "low": "per-unit", "high": "per-unit"}
    else:
        lows, highs = [-1.5] * 3, [2.0] * 3
        h = Histogram(**HIST_ARGS)
    for s in range(0, 300, batch):
        h.update(x[s:s + batch])
    r = h.compute()
    for u in range(3):
        ref = ref_hist(x[:, u:u + 1], 7, lows[u], highs[u])
        assert r.edges[u].numpy().tolist() == ref["edges"].tolist()
        assert r.counts[u].numpy().tolist() == ref["counts"][0].tolist()
        assert r.underflow[u] == ref["underflow"][0] and r.overflow[u] == ref["overflow"][0]
        assert r.nonfinite[u] == ref["nonfinite"][0]
    total = r.counts.sum(1) + r.underflow + r.overflow + r.nonfinite
    assert total.tolist() == [300] * 3


def test_histogram_high_goes_into_last_bin_and_outside_values_are_counted() -> None:
    h = Histogram(bins=4, low=0.0, high=1.0)
    h.update(torch.tensor([[1.0], [0.0], [0.25], [0.9999], [1.0000001], [-1e-12], [math.inf]]))
    r = h.compute()
    assert r.counts.tolist() == [[1, 1, 0, 2]]
    assert r.underflow.tolist() == [1] and r.overflow.tolist() == [1]
    assert r.nonfinite.tolist() == [1]


def test_histogram_bins_agree_with_edges_under_rounding() -> None:
    # floor((0.3 - 0) / 1 * 10) == 3, but linspace's edge 3 is 0.30000000000000004 > 0.3:
    # the count must follow the reported edges, exactly as numpy.histogram does
    values = [k / 10 for k in range(11)] + [k / 7 for k in range(8)]
    h = Histogram(bins=10, low=0.0, high=1.0)
    h.update(torch.tensor(values, dtype=F64))
    ref = np.histogram(np.array(values), bins=10, range=(0.0, 1.0))[0]
    assert h.compute().counts[0].tolist() == ref.tolist()
    assert torch.equal(h.compute().edges[0], torch.from_numpy(np.linspace(0.0, 1.0, 11)))


def test_histogram_validates_arguments() -> None:
    for kwargs in ({"bins": 0}, {"bins": 2.5}, {"low": 1.0, "high": 1.0},
                   {"low": 2.0, "high": 1.0}, {"low": math.nan},
                   {"low": torch.tensor([0.0, 1.0]), "high": torch.tensor([1.0, 1.0])},
                   {"low": torch.zeros(2), "high": torch.ones(3)}):
        with pytest.raises(ValueError):
            Histogram(**kwargs)
    h = Histogram(low=torch.zeros(3), high=torch.ones(3))
    with pytest.raises(ValueError, match="3 edges"):
        h.update(torch.zeros(4, 2))


# --------------------------------------------------------------------------- shards and merging
@st.composite
def sharded_dataset(draw: st.DrawFn) -> tuple[torch.Tensor, list[tuple[int, int]], random.Random,
                                              list[bool]]:
    n = draw(st.integers(0, 40))
    units = draw(st.integers(1, 4))
    x = make_data(draw(st.integers(0, 2**32 - 1)), n, units, ties=draw(st.booleans()),
                  nonfinite=draw(st.sampled_from([0.0, 0.0, 0.1])))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    bounds = [0, *cuts, n]
    pieces = list(itertools.pairwise(bounds))
    # an empty piece either never updates (uninitialised) or updates with an empty batch
    skip_empty = draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))
    return x, pieces, draw(st.randoms(use_true_random=False)), skip_empty


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@settings(max_examples=40, deadline=None)
@given(case=sharded_dataset())
def test_any_split_merged_in_any_grouping_equals_one_pass(
        kind: str, case: tuple[torch.Tensor, list[tuple[int, int]], random.Random, list[bool]]
) -> None:
    x, pieces, rnd, skip_empty = case
    one_pass = FACTORIES[kind]()
    feed(one_pass, x)
    parts = []
    for (a, b), skip in zip(pieces, skip_empty, strict=True):
        acc = FACTORIES[kind]()
        if a < b or not skip:
            feed(acc, x[a:b], a)
        parts.append(acc)
    rnd.shuffle(parts)
    while len(parts) > 1:  # merge random neighbours, in either direction: a random tree
        i = rnd.randrange(len(parts) - 1)
        left, right = parts[i], parts.pop(i + 1)
        parts[i] = left.merge(right) if rnd.random() < 0.5 else right.merge(left)
    merged = parts[0]
    if not merged.initialized:
        assert x.shape[0] == 0
        return
    assert_states_equal(merged, one_pass, exact=kind in EXACT)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_empty_accumulator_is_merge_identity(kind: str) -> None:
    x = make_data(6, 30, 3)
    full = streamed(kind, x, 8)
    before = snapshot(full)
    assert full.merge(FACTORIES[kind]()) is full
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())
    empty = FACTORIES[kind]()
    empty.merge(full)
    assert_states_equal(empty, full, exact=True)
    empty_batch = FACTORIES[kind]()  # initialised by an empty batch: also an identity
    feed(empty_batch, x[:0])
    assert empty_batch.initialized
    empty_batch.merge(full)
    assert_states_equal(empty_batch, full, exact=kind in EXACT)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_merge_refuses_other_class_and_unit_count(kind: str) -> None:
    acc = streamed(kind, make_data(7, 10, 3), 4)
    before = snapshot(acc)
    other_kind = "moments" if kind != "moments" else "topk"
    with pytest.raises(MergeError):
        acc.merge(streamed(other_kind, make_data(7, 10, 3), 4))
    with pytest.raises(MergeError):
        acc.merge(streamed(kind, make_data(7, 10, 2), 4))
    assert all(torch.equal(before[k], v) for k, v in acc.state_dict().items())


def test_merge_refuses_different_config_or_edges() -> None:
    x = make_data(8, 10, 2)
    pairs = [
        (TopK(k=3), TopK(k=4)),
        (TopK(k=3), TopK(k=3, aux_dim=1)),
        (Histogram(bins=5), Histogram(bins=6)),
        (Histogram(low=0.0), Histogram(low=-1.0)),
        (Histogram(low=torch.zeros(2), high=torch.ones(2)),
         Histogram(low=torch.zeros(2), high=torch.full((2,), 2.0))),
    ]
    for a, b in pairs:
        for acc in (a, b):
            if acc.config().get("aux_dim"):
                acc.update(x, index=torch.arange(10), aux=torch.zeros(10, 2, 1, dtype=torch.int64))
            else:
                feed(acc, x)
        with pytest.raises(MergeError):
            a.merge(b)
    # per-unit edges are checked even when the receiving accumulator is still empty
    empty = Histogram(low=torch.zeros(2), high=torch.ones(2))
    other = Histogram(low=torch.zeros(2), high=torch.full((2,), 2.0))
    other.update(x)
    with pytest.raises(MergeError):
        empty.merge(other)


# --------------------------------------------------------------------------- persistence
def _all_accumulators() -> dict[str, Accumulator]:
    x = make_data(9, 50, 4, nonfinite=0.05)
    accs = {kind: streamed(kind, x, 16) for kind in FACTORIES}
    per_unit = Histogram(bins=5, low=torch.tensor([-1.0, 0, 0, 0]),
                         high=torch.tensor([1.0, 2, 3, 4]))
    per_unit.update(x)
    accs["per_unit_histogram"] = per_unit
    aux = TopK(k=2, aux_dim=3)
    aux.update(x, index=torch.arange(100, 150), aux=torch.arange(50 * 4 * 3).reshape(50, 4, 3))
    accs["topk_aux"] = aux
    return accs


def test_state_dict_round_trip_and_continue() -> None:
    x2 = make_data(10, 20, 4)
    for acc in _all_accumulators().values():
        copy = type(acc)(**acc.config())
        copy.load_state_dict(acc.state_dict())
        assert_states_equal(copy, acc, exact=True)
        clone = acc.clone()
        assert_states_equal(clone, acc, exact=True)
        if isinstance(acc, TopK) and acc.aux_dim:
            continue
        feed(copy, x2, 1000)
        feed(acc, x2, 1000)
        assert_states_equal(copy, acc, exact=True)


def test_save_and_load_states_round_trip(tmp_path) -> None:
    accs = _all_accumulators()
    path = tmp_path / "states.safetensors"
    save_states(path, accs, meta={"model": "toy", "step": 3})
    loaded, meta = load_states(path)
    assert meta == {"model": "toy", "step": 3}
    assert loaded.keys() == accs.keys()
    for key, acc in accs.items():
        assert type(loaded[key]) is type(acc)
        assert loaded[key].config() == acc.config()
        assert_states_equal(loaded[key], acc, exact=True)
    # loaded per-unit histogram keeps its edges and still merges with the original
    hist = loaded["per_unit_histogram"]
    assert torch.equal(hist.compute().edges, accs["per_unit_histogram"].compute().edges)
    hist.merge(accs["per_unit_histogram"])
    assert torch.equal(hist.compute().counts, 2 * accs["per_unit_histogram"].compute().counts)
    assert {"Moments", "Covariance", "TopK", "Histogram"} <= set(ACCUMULATORS)


def test_load_state_dict_rejects_wrong_keys() -> None:
    m = Moments()
    with pytest.raises(MergeError):
        m.load_state_dict({"count": torch.zeros(2)})


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_compute_does_not_mutate_state(kind: str) -> None:
    acc = streamed(kind, make_data(11, 25, 3, nonfinite=0.1), 10)
    before = snapshot(acc)
    r1 = acc.compute()
    for value in vars(r1).values():  # scribbling on the result must not reach the state
        if isinstance(value, torch.Tensor) and value.numel():
            value.fill_(0)
    r2 = acc.compute()
    for k, v in acc.state_dict().items():
        assert torch.equal(before[k], v), k
    assert r2 is not r1


# --------------------------------------------------------------------------- non-finite values
def test_nonfinite_values_are_counted_and_excluded() -> None:
    x = torch.tensor([[1.0, math.nan], [math.inf, 2.0], [3.0, -math.inf], [5.0, 4.0]])
    m = Moments()
    m.update(x)
    r = m.compute()
    assert r.nonfinite.tolist() == [1, 2]
    assert r.count.tolist() == [3.0, 2.0]
    assert r.mean.tolist() == [3.0, 3.0] and r.max.tolist() == [5.0, 4.0]

    c = Covariance()
    c.update(x)
    rc = c.compute()
    assert rc.count.item() == 1.0 and rc.nonfinite_rows.item() == 3
    assert rc.mean.tolist() == [5.0, 4.0]

    t = TopK(k=4)
    t.update(x, index=torch.tensor([10, 11, 12, 13]))
    rt = t.compute()
    assert t.state_dict()["nonfinite"].tolist() == [1, 2]
    assert rt.values[0].tolist() == [math.inf, 5.0, 3.0, 1.0]
    assert rt.indices[0].tolist() == [11, 13, 12, 10]
    # NaN never enters; -inf is a real value and beats an empty slot
    assert rt.values[1].tolist() == [4.0, 2.0, -math.inf, -math.inf]
    assert rt.indices[1].tolist() == [13, 11, 12, EMPTY]
    assert rt.count.tolist() == [4, 3]

    h = Histogram(bins=2, low=0.0, high=10.0)
    h.update(x)
    rh = h.compute()
    assert rh.nonfinite.tolist() == [1, 2]
    assert rh.counts.tolist() == [[2, 1], [2, 0]]
    assert (rh.underflow + rh.overflow).tolist() == [0, 0]


# --------------------------------------------------------------------------- TopK specifics
def test_topk_ties_go_to_smaller_global_index_across_batches() -> None:
    t = TopK(k=3)
    t.update(torch.ones(3, 2), index=torch.tensor([50, 7, 30]))
    t.update(torch.ones(2, 2), index=torch.tensor([9, 8]))
    t.update(torch.ones(2, 2), index=torch.tensor([100, 1]))
    assert t.compute().indices.tolist() == [[1, 7, 8], [1, 7, 8]]
    # a larger value still wins over a smaller index
    t.update(torch.tensor([[2.0, 0.0]]), index=torch.tensor([999]))
    assert t.compute().indices.tolist() == [[999, 1, 7], [1, 7, 8]]


def test_topk_fewer_than_k_samples_leaves_empty_slots() -> None:
    t = TopK(k=5, aux_dim=1)
    t.update(torch.tensor([[2.0], [3.0]]), index=torch.tensor([4, 2]),
             aux=torch.tensor([[[40]], [[20]]]))
    r = t.compute()
    assert r.count.tolist() == [2]
    assert r.values.tolist() == [[3.0, 2.0, -math.inf, -math.inf, -math.inf]]
    assert r.indices.tolist() == [[2, 4, EMPTY, EMPTY, EMPTY]]
    assert r.aux is not None and r.aux[..., 0].tolist() == [[20, 40, -1, -1, -1]]


def test_topk_validates_index_and_aux() -> None:
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="index"):
        TopK(k=2).update(x)
    with pytest.raises(ValueError, match="index"):
        TopK(k=2).update(x, index=torch.arange(2))
    with pytest.raises(ValueError, match="index"):
        TopK(k=2).update(x, index=torch.zeros(3))
    with pytest.raises(ValueError, match="aux"):
        TopK(k=2, aux_dim=2).update(x, index=torch.arange(3))
    with pytest.raises(ValueError, match="aux"):
        TopK(k=2, aux_dim=2).update(x, index=torch.arange(3), aux=torch.zeros(3, 2, 3).long())
    with pytest.raises(ValueError, match="aux"):
        TopK(k=2).update(x, index=torch.arange(3), aux=torch.zeros(3, 2, 1).long())
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError):
            TopK(k=k)


# --------------------------------------------------------------------------- Histogram quantiles
def test_histogram_quantiles_within_one_bin_of_numpy() -> None:
    g = torch.Generator().manual_seed(12)
    x = torch.rand(20000, 3, generator=g, dtype=F64) * torch.tensor([1.0, 2.0, 0.5])
    h = Histogram(bins=50, low=torch.zeros(3), high=torch.tensor([1.0, 2.0, 0.5]))
    h.update(x)
    qs = [0.0, 0.01, 0.1, 0.25, 0.5, 0.9, 0.999, 1.0]
    got = h.quantile(qs)
    assert got.shape == (3, len(qs))
    width = torch.tensor([1.0, 2.0, 0.5], dtype=F64) / 50
    ref = torch.from_numpy(np.quantile(x.numpy(), qs, axis=0).T)
    assert ((got - ref).abs() <= width[:, None]).all()
    scalar = h.quantile(0.5)
    assert scalar.shape == (3,) and torch.equal(scalar, got[:, 4])
    assert torch.equal(h.quantile(torch.tensor([0.5])), got[:, 4:5])
    # monotone in q
    assert (got.diff(dim=1) >= 0).all()


def test_histogram_quantile_underflow_overflow_and_empty() -> None:
    h = Histogram(bins=4, low=0.0, high=1.0)
    h.update(torch.tensor([[-5.0, math.nan], [-4.0, math.nan], [0.5, math.nan], [7.0, math.nan]]))
    q = h.quantile([0.0, 0.25, 0.5, 0.6, 1.0])
    assert q[0].tolist() == [0.0, 0.0, 0.0, 0.6, 1.0]  # underflow -> low, overflow -> high
    assert q[1].isnan().all()  # no finite value at all
    g = Histogram(bins=4, low=0.0, high=1.0)
    g.update(torch.tensor([[0.6], [0.7]]))
    assert g.quantile(0.0).tolist() == [0.5]  # first non-empty bin, not low
    assert g.quantile(1.0).tolist() == [0.75]
    with pytest.raises(ValueError):
        h.quantile(1.5)


# --------------------------------------------------------------------------- numerical stability
def test_large_offset_is_stable() -> None:
    g = torch.Generator().manual_seed(13)
    x = 1e8 + torch.randn(4000, 3, generator=g, dtype=F64)
    m, c = Moments(), Covariance()
    for s in range(0, 4000, 256):
        m.update(x[s:s + 256])
        c.update(x[s:s + 256])
    ref_var = torch.var(x - 1e8, dim=0)  # centred exactly before the reference two-pass var
    assert torch.allclose(m.compute().var, ref_var, rtol=1e-6)
    assert torch.allclose(c.compute().cov, torch.cov((x - 1e8).T), rtol=1e-6, atol=1e-6)
    # the same through a sharded merge
    a, b = Moments(), Moments()
    a.update(x[:1000])
    b.update(x[1000:])
    assert torch.allclose(a.merge(b).compute().var, ref_var, rtol=1e-6)


# --------------------------------------------------------------------------- torch.distributed
def _dist_worker(rank: int, world: int, init_file: str, out_prefix: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        x = make_data(14, 60, 3, ties=True, nonfinite=0.05)
        lo, hi = (0, 25) if rank == 0 else (25, 60)
        accs: dict[str, Accumulator] = {}
        for kind in FACTORIES:
            acc = FACTORIES[kind]()
            feed(acc, x[lo:hi], lo)
            accs[kind] = acc.sync()
            lonely = FACTORIES[kind]()  # only rank 0 sees data: gather fallback
            if rank == 0:
                feed(lonely, x, 0)
            accs[f"{kind}_lonely"] = lonely.sync()
        for acc in accs.values():  # fed outside inference mode: later in-place updates must work
            assert not any(t.is_inference() for t in acc.state_dict().values() if torch.is_tensor(t))
        save_states(f"{out_prefix}{rank}.safetensors", accs)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_sync_over_gloo_equals_one_pass(tmp_path) -> None:
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2,
             join=True)
    x = make_data(14, 60, 3, ties=True, nonfinite=0.05)
    for rank in range(2):
        synced, _ = load_states(tmp_path / f"rank{rank}.safetensors")
        for kind in FACTORIES:
            one_pass = FACTORIES[kind]()
            feed(one_pass, x)
            assert_states_equal(synced[kind], one_pass, exact=kind in EXACT)
            assert_states_equal(synced[f"{kind}_lonely"], one_pass, exact=kind in EXACT)
