"""Linear probes: agreement with scikit-learn, spec sanity cases, caching and bad input."""

from __future__ import annotations

import logging

import pytest
import torch

import unitscope
from unitscope.analyses import probes as probes_mod
from unitscope.analyses.probes import COLUMNS, fit_probes, probes
from unitscope.capture import LayerError
from unitscope.features import extract_features
from unitscope.stats.logreg import accuracy, fit_logreg, fit_logreg_many, objective


@pytest.fixture(scope="module")
def digits_feats(tmp_path_factory):
    """Pooled (4×4) relu2 and (2×2) conv1 features of a random-weight digits-cnn, both splits."""
    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    out = tmp_path_factory.mktemp("feats")
    tr = extract_features(model, unitscope.load_dataset("digits", "train"), ["conv1", "relu2"], 4, out=out,
                          split="train")
    te = extract_features(model, unitscope.load_dataset("digits", "test"), ["conv1", "relu2"], 4, out=out,
                          split="test")
    return tr, te


@pytest.mark.parametrize("layer", ["conv1", "relu2"])
def test_matches_sklearn(digits_feats, layer):
    from sklearn.linear_model import LogisticRegression

    tr, te = digits_feats
    xtr, xte = tr.features(layer, as_tensor=True), te.features(layer, as_tensor=True)
    ytr, yte = tr.labels(), te.labels()
    sk = LogisticRegression(C=1.0, max_iter=5000).fit(xtr.numpy(), ytr.numpy())
    sk_tight = LogisticRegression(C=1.0, max_iter=5000, tol=1e-7).fit(xtr.double().numpy(), ytr.numpy())
    w_sk, b_sk = torch.from_numpy(sk_tight.coef_), torch.from_numpy(sk_tight.intercept_)
    obj_sk = objective(xtr.double(), ytr, w_sk, b_sk)
    obj_sk_default = objective(xtr.double(), ytr, torch.from_numpy(sk.coef_), torch.from_numpy(sk.intercept_))

    r32 = fit_logreg(xtr, ytr)
    # conv1's pooled features have rank ~57 of 256: weights along the near-null directions are set by
    # the penalty alone (curvature ~1/(C·n)), so agreeing with sklearn's weights to 1e-4 needs a
    # gradient tolerance below the default 1e-6 (at which they differed by up to 2e-4 here)
    r64 = fit_logreg(xtr, ytr, dtype=torch.float64, tol=1e-8)
    assert r32.converged and r64.converged
    obj32 = objective(xtr.double(), ytr, r32.weight.double(), r32.bias.double())
    assert abs(obj32 - obj_sk) / obj_sk < 1e-4
    assert obj32 <= obj_sk_default * (1 + 1e-6)  # at least as good as sklearn's default stop
    assert abs(r64.objective - obj_sk) / obj_sk < 1e-7
    assert abs(r32.objective - obj32) / obj32 < 1e-5  # the reported objective is the real one
    acc_sk = sk.score(xte.numpy(), yte.numpy())  # sklearn's defaults stop early (tol 1e-4)
    acc_tight = sk_tight.score(xte.double().numpy(), yte.numpy())
    acc32 = accuracy(xte, yte, r32.weight, r32.bias)
    print(f"{layer}: objective rel. diff f32 {abs(obj32 - obj_sk) / obj_sk:.2e}, "
          f"f64 {abs(r64.objective - obj_sk) / obj_sk:.2e}; test acc ours {acc32:.4f}, "
          f"sklearn tight {acc_tight:.4f}, sklearn default {acc_sk:.4f}")
    assert abs(acc32 - acc_tight) <= 0.005
    assert abs(acc32 - acc_sk) <= 0.01
    assert abs(accuracy(xte, yte, r64.weight, r64.bias) - acc_tight) <= 1 / 360 + 1e-12
    torch.testing.assert_close(r64.weight, w_sk, rtol=1e-3, atol=1e-4)


def test_unpreconditioned_fit_reaches_same_optimum(digits_feats):
    tr, _ = digits_feats
    x, y = tr.features("conv1", as_tensor=True).double(), tr.labels()
    a = fit_logreg(x, y, dtype=torch.float64)
    b = fit_logreg(x, y, dtype=torch.float64, precondition=False)
    # both stop once every gradient entry is below 1e-6, which bounds the gap to the optimum by
    # about |g|² · C · n / 2 (strong convexity 1/(C·n)), not by 1e-7: another BLAS gave 1.09e-7
    assert abs(a.objective - b.objective) / a.objective < 1e-6


def test_one_hot_features_are_separable():
    torch.manual_seed(0)
    y = torch.arange(600) % 10
    x = torch.nn.functional.one_hot(y, 10).float() + 0.01 * torch.randn(600, 10)
    r = fit_logreg(x[:400], y[:400])
    assert r.converged
    assert accuracy(x[400:], y[400:], r.weight, r.bias) == 1.0


