"""TopK analysis: the brightest-window unit, agreement with a full argsort, exact shard merging."""

from __future__ import annotations

from collections import OrderedDict

import pandas as pd
import pytest
import torch
from torch import nn

import unitscope
from unitscope.analyses.topk import TopK, parse_unit, score_with_location, unit_topk
from unitscope.data import ArrayDataset
from unitscope.results import merge_runs

from .toy_models import B, window_sum_model


def random_images(n: int = 23, side: int = 16, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, side, side, generator=g)
    return ArrayDataset(x, torch.zeros(n, dtype=torch.int64))


def test_topk_of_window_sum_unit_are_the_brightest_windows():
    data = random_images()
    model = window_sum_model()
    run = unitscope.analyze(model, data, layers="conv", analyses=[TopK(k=4)], batch_size=5,
                            progress=False)
    table = unit_topk(run.table("topk"), "conv", 0)
    sums = nn.functional.avg_pool2d(data.x.double(), B, stride=1) * B * B  # (N, 1, h, w)
    best = sums.flatten(1).max(1)
    order = torch.argsort(best.values, descending=True)[:4]
    assert table["index"].tolist() == order.tolist()
    assert table["value"].to_numpy() == pytest.approx(best.values[order].numpy(), rel=1e-6)
    w = sums.shape[-1]
    loc = best.indices[order]
    assert table["y"].tolist() == (loc // w).tolist()
    assert table["x"].tolist() == (loc % w).tolist()
    # the brightest window of the top image, read back at (y, x), is the score
    i, y, x = int(table["index"][0]), int(table["y"][0]), int(table["x"][0])
    assert float(data.x[i, 0, y:y + B, x:x + B].sum()) == pytest.approx(table["value"][0], rel=1e-6)


def test_topk_equals_full_argsort_with_ties_broken_by_index():
    # constant unit: every input ties, so the top-k are the k smallest indices
    data = random_images(n=11)
    run = unitscope.analyze(window_sum_model(), data, layers="conv", analyses=[TopK(k=3)], batch_size=4,
                            progress=False)
    const = unit_topk(run.table("topk"), "conv", 1)
    assert const["index"].tolist() == [0, 1, 2]
    assert const["value"].tolist() == [1.0, 1.0, 1.0]
    assert const["y"].tolist() == [0, 0, 0] and const["x"].tolist() == [0, 0, 0]


def test_topk_mean_score_and_linear_layer():
    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    data = unitscope.load_dataset("digits", "test")
    run = unitscope.analyze(model, data, layers=["relu2", "fc"], analyses=[TopK(k=5, reduce="mean")],
                            batch_size=64, progress=False)
    t = run.table("topk")
    x = torch.stack([data[i][0] for i in range(len(data))])
    with unitscope.capture(model, ["relu2", "fc"]) as acts:
        model(x)
    for layer, scores in (("relu2", acts["relu2"].double().mean((2, 3))), ("fc", acts["fc"].double())):
        for unit in (0, 3):
            rows = unit_topk(t, layer, unit)
            ref = torch.sort(scores[:, unit], descending=True, stable=True)
            assert rows["value"].to_numpy() == pytest.approx(ref.values[:5].numpy(), rel=1e-6)
            assert rows["index"].tolist() == ref.indices[:5].tolist()
    assert set(t[t.layer == "fc"]["y"]) == {-1}


def test_topk_two_shards_merged_equal_one_pass(tmp_path):
    torch.manual_seed(1)
    model = unitscope.load_model("digits-cnn")
    data = unitscope.load_dataset("digits", "test")
    kwargs = {"layers": ["relu1", "relu3"], "batch_size": 50, "progress": False}
    whole = unitscope.analyze(model, data, analyses=[TopK(k=7)], **kwargs).table("topk")
    paths = []
    for i in range(2):
        part = unitscope.analyze(model, data, analyses=[TopK(k=7)], shard=(i, 2), **kwargs)
        paths.append(part.save(tmp_path / f"shard{i}"))
    merged = merge_runs(paths).table("topk")
    pd.testing.assert_frame_equal(merged, whole)
    # the shards alone differ from the whole (the test can fail)
    assert not unitscope.load_run(paths[0]).table("topk").equals(whole)
    from unitscope.analyses.mosaics import render_mosaics

    with pytest.raises(ValueError, match="records no model or dataset"):
        render_mosaics(paths[0], ["relu1:0"])
    plain = unitscope.analyze(model, data, layers="fc", progress=False).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="has no topk table"):
        render_mosaics(plain, ["fc:0"])


