"""Sensitivity of units to augmentations: known answers on built units, shards, design bookkeeping."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import unitscope
from unitscope.analyses.sensitivity import (
    Sensitivity,
    design_images,
    lda_signature,
    sensitivity,
    variable_correlation,
)
from unitscope.stats.sobol import saltelli_sample


class Unit(nn.Module):
    """A 'layer' whose output is a fixed function of the image."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.dummy = nn.Parameter(torch.zeros(()))  # so the model has a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def unit_model(fn) -> nn.Module:
    return nn.Sequential(OrderedDict(unit=Unit(fn)))


@pytest.fixture(scope="module")
def shapes() -> torch.Tensor:
    data = unitscope.load_dataset("shapes", "test", n=16, size=32)
    return torch.stack([data[i][0] for i in range(len(data))])


def test_brightness_unit_is_sensitive_to_brightness_only(shapes):
    images = [shapes[0] * 0.39]  # one fixed image, dark enough that a factor of 2.5 cannot clip
    model = unit_model(lambda x: x.mean((1, 2, 3))[:, None])
    run = sensitivity(model, images, ["brightness", "hflip", "roll"], n=256, layers="unit", bootstrap=20,
                      batch_size=200)
    t = run.table("sensitivity").set_index("variable")
    assert t.loc["brightness", "S1"] == pytest.approx(1.0, abs=0.02)
    assert t.loc["brightness", "ST"] == pytest.approx(1.0, abs=0.02)
    for var in ("hflip", "roll", "image"):
        assert abs(t.loc[var, "S1"]) < 1e-6 and abs(t.loc[var, "ST"]) < 1e-6
    assert 0 < t.loc["brightness", "ST_conf"] < 0.2
    layers = run.table("sensitivity_layers").set_index("variable")
    assert layers.loc["brightness", "dominant_fraction"] == 1.0


def test_image_unit_is_sensitive_to_the_image_only(shapes):
    model = unit_model(lambda x: x[:, :, 5:20, 5:20].mean((1, 2, 3))[:, None])
    run = sensitivity(model, list(shapes), ["hflip"], n=128, layers="unit", bootstrap=0)
    t = run.table("sensitivity").set_index("variable")
    assert t.loc["image", "S1"] == pytest.approx(1.0, abs=0.1)
    assert t.loc["image", "ST"] == pytest.approx(1.0, abs=0.05)
    # with the image fixed per base sample, flipping a centred window changes little but not nothing
    assert t.loc["hflip", "ST"] < t.loc["image", "ST"]


def test_paired_rows_see_the_same_image():
    design = saltelli_sample(3, 64, seed=0)
    groups = [[0], [1], [2]]  # the last group is the image column
    rows = design.rows(groups)
    ids = design_images(rows[..., -1], 1000)
    for j in (1, 2):  # AB rows of the augmentation groups keep A's image
        assert torch.equal(ids[:, j], ids[:, 0])
    assert torch.equal(ids[:, 3], ids[:, -1])  # AB_image takes B's image
    assert (ids[:, 0] != ids[:, -1]).float().mean() > 0.9


def test_pass_records_tf32_and_leaves_cpu_settings_alone(shapes):
    """TF32 is switched off for CUDA passes only (on a GPU in TF32, Sobol' indices of two ranks
    differed from one process by 0.009; tests/test_sensitivity's two-rank test checks it there)."""
    before = torch.backends.cudnn.allow_tf32
    for allowed in (False, True):
        run = sensitivity(unit_model(lambda x: x.mean((1, 2, 3))[:, None]), list(shapes[:4]), ["brightness"],
                          n=4, layers="unit", bootstrap=0, tf32=allowed, device="cpu")
        assert run.manifest["tf32"] is allowed
    assert torch.backends.cudnn.allow_tf32 == before


def test_constant_unit_gives_nan_and_flag(shapes):
    model = unit_model(lambda x: torch.stack([torch.zeros(len(x), device=x.device), x.mean((1, 2, 3))], 1))
    run = sensitivity(model, list(shapes[:4]), ["brightness"], n=32, layers="unit", bootstrap=4)
    t = run.table("sensitivity")
    dead = t[t.unit == 0]
    assert dead["constant"].all() and dead["S1"].isna().all() and dead["ST_conf"].isna().all()
    assert t[t.unit == 1]["S1"].notna().all() and not t[t.unit == 1]["constant"].any()


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return unitscope.load_model("shapes-cnn").eval()


