"""The single pass: numbers equal a full-batch reference, shards merge exactly, bad input fails clearly."""

from __future__ import annotations

import copy
import itertools

import pandas as pd
import pytest
import torch
from torch import nn

import unitscope
from unitscope.engine import EmptyDatasetError, InputError, shard_range
from unitscope.results import merge_runs

from .conftest import hook_counts


def reference_moments(model, data, layers):
    """Full-batch float64 statistics of the channel means of ``layers`` (slow and obvious)."""
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad(), unitscope.capture(model.eval(), layers, reduce="mean") as acts:
        model(x)
    rows = []
    for layer, a in acts.items():
        a = a.double()
        for u in range(a.shape[1]):
            rows.append({"layer": layer, "unit": u, "count": len(a), "mean": a[:, u].mean().item(),
                         "std": a[:, u].std().item(), "min": a[:, u].min().item(),
                         "max": a[:, u].max().item()})
    return pd.DataFrame(rows)


def assert_tables_close(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 1e-9, atol: float = 1e-9) -> None:
    a = a.sort_values(["layer", "unit"]).reset_index(drop=True)
    b = b.sort_values(["layer", "unit"]).reset_index(drop=True)
    assert list(a["layer"]) == list(b["layer"]) and list(a["unit"]) == list(b["unit"])
    for col in b.columns.drop(["layer", "unit"]):
        if col in a.columns:
            torch.testing.assert_close(torch.tensor(a[col].to_numpy(dtype="float64")),
                                       torch.tensor(b[col].to_numpy(dtype="float64")),
                                       rtol=rtol, atol=atol, msg=f"column {col}")


@pytest.mark.parametrize("batch_size", [1, 37, 1000])
def test_moments_equal_full_batch_reference(digits_model, digits_test, batch_size):
    run = unitscope.analyze(digits_model, digits_test, layers=["conv*", "relu*", "fc"],
                            batch_size=batch_size, progress=False)
    table = run.table("moments")
    assert (table["count"] == len(digits_test)).all() and (table["nonfinite"] == 0).all()
    ref = reference_moments(digits_model, digits_test, ["conv*", "relu*", "fc"])
    assert_tables_close(table, ref, rtol=1e-5, atol=1e-6)


def test_analyses_choose_their_own_layers_and_reduction(digits_model, digits_test):
    run = unitscope.analyze(digits_model, digits_test, layers="relu*",
                            analyses=[unitscope.Moments(layers="fc", reduce="max")], progress=False)
    assert set(run.table("moments")["layer"]) == {"fc"}
    assert run.manifest["analyses"] == [{"name": "moments", "config": {"layers": "fc", "reduce": "max"}}]


def test_shards_merged_equal_one_pass(tmp_path, digits_model, digits_test):
    whole = unitscope.analyze(digits_model, digits_test, layers="relu*", batch_size=50, progress=False)
    dirs = []
    for i in range(3):
        d = tmp_path / f"shard{i}"
        unitscope.analyze(digits_model, digits_test, layers="relu*", batch_size=50, shard=(i, 3),
                          out=d, progress=False)
        dirs.append(d)
    merged = merge_runs(dirs)
    assert_tables_close(merged.table("moments"), whole.table("moments"))
    assert (merged.table("moments")["count"] == 360).all()
    with pytest.raises(unitscope.RunError, match="missing"):
        merge_runs(dirs[:2])
    with pytest.raises(unitscope.RunError, match="overlaps"):
        merge_runs([dirs[0], dirs[0], dirs[1], dirs[2]])


