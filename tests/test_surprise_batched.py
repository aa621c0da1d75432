"""LSC, DSC and MDSC compute every class of a batch at once: equal to the class-by-class computation.

The references below are the former per-class implementations (one triangular solve, matrix
product or distance block per class present in the batch), kept here only to check the batched
path against them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unitscope.coverage import surprise
from unitscope.coverage.surprise import DSC, LSC, MDSC, MM, _cholesky

RTOL = 1e-9


def _factor(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    factor = _cholesky(cov)
    if factor is None:
        eye = torch.eye(cov.shape[0], dtype=cov.dtype)
        factor = _cholesky(cov + ridge * cov.diagonal().mean() * eye)
    assert factor is not None
    return factor


def _per_class(crit: surprise._Surprise, x: torch.Tensor, classes: torch.Tensor, one_class) -> np.ndarray:
    """SA class by class with ``one_class(crit, masked traces, c)``; NaN for a class without a model."""
    x = x[:, crit.mask()].double()
    out = torch.full((len(x),), math.nan, dtype=torch.float64)
    for c in crit.usable_classes():
        rows = classes == c
        if rows.any():
            out[rows] = one_class(crit, x[rows], c)
    return out.numpy()


def _lsc_class(crit: LSC, x: torch.Tensor, c: int) -> torch.Tensor:
    train = crit._class_data()[c]
    n, d = train.shape
    if crit.bandwidth == "scott":
        cov = torch.atleast_2d(torch.cov(train.T)) * n ** (-2.0 / (d + 4))
    else:
        cov = torch.eye(d, dtype=torch.float64) * float(crit.bandwidth) ** 2
    chol = _factor(cov, crit.ridge)
    z = torch.linalg.solve_triangular(chol, train.T, upper=False)
    proj = torch.linalg.solve_triangular(chol.T, z, upper=True)
    log_norm = -math.log(n) - 0.5 * d * math.log(2 * math.pi) - float(chol.diagonal().log().sum())
    quad = torch.linalg.solve_triangular(chol, x.T, upper=False).square().sum(0)
    d2 = (quad[:, None] + z.square().sum(0)[None, :] - 2 * (x @ proj)).clamp_(min=0)
    return -(torch.logsumexp(-0.5 * d2, dim=1) + log_norm)


def _dsc_class(crit: DSC, x: torch.Tensor, c: int) -> torch.Tensor:
    data = crit._class_data()
    own = data[c]
    others = torch.cat([v for k, v in data.items() if k != c])
    dist_b = torch.cdist(own, others, compute_mode=MM).amin(1)
    dist_a, nearest = torch.cdist(x, own, compute_mode=MM).min(1)
    return dist_a / dist_b[nearest]


def _mdsc_class(crit: MDSC, x: torch.Tensor, c: int) -> torch.Tensor:
    keep = crit.mask()
    n = float(crit._sh["count"][c])
    cov = crit._sh["m2"][c][keep][:, keep] / (n - (1 if crit.covariance == "sample" else 0))
    factor = _factor(cov, crit.ridge)
    delta = (x - crit._sh["mean"][c][keep]).T
    return torch.linalg.solve_triangular(factor, delta, upper=False).square().sum(0).sqrt()


REFERENCE = {LSC: _lsc_class, DSC: _dsc_class, MDSC: _mdsc_class}


def _data(n_classes: int, seed: int, d: int = 6) -> tuple[torch.Tensor, ...]:
    """Training traces of ``n_classes`` classes (uneven sizes, a class of 4 inputs with a singular
    kernel covariance and a class of one input), and test traces including a class never fitted."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(s) for s in torch.randint(12, 40, (n_classes,), generator=gen)]
    sizes[1], sizes[-1] = 4, 1
    centres = torch.randn(n_classes, d, generator=gen) * 3
    train = torch.cat([centres[c] + torch.randn(s, d, generator=gen) for c, s in enumerate(sizes)])
    classes = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    shuffle = torch.randperm(len(train), generator=gen)
    test_classes = torch.randint(0, n_classes + 1, (300,), generator=gen)  # n_classes: never fitted
    test = centres[test_classes.clamp(max=n_classes - 1)] + 1.5 * torch.randn(300, d, generator=gen)
    return train[shuffle], classes[shuffle], test, test_classes


CRITERIA = [
    pytest.param(lambda: LSC(min_var=0.0), id="lsc-scott"),
    pytest.param(lambda: LSC(bandwidth=0.7, min_var=0.0), id="lsc-isotropic"),
    pytest.param(lambda: DSC(min_var=0.0), id="dsc"),
    pytest.param(lambda: DSC(min_var=0.0, var_scope="global"), id="dsc-global"),
    pytest.param(lambda: MDSC(), id="mdsc"),
    pytest.param(lambda: MDSC(covariance="sample"), id="mdsc-sample"),
]


@pytest.mark.parametrize("make", CRITERIA)
@pytest.mark.parametrize("n_classes", [3, 6, 10])
def test_batched_equals_per_class(make, n_classes):
    train, classes, test, test_classes = _data(n_classes, seed=n_classes)
    crit = make().fit(train, classes)
    got = crit.surprise(test, test_classes).numpy()
    want = _per_class(crit, test, test_classes, REFERENCE[type(crit)])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[(test_classes == n_classes).numpy()]).all()  # never fitted
    skipped = crit.usable_classes() != list(range(n_classes))
    if skipped:  # the one-input class has no model
        assert np.isnan(got[(test_classes == n_classes - 1).numpy()]).all()
    assert np.isfinite(got).sum() > 100
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)


