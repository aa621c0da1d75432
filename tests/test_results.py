"""The run directory: round trip, atomic replacement, clear errors on what is not a run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import unitscope
from unitscope.results import load_analysis_states


@pytest.fixture
def run(digits_model, digits_test):
    return unitscope.analyze(digits_model, digits_test, layers=["relu*", "fc"], progress=False)


def test_save_and_load_round_trip(tmp_path, run):
    path = run.save(tmp_path / "r")
    assert {p.name for p in path.iterdir()} >= {"manifest.json", "tables", "states"}
    back = unitscope.load_run(path)
    pd.testing.assert_frame_equal(back.table("moments"), run.table("moments"))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["status"] == "complete"
    assert len(manifest["model"]["fingerprint"]) == 64 and manifest["data"]["size"] == 360
    assert {"unitscope", "torch", "python"} <= set(manifest["versions"])
    # the saved accumulator states recompute the same table
    moments = back.analysis("moments")
    pd.testing.assert_frame_equal(moments.tables()["moments"], run.table("moments"))


def test_interrupted_save_keeps_the_previous_run(tmp_path, run, monkeypatch):
    path = run.save(tmp_path / "r")
    before = (path / "manifest.json").read_text()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(KeyboardInterrupt):
        run.save(path)
    assert (path / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"], "no temporary directory may remain"
    with pytest.raises(KeyboardInterrupt):
        run.save(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_a_replacement_cut_between_renames_is_recovered(tmp_path, run):
    path = run.save(tmp_path / "r")
    path.rename(tmp_path / ".r.old-deadbeef")
    assert unitscope.load_run(path).table("moments").shape[0] == 112 + 10


def test_not_a_run_directory(tmp_path):
    with pytest.raises(unitscope.RunError, match="not a unitscope run directory"):
        unitscope.load_run(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(unitscope.RunError, match="corrupt"):
        unitscope.load_run(tmp_path)


def test_corrupt_state_file_names_the_file(tmp_path, run):
    path = run.save(tmp_path / "r")
    state = path / "states" / "moments.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match="moments.safetensors.*corrupt"):
        load_analysis_states(state)
