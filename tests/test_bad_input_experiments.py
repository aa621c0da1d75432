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
