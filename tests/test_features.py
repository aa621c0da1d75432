"""Feature extraction to zarr: shapes, pooling identities, resume, reuse and stale stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import unitscope
from unitscope import features as feat_mod
from unitscope.capture import LayerError
from unitscope.data.arrays import dataset_fingerprint
from unitscope.features import FeatureStore, StaleFeaturesError, downsample_name, extract_features


class Interrupting(Dataset):
    """Wraps a dataset and raises KeyboardInterrupt when item ``stop_at`` is read."""

    def __init__(self, base: Dataset, stop_at: int) -> None:
        self.base, self.stop_at = base, stop_at

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i == self.stop_at:
            raise KeyboardInterrupt
        return self.base[i]

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.base)


def _full(model, data, layer):
    x = torch.stack([data[i][0] for i in range(len(data))])
    with unitscope.capture(model, layer) as acts, torch.no_grad():
        model.eval()(x)
    return acts[layer]


def test_pooled_shapes_and_identities(digits_model, digits_test, tmp_path):
    full = _full(digits_model, digits_test, "conv1")  # (360, 16, 8, 8)
    s8 = extract_features(digits_model, digits_test, ["conv1", "fc"], 8, out=tmp_path / "d8")
    s1 = extract_features(digits_model, digits_test, ["conv1"], 1, out=tmp_path / "d1")
    sn = extract_features(digits_model, digits_test, ["conv1"], None, out=tmp_path / "dn")
    s4 = extract_features(digits_model, digits_test, ["conv1"], 4, out=tmp_path / "d4")
    assert s4.features("conv1").shape == (360, 16 * 4 * 4)
    # d = H is the identity, channel-major, and equals the full flatten
    np.testing.assert_allclose(s8.features("conv1")[:], full.reshape(360, -1).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sn.features("conv1")[:], s8.features("conv1")[:])
    # d = 1 is global average pooling
    np.testing.assert_allclose(s1.features("conv1")[:], full.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    assert s8.features("fc").shape == (360, 10)  # 2-D outputs are stored as is
    assert s8.labels().tolist() == [int(digits_test[i][1]) for i in range(360)]
    assert s8.features("fc", as_tensor=True).dtype == torch.float32


def test_pixelwise_shapes(digits_model, digits_test, tmp_path):
    s = extract_features(digits_model, digits_test, ["conv1", "conv3", "fc"], "pixelwise", out=tmp_path)
    assert s.downsample == "pixelwise"
    assert s.features("conv1").shape == (360, 16, 8, 8)
    assert s.features("conv3").shape == (360, 64, 4, 4)
    assert s.features("fc").shape == (360, 10)
    np.testing.assert_allclose(s.features("conv1")[:], _full(digits_model, digits_test, "conv1").numpy(),
                               rtol=1e-6, atol=1e-6)


def test_resume_after_interrupt_matches_uninterrupted(digits_model, digits_test, tmp_path):
    layers = ["conv2", "relu3"]
    with pytest.raises(KeyboardInterrupt):
        extract_features(digits_model, Interrupting(digits_test, 250), layers, 2, out=tmp_path / "a",
                         batch_size=64)
    partial = FeatureStore(tmp_path / "a" / "data")
    assert len(partial) == 192 and not partial.complete  # three complete batches of 64
    resumed = extract_features(digits_model, digits_test, layers, 2, out=tmp_path / "a", batch_size=64)
    whole = extract_features(digits_model, digits_test, layers, 2, out=tmp_path / "b", batch_size=64)
    assert resumed.complete and len(resumed) == 360
    for layer in layers:
        np.testing.assert_array_equal(resumed.features(layer)[:], whole.features(layer)[:])
        assert resumed.features(layer).shape[0] == 360
    np.testing.assert_array_equal(resumed.labels(), whole.labels())


def test_finished_store_is_reused(digits_model, digits_test, tmp_path, monkeypatch):
    first = extract_features(digits_model, digits_test, "conv1", 2, out=tmp_path, split="test")

    def boom(*args, **kwargs):
        raise AssertionError("a finished store was recomputed")

    monkeypatch.setattr(feat_mod, "_extract", boom)
    again = extract_features(digits_model, digits_test, "conv1", 2, out=tmp_path, split="test")
    assert again.fingerprint == first.fingerprint


def test_stale_store_is_an_error_unless_overwrite(digits_test, tmp_path):
    torch.manual_seed(0)
    a = unitscope.load_model("digits-cnn")
    torch.manual_seed(1)
    b = unitscope.load_model("digits-cnn")
    extract_features(a, digits_test, "conv1", 2, out=tmp_path)
    with pytest.raises(StaleFeaturesError, match=r"different model.*overwrite=True"):
        extract_features(b, digits_test, "conv1", 2, out=tmp_path)
    with pytest.raises(StaleFeaturesError, match="different downsample"):
        extract_features(a, digits_test, "conv1", 4, out=tmp_path)
    s = extract_features(b, digits_test, "conv1", 2, out=tmp_path, overwrite=True)
    np.testing.assert_allclose(s.features("conv1")[:], _pool(b, digits_test), rtol=1e-5, atol=1e-6)


def test_a_store_whose_first_batch_failed_does_not_block_the_corrected_call(tmp_path):
    from torch import nn
    from torch.utils.data import TensorDataset

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 3))
    labels = torch.zeros(10, dtype=torch.long)
    with pytest.raises(RuntimeError):  # one channel for a three-channel conv: the first forward fails
        extract_features(model, TensorDataset(torch.randn(10, 1, 6, 6), labels), ["0"], 2, out=tmp_path)
    good = TensorDataset(torch.randn(10, 3, 6, 6), labels)
    store = extract_features(model, good, ["0"], 2, out=tmp_path)
    assert store.complete and store.features("0").shape == (10, 16)


def _pool(model, data):
    full = _full(model, data, "conv1")
    return torch.nn.functional.adaptive_avg_pool2d(full, 2).reshape(len(full), -1).numpy()


def test_bad_inputs(digits_model, digits_test, tmp_path):
    s = extract_features(digits_model, digits_test, "conv1", 2, out=tmp_path)
    with pytest.raises(LayerError, match="not in the feature store"):
        s.features("conv9")
    with pytest.raises(LayerError):
        extract_features(digits_model, digits_test, "conv9", 2, out=tmp_path / "x")
    for bad in (0, -2, "pixel", 2.5, True):
        with pytest.raises(ValueError, match="downsample"):
            downsample_name(bad)
    with pytest.raises(FileNotFoundError, match="extract_features"):
        FeatureStore(tmp_path / "nothing")


def test_a_damaged_store_names_the_fix(tmp_path):
    """A truncated or deleted array of a complete store is a StaleFeaturesError naming overwrite=True,
    not a shape mismatch or a bare FileNotFoundError later on."""
    import shutil

    import zarr

    data = unitscope.load_dataset("digits", "test")
    store = extract_features(unitscope.load_model("digits-cnn"), data, ["fc"], None, out=tmp_path,
                             split="test", device="cpu")
    arr = zarr.open_array(str(store.root / "fc.zarr"), mode="r+")
    arr.resize((100, arr.shape[1]))
    with pytest.raises(StaleFeaturesError, match="holds 100 rows but the store records 360.*overwrite=True"):
        FeatureStore(store.root).features("fc", as_tensor=True)
    shutil.rmtree(store.root / "labels.zarr")
    with pytest.raises(StaleFeaturesError, match="lacks a readable labels.zarr.*overwrite=True"):
        FeatureStore(store.root).labels()