@pytest.fixture(scope="module")
def shapes64():
    return unitscope.load_dataset("shapes", "test", n=32)


def _tables_close(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        if a[col].dtype.kind == "f":
            rtol = 1e-5 if col.endswith("_conf") else 1e-9  # half-widths: float32 replicate sums per batch
            np.testing.assert_allclose(a[col], b[col], rtol=rtol, atol=1e-12, equal_nan=True)
        else:
            assert (a[col].to_numpy() == b[col].to_numpy()).all()


def test_shards_merged_equal_one_pass_and_batch_size_does_not_matter(cnn, shapes64):
    kw = dict(variables=["hue", "brightness", "rotation"], n=16, layers=["relu3", "fc"], bootstrap=8,
              second_order=True, device="cpu")
    one = sensitivity(cnn, shapes64, batch_size=64, **kw)
    other = sensitivity(cnn, shapes64, batch_size=20, **kw)
    parts = [sensitivity(cnn, shapes64, batch_size=64, shard=(i, 3), **kw) for i in range(3)]
    merged = parts[2].analysis("sensitivity").merge(parts[0].analysis("sensitivity"))
    merged.merge(parts[1].analysis("sensitivity"))
    ref = one.analysis("sensitivity").tables()
    for name, table in merged.tables().items():
        _tables_close(ref[name], table)
        _tables_close(ref[name], other.analysis("sensitivity").tables()[name])
    assert set(ref) == {"sensitivity", "sensitivity_layers", "sensitivity_correlation", "sensitivity_s2"}
    assert list(ref["sensitivity"].columns) == ["layer", "unit", "variable", "S1", "ST", "S1_conf",
                                                "ST_conf", "constant"]
    assert len(ref["sensitivity"]) == (64 + 4) * 4


def test_a_sensitivity_analysis_serves_one_run_and_a_float64_model_works(cnn, shapes64):
    import copy

    from unitscope.analyses.sensitivity import Sensitivity

    kw = dict(layers=["fc"], bootstrap=4, device="cpu")
    a = Sensitivity(["hue", "brightness"], n=8, layers=["fc"], bootstrap=4)
    first = sensitivity(cnn, shapes64, analysis=a, **kw)
    with pytest.raises(ValueError, match="already went through a sensitivity"):  # would fold twice
        sensitivity(cnn, shapes64, analysis=a, **kw)
    wide = sensitivity(copy.deepcopy(cnn).double(), shapes64, ["hue", "brightness"], n=8, **kw)
    for col in ("S1", "ST"):  # the same indices up to float32 rounding of the model's outputs
        np.testing.assert_allclose(first.table("sensitivity")[col], wide.table("sensitivity")[col], atol=1e-3,
                                   equal_nan=True)


def test_saved_shards_merge_offline(cnn, shapes64, tmp_path):
    from unitscope.results import merge_runs

    kw = dict(variables=["brightness", "hflip"], n=8, layers="relu4", bootstrap=4, device="cpu")
    one = sensitivity(cnn, shapes64, **kw)
    paths = [sensitivity(cnn, shapes64, shard=(i, 2), **kw).save(tmp_path / f"s{i}") for i in range(2)]
    merged = merge_runs(paths)
    _tables_close(one.table("sensitivity"), merged.table("sensitivity"))
    with pytest.raises(Exception, match="leaves items|missing"):
        merge_runs(paths[:1])


def test_run_saves_and_loads_back(cnn, shapes64, tmp_path):
    run = sensitivity(cnn, shapes64, ["brightness", "hflip"], n=8, layers="relu4", bootstrap=0)
    back = unitscope.load_run(run.save(tmp_path / "run"))
    _tables_close(run.table("sensitivity"), back.table("sensitivity"))
    _tables_close(run.table("sensitivity"), back.analysis("sensitivity").tables()["sensitivity"])


def test_map_mode_gives_maps_and_per_channel_aggregates(cnn, shapes64):
    run = sensitivity(cnn, shapes64, ["brightness", "hue"], n=8, layers="relu4", reduce="map", bootstrap=0)
    maps = run.arrays["sensitivity"]
    assert maps["relu4/S1"].shape == (3, 64, 8, 8)
    acc = run.analysis("sensitivity").accumulators["relu4"]
    per = acc.compute()
    v1 = torch.nan_to_num(per.V1).sum((-2, -1))
    expected = v1 / per.V.sum((-2, -1))
    t = run.table("sensitivity")
    got = torch.tensor(t.pivot(index="variable", columns="unit", values="S1").loc[
        ["brightness", "hue", "image"]].to_numpy())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_bad_input_is_refused(cnn, shapes64):
    with pytest.raises(TypeError, match="own design"):
        unitscope.analyze(cnn, shapes64, layers="fc", analyses=[Sensitivity(["hue"])], progress=False)
    digits = unitscope.load_dataset("digits", "test")
    with pytest.raises(ValueError, match="need RGB"):
        sensitivity(unitscope.load_model("digits-cnn"), digits, ["hue"], n=4, layers="fc")
    with pytest.raises(ValueError, match="reduce"):
        Sensitivity(["hue"], reduce="median")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sensitivity(cnn, [torch.full((3, 64, 64), 3.0)], ["brightness"], n=4, layers="fc")
    with pytest.warns(UserWarning, match="power of two"):
        sensitivity(cnn, shapes64, ["brightness"], n=6, layers="fc", bootstrap=0)


def test_lda_separates_template_maps_and_not_noise():
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(4, 1, 36, generator=g)
    maps = templates + 0.05 * torch.randn(4, 30, 36, generator=g)
    acc, conf = lda_signature(maps, n_repeats=2)
    assert acc > 0.95 and conf.shape == (4, 4)
    np.testing.assert_allclose(conf.sum(1), 1.0)
    noise, _ = lda_signature(torch.randn(4, 30, 36, generator=g), n_repeats=4)
    assert abs(noise - 0.25) < 0.15


def test_variable_correlation_of_profiles():
    st_a = np.arange(10.0)
    table = pd.DataFrame({"layer": "l", "unit": np.repeat(np.arange(10), 3),
                          "variable": np.tile(["a", "b", "c"], 10),
                          "ST": np.stack([st_a, st_a ** 2, -st_a], 1).reshape(-1), "constant": False})
    corr = variable_correlation(table).set_index(["variable_a", "variable_b"])["spearman"]
    assert corr[("a", "b")] == pytest.approx(1.0) and corr[("a", "c")] == pytest.approx(-1.0)


# --------------------------------------------------------------------------- guided masking
def _fake_table(layers: dict[str, int], variables=("a", "b")) -> pd.DataFrame:
    rows = []
    for layer, units in layers.items():
        for u in range(units):
            for i, v in enumerate(variables):
                rows.append((layer, u, v, 0.0, float((u * (i + 1)) % units), 0.0, 0.0, False))
    return pd.DataFrame(rows, columns=["layer", "unit", "variable", "S1", "ST", "S1_conf", "ST_conf",
                                       "constant"])


def test_masking_hooks_and_identity_cases(cnn, shapes64):
    from unitscope.analyses.masking import guided_masking, masked

    from .conftest import hook_counts

    x = torch.stack([shapes64[i][0] for i in range(8)])
    with torch.inference_mode():
        ref = cnn(x)
        with masked(cnn, {"relu3": torch.ones(64)}):
            same = cnn(x)
        with masked(cnn, {"relu3": torch.zeros(64)}):
            off = cnn(x)
    assert torch.equal(ref, same) and not torch.equal(ref, off)
    # with relu3 silenced nothing reaches relu4: the output is the batch-norm/bias path only
    assert torch.allclose(off, off[:1].expand_as(off))
    assert hook_counts(cnn) == 0
    from unitscope.capture import LayerError

    bad = (({"relu3": [64]}, ValueError, r"units \[64\] of layer 'relu3' are out of range"),
           ({"relu3": torch.ones(63)}, ValueError, "63 factors for its 64 units"),
           ({"relu33": [0]}, LayerError, "relu3"), ({"relu*": [0]}, LayerError, "exact layer names"))
    for masks, error, message in bad:
        with pytest.raises(error, match=message), torch.inference_mode(), masked(cnn, masks):
            cnn(x)
    assert hook_counts(cnn) == 0
    table = _fake_table({"relu3": 64, "relu4": 64, "fc": 4})
    kept = guided_masking(cnn, shapes64, table, fraction=0.25, alpha=1.0, samples=16, random_repeats=2,
                          augment=["hflip", ("brightness", (0.5, 1.5))])
    assert (kept["agreement"] == 1.0).all() and (kept["accuracy"] == kept["accuracy_intact"]).all()
    assert set(kept["inputs"]) == {"original", "brightness", "hflip"}
    # the intact model on flipped images: its own accuracy, computed directly
    x = torch.stack([shapes64[i][0] for i in range(32)])
    y = torch.tensor([shapes64[i][1] for i in range(32)])
    sub = torch.randperm(32, generator=torch.Generator().manual_seed(0))[:16].sort().values
    with torch.inference_mode():
        flipped_acc = (cnn(x[sub].flip(-1)).argmax(1) == y[sub]).float().mean().item()
    assert kept[kept["inputs"] == "hflip"]["accuracy_intact"].iloc[0] == pytest.approx(flipped_acc)
    assert set(kept["layer"]) == {"all"} and kept["units_masked"].iloc[0] == 32  # fc (output) left out
    out = guided_masking(cnn, shapes64, table, fraction=1.0, samples=16, per_layer=True, random_repeats=1)
    # masking every unit of a layer is the same whichever units are "sensitive"
    for layer, rows in out.groupby("layer"):
        assert rows["agreement"].nunique() == 1, layer
    with pytest.raises(ValueError, match="fraction"):
        guided_masking(cnn, shapes64, table, fraction=0.0)


def test_single_class_picks_the_most_sensitive_classes(cnn, shapes64):
    from unitscope.analyses.masking import single_class

    table = _fake_table({"fc": 4})
    out = single_class(cnn, shapes64, table, layer="fc", top=1, samples=32).set_index("variable")
    assert out.loc["a", "classes"] == "3" and out.loc["b", "classes"] == "1"  # ST = u·(i+1) mod 4
    x = torch.stack([shapes64[i][0] for i in range(32)])
    with torch.inference_mode():
        pred = cnn(x).argmax(1)
    assert out.loc["a", "jaccard"] == pytest.approx(float((pred == 3).float().mean()))


# --------------------------------------------------------------------------- the family
CONFIG = ('experiment = "sensitivity"\nmodel = "shapes-cnn"\ndataset = "shapes"\n'
          'dataset_options = {n = 16}\nvariables = ["brightness=0.5:1.5", "hue"]\nn = 8\n'
          'layers = ["relu4", "fc"]\nbootstrap = 4\nreduce = "map"\nlda_repeats = 1\nmasking = true\n'
          'mask_augment = true\n'
          'mask_samples = 16\ncontrast = true\ncontrast_images = 8\nshapley = true\n'
          'shapley_permutations = 2\nshapley_outer = 2\nshapley_inner = 2\n'
          'hsv_segment = ["conv1", "bn1", "relu1"]\n')


def _run_config(tmp_path):
    from unitscope.experiments import run_config

    cfg = tmp_path / "sens.toml"
    cfg.write_text(CONFIG)
    [(target, status)] = run_config(cfg, out=tmp_path / "runs", progress=False)
    assert status == "done"
    return target


def test_config_run(tmp_path):
    from unitscope.experiments import ConfigError, run_config
    from unitscope.families.sensitivity import parse_variables

    assert parse_variables(["hue", "brightness=0.5:1.5", "roll.dx=-0.1:0.1", "roll.dy=0:0.1"]) == [
        ("hue", None), ("brightness", (0.5, 1.5)), ("roll", {"dx": (-0.1, 0.1), "dy": (0.0, 0.1)})]
    run = unitscope.load_run(_run_config(tmp_path))
    assert {"sensitivity", "sensitivity_layers", "sensitivity_lda", "sensitivity_masking",
            "sensitivity_contrast", "sensitivity_shapley", "sensitivity_hsv", "sensitivity_hsv_compare",
            "sensitivity_single_class"} <= set(run.tables)
    assert run.table("sensitivity_single_class")["classes"].str.len().min() >= 1
    assert set(run.table("sensitivity_masking")["inputs"]) == {"original", "brightness", "hue"}
    assert run.analysis("sensitivity").config()["variables"][0] == ["brightness", {"factor": [0.5, 1.5]}]
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.replace('"hue"]', '"hue=0:2"]'))
    with pytest.raises(ConfigError, match="valid domain"):
        run_config(bad, out=tmp_path / "runs", progress=False)