def test_ridged_class_equals_per_class():
    train, classes, test, test_classes = _data(5, seed=1)
    for crit in (LSC(min_var=0.0), MDSC()):
        crit.fit(train, classes)
        got = crit.surprise(test, test_classes).numpy()
        assert crit.diagnostics() == {}  # not started: no test inputs yet
        crit.update(test, test_classes)
        assert crit.diagnostics()["ridged"] >= 1  # the 4-input class in 6 units is singular
        assert crit.diagnostics()["skipped_classes"] == 1
        want = _per_class(crit, test, test_classes, REFERENCE[type(crit)])
        np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("make", CRITERIA)
def test_independent_of_batching_and_row_blocks(make, monkeypatch):
    train, classes, test, test_classes = _data(4, seed=7)
    crit = make().fit(train, classes)
    whole = crit.surprise(test, test_classes).numpy()
    rows = np.concatenate([crit.surprise(test[i:i + 1], test_classes[i:i + 1]).numpy() for i in range(40)])
    np.testing.assert_allclose(rows, whole[:40], rtol=1e-12)
    monkeypatch.setattr(surprise, "_rows_per_block", lambda columns: 7)  # many row blocks
    np.testing.assert_allclose(crit.surprise(test, test_classes).numpy(), whole, rtol=1e-12)


@pytest.mark.parametrize("make", CRITERIA)
def test_unusable_only_and_empty_batches(make):
    train, classes, test, _ = _data(3, seed=3)
    crit = make().fit(train, classes)
    assert np.isnan(crit.surprise(test[:5], torch.full((5,), 99)).numpy()).all()
    assert crit.surprise(test[:0], torch.zeros(0, dtype=torch.long)).shape == (0,)
    crit.update(test[:5], torch.full((5,), 99))
    assert crit.diagnostics()["dropped"] == 5
    crit.update(test[:5], torch.zeros(5, dtype=torch.long))
    assert crit.diagnostics()["dropped"] == 5


def test_dsc_ties_take_the_first_nearest_trace_of_the_class():
    """Two same-class traces equally near: the first in training order is x_a, as before."""
    test, test_cls = torch.tensor([[0.0]]), torch.tensor([0])
    for order, expected in (([1.0, -1.0], 1 / 2), ([-1.0, 1.0], 1 / 4)):
        train = torch.tensor([[order[0]], [3.0], [order[1]], [-10.0]])
        dsc = DSC(min_var=0.0, var_scope="global").fit(train, torch.tensor([0, 1, 0, 2]))
        assert dsc.surprise(test, test_cls).item() == pytest.approx(expected, rel=1e-12)
        # a class with a single, far training trace does not change the tie
        assert dsc.surprise(torch.tensor([[0.0], [-9.0]]), torch.tensor([0, 2])).tolist()[0] == pytest.approx(
            expected, rel=1e-12)


def test_lsc_auto_bounds_use_the_batched_training_lsa():
    train, classes, test, test_classes = _data(6, seed=11)
    lsc = LSC(min_var=0.0).fit(train, classes)
    lsc.update(test, test_classes)
    lsa = _per_class(lsc, train, classes, _lsc_class)
    assert lsc._sh["bounds"][0].item() == math.floor(np.nanmin(lsa))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", CRITERIA)
def test_cuda_matches_cpu(make):
    train, classes, test, test_classes = _data(5, seed=5)
    cpu = make().fit(train, classes).surprise(test, test_classes).numpy()
    gpu = make().fit(train.cuda(), classes.cuda())
    got = gpu.surprise(test.cuda(), test_classes.cuda())
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), cpu, rtol=1e-9)


@pytest.mark.parametrize("make", CRITERIA[:3])
def test_imbalanced_classes_are_stacked_in_parts_of_similar_size(make):
    gen = torch.Generator().manual_seed(7)
    sizes = [1500, 30, 25, 40, 35]  # one large class: padding all to 1500 would be 40x the work
    centres = torch.randn(len(sizes), 5, generator=gen) * 3
    train = torch.cat([centres[c] + torch.randn(s, 5, generator=gen) for c, s in enumerate(sizes)])
    classes = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    test_classes = torch.randint(0, len(sizes), (200,), generator=gen)
    test = centres[test_classes] + 1.5 * torch.randn(200, 5, generator=gen)
    crit = make().fit(train, classes)
    got = crit.surprise(test, test_classes).numpy()
    want = _per_class(crit, test, test_classes, REFERENCE[type(crit)])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
    parts = crit._cache["parts"]
    assert sorted(len(members) for members, _ in parts) == [1, 4]
    for members, model in parts:  # the training side of a part is padded to at most 2x its smallest class
        assert crit._group_width(model) <= max(2 * min(sizes[i] for i in members), 5)


def test_size_parts():
    from unitscope.coverage.surprise import _size_parts

    assert _size_parts([10, 10, 10]) == [[0, 1, 2]]
    assert _size_parts([100, 49, 50]) == [[0, 2], [1]]
    assert _size_parts([1]) == [[0]]
