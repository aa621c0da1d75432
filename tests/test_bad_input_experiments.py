"""Bad configs and bad inputs of experiments: clear errors, distinct run directories, nothing half-written."""

from __future__ import annotations

import json

import pytest

from unitscope.experiments import ConfigError, expand, run_config, run_name


def write(path, text):
    path.write_text(text)
    return path


def test_sanitised_names_of_different_grid_points_differ():
    exps = expand({"model": "digits-cnn", "dataset": "digits", "layers": [["conv*"], ["conv?"]]})
    names = [run_name(cfg, swept) for cfg, swept in exps]
    assert len(set(names)) == 2
    assert all(n.startswith("digits-cnn_digits-test_layers=conv-") for n in names)
    # names that need no sanitising keep their plain form
    plain = expand({"model": "digits-cnn", "dataset": "digits", "seed": [0, 1]})
    assert [run_name(c, s) for c, s in plain] == ["digits-cnn_digits-test_seed=0",
                                                  "digits-cnn_digits-test_seed=1"]


def test_globs_that_sanitise_alike_get_their_own_runs(tmp_path):
    cfg = write(tmp_path / "g.toml", 'model = "digits-cnn"\ndataset = "digits"\n'
                'layers = [["relu*"], ["relu?"]]\n')
    results = run_config(cfg, out=tmp_path / "runs", progress=False)
    assert [status for _, status in results] == ["done", "done"]
    first, second = (target for target, _ in results)
    assert first != second
    recorded = [json.loads((t / "manifest.json").read_text())["config"]["layers"] for t in (first, second)]
    assert recorded == [["relu*"], ["relu?"]]


def test_grid_points_that_would_share_a_directory_are_refused_before_any_run(tmp_path):
    cfg = write(tmp_path / "c.toml", 'model = "digits-cnn"\ndataset = "digits"\n'
                'layers = [["relu1", "fc"], ["relu1+fc"]]\n')
    with pytest.raises(ConfigError, match=r"would share the run directory") as info:
        run_config(cfg, out=tmp_path / "runs", progress=False)
    assert "relu1+fc" in str(info.value) and "'relu1', 'fc'" in str(info.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("text", "message"), [
    ('model = "digits-cnn"\ndataset = "digits"\nanalyses = "moments"\n',
     'analyses must be a list of analysis names, e.g. analyses = ["moments"]'),
    ('model = "digits-cnn"\ndataset = "digits"\nseed = "abc"\n', "seed = 'abc': give an integer"),
    ('model = "digits-cnn"\ndataset = "digits"\nbatch_size = 0\n', "batch_size = 0: give an integer >= 1"),
    ('model = "digits-cnn"\ndataset = "digits"\nmoments = 3\n', "the options of an analysis are a table"),
])
def test_values_of_the_wrong_kind_are_named(tmp_path, text, message):
    cfg = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        run_config(cfg, out=tmp_path / "runs", progress=False)
    assert message in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_sub_key_of_a_plain_key_is_refused(tmp_path):
    cfg = write(tmp_path / "c.toml", 'model = "digits-cnn"\ndataset = "digits"\n')
    with pytest.raises(ConfigError, match=r"'model' is a plain key .* takes no sub-keys; write --set model="):
        run_config(cfg, out=tmp_path / "runs", overrides=["model.x=1"], progress=False)
    assert not (tmp_path / "runs").exists()


def test_json_config_must_be_an_object(tmp_path):
    cfg = write(tmp_path / "c.json", json.dumps([{"model": "digits-cnn", "dataset": "digits"}]))
    with pytest.raises(ConfigError, match=r"holds a list, but a config is a table of keys"):
        run_config(cfg, out=tmp_path / "runs", progress=False)


def refused_before_work(tmp_path, monkeypatch, module, name, text, message):
    """Run the config ``text`` with ``module.name`` (the first costly step) made to fail: the run
    must stop with a ConfigError holding ``message`` before it, and leave no run directory."""
    def costly(*args, **kwargs):
        raise AssertionError(f"{name} ran before the settings were checked")

    monkeypatch.setattr(module, name, costly)
    cfg = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        run_config(cfg, out=tmp_path / "runs", progress=False)
    assert message in str(info.value)
    assert not (tmp_path / "runs").exists()


PROBES = 'experiment = "probes"\nmodel = "digits-cnn"\ndataset = "digits"\nlayers = ["fc"]\ndownsample = 1\n'


@pytest.mark.parametrize(("extra", "message"), [
    ("C = 0.0\n", "C=0.0: C is the inverse L2 strength and must be a positive finite number"),
    ('dtype = "float16"\n', "dtype='float16': use float32 or float64"),
    ("downsample = 0\n", "downsample=0: use a positive int"),
])
def test_bad_probe_options_fail_before_any_work(tmp_path, monkeypatch, extra, message):
    import unitscope.features

    refused_before_work(tmp_path, monkeypatch, unitscope.features, "extract_features",
                        PROBES.replace("downsample = 1\n", "") + extra, message)


def with_weights(tmp_path):
    """The probes config with a fixed weights file, so reruns see the same model."""
    import torch

    import unitscope

    torch.save(unitscope.load_model("digits-cnn").state_dict(), tmp_path / "w.pt")
    return write(tmp_path / "pr.toml", PROBES + f'weights = "{tmp_path / "w.pt"}"\n')