def test_label_independent_features_give_chance_accuracy():
    g = torch.Generator().manual_seed(0)
    n_test, k = 2000, 10
    y = torch.arange(1000 + n_test) % k
    x = torch.randn(1000 + n_test, 20, generator=g)
    r = fit_logreg(x[:1000], y[:1000])
    acc = accuracy(x[1000:], y[1000:], r.weight, r.bias)
    half = 2.576 * (0.1 * 0.9 / n_test) ** 0.5  # 99 % normal approximation of the binomial interval
    assert 0.1 - half <= acc <= 0.1 + half


def test_column_permutation_invariance_and_scale_dependence(digits_feats):
    tr, te = digits_feats
    xtr, xte = tr.features("conv1", as_tensor=True).double(), te.features("conv1", as_tensor=True).double()
    ytr, yte = tr.labels(), te.labels()
    perm = torch.randperm(xtr.shape[1], generator=torch.Generator().manual_seed(0))
    a = fit_logreg(xtr, ytr, dtype=torch.float64)
    b = fit_logreg(xtr[:, perm], ytr, dtype=torch.float64)
    assert accuracy(xte, yte, a.weight, a.bias) == accuracy(xte[:, perm], yte, b.weight, b.bias)
    assert abs(a.objective - b.objective) < 1e-9
    # documented non-invariance: without standardisation, L2 with C=1 depends on the feature scale
    c = fit_logreg(xtr * 100, ytr, dtype=torch.float64)
    assert not torch.allclose(c.weight * 100, a.weight, rtol=1e-3)


def test_probes_table_cache_and_pairing(digits_model, tmp_path, monkeypatch, caplog):
    tr, te = unitscope.load_dataset("digits", "train"), unitscope.load_dataset("digits", "test")
    t1 = probes(digits_model, tr, te, ["conv1", "relu3", "fc"], 2, out=tmp_path)
    assert list(t1.columns) == COLUMNS
    assert list(t1.layer) == ["conv1", "relu3", "fc"]
    assert t1.converged.all() and not t1.cached.any()
    assert list(t1.features) == [16 * 4, 64 * 4, 10]
    from unitscope.train import evaluate

    model_acc = evaluate(digits_model, te)["acc"]
    torch.testing.assert_close(torch.tensor(t1.relative_test_acc.values),
                               torch.tensor(t1.test_acc.values / model_acc), rtol=1e-12, atol=0)
    # the model's argmax is a linear classifier on its logits
    assert t1.set_index("layer").test_acc["fc"] >= model_acc - 0.05

    def no_fit(*args, **kwargs):
        raise AssertionError("a cached probe was refitted")

    monkeypatch.setattr(probes_mod, "fit_logreg_many", no_fit)
    t2 = probes(digits_model, tr, te, ["conv1", "relu3", "fc"], 2, out=tmp_path)
    assert t2.cached.all()
    cols = ["train_acc", "test_acc", "objective", "n_iter"]
    assert t2[cols].equals(t1[cols])
    # pairing is by layer name, whatever order the layers are asked in
    s_tr = extract_features(digits_model, tr, ["conv1", "relu3", "fc"], 2, out=tmp_path, split="train")
    s_te = extract_features(digits_model, te, ["conv1", "relu3", "fc"], 2, out=tmp_path, split="test")
    t3 = fit_probes(s_tr, s_te, ["fc", "conv1", "relu3"], cache=tmp_path / "probes", model_acc=model_acc)
    assert t3.set_index("layer")[cols].sort_index().equals(t1.set_index("layer")[cols].sort_index())
    with pytest.raises(LayerError, match="missing from the train feature store"):
        fit_probes(s_tr, s_te, ["conv2"], cache=None)


def test_pixelwise_probes(digits_model, tmp_path):
    tr, te = unitscope.load_dataset("digits", "train"), unitscope.load_dataset("digits", "test")
    t = probes(digits_model, tr, te, ["conv3", "fc"], "pixelwise", out=tmp_path, model_acc=0.5)
    conv3 = t[t.layer == "conv3"]
    assert len(conv3) == 16 and set(conv3.features) == {64}
    assert conv3.position.iloc[0] == "(0,0)" and conv3.position.iloc[-1] == "(3,3)"
    assert t[t.layer == "fc"].position.isna().all()