@pytest.mark.slow
def test_report_section(tmp_path):
    from unitscope.report import write_report

    html = write_report(_run_config(tmp_path)).read_text()
    assert "id='sensitivity'" in html and html.count("<img") >= 4


# --------------------------------------------------------------------------- contrast and Shapley on models
def test_contrast_of_invariant_and_monotone_augmentations(shapes):
    from unitscope.analyses.sensitivity import contrast

    model = unit_model(lambda x: x.amax((1, 2, 3))[:, None])  # invariant to flips and rolls, exactly
    images = list(shapes[:8] * 0.39)
    t = contrast(model, images, [("brightness", (1.5, 2.5)), "hflip", "roll"], "unit", images=8, draws=3)
    t = t.set_index("variable")
    for var in ("hflip", "roll"):
        assert t.loc[var, "rank_biserial"] == 0.0 and t.loc[var, "p_value"] == 1.0
    assert t.loc["brightness", "rank_biserial"] == 1.0 and t.loc["brightness", "pairs"] == 24
    assert t.loc["hflip", "pairs"] == 8  # on/off augmentations are applied once, switched on
    assert t.loc["brightness", "q_value"] == pytest.approx(t.loc["brightness", "p_value"] * 3)


def test_shapley_of_a_brightness_unit(shapes):
    from unitscope.analyses.sensitivity import shapley

    model = unit_model(lambda x: torch.stack([x.mean((1, 2, 3)), x[:, 0, 0, 0]], 1))
    t = shapley(model, [shapes[0] * 0.39], ["brightness", "hflip"], "unit", n_outer=256, n_inner=4)
    first = t[t.unit == 0].set_index("variable")["shapley"]
    assert first["brightness"] == pytest.approx(1.0, abs=0.05)
    assert abs(first["hflip"]) < 0.05 and abs(first["image"]) < 0.05
    assert t.groupby("unit")["shapley"].sum().to_numpy() == pytest.approx([1.0, 1.0])


