"""Run directories are never written over somebody's files; merges and resumes keep every count.

Also: a module called twice in one forward is reported or kept as asked, never cut short.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unitscope
from unitscope.capture import CaptureError
from unitscope.features import extract_features
from unitscope.results import RunError, merge_runs

from .test_engine import Interrupting, WithNaN, assert_tables_close


def test_save_refuses_a_directory_that_is_not_a_run(tmp_path, digits_model, digits_test):
    run = unitscope.analyze(digits_model, digits_test, layers="fc", progress=False)
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "notes.txt").write_text("precious")
    with pytest.raises(RunError, match="not a unitscope run.*sub"):
        run.save(victim)
    assert (victim / "sub" / "notes.txt").read_text() == "precious"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(RunError, match="is a file"):
        run.save(a_file)
    (tmp_path / "empty").mkdir()
    run.save(tmp_path / "empty")
    run.save(tmp_path / "empty")  # a run directory is replaced
    assert unitscope.load_run(tmp_path / "empty").manifest["status"] == "complete"


def test_analyze_checks_the_output_directory_before_the_pass(tmp_path, digits_model):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.csv").write_text("1,2")

    class Unread(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise AssertionError("the pass must not start")

    with pytest.raises(RunError, match="not a unitscope run"):
        unitscope.analyze(digits_model, Unread(), out=victim, progress=False)
    assert (victim / "data.csv").read_text() == "1,2"


def test_checkpoint_every_must_be_positive(tmp_path, digits_model, digits_test):
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        unitscope.analyze(digits_model, digits_test, out=tmp_path / "r", checkpoint_every=0, progress=False)


def test_merge_refuses_shards_of_other_layers_or_seeds(tmp_path, digits_model, digits_test):
    kw = {"progress": False}
    unitscope.analyze(digits_model, digits_test, layers="conv1", shard=(0, 2), out=tmp_path / "s0", **kw)
    unitscope.analyze(digits_model, digits_test, layers="conv2", shard=(1, 2), out=tmp_path / "s1", **kw)
    unitscope.analyze(digits_model, digits_test, layers="conv1", shard=(1, 2), seed=3, out=tmp_path / "s2",
                      **kw)
    with pytest.raises(RunError, match="captured layers"):
        merge_runs([tmp_path / "s0", tmp_path / "s1"])
    with pytest.raises(RunError, match="seed 3"):
        merge_runs([tmp_path / "s0", tmp_path / "s2"])


def test_a_resumed_run_counts_the_nonfinite_values_before_the_interruption(tmp_path, digits_model,
                                                                          digits_test):
    class NaNThenInterrupt(Interrupting):
        def __getitem__(self, i):
            if i == self.stop_at:
                raise KeyboardInterrupt
            return WithNaN(self.base)[i]

    kwargs = {"layers": "relu1", "batch_size": 50, "progress": False, "out": tmp_path / "run",
              "checkpoint_every": 1}
    with pytest.raises(KeyboardInterrupt):  # item 3 (NaN) is in a checkpointed batch, item 200 is not
        unitscope.analyze(digits_model, NaNThenInterrupt(digits_test, stop_at=210), **kwargs)
    resumed = unitscope.analyze(digits_model, NaNThenInterrupt(digits_test), **kwargs)
    whole = unitscope.analyze(digits_model, WithNaN(digits_test), layers="relu1", progress=False)
    assert resumed.manifest["timings"]["resumed_batches"] == 4
    assert resumed.manifest["nonfinite"] == whole.manifest["nonfinite"] == {"relu1": 2 * 16}


class SharedReLU(nn.Module):
    """One ReLU module applied twice in each forward, as in a torchvision ResNet block."""

    input_shape = (4,)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.relu, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.b(self.relu(self.a(x)))))


@pytest.fixture
def shared():
    model = SharedReLU().eval()
    x = torch.randn(40, 4)
    with torch.no_grad():
        first = model.relu(model.a(x))
        second = model.relu(model.b(first))
    return model, unitscope.ArrayDataset(x, torch.zeros(40, dtype=torch.int64)), first, second


def test_a_module_called_twice_is_reported_or_kept_as_asked(shared):
    model, data, first, second = shared
    for calls, expected in (("first", first), ("last", second)):
        run = unitscope.analyze(model, data, layers="relu", calls=calls, progress=False)
        mean = torch.tensor(run.table("moments").sort_values("unit")["mean"].to_numpy())
        torch.testing.assert_close(mean, expected.mean(0).double(), rtol=1e-6, atol=1e-7)
    with pytest.raises(CaptureError, match="called 2 times"):
        unitscope.analyze(model, data, layers="relu", progress=False)


def test_extract_features_reports_a_module_called_twice(tmp_path, shared):
    model, data, _first, second = shared
    with pytest.raises(CaptureError, match="calls='first' or calls='last' to extract_features"):
        extract_features(model, data, ["relu"], None, out=tmp_path / "f")
    store = extract_features(model, data, ["relu"], None, out=tmp_path / "g", calls="last")
    torch.testing.assert_close(store.features("relu", as_tensor=True), second)
    with pytest.raises(ValueError, match="calls='all'"):
        extract_features(model, data, ["relu"], None, out=tmp_path / "h", calls="all")


def test_unitscope_run_refuses_a_target_that_is_not_a_run(tmp_path):
    import shutil

    from unitscope.experiments import run_config

    cfg = tmp_path / "rf.toml"
    cfg.write_text('experiment = "receptive-field"\nmodel = "digits-cnn"\n')
    [(target, status)] = run_config(cfg, out=tmp_path / "runs", progress=False)
    assert status == "done"
    shutil.rmtree(target)
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a unitscope run"):
        run_config(cfg, out=tmp_path / "runs", progress=False, force=True)
    assert (target / "notes.txt").read_text() == "mine"


def test_extraction_cut_short_in_its_first_batch_resumes(tmp_path, digits_model, digits_test, monkeypatch):
    import unitscope.features as features_module

    write = features_module._write_progress

    def fail_after_the_arrays(root, meta):
        if meta["written"] > 0:  # the record of the first batch, written after its arrays
            raise KeyboardInterrupt
        write(root, meta)

    monkeypatch.setattr(features_module, "_write_progress", fail_after_the_arrays)
    with pytest.raises(KeyboardInterrupt):
        extract_features(digits_model, digits_test, ["fc"], None, out=tmp_path / "f", split="test")
    monkeypatch.undo()
    store = extract_features(digits_model, digits_test, ["fc"], None, out=tmp_path / "f", split="test")
    whole = extract_features(digits_model, digits_test, ["fc"], None, out=tmp_path / "g", split="test")
    assert store.complete and len(store) == 360
    torch.testing.assert_close(store.features("fc", as_tensor=True), whole.features("fc", as_tensor=True))


def test_ctrl_c_between_batches_keeps_the_batches_since_the_last_checkpoint(tmp_path, digits_model,
                                                                            digits_test):
    out = tmp_path / "run"
    kwargs = {"layers": "relu*", "batch_size": 50, "progress": False, "out": out}  # checkpoints every 30 s
    with pytest.raises(KeyboardInterrupt):
        unitscope.analyze(digits_model, Interrupting(digits_test, stop_at=210), **kwargs)
    resumed = unitscope.analyze(digits_model, Interrupting(digits_test), **kwargs)
    assert resumed.manifest["timings"]["resumed_batches"] == 4
    whole = unitscope.analyze(digits_model, digits_test, layers="relu*", batch_size=50, progress=False)
    assert_tables_close(resumed.table("moments"), whole.table("moments"))


def test_a_store_made_with_calls_first_is_not_returned_for_calls_last(tmp_path, shared):
    from unitscope.features import StaleFeaturesError

    model, data, first, second = shared
    store = extract_features(model, data, ["relu"], None, out=tmp_path / "f", calls="first")
    torch.testing.assert_close(store.features("relu", as_tensor=True), first)
    with pytest.raises(StaleFeaturesError, match="calls"):
        extract_features(model, data, ["relu"], None, out=tmp_path / "f", calls="last")
    again = extract_features(model, data, ["relu"], None, out=tmp_path / "f", calls="last", overwrite=True)
    torch.testing.assert_close(again.features("relu", as_tensor=True), second)


def test_a_callback_state_that_cannot_load_is_refused_at_the_first_epoch(tmp_path, digits_model):
    import numpy as np

    from unitscope.train import Callback, train

    class NumpyState(Callback):
        def state_dict(self):
            return {"loss": np.float32(0.5)}

    class DuckTyped:  # a callback that does not subclass Callback: no state methods
        def on_epoch_start(self, state):
            pass

        def on_batch_end(self, state):
            pass

        def on_epoch_end(self, state, metrics):
            pass

    data = unitscope.load_dataset("digits", "test")
    train(digits_model, data, epochs=1, checkpoint_dir=tmp_path / "a", callbacks=[DuckTyped()],
          progress=False)
    with pytest.raises(TypeError, match="NumpyState.state_dict"):
        train(digits_model, data, epochs=1, checkpoint_dir=tmp_path / "b", callbacks=[NumpyState()],
              progress=False)


def test_a_capture_error_inside_a_checked_forward_is_not_called_a_shape_error(shared):
    from unitscope.analyses.flops import flops

    model, *_ = shared
    model.input_shape = None  # no declared shape: every RuntimeError of the forward is examined
    with pytest.raises(CaptureError, match="called 2 times"), unitscope.capture(model, ["relu"]):
        flops(model, (4,))
