"""IDC: the spec's exact examples, set-union invariants, unit ranking, clustering and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unitscope.coverage.idc import IDC, ClusteringError, assign, cluster_1d

STREAM = [[0.1, 1.9], [0.9, 0.2], [0.2, 2.2], [0.6, 3.5]]


def test_spec_5_4_stream_exact():
    idc = IDC.from_centroids([[0.0, 1.0], [0.0, 2.0, 4.0]])
    assert idc.combinations(0) == 6
    values = []
    for t in STREAM:
        idc.update(torch.tensor([t]))
        values.append(idc.value())
    assert values == [1 / 6, 2 / 6, 2 / 6, 3 / 6]
    (row,) = idc.results()
    assert row["covered"] == 3 and row["inputs"] == 4
    assert row["max_achievable"] == pytest.approx(4 / 6)


def test_spec_5_4_silhouette_choice():
    v = torch.tensor([0.0, 0.0, 1.0, 1.0, 10.0, 10.0])
    centroids, score = cluster_1d(v, k_range=(2, 4))
    assert centroids.tolist() == [0.0, 1.0, 10.0]
    assert score == pytest.approx(1.0)
    _, score2 = cluster_1d(v, k_range=(2, 2))
    assert score2 == pytest.approx(0.953086, abs=1e-6)


def test_exact_1d_silhouette_equals_sklearn():
    import numpy as np
    from sklearn.metrics import silhouette_score

    from unitscope.coverage.idc import silhouette_1d

    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        x = np.concatenate([rng.normal(3 * c, 1.0, 40 + c) for c in range(k)])
        x[:5] = x[5]  # ties
        labels = rng.integers(0, k, len(x)) if k == 5 else np.repeat(np.arange(k), [40 + c for c in range(k)])
        assert silhouette_1d(x, labels) == pytest.approx(silhouette_score(x[:, None], labels), abs=1e-12)
    x, labels = np.array([0.0, 1.0, 1.5, 7.0]), np.array([0, 1, 1, 2])  # a singleton cluster scores 0
    assert silhouette_1d(x, labels) == pytest.approx(silhouette_score(x[:, None], labels), abs=1e-12)


def test_nearest_centroid_ties_go_to_the_lower_one():
    c = torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)
    assert assign(torch.tensor([1.0, 3.0, -5.0, 9.0, 1.01]), c).tolist() == [0, 1, 0, 2, 1]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4), st.integers(1, 5))
def test_all_units_one_cluster_each_is_one_after_any_input(x, n):
    torch.manual_seed(0)
    train = torch.randn(12, 4)
    idc = IDC(m=4, k=1).fit(train, units=[0, 1, 2, 3])
    assert idc.value() == 0.0
    idc.update(torch.tensor([x] * n))
    assert idc.value() == 1.0


def test_one_unit_value_is_the_fraction_of_clusters_hit():
    idc = IDC.from_centroids([[0.0, 1.0, 5.0, 9.0]])
    idc.update(torch.tensor([[0.2], [8.0], [7.5]]))
    assert idc.value() == 2 / 4


def test_build_set_covers_every_cluster_of_one_unit():
    torch.manual_seed(1)
    train = torch.cat([torch.randn(30, 3), torch.randn(30, 3) + 6])
    idc = IDC(m=1, k_range=(2, 4)).fit(train, relevance=torch.tensor([0.0, 2.0, 1.0]))
    assert idc.groups[0]["units"] == [("layer", 1)]
    idc.update(train)
    assert idc.value() == 1.0


def _fitted(seed: int = 0, **options) -> tuple[IDC, dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    acts = {"a": torch.randn(60, 5, generator=g), "b": torch.rand(60, 4, 3, 3, generator=g)}
    rel = {"a": torch.randn(60, 5, generator=g), "b": torch.randn(60, 4, 3, 3, generator=g)}
    classes = torch.arange(60) % 3
    return IDC(m=2, k=3, **options).fit(acts, relevance=rel, classes=classes), acts, classes


def test_groups_per_layer_end_to_end_and_class():
    idc, _, classes = _fitted()
    scopes = {(g["scope"], g["layer"], g["class"]) for g in idc.groups}
    assert scopes == {(s, la, c) for c in (-1, 0, 1, 2) for s, la in (("layer", "a"), ("layer", "b"),
                                                                        ("end2end", ""))}
    # per-layer ranking: the signed sum of the relevance, ties to the lower index
    g = torch.Generator().manual_seed(0)
    torch.randn(60, 5, generator=g), torch.rand(60, 4, 3, 3, generator=g)
    rel_a = torch.randn(60, 5, generator=g)
    want = rel_a.double().sum(0).argsort(descending=True)[:2].tolist()
    assert idc.groups[0]["units"] == [("a", i) for i in want]
    cls1 = rel_a[classes == 1].double().sum(0).argsort(descending=True)[:2].tolist()
    grp = next(x for x in idc.groups if x["layer"] == "a" and x["class"] == 1)
    assert grp["units"] == [("a", i) for i in cls1]


def test_summed_per_class_relevance_gives_the_same_fit_as_per_input():
    idc, acts, classes = _fitted()
    g = torch.Generator().manual_seed(0)
    torch.randn(60, 5, generator=g), torch.rand(60, 4, 3, 3, generator=g)
    rel = {"a": torch.randn(60, 5, generator=g), "b": torch.randn(60, 4, 3, 3, generator=g).sum((2, 3))}
    total = {k: v.double().sum(0) for k, v in rel.items()}
    per = {c: {k: v[classes == c].double().sum(0) for k, v in rel.items()} for c in range(3)}
    other = IDC(m=2, k=3).fit(acts, relevance=total, class_relevance=per)
    assert [g["units"] for g in other.groups] == [g["units"] for g in idc.groups]
    assert torch.equal(other.state_dict()["centroids"], idc.state_dict()["centroids"])


def test_test_inputs_of_a_class_cover_only_its_groups():
    idc, acts, classes = _fitted()
    idc.update({k: v[:1] for k, v in acts.items()}, classes[:1])  # one input of class 0
    for row in idc.results():
        assert (row["covered"] > 0) == (row["class"] in (-1, 0)), row
    with pytest.raises(ValueError, match="pass the test inputs' classes"):
        idc.update(acts)


def test_invariants_monotone_order_batch_merge_roundtrip():
    idc, acts, classes = _fitted(2)
    test = {k: v + 0.3 * torch.randn_like(v) for k, v in acts.items()}
    whole = idc.clone()
    whole.update(test, classes)
    # streaming in small batches never decreases and ends equal
    stream = idc.clone()
    last = 0.0
    for i in range(0, 60, 7):
        gain = stream.update({k: v[i:i + 7] for k, v in test.items()}, classes[i:i + 7])
        assert gain >= 0 and stream.value() >= last
        last = stream.value()
    # reversed order
    rev = idc.clone()
    rev.update({k: v.flip(0) for k, v in test.items()}, classes.flip(0))
    # two shards merged
    a, b = idc.clone(), idc.clone()
    a.update({k: v[:25] for k, v in test.items()}, classes[:25])
    b.update({k: v[25:] for k, v in test.items()}, classes[25:])
    merged = a.merge(b)
    # save and load
    loaded = IDC(**{**idc.config(), "k_range": tuple(idc.k_range)})
    loaded.load_state_dict(whole.state_dict())
    expected = whole.results()
    for other in (stream, rev, merged, loaded):
        assert other.results() == expected
    # idempotent
    again = whole.clone()
    assert again.update(test, classes) == 0.0
    assert 0 < whole.value() <= 1


def test_state_file_round_trip_without_pickle(tmp_path):
    from unitscope.stats.base import load_states, save_states

    idc, acts, classes = _fitted(3)
    idc.update({k: v[:30] for k, v in acts.items()}, classes[:30])
    save_states(tmp_path / "s.safetensors", {"idc": idc})
    back = load_states(tmp_path / "s.safetensors")[0]["idc"]
    assert back.results() == idc.results()
    import pandas as pd

    assert pd.DataFrame(back.important_units()).equals(pd.DataFrame(idc.important_units()))  # NaN == NaN
    assert back.update({k: v[30:] for k, v in acts.items()}, classes[30:]) == \
        idc.update({k: v[30:] for k, v in acts.items()}, classes[30:])


def test_propose_leaves_the_state_and_commit_adopts_it():
    idc = IDC.from_centroids([[0.0, 1.0], [0.0, 2.0, 4.0]])
    idc.update(torch.tensor([STREAM[0]]))
    candidate = idc.propose(torch.tensor(STREAM[1:]))
    assert idc.value() == 1 / 6 and candidate.value() == 3 / 6
    assert idc.commit(candidate) == pytest.approx(2 / 6)
    assert idc.value() == 3 / 6


def test_merge_refuses_a_differently_fitted_idc():
    a, _, _ = _fitted(0)
    b, _, _ = _fitted(1)
    with pytest.raises(ValueError, match="fitted differently"):
        a.merge(b)


def test_cross_layer_norm_changes_the_end_to_end_ranking():
    acts = {"narrow": torch.randn(20, 2), "wide": torch.randn(20, 50)}
    rel = {"narrow": torch.tensor([5.0, 4.0]), "wide": torch.linspace(0, 1, 50)}
    raw = IDC(m=2, k=2).fit(acts, relevance=rel)
    normed = IDC(m=2, k=2, cross_layer_norm="per_layer_max").fit(acts, relevance=rel)
    e2e = next(g for g in raw.groups if g["scope"] == "end2end")
    assert e2e["units"] == [("narrow", 0), ("narrow", 1)]
    e2e = next(g for g in normed.groups if g["scope"] == "end2end")
    assert e2e["units"] == [("narrow", 0), ("wide", 49)]


def test_abs_sum_importance():
    acts = torch.randn(20, 3)
    rel = torch.tensor([[0.5, -2.0, 0.0], [1.0, 0.0, 3.0]]).repeat(10, 1)
    assert IDC(m=2, k=2).fit(acts, relevance=rel).groups[0]["units"] == [("layer", 2), ("layer", 0)]
    assert IDC(m=2, k=2, importance="abs_sum").fit(acts, relevance=rel).groups[0]["units"] == [
        ("layer", 2), ("layer", 1)]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="layer 'small' has 2 units, fewer than m=3"):
        IDC(m=3).fit({"small": torch.randn(10, 2)}, relevance={"small": torch.randn(10, 2)})
    with pytest.raises(ClusteringError, match="needs at least 3 samples, got 2"):
        IDC(m=1, k=3).fit(torch.randn(2, 4), units=[0])
    with pytest.raises(ClusteringError, match="needs at least 2 samples"):
        IDC(m=1).fit(torch.randn(1, 4), units=[1])
    with pytest.raises(ValueError, match="either relevance= .* or units="):
        IDC().fit(torch.randn(5, 4))
    with pytest.raises(ValueError, match="before update"):
        IDC().update(torch.randn(3, 4))
    idc = IDC(m=1, k=2).fit(torch.randn(10, 4), units=[0])
    with pytest.raises(ValueError, match=r"expected \(n, 4\)"):
        idc.update(torch.randn(3, 5))


def test_constant_unit_gets_one_cluster_and_rounding_dedupes():
    c, score = cluster_1d(torch.zeros(20))
    assert c.tolist() == [0.0] and math.isnan(score)
    idc = IDC(m=1, k=2, round_centroids=0).fit(torch.tensor([[0.0], [0.01], [0.2], [0.21]]), units=[0])
    assert idc.centroids[("layer", 0)].tolist() == [0.0]
    assert idc.combinations(0) == 1


# ---------------------------------------------------------------------- the pipeline on a model
def _small(n: int = 40, split: str = "train"):
    from torch.utils.data import Subset

    import unitscope

    return Subset(unitscope.load_dataset("digits", split), list(range(n)))


def test_pipeline_tables_and_batching_invariance(digits_model):
    from unitscope.analyses.importance import idc, unit_relevance
    from unitscope.attribution import attribute

    data = _small(30)
    a = unit_relevance(digits_model, data, ["conv2", "fc"], train_filter="all", batch_size=7)
    b = unit_relevance(digits_model, data, ["conv2", "fc"], train_filter="all", batch_size=30)
    x = torch.stack([data[i][0] for i in range(30)])
    y = torch.tensor([data[i][1] for i in range(30)])
    direct = attribute(digits_model, x, y, layer="conv2").double().sum((0, 2, 3))
    for r in (a, b):
        torch.testing.assert_close(r.total["conv2"], direct, rtol=1e-5, atol=1e-8)
        assert r.kept.tolist() == list(range(30))
    per = sum(v["conv2"] for v in a.per_class.values())
    torch.testing.assert_close(per, a.total["conv2"])
    tables = idc(digits_model, data, _small(20, "test"), ["conv2", "conv3"], m=2, k=2, train_filter="all",
                 per_class=False, n_init=2)
    t = tables["idc"]
    assert t["scope"].tolist() == ["layer", "layer", "end2end"]
    assert {"coverage", "combinations", "covered", "max_achievable"} <= set(t.columns)
    assert t["coverage"].between(0, 1).all()
    assert (t["coverage"] <= t["max_achievable"] + 1e-12).all()
    assert len(tables["idc_units"]) == 2 * len(t)


def test_pipeline_bad_input(digits_model):
    from torch import nn

    from unitscope.analyses.importance import NoCorrectInputError, fit_idc
    from unitscope.data.arrays import ArrayDataset

    with pytest.raises(ValueError, match="layer 'fc' has 10 units, fewer than m=11"):
        fit_idc(digits_model, _small(10), "fc", m=11)
    always0 = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        always0[1].weight.zero_()
        always0[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    data = ArrayDataset(torch.rand(8, 1, 8, 8), torch.ones(8, dtype=torch.long))
    with pytest.raises(NoCorrectInputError, match="none of the 8 training inputs is classified correctly"):
        fit_idc(always0, data, "1", m=1)
    with pytest.raises(ClusteringError, match="needs at least 3 samples, got 2"):
        fit_idc(digits_model, _small(2), "conv3", m=1, k=3, train_filter="all")


def _sync_worker(rank: int, world: int, store: str, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        idc = IDC.from_centroids({"a": {0: [0.0, 1.0], 2: [0.0, 2.0, 4.0]}, "b": {1: [-1.0, 1.0]}})
        x = torch.tensor(STREAM * 3) * torch.tensor([[1.0, 1.1]] * 12)
        acts = {"a": torch.stack([x[:, 0], x[:, 0], x[:, 1]], 1), "b": torch.stack([x[:, 1], -x[:, 0]], 1)}
        part = slice(0, 5) if rank == 0 else slice(5, 12)
        idc.update({k: v[part] for k, v in acts.items()})
        idc.sync()
        with open(f"{out}.{rank}", "w") as f:
            json.dump(idc.results(), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow
def test_two_gloo_ranks_sync_to_one_pass(tmp_path):
    import json

    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    idc = IDC.from_centroids({"a": {0: [0.0, 1.0], 2: [0.0, 2.0, 4.0]}, "b": {1: [-1.0, 1.0]}})
    x = torch.tensor(STREAM * 3) * torch.tensor([[1.0, 1.1]] * 12)
    idc.update({"a": torch.stack([x[:, 0], x[:, 0], x[:, 1]], 1), "b": torch.stack([x[:, 1], -x[:, 0]], 1)})
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            assert json.load(f) == idc.results()
    assert idc.layer_values()["a"] > 0


def test_abs_sum_ranks_on_summed_absolute_relevance():
    import unitscope
    from unitscope.analyses.importance import unit_relevance

    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn").eval()
    data = torch.utils.data.Subset(unitscope.load_dataset("digits", "train"), range(64))
    signed = unit_relevance(model, data, ["conv3"], train_filter="all")
    absolute = unit_relevance(model, data, ["conv3"], train_filter="all", absolute=True)
    assert (absolute.total["conv3"] >= signed.total["conv3"].abs() - 1e-9).all()
    assert (absolute.total["conv3"] > signed.total["conv3"].abs() + 1e-6).any()  # signs cancel in the sum


def test_deepimportance_quantisation_options():
    """Spec coverage §3.1/§3.5: fewer than ``min_values`` values give the single centroid {0}
    (DeepImportance's 10, so [0, 0, 1, 1, 10, 10] gets {0}); ``drop_zeros`` leaves exact zeros out."""
    unit = torch.tensor([[0.0], [0.0], [1.0], [1.0], [10.0], [10.0]])
    assert IDC(m=1).fit(unit, units=[0]).centroids[("layer", 0)].tolist() == [0.0, 1.0, 10.0]
    assert IDC(m=1, min_values=10).fit(unit, units=[0]).centroids[("layer", 0)].tolist() == [0.0]
    dead = torch.tensor([[0.0]] * 8 + [[1.0], [1.1], [5.0], [5.2]])
    kept = IDC(m=1, k=2, drop_zeros=True).fit(dead, units=[0]).centroids[("layer", 0)]
    torch.testing.assert_close(kept, torch.tensor([1.05, 5.1], dtype=torch.float64))
    assert IDC(m=1, k=2).fit(dead, units=[0]).centroids[("layer", 0)][0] < 0.5  # the zeros pull one down
    only_zeros = IDC(m=1, drop_zeros=True, min_values=10).fit(torch.zeros(20, 1), units=[0])
    assert only_zeros.centroids[("layer", 0)].tolist() == [0.0]
    with pytest.raises(ValueError, match="min_values"):
        IDC(min_values=-1)


def test_drop_zeros_gives_a_dead_unit_one_centroid():
    dead = torch.cat([torch.zeros(30, 1), torch.rand(30, 1)], dim=1)
    idc = IDC(m=2, drop_zeros=True).fit(dead, units=[0, 1])
    assert idc.centroids[("layer", 0)].tolist() == [0.0]
    assert len(idc.centroids[("layer", 1)]) >= 2


def test_groups_beyond_int64_combinations_keep_every_covered_cell():
    # 64 units with 2 clusters each: 2**64 combinations, more than one int64 key can number
    torch.manual_seed(0)
    acts = torch.randn(1000, 64)
    idc = IDC(m=64, k=2).fit(acts, relevance=torch.ones(64))
    assert idc.combinations(0) == 2 ** 64
    idc.update(acts[:400])
    idc.update(acts[400:])
    cells = {tuple(row) for row in (acts >= torch.stack(
        [idc.centroids[("layer", u)].mean() for u in range(64)])).tolist()}
    assert idc.covered(0) == len(cells) == 1000  # every input reached a cell of its own
    again = IDC(m=64, k=2).fit(acts, relevance=torch.ones(64))
    again.update(acts[:700])
    shard = IDC(m=64, k=2).fit(acts, relevance=torch.ones(64))
    shard.update(acts[700:])
    again.merge(shard)
    assert again.covered(0) == 1000
    back = IDC(m=64, k=2)
    back.load_state_dict(idc.state_dict())
    assert back.covered(0) == 1000 and back.value() == idc.value()


def test_a_one_word_key_set_saved_flat_still_loads():
    acts = torch.randn(50, 30)
    idc = IDC(m=30, k=2).fit(acts, relevance=torch.ones(30))  # 2**30 > the bitmap limit: a key set
    idc.update(acts[:20])
    state = idc.state_dict()
    assert state["covered.0"].shape == (idc.covered(0), 1)
    state["covered.0"] = state["covered.0"].reshape(-1)  # the layout of states saved before
    old = IDC(m=30, k=2)
    old.load_state_dict(state)
    old.update(acts[20:])
    idc.update(acts[20:])
    assert old.covered(0) == idc.covered(0)


def test_abs_sum_refuses_a_signed_summed_relevance():
    acts = torch.randn(2, 3)
    summed = torch.tensor([[1.0, -5.0, 0.5], [1.0, 1.0, 0.5]]).sum(0)  # |Σr| = 4 is not Σ|r| = 6
    with pytest.raises(ValueError, match="not a sum of absolute values"):
        IDC(m=1, k=1, importance="abs_sum").fit(acts, relevance=summed)
    kept = IDC(m=1, k=1, importance="abs_sum").fit(acts, relevance=torch.tensor([2.0, 10.0, 1.0]))
    assert kept.groups[0]["units"] == [("layer", 1)]


def test_update_refuses_negative_or_fractional_classes():
    idc = IDC(m=1, k=2).fit(torch.randn(50, 3), relevance=torch.randn(50, 3),
                            classes=torch.arange(50) % 2)
    with pytest.raises(ValueError, match=">= 0"):
        idc.clone().update(torch.randn(4, 3), torch.full((4,), -1))
    with pytest.raises(ValueError, match="integer class indices"):
        idc.clone().update(torch.randn(4, 3), torch.rand(4) * 2)


def test_an_empty_update_with_empty_classes_is_a_no_op():
    idc = IDC(m=1, k=2).fit(torch.randn(50, 3), relevance=torch.randn(50, 3), classes=torch.arange(50) % 2)
    assert idc.update(torch.zeros(0, 3), []) == 0.0
