"""Studies: Pielou and Pearson formulas, unit zeroing, and the four research-question functions."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch.utils.data import Subset

import unitscope
from unitscope.analyses import studies
from unitscope.stats.evenness import pearson, pielou
from unitscope.train import train

from .conftest import hook_counts

LAYERS = ["conv2", "conv3"]


@pytest.mark.parametrize(("preds", "kwargs", "expected"), [
    ([0, 0, 1, 1], {"num_classes": 2}, 1.0),
    ([0, 0, 1, 1], {"num_classes": 4}, 0.5),
    ([0, 0, 1, 1], {"richness": "observed"}, 1.0),
    ([0, 0, 0, 1], {"num_classes": 2}, 0.811278),
    ([3, 3, 3], {"richness": "observed"}, 0.0),
])
def test_pielou_spec_5_5(preds, kwargs, expected):
    assert pielou(torch.tensor(preds), **kwargs) == pytest.approx(expected, abs=1e-6)


def test_pielou_bad_input():
    with pytest.raises(ValueError, match="needs num_classes"):
        pielou([0, 1])
    with pytest.raises(ValueError, match="outside"):
        pielou([0, 5], num_classes=3)
    with pytest.raises(ValueError, match="richness="):
        pielou([0, 1], richness="all")


def test_pearson_matches_scipy_and_is_nan_when_undefined():
    from scipy.stats import pearsonr

    a, b = [0.1, 0.4, 0.35, 0.8, 0.5], [1.0, 0.7, 0.9, 0.2, 0.4]
    assert pearson(a, b) == pytest.approx(pearsonr(a, b)[0], abs=1e-12)
    with pytest.warns(UserWarning, match="fewer than 3"):
        assert math.isnan(pearson([1, 2], [2, 1]))
    with pytest.warns(UserWarning, match="constant"):
        assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.warns(UserWarning, match="constant"):  # its centred values are not 0 in floats
        assert math.isnan(pearson([0.1] * 3, [0, 1, 2]))
    assert math.copysign(1.0, pielou([3, 3, 3], 10)) == 1.0  # 0.0, not -0.0


def test_cw_needs_finite_distinct_bounds():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    for bounds in (None, (0.5, 0.5), (0.0, math.inf)):
        with pytest.raises(ValueError, match="needs finite bounds with low < high"):
            unitscope.attacks.cw(net, x, y, bounds=bounds)


def test_zeroed_masks_channels_and_restores_the_model(digits_model):
    digits_model.eval()
    x = torch.rand(3, 1, 8, 8)
    before = digits_model(x)
    from unitscope.capture import capture

    with studies.zeroed(digits_model, [("conv2", 3), ("conv2", 5), ("conv3", 0)]):
        with capture(digits_model, ["conv2", "conv3"], reduce="none") as acts:
            during = digits_model(x)
    assert acts["conv2"][:, [3, 5]].abs().sum() == 0 and acts["conv2"][:, 4].abs().sum() > 0
    assert acts["conv3"][:, 0].abs().sum() == 0
    assert not torch.equal(before, during)
    assert hook_counts(digits_model) == 0
    assert torch.equal(digits_model(x), before)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    tr = unitscope.load_dataset("digits", "train")
    train(model, tr, epochs=3, lr=5e-3, batch_size=32, seed=0, device="cpu")
    model.eval().zero_grad(set_to_none=True)
    test = Subset(unitscope.load_dataset("digits", "test"), list(range(80)))
    return model, Subset(tr, list(range(300))), test


def test_pruning_important_units_hurt_more_than_random(setup):
    model, tr, te = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    table = studies.pruning(model, tr, te, LAYERS, prune_m=[2], repeats=4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert hook_counts(model) == 0
    base = table[table["selection"] == "none"]["accuracy"].item()
    x, y = studies.stack(te)
    assert base == studies.accuracy(model, x, y)
    imp = table[table["selection"] == "important"]
    rnd = table[table["selection"] == "random"]
    assert len(imp) == 1 and len(rnd) == 4
    assert (table["accuracy_drop"] == base - table["accuracy"]).all()
    assert imp["accuracy_drop"].item() > rnd["accuracy_drop"].mean()
    with pytest.raises(ValueError, match="prune_m=0"):
        studies.pruning(model, tr, te, LAYERS, prune_m=[0])


def test_pruning_accuracies_equal_weight_surgery(setup):
    """Each row's accuracy, recomputed on a copy whose pruned channels have zero weights and bias."""
    import copy

    model, tr, te = setup
    table = studies.pruning(model, tr, te, LAYERS, prune_m=[3], repeats=2)
    x, y = studies.stack(te)
    for row in table[table["selection"] != "none"].itertuples():
        surgery = copy.deepcopy(model)
        modules = dict(surgery.named_modules())
        with torch.no_grad():
            for item in row.units.split():
                layer, unit = item.split(":")
                modules[layer].weight[int(unit)] = 0.0
                modules[layer].bias[int(unit)] = 0.0
            acc = float((surgery(x).argmax(1) == y).double().mean())
        assert row.accuracy == pytest.approx(acc, abs=1e-12), row.units


