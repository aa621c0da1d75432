"""The command line: version, layers, grid runs with skipping, merge, report, demo, error lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import unitscope
from unitscope.cli import EXAMPLES, build_parser, main
from unitscope.experiments import expand


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"unitscope {unitscope.__version__}"


def test_help_of_every_command_has_examples(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(EXAMPLES)
    for name in commands:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "examples:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    from unitscope.experiments import EXPERIMENTS

    listed = capsys.readouterr().out
    for experiment in EXPERIMENTS.names():  # every experiment type, with its keys
        assert f"  {experiment}: " in listed


def test_layers_lists_names_types_and_shapes(capsys):
    assert main(["layers", "digits-cnn"]) == 0
    out = capsys.readouterr().out
    assert "conv2" in out and "Conv2d" in out and "(32, 8, 8)" in out and "4640" in out


def test_unknown_model_is_one_line_with_the_known_names(capsys):
    assert main(["layers", "digit-cnn"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "digits-cnn" in err and "Traceback" not in err


def write(path, text):
    path.write_text(text)
    return path


def test_grid_expands_lists_but_not_layer_lists():
    exps = expand({"model": "digits-cnn", "dataset": "digits", "layers": ["relu*", "fc"],
                   "seed": [0, 1], "moments": {"reduce": ["mean", "max"]}})
    assert len(exps) == 4
    assert all(cfg["layers"] == ["relu*", "fc"] for cfg, _ in exps)
    chosen = {(c["seed"], c["moments"]["reduce"]) for c, _ in exps}
    assert chosen == {(0, "mean"), (0, "max"), (1, "mean"), (1, "max")}
    assert len(expand({"model": "digits-cnn", "dataset": "digits", "layers": [["relu1"], ["fc"]]})) == 2


def test_run_grid_then_skip_finished(tmp_path, capsys):
    cfg = write(tmp_path / "grid.toml", 'model = "digits-cnn"\ndataset = "digits"\n'
                'layers = ["relu*"]\nseed = [0, 1]\n[moments]\nreduce = ["mean", "max"]\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs")]) == 0
    dirs = sorted(p.name for p in (tmp_path / "runs" / "grid").iterdir())
    assert dirs == ["digits-cnn_digits-test_seed=0_moments.reduce=max",
                    "digits-cnn_digits-test_seed=0_moments.reduce=mean",
                    "digits-cnn_digits-test_seed=1_moments.reduce=max",
                    "digits-cnn_digits-test_seed=1_moments.reduce=mean"]
    one = tmp_path / "runs" / "grid" / dirs[0]
    assert (one / "config.toml").is_file()
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["config"]["moments"] == {"reduce": "max"}
    stamp = (one / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs")]) == 0
    assert (one / "manifest.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err.count("skipped") == 4


def test_run_with_weights_and_overrides(tmp_path):
    model = unitscope.load_model("digits-cnn")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    cfg = write(tmp_path / "c.json", json.dumps({"model": "digits-cnn", "dataset": "digits",
                                                 "weights": str(tmp_path / "w.pt")}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs"), "--run-id", "x",
                 "--set", 'layers=["fc"]', "--set", "batch_size=7"]) == 0
    run = unitscope.load_run(tmp_path / "runs" / "x" / "digits-cnn_digits-test")
    assert set(run.table("moments")["layer"]) == {"fc"} and run.manifest["batch_size"] == 7
    assert run.manifest["model"]["fingerprint"] == unitscope.models.model_fingerprint(model)


@pytest.mark.parametrize(("text", "message"), [
    ('model = "digits-cnn"\ndataset = "digits"\nlayer = "fc"\n', "unknown config key 'layer'; known keys:"),
    ('model = "digits-cnn"\n', "config key 'dataset' is required"),
    ('model = "digits-cnn"\ndataset = "digits"\nexperiment = "nope"\n', "unknown experiment type"),
    ('model = "digits-cnn"\ndataset = "digits"\nlayers = "nolayer"\n', "layer 'nolayer' matches no module"),
    ('model = "digits-cnn"\ndataset = "digits"\n[moments]\nbins = 3\n',
     "[moments] options: unknown key 'bins'; known keys: layers, reduce"),
    ('model = "digits-cnn"\ndataset = "digits"\nseed = []\n', "empty list"),
    ('model = = 1', "cannot parse"),
])
def test_bad_configs_fail_with_one_clear_line(tmp_path, capsys, text, message):
    cfg = write(tmp_path / "bad.toml", text)
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any((tmp_path / "runs").rglob("manifest.json"))


def test_finished_run_with_another_config_is_not_overwritten(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", 'model = "digits-cnn"\ndataset = "digits"\nlayers = "fc"\n')
    assert main(["run", str(cfg), "--out", str(tmp_path)]) == 0
    write(cfg, 'model = "digits-cnn"\ndataset = "digits"\nlayers = "relu1"\n')
    assert main(["run", str(cfg), "--out", str(tmp_path)]) == 1
    assert "differs in layers" in capsys.readouterr().err
    assert main(["run", str(cfg), "--out", str(tmp_path), "--force"]) == 0


def test_merge_command(tmp_path, digits_model, digits_test):
    shards = []
    for i in range(2):
        shards.append(str(tmp_path / f"s{i}"))
        unitscope.analyze(digits_model, digits_test, layers="fc", shard=(i, 2), out=shards[-1],
                          progress=False)
    assert main(["merge", *shards, "--out", str(tmp_path / "m")]) == 0
    assert (unitscope.load_run(tmp_path / "m").table("moments")["count"] == 360).all()
    assert main(["merge", shards[0], "--out", str(tmp_path / "m2")]) == 1
    assert not (tmp_path / "m2").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(unitscope.RunError):
        main(["--debug", "report", str(tmp_path)])


def test_demo_quick_writes_runs_and_reports(quick_demo):
    tmp_path = quick_demo
    run = unitscope.load_run(tmp_path / "digits-cnn")
    assert set(run.table("moments")["layer"]) == {"conv1", "conv2", "conv3", "relu1", "relu2", "relu3", "fc"}
    shapes = unitscope.load_run(tmp_path / "shapes-cnn").table("moments")
    assert "relu4" in set(shapes["layer"]) and (shapes["count"] == 800).all()
    tables = unitscope.load_run(tmp_path / "digits-cnn").tables
    assert {"saturation", "saturation_epochs", "saturation_projection"} <= set(tables)
    assert set(tables["saturation_epochs"]["epoch"]) == {1, 2, 3}
    for name in ("digits-cnn", "shapes-cnn"):
        page = (tmp_path / name / "report.html").read_text()
        assert page.count("data:image/png;base64,") >= 6 and "<section id='saturation'>" in page
        assert "http://" not in page and "https://" not in page
        assert "time: samples" not in page and "pass: samples" in page  # a count, not seconds
    # the run's config and manifest say what made every table: the pass, then the demo's steps
    manifest = json.loads((tmp_path / "digits-cnn" / "manifest.json").read_text())
    config = manifest["config"]
    assert config["experiment"] == "demo" and config["pass_experiment"] == "analyze"
    assert config["dataset"] == "digits" and config["weights"].endswith("digits-cnn.pt")  # mosaics read them
    import tempfile

    for name in ("digits-cnn", "shapes-cnn"):
        top = unitscope.load_run(tmp_path / name).tables.get("topk")
        if top is not None:  # the portraits part ranked images: the mosaics command draws them
            unit = f"{top['layer'].iloc[0]}:{int(top['unit'].iloc[0])}"
            assert main(["-q", "mosaics", str(tmp_path / name), unit, "--out", tempfile.mkdtemp()]) == 0
    assert {"moments", "saturation"} | set(manifest["added_tables"]) == set(tables)
    assert {"probes", "receptive_field", "saturation_epochs"} <= set(manifest["added_tables"])
    assert 'reproduce = "unitscope demo --quick"' in (tmp_path / "digits-cnn" / "config.toml").read_text()
    history = json.loads((tmp_path / "training" / "digits-cnn" / "history.json").read_text())
    assert history[-1]["epoch"] == 3
    # a second demo reuses the finished trainings (checkpoints) instead of training again
    stamp = (tmp_path / "training" / "shapes-cnn" / "epoch-002.pt").stat().st_mtime_ns
    assert main(["-q", "demo", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "training" / "shapes-cnn" / "epoch-002.pt").stat().st_mtime_ns == stamp


def test_demo_refuses_a_folder_of_other_files_before_any_work(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    assert main(["-q", "demo", "--quick", "--out", str(tmp_path)]) == 1
    assert "not the demo's (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.slow
@pytest.mark.parametrize("name", unitscope.models.MODELS.names())
def test_layers_command_for_every_registered_model(name, capsys):
    assert main(["layers", name]) == 0
    out = capsys.readouterr().out
    shape = unitscope.models.default_input_shape(name)
    assert "Conv2d" in out and "Linear" in out and str(tuple(shape)) in out


def test_receptive_field_and_probes_experiments_with_reports(tmp_path):
    from unitscope.report import write_report

    rf = write(tmp_path / "rf.toml", 'experiment = "receptive-field"\nmodel = ["digits-cnn", "resnet18"]\n')
    assert main(["-q", "run", str(rf), "--out", str(tmp_path)]) == 0
    run = unitscope.load_run(tmp_path / "rf" / "resnet18")
    table = run.table("receptive_field").set_index("layer")
    assert table.loc["layer4", "rf_size"] == 435
    assert run.table("receptive_field_flops")["flops"].sum() == 3_628_146_688
    pr = write(tmp_path / "pr.toml", 'experiment = "probes"\nmodel = "digits-cnn"\ndataset = "digits"\n'
               'layers = ["conv2", "fc"]\n')
    assert main(["-q", "run", str(pr), "--out", str(tmp_path)]) == 0
    probes = unitscope.load_run(tmp_path / "pr" / "digits-cnn_digits").table("probes")
    assert list(probes["layer"]) == ["conv2", "fc"] and probes["converged"].all()
    for d in (tmp_path / "rf" / "resnet18", tmp_path / "pr" / "digits-cnn_digits"):
        page = write_report(d).read_text()
        assert page.count("data:image/png;base64,") == 1
    # the grid directory of the two receptive-field runs gets an index comparing them
    assert main(["-q", "report", str(tmp_path / "rf")]) == 0
    index = (tmp_path / "rf" / "report.html").read_text()
    for name in ("digits-cnn", "resnet18"):
        assert f"href='{name}/report.html'" in index and (tmp_path / "rf" / name / "report.html").is_file()
    assert "<section id='compare-receptive_field'>" in index and index.count("data:image/png;base64,") == 1
    assert main(["run", str(pr), "--out", str(tmp_path)]) == 0  # finished: skipped


def test_mosaics_command_draws_chosen_units(tmp_path, capsys):
    config = write(tmp_path / "top.toml", 'experiment = "topk"\nmodel = "digits-cnn"\ndataset = "digits"\n'
                   'k = 3\nlayers = ["relu3"]\nmosaics = 0\n')
    assert main(["-q", "run", str(config), "--out", str(tmp_path)]) == 0
    [target] = [p for p in (tmp_path / "top").iterdir() if p.is_dir()]
    assert main(["-q", "mosaics", str(target), "relu3:1", "relu3:5", "--out", str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["relu3_1.png", "relu3_5.png"]
    assert main(["mosaics", str(target), "relu3:99"]) == 1
    assert "relu3" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "runs"), [("moments.toml", 1), ("grid.toml", 4)])
def test_the_shipped_configs_run(name, runs, tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / name
    assert main(["-q", "run", str(config), "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*/*/manifest.json"))) == runs


def test_the_shipped_training_config_trains(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "train.toml"
    quick = ["--set", "epochs=1", "--set", "lr=5e-3"]
    assert main(["-q", "train", str(config), *quick, "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*/*/weights.pt"))) == 1


def test_error_lines_show_a_key_errors_text_not_its_repr(capsys):
    from unitscope.cli import error_line

    text = "the topk table has no layer 'conv1'"
    assert error_line(KeyError(text)) == text
    assert error_line(ValueError("plain")) == "plain"