# --------------------------------------------------------------------------- HSV single-channel segments
def test_hsv_segments_value_plane_ignores_hue_and_hue_plane_ignores_brightness(shapes):
    from unitscope.analyses.sensitivity import PlaneSegment, hsv_segments
    from unitscope.augment import rgb_to_hsv

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    images = list(shapes[:8] * 0.39)
    x = torch.stack(images[:2])
    seg = PlaneSegment(net, ["0", "1"], plane=2, in_channels=3)
    with torch.no_grad():
        ref = net[1](net[0](rgb_to_hsv(x)[:, 2:3].expand(-1, 3, -1, -1)))
        torch.testing.assert_close(seg(x), ref)
    table, cmp = hsv_segments(net, images, [("brightness", (0.5, 2.5)), "hue"], ["0", "1"], n=16)
    t = table.set_index(["plane", "variable"])
    assert (t.loc[("value", "hue"), "ST"].abs() < 1e-9).all()  # V = max(R, G, B) survives a hue turn
    assert (t.loc[("hue", "brightness"), "ST"].abs() < 1e-4).all()  # H is a ratio: scaling keeps it
    assert set(table["plane"]) == {"intact", "hue", "saturation", "value"}
    assert list(cmp.columns) == ["plane", "unit", "spearman", "mean_abs_diff"] and len(cmp) == 3 * 4
    with pytest.raises(ValueError, match="in_channels"):
        hsv_segments(net, images, ["hue"], ["1"], n=4)