def test_relevant_pixels_and_noise(setup):
    model, tr, te = setup
    x, _ = studies.stack(te)
    mask = studies.relevant_pixels(model, x[:5], 0.1)
    assert mask.flatten(1).sum(1).tolist() == [6] * 5  # round(0.1 * 64)
    rel = unitscope.attribution.attribute(model, x[:5]).abs().flatten(1)
    inside, outside = rel[mask.flatten(1)].view(5, -1), rel[~mask.flatten(1)].view(5, -1)
    assert (inside.min(1).values >= outside.max(1).values).all()
    table = studies.noise(model, tr, te, LAYERS, std=0.5, fraction=0.1, repeats=2, k=2)
    clean = table[table["selection"] == "clean"]["coverage"].item()
    assert sorted(set(table["selection"])) == ["clean", "important", "random"]
    assert (table["coverage_change"] == table["coverage"] - clean).all()
    assert table["coverage"].between(0, 1).all()


def test_adversarial_mixing_by_hand(setup):
    model, tr, te = setup
    table = studies.adversarial(model, tr, te, LAYERS, attack="fgsm", eps=0.2, fractions=[0.05, 0.5], k=2)
    assert table["replaced"].tolist() == [4, 40]
    # redo the 50 % row by hand: the same seeded draws, the same meter
    meter = studies.CoverageMeter(model, tr, LAYERS, k=2)
    x, y = studies.stack(te)
    adv = unitscope.attacks.fgsm(model, x, y, 0.2)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:40]  # nested: one permutation
    mixed = x.clone()
    mixed[idx] = adv[idx]
    clean, cov = meter.value(*meter.acts(x)), meter.value(*meter.acts(mixed))
    row = table.iloc[1]
    assert row["coverage_clean"] == clean and row["coverage_mixed"] == cov
    assert row["normalised_change"] == pytest.approx(abs(cov - clean) / clean)


def test_attack_settings_reach_the_attacks_and_bad_ones_fail_before_any_fit(setup, monkeypatch):
    model, tr, te = setup
    x, y = studies.stack(te)
    x, y = x[:8], y[:8]
    bounds = (float(x.min()), float(x.max()))
    for seed in (0, 1):  # PGD: alpha eps/4 by default, the study's seed for the random start
        got = studies._attack_on_model_device(model, x, y, "pgd", 0.2, 8, seed=seed)
        want = unitscope.attacks.pgd(model, x, y, 0.2, alpha=0.05, steps=20, seed=seed, bounds=bounds)
        assert torch.equal(got, want)
    assert not torch.equal(got, studies._attack_on_model_device(model, x, y, "pgd", 0.2, 8, seed=0))
    table = studies.adversarial(model, tr, te, LAYERS, attack="cw", c=0.5, fractions=[0.1], k=2)
    assert table["c"].item() == 0.5 and math.isnan(table["eps"].item())

    def no_fit(*args, **kwargs):
        raise AssertionError("the meter was fitted before the settings were checked")

    monkeypatch.setattr(studies, "CoverageMeter", no_fit)
    for kwargs, message in (({"attack": "deepfool"}, "attack='deepfool': use one of fgsm, pgd, cw"),
                            ({"eps": "abc"}, "eps='abc': give a finite number >= 0"),
                            ({"attack": "cw", "c": 0}, "c=0: give a finite number > 0"),
                            ({"attack": "pgd", "steps": 0}, "steps=0: give a positive number"),
                            ({"fractions": [0.0]}, r"fractions \[0.0\]: choose fractions in \(0, 1\]")):
        with pytest.raises(ValueError, match=message):
            studies.adversarial(model, tr, te, LAYERS, **kwargs)
    with pytest.raises(ValueError, match="fraction <= 0.5; lower it or pass exclude_important=False"):
        studies.noise(model, tr, te, LAYERS, fraction=0.75)
    with pytest.raises(ValueError, match="richness='all'"):
        studies.impartiality(model, tr, te, LAYERS, richness="all")


def test_noise_baseline_can_draw_from_every_pixel(setup):
    model, tr, te = setup
    table = studies.noise(model, tr, te, LAYERS, fraction=0.75, repeats=1, exclude_important=False, k=2)
    assert sorted(set(table["selection"])) == ["clean", "important", "random"]