def test_score_with_location_first_maximum_and_shapes():
    t = torch.zeros(2, 3, 4, 5)
    t[0, 1, 2, 3] = 7.0
    t[0, 1, 3, 4] = 7.0  # tie: the first in row-major order wins
    out = score_with_location(t)
    assert out.shape == (2, 3, 3)
    assert out[0, 1].tolist() == [7.0, 2.0, 3.0]
    assert out[1, 0].tolist() == [0.0, 0.0, 0.0]
    assert score_with_location(t, "mean")[0, 1, 0] == pytest.approx(14.0 / 20)


def test_bad_input():
    with pytest.raises(ValueError, match="positive integer"):
        TopK(k=0)
    with pytest.raises(ValueError, match="'max'"):
        TopK(reduce="median")
    with pytest.raises(ValueError, match="layer:channel"):
        parse_unit("features.6")
    table = pd.DataFrame({"layer": ["a"], "unit": [0], "rank": [0], "index": [0], "value": [1.0],
                          "y": [0], "x": [0]})
    with pytest.raises(KeyError, match="no layer 'b'"):
        unit_topk(table, "b", 0)
    with pytest.raises(KeyError, match="units 0..0"):
        unit_topk(table, "a", 3)


def test_k_larger_than_dataset_gives_short_lists_and_a_warning(caplog):
    data = random_images(n=3)
    with caplog.at_level("WARNING"):
        run = unitscope.analyze(window_sum_model(), data, layers="conv", analyses=[TopK(k=5)],
                                progress=False)
    assert len(unit_topk(run.table("topk"), "conv", 0)) == 3
    assert "fewer than k=5" in caplog.text


def test_config_round_trip():
    a = TopK(k=4, reduce="mean", layers=["relu1"])
    b = unitscope.analyses.base.build_analysis("topk", a.config())
    assert b.config() == a.config() == {"layers": ["relu1"], "k": 4, "reduce": "mean"}


# ----------------------------------------------------------------------------- mosaics
@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    torch.manual_seed(0)
    return unitscope.load_model("alexnet").eval()


def test_rf_boxes_of_alexnet_conv1_and_pool5(alexnet):
    from unitscope.analyses.mosaics import rf_boxes
    from unitscope.analyses.occlusion import LayerRF, layer_rf

    model = alexnet.features
    conv1 = layer_rf(model, "0", (224, 224))
    assert (conv1.size, conv1.jump) == (11, 4)
    # spec C.3.5: conv1 cell 0 is centred on pixel 3 (0-based), so it spans pixels -2..8
    assert rf_boxes(conv1, torch.tensor([[0, 1]])).tolist() == [[-2, 9, 2, 13]]
    table = unitscope.receptive_fields(model, 224).set_index("layer")
    pool5 = LayerRF(*(float(table.loc["12", c]) for c in ("rf_size", "jump", "start")))
    assert (pool5.size, pool5.jump) == (195, 32)
    assert pool5.centre(torch.tensor([[1, 2]])).tolist() == [[63.0, 95.0]]  # 31 + 32·(u, v)


def test_mosaic_marks_and_crops_the_receptive_field(tmp_path):
    from unitscope.analyses.mosaics import display_images, mosaic, save_mosaics, unit_mosaics

    data, model = _bright_data(), window_sum_model()
    run = unitscope.analyze(model, data, layers="conv", analyses=[TopK(k=4)], progress=False)
    crops = unit_mosaics(model, data, run.table("topk"), ["conv:0"], mode="crop", nrow=4)["conv:0"]
    # every crop is exactly the bright B×B window (the brightest pixels of each picture)
    assert crops.shape == (3, B + 4, 4 * B + 10)
    top = unit_topk(run.table("topk"), "conv", 0)
    for t in range(4):
        tile = crops[0, 2:2 + B, 2 + t * (B + 2): 2 + t * (B + 2) + B]
        i, y, x = (int(top[c][t]) for c in ("index", "y", "x"))
        assert torch.equal(tile, display_images(data.x[i:i + 1])[0, 0, y:y + B, x:x + B])
        assert tile.min() > 0.9  # the bright window, not the dim background
    marked = mosaic(torch.zeros(1, 1, 12, 12), torch.tensor([[3, 8, 4, 9]]), nrow=1, padding=0)
    edge = (marked == torch.tensor([1.0, 0.1, 0.1])[:, None, None]).all(0)
    assert edge[3, 4:9].all() and edge[7, 4:9].all() and edge[3:8, 4].all() and edge[3:8, 8].all()
    assert not edge[5, 6] and not edge[0, 0] and not edge[10, 10]
    paths = save_mosaics({"conv:0": crops}, tmp_path, scale=2)
    from PIL import Image

    assert Image.open(paths[0]).size == (2 * crops.shape[2], 2 * crops.shape[1])
    with pytest.raises(ValueError, match="mode='box'"):
        mosaic(torch.zeros(1, 1, 4, 4), torch.tensor([[0, 2, 0, 2]]), mode="box")


