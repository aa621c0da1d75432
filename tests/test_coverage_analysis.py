"""The Coverage analysis: one pass feeds every criterion, tables, curve, shards, save and load."""

from __future__ import annotations

import pytest
import torch

import unitscope
from unitscope.analyses.coverage import (
    DEFAULT_CRITERIA,
    Coverage,
    coverage,
    plot_coverage_curve,
    plot_coverage_layers,
)
from unitscope.coverage.base import criterion
from unitscope.coverage.neuron import NC

from .conftest import hook_counts

LAYERS = ["conv1", "conv2", "conv3", "fc"]
OPTIONS = {"kmnc": {"k": 50}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return unitscope.load_model("digits-cnn").eval()


@pytest.fixture(scope="module")
def train_data():
    return unitscope.load_dataset("digits", "train")


@pytest.fixture(scope="module")
def test_data():
    return unitscope.load_dataset("digits", "test")


@pytest.fixture(scope="module")
def fitted(model, train_data):
    # labels, not predictions: the untrained model predicts one class, and DSC needs two
    cov = Coverage(options=OPTIONS, class_source="label")
    return cov.fit(model, train_data, device="cpu", progress=False)


def _run(model, data, cov, **kw):
    return unitscope.analyze(model, data, analyses=[cov], device="cpu", progress=False, **kw)


def _copy(cov: Coverage) -> Coverage:
    other = Coverage(options=OPTIONS, layers=cov.layers, class_source=cov.class_source)
    for k in cov.names:
        other.accumulators[k] = cov.accumulators[k].clone()
    return other


def _acts(model, data, layers, classes="label"):
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    with unitscope.capture(model, layers, reduce="mean") as acts, torch.no_grad():
        out = model(x)
    return dict(acts), y if classes == "label" else out.argmax(1)


def test_default_layers_are_the_conv_and_linear_outputs(fitted):
    assert fitted.layers == LAYERS
    assert list(fitted.criteria) == list(DEFAULT_CRITERIA)


def test_one_pass_equals_the_criteria_fed_by_hand(model, train_data, test_data, fitted):
    run = _run(model, test_data, _copy(fitted), batch_size=64)
    table = run.table("coverage")
    assert list(table.columns) == ["criterion", "layer", "value"]
    train_acts, train_pred = _acts(model, train_data, LAYERS)
    test_acts, test_pred = _acts(model, test_data, LAYERS)
    for name in DEFAULT_CRITERIA:
        by_hand = criterion(name, **OPTIONS.get(name, {}))
        if by_hand.needs_fit:
            by_hand.fit(train_acts, train_pred)
        by_hand.update(test_acts, test_pred)
        rows = table[table.criterion == name].set_index("layer")["value"]
        assert rows["all"] == pytest.approx(by_hand.value(), abs=1e-12), name
        for layer, value in by_hand.layer_values().items():
            assert rows[layer] == pytest.approx(value, abs=1e-12), (name, layer)
    fractions = table[~table.criterion.isin(["tknp", "cc"])]
    assert fractions.value.between(0, 1).all()
    diagnostics = run.table("coverage_diagnostics").set_index(["criterion", "diagnostic"])["value"]
    for name in ("lsc", "dsc", "mdsc"):
        expected = criterion(name).fit(train_acts, train_pred)
        expected.update(test_acts, test_pred)
        for key, value in expected.diagnostics().items():
            assert diagnostics[(name, key)] == value
    assert diagnostics[("kmnc", "degenerate")] >= 0
    assert hook_counts(model) == 0


def test_predicted_classes_feed_the_surprise_criteria(model, train_data, test_data):
    cov = Coverage(["lsc", "mdsc"], layers=["relu3"]).fit(model, train_data, device="cpu", progress=False)
    table = _run(model, test_data, cov).table("coverage")
    train_acts, train_pred = _acts(model, train_data, ["relu3"], "pred")
    test_acts, test_pred = _acts(model, test_data, ["relu3"], "pred")
    for name in ("lsc", "mdsc"):
        by_hand = criterion(name).fit(train_acts, train_pred)
        by_hand.update(test_acts, test_pred)
        assert table[table.criterion == name].value.item() == pytest.approx(by_hand.value(), abs=1e-12)


def test_curve_is_monotone_and_ends_at_the_table(model, test_data, fitted):
    run = _run(model, test_data, _copy(fitted), batch_size=50)
    curve, table = run.table("coverage_curve"), run.table("coverage")
    assert list(curve.columns) == ["criterion", "n_inputs", "value"]
    for name, rows in curve.groupby("criterion"):
        assert rows.n_inputs.tolist() == [*range(50, 360, 50), 360]
        assert rows.value.is_monotonic_increasing, name
        final = table[(table.criterion == name) & (table.layer == "all")].value.item()
        assert rows.value.iloc[-1] == final
    fig = plot_coverage_curve(curve)
    assert len(fig.axes) == 2  # fractions and counts
    bars = plot_coverage_layers(table)
    labels = [t.get_text() for t in bars.axes[0].get_xticklabels()]
    assert labels == [*LAYERS, "all"]
    # one bar per layer group for each per-layer fraction criterion (nc kmnc nbc snac tknc)
    assert len(bars.axes[0].patches) == 5 * len(labels)
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(bars)


def test_shards_merged_equal_one_pass_and_batching_does_not_matter(model, test_data, fitted):
    whole = _run(model, test_data, _copy(fitted), batch_size=360).table("coverage")
    other_batching = _run(model, test_data, _copy(fitted), batch_size=7).table("coverage")
    first = _run(model, test_data, _copy(fitted), shard=(0, 2), batch_size=64)
    second = _run(model, test_data, _copy(fitted), shard=(1, 2), batch_size=64)
    merged = first.analysis("coverage").merge(second.analysis("coverage"))
    tables = merged.tables()
    union = [c for c in DEFAULT_CRITERIA if c != "cc"]  # CC is order-dependent (greedy)
    for t in (other_batching, tables["coverage"]):
        a, b = whole[whole.criterion.isin(union)], t[t.criterion.isin(union)]
        assert a.reset_index(drop=True).equals(b.reset_index(drop=True))
    curve = tables["coverage_curve"]
    assert curve[curve.criterion == "nc"].n_inputs.tolist() == [64, 128, 180, 360]


def test_save_and_load_round_trip(model, test_data, fitted, tmp_path):
    run = _run(model, test_data, _copy(fitted), out=tmp_path / "run")
    back = unitscope.load_run(tmp_path / "run")
    assert back.table("coverage").equals(run.table("coverage"))
    rebuilt = back.analysis("coverage")
    assert isinstance(rebuilt, Coverage)
    assert rebuilt.tables()["coverage"].equals(run.table("coverage"))


def test_coverage_function_and_criteria_without_profile(model, train_data, test_data):
    run = coverage(model, None, test_data, criteria=["tknc", NC(threshold=0.2, scale="none")],
                   device="cpu", progress=False)
    assert sorted(run.table("coverage").criterion.unique()) == ["nc", "tknc"]
    two = coverage(model, train_data, test_data, layers=["relu3", "fc"], criteria=["kmnc", "nbc"],
                   options={"kmnc": {"k": 10}}, device="cpu", progress=False)
    assert sorted(two.table("coverage").layer.unique()) == ["all", "fc", "relu3"]


def test_surprise_layers_give_the_surprise_criteria_their_own_trace(model, train_data, test_data, tmp_path):
    cov = Coverage(["nc", "mdsc", "lsc"], layers=["conv1", "conv2"], surprise_layers=["conv3"],
                   class_source="label")
    cov.fit(model, train_data, device="cpu", progress=False)
    assert cov.layers == ["conv1", "conv2", "conv3"]
    assert cov.criteria["nc"].layers == [] and cov.criteria["mdsc"].layers == ["conv3"]
    run = _run(model, test_data, cov, out=tmp_path / "run")
    table = run.table("coverage")
    assert sorted(table[table.criterion == "nc"].layer) == ["all", "conv1", "conv2"]
    train_acts, train_y = _acts(model, train_data, ["conv3"])
    test_acts, test_y = _acts(model, test_data, ["conv3"])
    for name in ("mdsc", "lsc"):
        by_hand = criterion(name).fit(train_acts, train_y)
        by_hand.update(test_acts, test_y)
        assert table[table.criterion == name].value.item() == by_hand.value()
    assert unitscope.load_run(tmp_path / "run").analysis("coverage").config() == cov.config()


def test_module_type_selection_is_saved_by_name(model, test_data, tmp_path):
    cov = Coverage(["nc"], layers=torch.nn.Conv2d)
    _run(model, test_data, cov, out=tmp_path / "run")
    back = unitscope.load_run(tmp_path / "run").analysis("coverage")
    assert back.config()["layers"] == "Conv2d" and back.coverage_layers == "Conv2d"


def test_map_minmax_captures_whole_maps(model, test_data):
    cov = Coverage([NC(threshold=0.5, scale="map_minmax")], layers=["conv1", "conv2"])
    assert cov.reduce == "none"
    value = _run(model, test_data, cov).table("coverage").query("layer == 'all'").value.item()
    x = torch.stack([test_data[i][0] for i in range(len(test_data))])
    with unitscope.capture(model, ["conv1", "conv2"]) as maps, torch.no_grad():
        model(x)
    assert value == NC(threshold=0.5, scale="map_minmax").update(dict(maps))


def test_bad_input(model, train_data, test_data):
    known = "known criteria: cc, dsc, kmnc, lsc, mdsc, nbc, nc, snac, tknc, tknp"
    with pytest.raises(ValueError, match=known):
        Coverage(["nc", "neuron"])
    with pytest.raises(ValueError, match="options for unknown criteria"):
        Coverage(["nc"], options={"xyz": {}})
    with pytest.raises(ValueError, match="not among the criteria"):
        Coverage(["nc"], options={"kmnc": {"k": 2}})
    with pytest.raises(ValueError, match="given twice"):
        Coverage(["nc", NC(threshold=0.1)])
    with pytest.raises(ValueError, match="needs a profile of training data.*fit"):
        _run(model, test_data, Coverage(["kmnc"], layers=["fc"]))
    fitted = Coverage(["kmnc"], layers=["fc"]).fit(model, train_data, device="cpu", progress=False)
    fitted.layers = ["conv3"]
    with pytest.raises(ValueError, match=r"fitted on layers \['fc'\] but this pass gives it \['conv3'\]"):
        _run(model, test_data, fitted)
    with pytest.raises(ValueError, match="use reduce='mean'"):
        Coverage([NC(scale="map_minmax"), "tknc"], reduce="max")
    with pytest.raises(ValueError, match="class_source"):
        Coverage(["lsc"], class_source="truth")
    assert hook_counts(model) == 0


def _distributed_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = unitscope.load_model("digits-cnn")
        cov = Coverage(UNION, options=OPTIONS, class_source="label")
        train = unitscope.load_dataset("digits", "train")
        cov.fit(model, train, batch_size=100, device="cpu", progress=False)
        unitscope.analyze(model, unitscope.load_dataset("digits", "test"), analyses=[cov], batch_size=50,
                          device="cpu", progress=False, out=out)
    finally:
        dist.destroy_process_group()


UNION = [c for c in DEFAULT_CRITERIA if c != "cc"]


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_equal_one_process(model, train_data, test_data, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "run"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    two = unitscope.load_run(out).table("coverage")
    cov = Coverage(UNION, options=OPTIONS, class_source="label")
    cov.fit(model, train_data, batch_size=100, device="cpu", progress=False)
    one = _run(model, test_data, cov, batch_size=50).table("coverage")
    assert two.equals(one)
