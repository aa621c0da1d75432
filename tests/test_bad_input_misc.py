"""Clear errors for a few remaining bad inputs: dataset options, analyses that need their own
experiment type, merging a run that is no analysis pass, a damaged table file."""

from __future__ import annotations

import pytest

import unitscope
from unitscope.experiments import ConfigError, run_config
from unitscope.results import RunError, merge_runs


def test_unknown_dataset_option_lists_the_known_ones():
    with pytest.raises(ValueError, match="dataset 'digits' has no option 'root'; its options: none"):
        unitscope.load_dataset("digits", "train", root="/data")
    with pytest.raises(ValueError, match="no option 'sise'.*size"):
        unitscope.load_dataset("shapes", "test", sise=32)


@pytest.mark.parametrize("name", ["sensitivity", "coverage"])
def test_analyze_experiment_points_to_the_experiment_type(tmp_path, name):
    cfg = tmp_path / "c.toml"
    cfg.write_text('experiment = "analyze"\nmodel = "digits-cnn"\ndataset = "digits"\n'
                   f'analyses = ["{name}"]\n')
    with pytest.raises(ConfigError, match=f'use experiment = "{name}"'):
        run_config(cfg, out=tmp_path / "runs", progress=False)


@pytest.fixture
def table_run(tmp_path):
    cfg = tmp_path / "rf.toml"
    cfg.write_text('experiment = "receptive-field"\nmodel = "digits-cnn"\n')
    [(target, _)] = run_config(cfg, out=tmp_path / "runs", progress=False)
    return target


def test_merging_a_run_that_is_no_analysis_pass_is_refused(table_run):
    with pytest.raises(RunError, match="not an analysis pass.*receptive_field"):
        merge_runs([table_run, table_run])


def test_a_damaged_table_file_names_the_file(table_run):
    damaged = next((table_run / "tables").glob("*.parquet"))
    damaged.write_bytes(b"garbage")
    with pytest.raises(RunError, match=f"{damaged.name} is corrupt"):
        unitscope.load_run(table_run)


def test_a_model_without_weights_gets_the_same_random_weights_on_every_run(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text('experiment = "analyze"\nmodel = "digits-cnn"\ndataset = "digits"\nlayers = ["fc"]\n')
    [(first, _)] = run_config(cfg, out=tmp_path / "one", progress=False)
    [(second, _)] = run_config(cfg, out=tmp_path / "two", progress=False)
    a, b = unitscope.load_run(first), unitscope.load_run(second)
    assert a.manifest["model"]["fingerprint"] == b.manifest["model"]["fingerprint"]
    assert a.table("moments").equals(b.table("moments"))