def _bright_data(n: int = 6, side: int = 20) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, side, side, generator=g) * 0.1
    corners = torch.randint(0, side - B, (n, 2), generator=g)
    for i, (a, b) in enumerate(corners.tolist()):
        x[i, 0, a:a + B, b:b + B] = 1.0 + 0.1 * i
        x[i, 0, a:a + B, b:b + B] -= torch.rand(B, B, generator=g) * 0.01
    return ArrayDataset(x, torch.zeros(n, dtype=torch.int64))


# ----------------------------------------------------------------------------- experiment and report
def test_topk_experiment_writes_mosaics_and_report(tmp_path):
    from unitscope.experiments import ConfigError, run_config
    from unitscope.report import write_report

    config = tmp_path / "top.toml"
    config.write_text('experiment = "topk"\nmodel = "digits-cnn"\ndataset = "digits"\nk = 4\n'
                      'mosaics = ["relu2:1", "relu3:4"]\nmosaic_mode = "crop"\n')
    [(target, status)] = run_config(config, out=tmp_path / "runs", progress=False)
    assert status == "done"
    run = unitscope.load_run(target)
    table = run.table("topk")
    assert set(table["layer"]) == {"relu1", "relu2", "relu3"}
    assert (table.groupby(["layer", "unit"]).size() == 4).all()
    assert sorted(run.arrays["topk_mosaics"]) == ["relu2:1", "relu3:4"]
    assert sorted(p.name for p in (target / "mosaics").iterdir()) == ["relu2_1.png", "relu3_4.png"]
    page = write_report(target).read_text()
    assert "id='topk'" in page and "alt='topk figure'" in page
    from unitscope.analyses.mosaics import render_mosaics

    paths = render_mosaics(target, ["relu1:7"], out=tmp_path / "later", mode="mark", k=2)
    assert [p.name for p in paths] == ["relu1_7.png"] and paths[0].is_file()
    with pytest.raises(KeyError, match="no layer 'conv9'"):
        render_mosaics(target, ["conv9:0"], out=tmp_path / "later")
    config.write_text('experiment = "topk"\nmodel = "digits-cnn"\ndataset = "digits"\nk = 2\n'
                      'layers = ["relu2", "fc"]\nmosaics = 2\n')
    [(target, _)] = run_config(config, out=tmp_path / "runs4", progress=False)
    drawn = unitscope.load_run(target).arrays["topk_mosaics"]
    assert len(drawn) == 2 and all(key.startswith("relu2:") for key in drawn)  # not the linear fc
    config.write_text('experiment = "topk"\nmodel = "digits-cnn"\ndataset = "digits"\nk = 400\n')
    with pytest.raises(ConfigError, match="k = 400 is larger than the dataset"):
        run_config(config, out=tmp_path / "runs2", progress=False)
    config.write_text('experiment = "topk"\nmodel = "digits-cnn"\ndataset = "digits"\nk = 2\n'
                      'layers = ["relu1"]\nmosaics = ["relu3:0"]\n')
    with pytest.raises(ConfigError, match="mosaics names layer 'relu3', which is not among the layers"):
        run_config(config, out=tmp_path / "runs3", progress=False)


def test_mosaic_with_discrepancy_overlay_row():
    from unitscope.analyses.mosaics import mosaic, overlay

    images = torch.rand(3, 1, 8, 8)
    maps = torch.zeros(3, 8, 8)
    maps[:, 2, 5] = 4.0
    maps[0, 0, 0] = torch.nan
    m = mosaic(images, torch.tensor([[0, 3, 0, 3]] * 3), maps=maps, padding=0)
    assert m.shape == (3, 16, 24)  # images above, overlays below, one column per input
    heat = overlay(torch.ones(3, 3, 8, 8) * 0.5, maps, alpha=1.0)
    assert heat[0, :, 2, 5].tolist() == [1.0, 1.0, 0.0]  # the peak is pure yellow
    assert torch.allclose(heat[0, :, 0, 0], torch.full((3,), 0.3))  # elsewhere the dimmed image
    with pytest.raises(ValueError, match="maps must be"):
        mosaic(images, torch.tensor([[0, 3, 0, 3]] * 3), maps=maps[:2])