def test_failed_probes_run_leaves_no_run_directory_and_resumes(tmp_path, monkeypatch):
    import unitscope
    from unitscope.analyses import probes as probes_mod

    cfg = with_weights(tmp_path)
    target = tmp_path / "runs" / "pr" / "digits-cnn_digits"
    partial = tmp_path / "runs" / "pr" / "digits-cnn_digits.partial"

    def broken_fit(*args, **kwargs):
        raise RuntimeError("fit failed")

    monkeypatch.setattr(probes_mod, "fit_logreg_many", broken_fit)
    with pytest.raises(RuntimeError, match="fit failed"):
        run_config(cfg, out=tmp_path / "runs", progress=False)
    assert not target.exists()
    assert sorted(p.name for p in (tmp_path / "runs" / "pr").iterdir()) == ["digits-cnn_digits.partial"]
    stamp = (partial / "features" / "train" / "progress.json").stat().st_mtime_ns
    monkeypatch.undo()
    assert run_config(cfg, out=tmp_path / "runs", progress=False) == [(target, "done")]
    assert not partial.exists()
    # the features of the failed attempt were reused, not extracted again
    assert (target / "features" / "train" / "progress.json").stat().st_mtime_ns == stamp
    assert unitscope.load_run(target).table("probes")["layer"].tolist() == ["fc"]


def test_features_left_in_the_run_directory_by_older_versions_are_moved_out(tmp_path):
    import unitscope
    from unitscope.features import extract_features

    cfg = with_weights(tmp_path)
    target = tmp_path / "runs" / "pr" / "digits-cnn_digits"
    model = unitscope.load_model("digits-cnn", weights=tmp_path / "w.pt")
    extract_features(model, unitscope.load_dataset("digits", "train"), ["fc"], 1, out=target / "features",
                     split="train")
    stamp = (target / "features" / "train" / "progress.json").stat().st_mtime_ns
    assert run_config(cfg, out=tmp_path / "runs", progress=False) == [(target, "done")]
    assert unitscope.load_run(target).manifest["status"] == "complete"
    assert (target / "features" / "train" / "progress.json").stat().st_mtime_ns == stamp
    assert (target / "features" / "test" / "progress.json").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "pr").iterdir()) == ["digits-cnn_digits"]


def test_layer_info_and_layers_command_name_the_expected_shape(capsys):
    import unitscope
    from unitscope.cli import main
    from unitscope.models.info import layer_info

    model = unitscope.load_model("digits-cnn")
    with pytest.raises(unitscope.InputError, match=r"expects one sample of shape \(1, 8, 8\).*is \(3, 8\)"):
        layer_info(model, (3, 8))
    with pytest.raises(ValueError, match="positive sizes"):
        layer_info(model, (1, 0, 8))
    assert layer_info(model, (1, 16, 16)).set_index("name").loc["conv1", "output_shape"] == "(16, 16, 16)"
    assert main(["layers", "digits-cnn", "--input-shape", "3,8"]) == 1
    err = capsys.readouterr().err
    assert "expects one sample of shape (1, 8, 8)" in err and "(3, 8)" in err and "Traceback" not in err


def test_write_table_run_hands_the_features_back_when_it_fails(tmp_path, monkeypatch):
    from pathlib import Path

    import pandas as pd

    from unitscope.experiments import write_table_run

    features = tmp_path / "t.partial" / "features"
    (features / "train").mkdir(parents=True)
    (features / "train" / "progress.json").write_text("{}")
    write_text = Path.write_text

    def fail_on_the_manifest(self, *args, **kwargs):
        if self.name == "manifest.json":
            assert (self.parent / "features").is_dir()  # the features were moved in
            raise OSError("disk full")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_on_the_manifest)
    with pytest.raises(OSError, match="disk full"):
        write_table_run(tmp_path / "t", "probes", pd.DataFrame({"a": [1]}), {}, features=features)
    assert (features / "train" / "progress.json").is_file()
    assert not (tmp_path / "t").exists()


STUDY = 'experiment = "coverage-study"\nmodel = "digits-cnn"\ndataset = "digits"\n'


@pytest.mark.parametrize(("extra", "message"), [
    ('study = "adversarial"\nattack = "deepfool"\n', "attack = 'deepfool': use one of fgsm, pgd, cw"),
    ('study = "adversarial"\nattack = "cw"\neps = "abc"\n', "eps = 'abc': give a finite number >= 0"),
    ('study = "impartiality"\nattack = "pgd"\nsteps = 0\n', "steps = 0: give a positive number of PGD steps"),
    ('study = "adversarial"\nfractions = [0.0]\n', "fractions = [0.0]: give fractions of the test set"),
    ("k_range = [4, 2]\n", "k_range = [4, 2]: give [low, high] cluster counts with 2 <= low <= high"),
    ('richness = "all"\n', "richness = 'all': use \"total\" (all classes) or \"observed\""),
    ('study = "noise"\npixel_fraction = 1.5\n', "pixel_fraction = 1.5: give a fraction of the pixels"),
])
def test_bad_coverage_study_settings_fail_before_any_work(tmp_path, monkeypatch, extra, message):
    from unitscope.analyses import studies

    refused_before_work(tmp_path, monkeypatch, studies, "CoverageMeter", STUDY + extra, message)
