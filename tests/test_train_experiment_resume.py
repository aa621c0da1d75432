"""The train experiment: an interruption leaves no run directory, the rerun resumes (saturation
rows of the earlier epochs included), and --force over a finished run never mixes two runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import unitscope
import unitscope.train as train_module
from unitscope.experiments import run_config


def _config(tmp_path, epochs: int = 3):
    """A train config on the CPU: a GPU's training is not bitwise repeatable (cuDNN's atomics)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'experiment = "train"\nmodel = "digits-cnn"\ndataset = "digits"\nepochs = {epochs}\n'
                   'track_saturation = true\nlayers = ["conv1", "conv2"]\ndevice = "cpu"\n')
    return cfg


def _interrupt_after_epoch(monkeypatch, epoch: int):
    save = train_module._save_checkpoint

    def save_then_stop(directory, e, *args, **kwargs):
        path = save(directory, e, *args, **kwargs)
        if e == epoch:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_stop)


def test_interrupted_training_leaves_no_run_and_resumes_with_every_epoch(tmp_path, monkeypatch):
    cfg, out = _config(tmp_path), tmp_path / "runs"
    _interrupt_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_config(cfg, out=out, progress=False)
    [partial] = list((out / "t").iterdir())  # no run directory beside it
    assert partial.name.endswith(".partial")
    target = partial.with_name(partial.name.removesuffix(".partial"))
    assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["epoch-001.pt", "epoch-002.pt"]
    monkeypatch.undo()
    assert run_config(cfg, out=out, progress=False) == [(target, "done")]
    assert not partial.exists()
    metrics = pd.read_parquet(target / "metrics.parquet")
    sat = pd.read_parquet(target / "saturation_epochs.parquet")
    assert list(metrics["epoch"]) == [1, 2, 3]
    assert sorted(sat["epoch"].unique()) == [1, 2, 3]
    assert sorted(p.name for p in (target / "checkpoints").iterdir()) == [
        "epoch-001.pt", "epoch-002.pt", "epoch-003.pt"]
    whole = run_config(_config(tmp_path / "w"), out=tmp_path / "whole", progress=False)[0][0]
    torch.testing.assert_close(torch.load(target / "weights.pt"), torch.load(whole / "weights.pt"))
    pd.testing.assert_frame_equal(sat, pd.read_parquet(whole / "saturation_epochs.parquet"))


def test_forced_longer_training_continues_and_a_failed_one_keeps_the_old_run(tmp_path, monkeypatch):
    out = tmp_path / "runs"
    [(target, _)] = run_config(_config(tmp_path, epochs=2), out=out, progress=False)
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    cfg = _config(tmp_path, epochs=3)
    _interrupt_after_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_config(cfg, out=out, progress=False, force=True)
    after = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before, "a failed --force run must leave the finished run as it was"
    monkeypatch.undo()
    assert run_config(cfg, out=out, progress=False, force=True) == [(target, "done")]
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["config"]["epochs"] == 3
    assert list(pd.read_parquet(target / "metrics.parquet")["epoch"]) == [1, 2, 3]
    model = unitscope.load_model("digits-cnn", weights=target / "weights.pt")
    assert unitscope.models.model_fingerprint(model) == manifest["model"]["fingerprint"]


def test_saturation_experiment_cut_short_after_its_pass_reuses_the_pass(tmp_path, monkeypatch):

    cfg = tmp_path / "s.toml"
    cfg.write_text('experiment = "saturation"\nmodel = "digits-cnn"\ndataset = "digits"\n'
                   'layers = ["conv1", "conv2"]\nproject_deltas = [0.9]\n')
    out = tmp_path / "runs"
    _interrupt_after_the_pass(monkeypatch, cfg, out)
    [partial] = list((out / "s").iterdir())
    assert partial.name.endswith(".partial") and (partial / "pass" / "manifest.json").is_file()
    monkeypatch.undo()

    outs = _record_passes(monkeypatch)
    [(target, status)] = run_config(cfg, out=out, progress=False)
    assert outs and not any(outs), "the finished pass must be reused, not run again"
    assert status == "done" and not partial.exists()
    monkeypatch.undo()
    run = unitscope.load_run(target)
    assert {"saturation", "saturation_projection"} <= set(run.tables)
    [(whole, _)] = run_config(cfg, out=tmp_path / "whole", progress=False)
    pd.testing.assert_frame_equal(run.table("saturation"), unitscope.load_run(whole).table("saturation"))


def test_a_kept_pass_of_other_weights_is_not_reused(tmp_path, monkeypatch):

    weights = tmp_path / "w.pt"
    torch.manual_seed(1)
    torch.save(unitscope.load_model("digits-cnn").state_dict(), weights)
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'experiment = "saturation"\nmodel = "digits-cnn"\nweights = "{weights}"\n'
                   'dataset = "digits"\nlayers = ["conv1"]\nproject_deltas = [0.9]\n')
    out = tmp_path / "runs"
    _interrupt_after_the_pass(monkeypatch, cfg, out)
    monkeypatch.undo()
    torch.manual_seed(2)  # the weights file is retrained in place
    torch.save(unitscope.load_model("digits-cnn").state_dict(), weights)
    outs = _record_passes(monkeypatch)
    run_config(cfg, out=out, progress=False)
    assert any(o is not None for o in outs), "a pass made with other weights must be run again"


def _record_passes(monkeypatch) -> list:
    """The ``out`` of every ``unitscope.engine.analyze`` call from now on (projected_accuracy runs
    passes of its own, without ``out``)."""
    import unitscope.engine as engine_module

    analyze, outs = engine_module.analyze, []

    def recording(*args, **kwargs):
        outs.append(kwargs.get("out"))
        return analyze(*args, **kwargs)

    monkeypatch.setattr(engine_module, "analyze", recording)
    return outs


def _interrupt_after_the_pass(monkeypatch, cfg, out) -> None:
    """Run the saturation experiment ``cfg`` and stop it in the projection step, after its pass."""
    import unitscope.analyses.saturation as saturation_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saturation_module, "projected_accuracy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_config(cfg, out=out, progress=False)


def test_checkpoints_an_older_version_left_in_the_run_directory_are_resumed(tmp_path, monkeypatch):
    cfg, out = _config(tmp_path, epochs=2), tmp_path / "runs"
    _interrupt_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_config(cfg, out=out, progress=False)
    monkeypatch.undo()
    [partial] = list((out / "t").iterdir())
    target = partial.with_name(partial.name.removesuffix(".partial"))
    target.mkdir()
    (partial / "checkpoints").rename(target / "checkpoints")  # where older versions kept them
    partial.rmdir()
    save, saved = train_module._save_checkpoint, []

    def recording(directory, epoch, *args, **kwargs):
        saved.append(epoch)
        return save(directory, epoch, *args, **kwargs)

    monkeypatch.setattr(train_module, "_save_checkpoint", recording)
    assert run_config(cfg, out=out, progress=False) == [(target, "done")]
    assert saved == [2], "epoch 1 must come from the old checkpoint, not be trained again"
    assert sorted(p.name for p in (target / "checkpoints").iterdir()) == ["epoch-001.pt", "epoch-002.pt"]
    assert sorted(pd.read_parquet(target / "saturation_epochs.parquet")["epoch"].unique()) == [1, 2]
    assert not partial.exists()