def test_shard_ranges_are_contiguous_and_exact():
    for n in (0, 1, 5, 360, 1001):
        for world in (1, 2, 3, 7):
            spans = [shard_range(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_model_left_as_it_was(digits_model, digits_test):
    digits_model.train()
    before = hook_counts(digits_model)
    unitscope.analyze(digits_model, digits_test, layers="conv1", progress=False)
    assert digits_model.training and hook_counts(digits_model) == before


class WithNaN(torch.utils.data.Dataset):
    """Digits where two items are all NaN."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (torch.full_like(x, float("nan")) if i in (3, 200) else x), y


def test_nonfinite_activations_are_counted_not_averaged(digits_model, digits_test, caplog):
    run = unitscope.analyze(digits_model, WithNaN(digits_test), layers="relu1", progress=False)
    table = run.table("moments")
    assert (table["nonfinite"] == 2).all() and (table["count"] == 358).all()
    assert run.manifest["nonfinite"]["relu1"] == 2 * 16
    clean = [i for i in range(360) if i not in (3, 200)]
    ref = reference_moments(digits_model, torch.utils.data.Subset(digits_test, clean), "relu1")
    assert_tables_close(table, ref, rtol=1e-5, atol=1e-6)
    assert "non-finite" in caplog.text


def test_empty_dataset_is_an_error(digits_model):
    empty = unitscope.ArrayDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(EmptyDatasetError, match="empty"):
        unitscope.analyze(digits_model, empty, progress=False)


def test_wrong_input_shape_names_the_expected_shape(digits_model):
    data = unitscope.ArrayDataset(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(InputError, match=r"\(3, 32, 32\).*expects \(1, 8, 8\)"):
        unitscope.analyze(digits_model, data, progress=False)
    plain = nn.Sequential(nn.Linear(5, 2))
    with pytest.raises(InputError, match=r"cannot run on samples of shape \(3, 32, 32\).*dataset.s samples"):
        unitscope.analyze(plain, data, progress=False)
    ints = unitscope.ArrayDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
                                  torch.zeros(4, dtype=torch.int64))
    with pytest.raises(InputError, match="floating point"):
        unitscope.analyze(digits_model, ints, progress=False)


def test_unknown_table_and_duplicate_analyses(digits_model, digits_test):
    run = unitscope.analyze(digits_model, digits_test, layers="fc", progress=False)
    with pytest.raises(KeyError, match="has: moments"):
        run.table("saturation")
    with pytest.raises(ValueError, match="given twice"):
        unitscope.analyze(digits_model, digits_test, analyses=[unitscope.Moments(), unitscope.Moments()])


class Interrupting(torch.utils.data.Dataset):
    """Digits that raise KeyboardInterrupt when item ``stop_at`` is read (a killed run)."""

    def __init__(self, base, stop_at=None):
        self.base, self.stop_at = base, stop_at

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.stop_at:
            raise KeyboardInterrupt
        return self.base[i]

    def fingerprint(self):
        return self.base.fingerprint()


def test_interrupted_run_resumes_from_checkpoint(tmp_path, digits_model, digits_test):
    out = tmp_path / "run"
    kwargs = {"layers": "relu*", "batch_size": 50, "progress": False, "out": out, "checkpoint_every": 1}
    with pytest.raises(KeyboardInterrupt):
        unitscope.analyze(digits_model, Interrupting(digits_test, stop_at=210), **kwargs)
    assert not out.exists(), "an interrupted pass must not leave a run directory"
    assert (tmp_path / "run.partial").is_dir()
    resumed = unitscope.analyze(digits_model, Interrupting(digits_test), **kwargs)
    assert resumed.manifest["timings"]["resumed_batches"] == 4
    assert resumed.manifest["timings"]["samples"] == 160
    whole = unitscope.analyze(digits_model, digits_test, layers="relu*", batch_size=50, progress=False)
    assert_tables_close(resumed.table("moments"), whole.table("moments"))
    assert not (tmp_path / "run.partial").exists()
    assert unitscope.load_run(out).manifest["status"] == "complete"


def test_checkpoint_of_another_configuration_is_not_used(tmp_path, digits_model, digits_test):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        unitscope.analyze(digits_model, Interrupting(digits_test, 120), layers="relu*", batch_size=50,
                          out=out, checkpoint_every=1, progress=False)
    run = unitscope.analyze(digits_model, digits_test, layers="relu1", batch_size=50, out=out,
                            progress=False)
    assert run.manifest["timings"]["resumed_batches"] == 0
    assert (run.table("moments")["count"] == 360).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pass_equals_cpu_pass(digits_model, digits_test):
    cpu = unitscope.analyze(digits_model, digits_test, layers="relu*", device="cpu", progress=False)
    gpu = unitscope.analyze(digits_model, digits_test, layers="relu*", device="cuda", progress=False)
    assert next(digits_model.parameters()).device.type == "cpu", "the model must be moved back"
    assert_tables_close(gpu.table("moments"), cpu.table("moments"), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pass_leaves_results_and_models_on_the_cpu(digits_model, digits_test):
    """Arrays and states are host tensors whatever device the pass ran on, as a loaded run's are,
    and CKA's other model goes back where it was, as the analysed one does."""
    other = unitscope.load_model("digits-cnn")
    run = unitscope.analyze(digits_model, digits_test, layers="relu*", device="cuda", progress=False,
                            analyses=[unitscope.Saturation(), unitscope.CKA(other=other)])
    devices = {t.device.type for arrays in run.arrays.values() for t in arrays.values()}
    devices |= {t.device.type for a in run.analyses for acc in a.accumulators.values()
                for t in acc.state_dict().values() if isinstance(t, torch.Tensor)}
    assert devices == {"cpu"}
    assert next(other.parameters()).device.type == "cpu"


def test_state_size_does_not_grow_with_the_data(digits_model, digits_test):
    small = unitscope.analyze(digits_model, torch.utils.data.Subset(digits_test, range(10)),
                              layers="relu*", progress=False)
    large = unitscope.analyze(digits_model, digits_test, layers="relu*", batch_size=7, progress=False)

    def state_bytes(run):
        return sum(t.numel() * t.element_size() for acc in run.analysis("moments").accumulators.values()
                   for t in acc.state_dict().values())

    assert state_bytes(small) == state_bytes(large) > 0


def test_a_model_failing_on_its_declared_shape_is_not_called_an_input_error():
    """A RuntimeError of the model's own code on samples of the shape it declares is no shape
    problem: analyze raises it unchanged instead of blaming the dataset's shape."""
    class Broken(nn.Module):
        input_shape = (1, 8, 8)

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("a bug in forward")

    data = unitscope.ArrayDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="a bug in forward") as info:
        unitscope.analyze(Broken(), data, progress=False)
    assert not isinstance(info.value, InputError)


def test_a_cpu_allocation_failure_is_not_called_an_input_error():
    class Hungry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 281474976710656 bytes")

    data = unitscope.ArrayDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="can't allocate memory") as info:
        unitscope.analyze(Hungry(), data, progress=False)
    assert not isinstance(info.value, InputError)