@pytest.mark.filterwarnings("ignore:pearson")  # k=2 coverage can be constant over the subsets
def test_impartiality_subsets_do_not_depend_on_the_other_sizes(setup):
    model, tr, te = setup
    one = studies.impartiality(model, tr, te, LAYERS, sizes=[10], repeats=2, eps=0.2, k=2)
    two = studies.impartiality(model, tr, te, LAYERS, sizes=[10, 40], repeats=2, eps=0.2, k=2)
    cols = ["kind", "size", "repeat", "coverage", "evenness", "accuracy"]
    same = two[two["size"] == 10][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(one[cols].reset_index(drop=True), same)


def test_a_classic_criterion_as_the_meter(setup):
    model, tr, te = setup
    try:
        from unitscope.coverage.neuron import NC
    except ImportError:
        pytest.skip("the classic criteria (unitscope.coverage.neuron) are not installed")
    meter = studies.CoverageMeter(model, tr, LAYERS, criterion="nc", threshold=0.5)
    x, _ = studies.stack(te)
    acts, preds = meter.acts(x)
    direct = NC(threshold=0.5)
    direct.update(acts)
    assert meter.value(acts, preds) == direct.value()
    table = studies.adversarial(model, tr, te, LAYERS, eps=0.2, fractions=[0.1], criterion="nc")
    assert table["coverage_clean"].item() == pytest.approx(NC().update(acts))


def test_impartiality_columns_are_what_they_say(setup):
    model, tr, te = setup
    table = studies.impartiality(model, tr, te, LAYERS, sizes=[10, 40], repeats=2, eps=0.2, m=4, k=3)
    assert len(table) == 2 * 2 * 2
    assert table["coverage"].nunique() > 1
    r = pearson(table["coverage"].tolist(), table["evenness"].tolist())
    assert (table["pearson_r"] == r).all() and -1 <= r <= 1
    assert table["evenness"].between(0, 1).all()
    clean = table[table["kind"] == "clean"]["accuracy"].mean()
    adv = table[table["kind"] == "adversarial"]["accuracy"].mean()
    assert adv < clean
    with pytest.raises(ValueError, match="do not fit a test set of 80"):
        studies.impartiality(model, tr, te, LAYERS, sizes=[81], k=2)
    fig = studies.plot_study(table)
    assert fig.axes


def test_family_experiment_types_and_report_sections(tmp_path, setup):
    from unitscope.analyses.importance import idc
    from unitscope.experiments import KEYS, run_config
    from unitscope.families import coverage as family
    from unitscope.report import write_report
    from unitscope.results import Run

    assert {"idc", "attribution", "coverage-study"} <= set(KEYS)
    model, tr, te = setup
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    config = tmp_path / "attr.toml"
    config.write_text(f'experiment = "attribution"\nmodel = "digits-cnn"\nweights = "{weights}"\n'
                      'dataset = "digits"\nn = 4\n')
    ((run_dir, status),) = run_config(config, out=tmp_path / "runs", progress=False)
    assert status == "done"
    page = write_report(run_dir).read_text()
    assert "id='attribution'" in page and page.count("data:image/png") == 1
    tables = idc(model, tr, te, LAYERS, m=2, k=2, n_init=2)
    table, arrays = family.attribution_tables(model, te, n=3)
    assert table["target"].tolist() == table["pred"].tolist()
    run = Run([], {"status": "complete", "versions": {}, "created": "now"},
              {**tables, "attribution": table}, {"attribution": arrays})
    page = write_report(run.save(tmp_path / "run")).read_text()
    assert "id='idc'" in page and "id='attribution'" in page
    assert page.count("data:image/png") == 3  # IDC per layer, important units, heatmaps
    assert family.default_layers(model) == ["conv1", "conv2", "conv3"]


def test_coverage_experiment_type_when_the_criteria_exist(tmp_path):
    from unitscope.experiments import run_config
    from unitscope.families import coverage as family
    from unitscope.report import write_report
    from unitscope.results import load_run

    if not family.HAS_CRITERIA:
        pytest.skip("unitscope.analyses.coverage (the ten criteria) is not installed")
    config = tmp_path / "cov.toml"
    config.write_text('experiment = "coverage"\nmodel = "digits-cnn"\ndataset = "digits"\n'
                      'criteria = ["nc", "tknc"]\nlayers = ["conv2", "conv3"]\n')
    ((run_dir, _),) = run_config(config, out=tmp_path / "runs", progress=False)
    table = load_run(run_dir).table("coverage")
    assert set(table["criterion"]) == {"nc", "tknc"}
    assert "id='coverage'" in write_report(run_dir).read_text()
