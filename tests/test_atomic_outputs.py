"""Outputs written beside a run (mosaic PNGs) are part of its atomic save; stale siblings go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torchvision.utils

import unitscope
from unitscope.experiments import run_config

TOPK = ('experiment = "topk"\nmodel = "digits-cnn"\ndataset = "digits"\nk = 2\nlayers = ["relu2"]\n'
        'mosaics = [0, 1, 2]\n')
ERF = ('experiment = "receptive-field-empirical"\nmodel = "digits-cnn"\ndataset = "digits"\n'
       'layers = ["relu1"]\nunits = [0, 1, 2]\nk = 2\noccluder = 3\nstride = 2\n')


def _fail_on_second_png(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``torchvision.utils.save_image`` write the first PNG, then raise."""
    real = torchvision.utils.save_image
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(torchvision.utils, "save_image", flaky)


def _manifest(path: Path) -> str:
    return (path / "manifest.json").read_text()


@pytest.mark.parametrize("text", [TOPK, ERF], ids=["topk", "receptive-field-empirical"])
def test_a_png_failure_leaves_no_complete_run_and_a_rerun_draws_every_mosaic(tmp_path, monkeypatch, text):
    config = tmp_path / "c.toml"
    config.write_text(text)
    with monkeypatch.context() as patch:
        _fail_on_second_png(patch)
        with pytest.raises(OSError, match="disk full"):
            run_config(config, out=tmp_path / "runs", progress=False)
    grid = tmp_path / "runs" / "c"
    left = [p.name for p in grid.iterdir()]
    assert left == ["digits-cnn_digits-test.partial"], "only the kept pass may remain, no run directory"
    [(target, status)] = run_config(config, out=tmp_path / "runs", progress=False)
    assert status == "done" and [p.name for p in grid.iterdir()] == [target.name]
    assert len(list((target / "mosaics").glob("*.png"))) == 3
    assert json.loads(_manifest(target))["status"] == "complete"


def test_a_png_failure_over_a_finished_run_keeps_it_whole(tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text(TOPK)
    [(target, _)] = run_config(config, out=tmp_path / "runs", progress=False)
    before = _manifest(target)
    pngs = sorted(p.name for p in (target / "mosaics").iterdir())
    assert len(pngs) == 3
    _fail_on_second_png(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        run_config(config, out=tmp_path / "runs", progress=False, force=True)
    assert _manifest(target) == before
    assert sorted(p.name for p in (target / "mosaics").iterdir()) == pngs
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, target.name + ".partial"]


def test_save_extra_hook_writes_into_the_run_before_the_manifest(tmp_path, digits_model, digits_test):
    run = unitscope.analyze(digits_model, digits_test, layers="fc", progress=False)
    seen = []

    def extra(tmp: Path) -> None:
        seen.append(tmp.exists() and not (tmp / "manifest.json").exists())
        (tmp / "note.txt").write_text("hello")

    path = run.save(tmp_path / "r", extra=extra)
    assert seen == [True]
    assert (path / "note.txt").read_text() == "hello"

    def broken(tmp: Path) -> None:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        run.save(tmp_path / "s", extra=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


# ----------------------------------------------------------------------------- stale siblings
@pytest.fixture
def small_run(digits_model, digits_test):
    return unitscope.analyze(digits_model, digits_test, layers="fc", progress=False)


def test_a_save_over_a_run_removes_its_stale_hidden_siblings(tmp_path, small_run):
    import shutil

    path = small_run.save(tmp_path / "r")
    shutil.copytree(path, tmp_path / ".r.old-deadbeef")  # an old copy whose removal was cut short
    import os
    import time

    killed = tmp_path / ".r.tmp-0123abcd"  # a save killed before its rename, two hours ago
    killed.mkdir()
    hours_ago = time.time() - 7200
    os.utime(killed, (hours_ago, hours_ago))
    # another target's leftovers, and a save of this target still running in another process
    kept = [".other.old-deadbeef", ".r.old-x.tmp-12345678", ".r.tmp-fedcba98"]
    for name in kept:
        (tmp_path / name).mkdir()
    small_run.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [*sorted(kept), "r"]


def test_a_missing_run_keeps_its_old_copy_for_recovery(tmp_path, small_run):
    path = small_run.save(tmp_path / "r")
    path.rename(tmp_path / ".r.old-deadbeef")  # cut between the two renames of a replacement

    def broken(tmp: Path) -> None:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        small_run.save(path, extra=broken)
    assert [p.name for p in tmp_path.iterdir()] == [".r.old-deadbeef"]
    assert unitscope.load_run(path).table("moments").shape[0] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_grid_report_skips_hidden_and_partial_directories(tmp_path, small_run):
    import shutil

    from unitscope.report import is_grid, write_report

    grid = tmp_path / "grid"
    for name in ("a", "b"):
        small_run.save(grid / name)
    for name in (".a.old-deadbeef", ".b.tmp-0123abcd", "c.partial"):
        shutil.copytree(grid / "a", grid / name)
    page = write_report(grid).read_text()
    assert "runs (2)" in page and "a/report.html" in page and "b/report.html" in page
    assert "old-deadbeef" not in page and "tmp-0123abcd" not in page and "c.partial" not in page
    for name in (".a.old-deadbeef", ".b.tmp-0123abcd", "c.partial"):
        assert not (grid / name / "report.html").exists()
    only_hidden = tmp_path / "hidden"
    shutil.copytree(grid / "a", only_hidden / ".a.old-deadbeef")
    assert not is_grid(only_hidden)
    with pytest.raises(unitscope.RunError, match="not a unitscope run directory"):
        write_report(only_hidden)