def test_non_convergence_is_flagged(digits_feats, caplog):
    tr, te = digits_feats
    with caplog.at_level(logging.WARNING, logger="unitscope.analyses.probes"):
        t = fit_probes(tr, te, ["relu2"], max_iter=3, cache=None, model_acc=0.9)
    assert not t.converged.any() and (t.stop == "max_iter").all()
    assert "did not converge" in caplog.text
    r = fit_logreg(tr.features("relu2", as_tensor=True), tr.labels(), max_iter=3)
    assert not r.converged and r.n_iter <= 3 and r.stop == "max_iter"


def test_stop_says_whether_the_gradient_test_or_a_stalled_objective_ended_the_fit():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([0, 0, 1, 1])
    exact = fit_logreg(x, y, dtype=torch.float64, tol=1e-6)  # a tiny problem reaches the tolerance
    assert exact.converged and exact.stop == "gradient"
    # features scaled by 1e4 make the float32 objective flat at its resolution long before the
    # gradient in the fitting coordinates falls to 1e-12: a stop on 'no change', still converged
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(300, 40, generator=g)
    labels = (wide[:, :3] @ torch.randn(3, 4, generator=g)).argmax(1)
    flat = fit_logreg(wide * 1e4, labels, tol=1e-12)
    assert flat.converged and flat.stop == "no change"