def test_minmax_renormalisation_cancels_brightness(shapes):
    """The seed rescaled each channel to [0, 1] after augmenting (defect D2): without clipping, that
    undoes a brightness factor exactly, so a unit behind it shows no brightness sensitivity."""
    def renormalised_mean(x):
        lo = x.amin((2, 3), keepdim=True)
        hi = x.amax((2, 3), keepdim=True)
        return ((x - lo) / (hi - lo + 1e-6)).mean((1, 2, 3))[:, None]
    images = list(shapes[:8] * 0.39)
    plain = sensitivity(unit_model(lambda x: x.mean((1, 2, 3))[:, None]), images, ["brightness", "hflip"],
                        n=64, layers="unit", bootstrap=0).table("sensitivity").set_index("variable")
    renorm = sensitivity(unit_model(renormalised_mean), images, ["brightness", "hflip"], n=64, layers="unit",
                         bootstrap=0).table("sensitivity").set_index("variable")
    assert plain.loc["brightness", "ST"] > 0.5
    assert abs(renorm.loc["brightness", "ST"]) < 1e-3  # what is left is the eps term
    assert renorm.loc["image", "ST"] > 0.99


@pytest.mark.slow
def test_demo_part_on_shapes(cnn, tmp_path):
    from unitscope.demo import DemoContext
    from unitscope.families.sensitivity import demo

    data = unitscope.load_dataset("shapes", "test", n=64)
    run = unitscope.analyze(cnn, data, layers="fc", progress=False)
    ctx = DemoContext(name="shapes-cnn", model=cnn, dataset="shapes", train_data=None, test_data=data,
                      run=run, out=tmp_path, quick=True, progress=False)
    demo(ctx)
    factors = run.tables["sensitivity_factors"]
    assert {"layer", "unit", "hue_r2", "ST_hue"} <= set(factors.columns) and len(factors) == 128
    assert (factors["hue_r2"].between(0, 1) | factors["hue_r2"].isna()).all()  # NaN: a dead unit
    assert {"sensitivity", "sensitivity_layers", "sensitivity_masking",
            "sensitivity_single_class"} <= set(run.tables)
    ctx.name = "digits-cnn"
    before = set(run.tables)
    demo(ctx)  # only shapes-cnn has a sensitivity part
    assert set(run.tables) == before