def _topk_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        unitscope.analyze(unitscope.load_model("digits-cnn"), unitscope.load_dataset("digits", "test"),
                          layers=["relu2", "fc"], analyses=[TopK(k=6)], batch_size=64, progress=False,
                          out=out)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow
def test_topk_two_gloo_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "run"
    mp.spawn(_topk_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    two = unitscope.load_run(out)
    assert two.manifest["world_size"] == 2
    torch.manual_seed(0)
    one = unitscope.analyze(unitscope.load_model("digits-cnn"), unitscope.load_dataset("digits", "test"),
                            layers=["relu2", "fc"], analyses=[TopK(k=6)], batch_size=64, progress=False)
    pd.testing.assert_frame_equal(two.table("topk"), one.table("topk"))


def test_all_relu_layers_of_alexnet_at_once_state_is_units_times_k(alexnet):
    model = alexnet
    data = ArrayDataset(torch.randn(5, 3, 96, 96), torch.zeros(5, dtype=torch.int64))
    # on the CPU, as the reference below: a GPU convolves in TF32 by PyTorch's default
    run = unitscope.analyze(model, data, layers="ReLU", analyses=[TopK(k=3)], batch_size=3, progress=False,
                            device="cpu")
    accs = run.analysis("topk").accumulators
    widths = {"features.1": 64, "features.4": 192, "features.7": 384, "features.9": 256, "features.11": 256,
              "classifier.2": 4096, "classifier.5": 4096}
    assert {key: acc.state_dict()["values"].shape for key, acc in accs.items()} == {
        key: (w, 3) for key, w in widths.items()}
    with unitscope.capture(model, "features.9") as acts:
        model(data.x)
    best = acts["features.9"][:, 17].flatten(1).max(1)
    rows = unit_topk(run.table("topk"), "features.9", 17)
    ref = torch.sort(best.values, descending=True).values[:3]
    assert rows["value"].to_numpy() == pytest.approx(ref.numpy(), rel=1e-5)


def test_zhou_segmentation_agrees_with_scipy_filter():
    from scipy import ndimage

    from unitscope.analyses.mosaics import unit_segments

    ident = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        ident.weight.zero_()
        ident.weight[0] = 1.0  # unit 0 is the image, unit 1 is zero
    model = nn.Sequential(OrderedDict(conv=ident))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 16, 16, generator=g) * 0.2
    images[:, 0, 10:14, 3:7] += 1.0
    masks = unit_segments(model, "conv", images, torch.tensor([0, 0, 1]), threshold=0.4)
    for i in range(2):
        smooth = ndimage.uniform_filter(images[i, 0].double().numpy(), size=3, mode="constant")
        assert torch.equal(masks[i], torch.from_numpy(smooth > 0.4 * smooth.max()))
    assert masks[0, 11, 4] and not masks[0, 2, 12]
    assert not masks[2].any()  # a zero map segments nothing
    from unitscope.analyses.mosaics import mosaic, unit_mosaics

    dimmed = mosaic(images[:1], torch.tensor([[0, 1, 0, 1]]), segments=masks[:1], padding=0, nrow=1)
    plain = mosaic(images[:1], torch.tensor([[0, 1, 0, 1]]), padding=0, nrow=1)
    assert torch.equal(dimmed[:, 11, 4], plain[:, 11, 4])
    assert torch.allclose(dimmed[:, 5, 12], plain[:, 5, 12] * 0.25)
    data = ArrayDataset(images[:2], torch.zeros(2, dtype=torch.int64))
    top = unitscope.analyze(model, data, layers="conv", analyses=[TopK(k=2)], progress=False).table("topk")
    seg = unit_mosaics(model, data, top, ["conv:0"], mode="segment")["conv:0"]
    assert seg.shape == unit_mosaics(model, data, top, ["conv:0"])["conv:0"].shape
    with pytest.raises(ValueError, match="'segment'"):
        unit_mosaics(model, data, top, ["conv:0"], mode="outline")
    with pytest.raises(ValueError, match="no 2-D maps"):
        unit_segments(nn.Sequential(OrderedDict(flat=nn.Flatten(), fc=nn.Linear(256, 2))), "fc", images,
                      torch.tensor([0, 0, 1]))