def test_cpu_pass_leaves_precision_settings_alone_and_records_tf32(digits_model, digits_test):
    """Reading torch's legacy TF32 flags raises once its fp32_precision settings were used."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without fp32_precision settings")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        run = unitscope.analyze(digits_model, digits_test, layers="fc", progress=False, device="cpu",
                                tf32=False)
        assert matmul.fp32_precision == "tf32" and run.manifest["tf32"] is False
    finally:
        matmul.fp32_precision = before


def test_tf32_switch_for_cuda_is_restored_after_an_error():
    from unitscope.models.modes import tf32_allowed

    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    read = (lambda: matmul.fp32_precision) if new_api else (lambda: matmul.allow_tf32)
    before = read()
    with pytest.raises(RuntimeError, match="boom"), tf32_allowed(False, "cuda"):
        assert read() in ("ieee", False)
        raise RuntimeError("boom")
    with tf32_allowed(True, "cuda"):
        assert read() in ("tf32", True)
    assert read() == before


def test_an_analysis_object_serves_one_pass_only(digits_model, digits_test, tmp_path):
    moments = unitscope.Moments()
    run = unitscope.analyze(digits_model, digits_test, layers="fc", analyses=[moments], progress=False)
    assert run.table("moments")["count"].iloc[0] == 360
    with pytest.raises(ValueError, match="pass a new one for every pass"):  # it would count 720
        unitscope.analyze(digits_model, digits_test, layers="fc", analyses=[moments], progress=False)
    assert run.table("moments")["count"].iloc[0] == 360
    fresh = unitscope.Moments()
    with pytest.raises(InputError):  # a pass that fails before any batch is folded in ...
        unitscope.analyze(digits_model, [torch.zeros(1, 16, 16)] * 4, layers="fc", analyses=[fresh],
                          progress=False)
    again = unitscope.analyze(digits_model, digits_test, layers="fc", analyses=[fresh], progress=False)
    assert again.table("moments")["count"].iloc[0] == 360  # ... leaves the analysis usable
    # an analysis that holds finished passes (loaded, merged, or of an empty shard) is refused too
    from unitscope.results import load_analysis_states

    saved = run.save(tmp_path / "run")
    loaded = load_analysis_states(saved / "states" / "moments.safetensors")
    merged = unitscope.Moments().merge(unitscope.load_run(saved).analysis("moments"))
    empty = unitscope.Moments()
    unitscope.analyze(digits_model, torch.utils.data.Subset(digits_test, range(2)), layers="fc", shard=(3, 4),
                      analyses=[empty], progress=False)
    for used in (loaded, merged, empty):
        with pytest.raises(ValueError, match="pass a new one"):
            unitscope.analyze(digits_model, digits_test, layers="fc", analyses=[used], progress=False)


def test_calls_all_is_refused_by_analyze_not_silently_reduced_to_the_first_call(digits_model, digits_test):
    with pytest.raises(ValueError, match=r"calls='all'\) is not supported"):
        unitscope.analyze(digits_model, digits_test, layers="fc", calls="all", progress=False)


def test_inputs_are_cast_to_the_models_floating_dtype(digits_model, digits_test):
    items = [digits_test[i][0] for i in range(8)]
    want = unitscope.analyze(digits_model, items, layers="fc", progress=False).table("moments")
    doubles = unitscope.analyze(digits_model, [x.double() for x in items], layers="fc",
                                progress=False).table("moments")  # numpy-style float64 data
    pd.testing.assert_frame_equal(want, doubles)
    wide = copy.deepcopy(digits_model).double()  # a float64 model gets its float32 data in float64
    got = unitscope.analyze(wide, items, layers="fc", progress=False).table("moments")
    assert (got["mean"] - want["mean"]).abs().max() < 1e-5