def test_fit_logreg_bad_input():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(ValueError, match="C=0: C is the inverse L2 strength"):
        fit_logreg(x, y, C=0)
    with pytest.raises(ValueError, match="tol=-1.0: give a gradient tolerance >= 0"):
        fit_logreg(x, y, tol=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        fit_logreg(x[:, :, None], y)
    with pytest.raises(ValueError, match="one label per sample"):
        fit_logreg(x, y[:5])
    with pytest.raises(ValueError, match="two classes"):
        fit_logreg(x, torch.zeros(10, dtype=torch.long))


def test_joint_fit_equals_separate_fits():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(300) % 4
    signal = torch.nn.functional.one_hot(y, 4).double()

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    xs = [signal @ randn(4, 6) + randn(300, 6), signal @ randn(4, 6) + 2 * randn(300, 6),
          torch.cat([signal, randn(300, 9)], 1)]
    joint = fit_logreg_many(xs, y, 0.5, dtype=torch.float64, tol=1e-9)
    for x, r in zip(xs, joint):
        alone = fit_logreg(x, y, 0.5, dtype=torch.float64, tol=1e-9)
        assert r.converged and r.weight.shape == alone.weight.shape
        assert abs(r.objective - alone.objective) < 1e-12
        torch.testing.assert_close(r.weight, alone.weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(r.bias, alone.bias, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        fit_logreg_many([], y)


@pytest.mark.parametrize("k", [2, 10, 16, 17])
def test_padded_logits_equal_the_plain_product(k):
    from unitscope.stats.logreg import _logits

    torch.manual_seed(k)
    x, w, b = torch.randn(3, 50, 40), torch.randn(3, k, 40), torch.randn(3, k)
    z = _logits(x, w, b)
    assert z.shape == (3, 50, k)
    torch.testing.assert_close(z, torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)), rtol=1e-5, atol=1e-5)
    zd = _logits(x.double(), w.double(), b.double())
    torch.testing.assert_close(zd, x.double() @ w.double().transpose(1, 2) + b.double().unsqueeze(1),
                               rtol=1e-12, atol=1e-12)


def test_corrupt_cached_probe_is_refitted_with_a_warning(digits_feats, tmp_path, caplog):
    tr, te = digits_feats
    cache = tmp_path / "probes"
    first = fit_probes(tr, te, ["conv1"], cache=cache, model_acc=0.9)
    (stored,) = cache.glob("*.safetensors")
    stored.write_bytes(b"not a safetensors file" * 4)
    with caplog.at_level(logging.WARNING, logger="unitscope.analyses.probes"):
        again = fit_probes(tr, te, ["conv1"], cache=cache, model_acc=0.9)
    assert "ignoring the unreadable cached probe" in caplog.text and "refitting" in caplog.text
    assert not again.cached.any()
    assert again.test_acc.tolist() == first.test_acc.tolist()
    # the refit replaced the corrupt file: the next call reads it from the cache
    assert fit_probes(tr, te, ["conv1"], cache=cache, model_acc=0.9).cached.all()


def test_non_finite_features_name_the_layer_and_the_row_count(digits_feats, tmp_path):
    import shutil

    import zarr

    tr, te = digits_feats
    copy = tmp_path / "train"
    shutil.copytree(tr.root, copy)
    arr = zarr.open_array(str(copy / "relu2.zarr"), mode="r+")
    arr[3, 0] = float("nan")
    arr[7, 5] = float("inf")
    arr[7, 6] = float("nan")
    bad = type(tr)(copy)
    with pytest.raises(ValueError, match=r"layer 'relu2': 2 of \d+ training feature rows .* NaN or infinite "
                                         r"values.*clean the data .* check the model"):
        fit_probes(bad, te, ["conv1", "relu2"], cache=None)


@pytest.mark.parametrize(("options", "message"), [
    ({"C": 0.0}, "C=0.0: C is the inverse L2 strength and must be a positive finite number"),
    ({"C": float("nan")}, "C=nan"),
    ({"dtype": "float16"}, "use torch.float32 or torch.float64"),
    ({"max_iter": 0}, "max_iter=0: give a positive integer"),
    ({"tol": float("inf")}, "tol=inf: give a gradient tolerance >= 0"),
])
def test_bad_options_are_refused_before_any_extraction(digits_model, tmp_path, options, message):
    tr, te = unitscope.load_dataset("digits", "train"), unitscope.load_dataset("digits", "test")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        probes(digits_model, tr, te, ["fc"], 2, out=tmp_path / "p", **options)
    assert not (tmp_path / "p").exists()


def test_unlabelled_data_is_refused_before_any_extraction(digits_model, tmp_path):
    te = unitscope.load_dataset("digits", "test")
    bare = [te[i][0] for i in range(20)]
    with pytest.raises(ValueError, match="the train dataset's items carry no labels"):
        probes(digits_model, bare, te, ["fc"], 2, out=tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_fit_options_take_one_element_tensors_and_arrays():
    """A ``torch.logspace`` sweep passes 0-d tensors as C; they fit as the same Python number."""
    import numpy as np

    from unitscope.stats.logreg import check_fit_options

    x, y = torch.randn(30, 3, generator=torch.Generator().manual_seed(0)), torch.arange(30) % 3
    plain = fit_logreg(x, y, C=0.5, dtype=torch.float64)
    for c in (torch.tensor(0.5), np.array(0.5), torch.logspace(-1, 1, 3)[0] * 5):
        assert torch.allclose(fit_logreg(x, y, C=c, dtype=torch.float64).weight, plain.weight)
    tol = torch.tensor(1e-6, dtype=torch.float64)
    assert check_fit_options(np.float32(2.0), 1e3, tol) == (2.0, 1000, 1e-6)
    with pytest.raises(ValueError, match="max_iter=1.5: give a positive integer"):
        check_fit_options(1.0, 1.5, 1e-6)
    with pytest.raises(ValueError, match="C=tensor"):
        check_fit_options(torch.tensor([1.0, 2.0]), 10, 1e-6)


def test_stores_of_two_models_are_refused(tmp_path):
    from unitscope.analyses.probes import fit_probes
    from unitscope.features import extract_features

    te = unitscope.load_dataset("digits", "test")
    small = torch.utils.data.Subset(te, range(40))
    torch.manual_seed(0)
    one, two = unitscope.load_model("digits-cnn"), unitscope.load_model("digits-cnn")
    tr_store = extract_features(one, small, ["fc"], None, out=tmp_path / "a", split="train", device="cpu")
    te_store = extract_features(two, small, ["fc"], None, out=tmp_path / "b", split="test", device="cpu")
    with pytest.raises(ValueError, match="extracted with a different model"):
        fit_probes(tr_store, te_store, cache=None)


def test_probes_are_fitted_and_released_in_bounded_groups(digits_feats, monkeypatch):
    """With a small JOINT_LIMIT a layer's probes are fitted and scored before the next layer is
    loaded (features are not all held at once), and the table equals one fitted in one group."""
    from unitscope.analyses import probes as probes_mod
    from unitscope.features import FeatureStore

    tr, te = digits_feats
    whole = fit_probes(tr, te, ["conv1", "relu2"], cache=None, model_acc=0.9)
    events: list[str] = []
    load, row = FeatureStore.features, probes_mod._row

    def logged_load(self, layer, as_tensor=False):
        events.append(f"load {layer}")
        return load(self, layer, as_tensor)

    def logged_row(probe, *args):
        events.append(f"row {probe['layer']}")
        return row(probe, *args)

    monkeypatch.setattr(FeatureStore, "features", logged_load)
    monkeypatch.setattr(probes_mod, "_row", logged_row)
    monkeypatch.setattr(probes_mod, "JOINT_LIMIT", 1000)
    parts = fit_probes(tr, te, ["conv1", "relu2"], cache=None, model_acc=0.9)
    assert events.index("row conv1") < events.index("load relu2")
    cols = ["layer", "train_acc", "test_acc", "features"]
    assert parts[cols].equals(whole[cols])


def test_the_probe_cache_key_includes_the_class_count():
    from unitscope.analyses.probes import _cache_key

    args = ("feat", "fc", None, 1.0, "float32", "4", 1000, 1e-6)
    assert _cache_key(*args, 10) != _cache_key(*args, 11) and _cache_key(*args, 10) == _cache_key(*args, 10)