def _dist_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = unitscope.load_model("shapes-cnn").eval()
        data = unitscope.load_dataset("shapes", "test", n=32)
        run = sensitivity(model, data, ["hue", "brightness"], n=16, layers=["relu4", "fc"], bootstrap=8)
        if rank == 0:
            run.save(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, shapes64):
    import torch.multiprocessing as mp

    out = tmp_path / "run"
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    two = unitscope.load_run(out)
    assert two.manifest["world_size"] == 2 and two.manifest["data"]["range"] == [0, 16]
    torch.manual_seed(0)
    model = unitscope.load_model("shapes-cnn").eval()
    one = sensitivity(model, shapes64, ["hue", "brightness"], n=16, layers=["relu4", "fc"], bootstrap=8)
    _tables_close(one.table("sensitivity"), two.table("sensitivity"))


def test_hue_unit_is_sensitive_to_hue_not_brightness(shapes):
    """A unit reading the saturation-weighted hue direction (cos 2πH · S) follows the hue variable;
    brightness without clipping keeps H and S, so it does not move the unit."""
    from unitscope.augment import rgb_to_hsv

    def hue_unit(x):
        hsv = rgb_to_hsv(x)
        return (torch.cos(2 * torch.pi * hsv[:, 0]) * hsv[:, 1]).mean((1, 2))[:, None]
    images = [shapes[0] * 0.39]
    run = sensitivity(unit_model(hue_unit), images, [("brightness", (0.5, 2.5)), "hue", "hflip"], n=128,
                      layers="unit", bootstrap=0)
    t = run.table("sensitivity").set_index("variable")
    assert t.loc["hue", "ST"] == pytest.approx(1.0, abs=0.02) and t.loc["hue", "S1"] > 0.95
    assert abs(t.loc["brightness", "ST"]) < 1e-4 and abs(t.loc["hflip", "ST"]) < 1e-6


def test_normalised_data_is_refused_with_the_fix():
    from unitscope.augment import AugmentError

    x = torch.rand(8, 3, 8, 8) * 4 - 2  # e.g. ImageNet-normalised images
    data = unitscope.ArrayDataset(x, torch.zeros(8, dtype=torch.long))
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 2, 3), relu=nn.ReLU()))
    with pytest.raises(AugmentError, match="put the normalisation inside the model"):
        sensitivity(net, data, ["brightness"], n=4, layers=["relu"], bootstrap=0)


def test_an_interrupted_sensitivity_pass_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import unitscope.analyses.sensitivity as sensitivity_module

    model = unitscope.load_model("digits-cnn")
    data = unitscope.load_dataset("digits", "test")
    ckpt = tmp_path / "s.safetensors"
    kwargs = {"n": 16, "layers": "conv3", "bootstrap": 0, "batch_size": 16, "checkpoint": ckpt}
    augmented, calls = sensitivity_module._augmented, {"n": 0}

    def stop_at_the_fourth_chunk(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return augmented(*args, **kw)

    monkeypatch.setattr(sensitivity_module, "_augmented", stop_at_the_fourth_chunk)
    with pytest.raises(KeyboardInterrupt):
        sensitivity_module.sensitivity(model, data, ["brightness", "hflip"], **kwargs)
    assert ckpt.is_file()
    calls["n"] = -1000  # no more interruptions; count the chunks of the rerun
    resumed = sensitivity_module.sensitivity(model, data, ["brightness", "hflip"], **kwargs)
    # 3 variables -> 5 design rows per base sample, 16 rows per forward -> chunks of 3 base samples:
    # 6 chunks for 16, the first 3 were kept, so the rerun evaluates 3
    assert calls["n"] == -1000 + 3
    whole = sensitivity_module.sensitivity(model, data, ["brightness", "hflip"],
                                           **{**kwargs, "checkpoint": None})
    pd.testing.assert_frame_equal(resumed.table("sensitivity"), whole.table("sensitivity"))
