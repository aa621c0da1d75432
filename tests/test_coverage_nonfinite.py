"""Surprise criteria and IDC leave NaN and inf out of their profiles, and inf covers no IDC cell."""

from __future__ import annotations

import pytest
import torch

from unitscope.coverage import DSC, IDC, LSC, MDSC


def _data():
    torch.manual_seed(0)
    train = torch.randn(120, 3, dtype=torch.float64)
    classes = torch.arange(120) % 2
    test = torch.randn(30, 3, dtype=torch.float64)
    return train, classes, test, torch.arange(30) % 2


@pytest.mark.parametrize("make", [lambda: LSC(bounds=(0, 20), n_buckets=50),
                                  lambda: DSC(bounds=(0, 4), n_buckets=50),
                                  lambda: MDSC(bounds=(0, 20), n_buckets=50)])
def test_surprise_profiles_ignore_nonfinite_training_rows(make):
    train, classes, test, test_classes = _data()
    bad = torch.tensor([[float("inf"), 0.0, 0.0], [0.0, float("-inf"), 1.0], [float("nan"), 0.0, 0.0]],
                       dtype=torch.float64)
    clean = make().fit(train, classes)
    dirty = make().fit(torch.cat([train, bad]), torch.cat([classes, torch.tensor([0, 1, 0])]))
    assert clean.update(test, test_classes) == dirty.update(test, test_classes) > 0
    torch.testing.assert_close(clean.surprise(test, test_classes), dirty.surprise(test, test_classes))


def test_idc_inf_activation_covers_no_cell():
    torch.manual_seed(0)
    train = torch.randn(60, 2)
    idc = IDC(m=2, k=2).fit(train, units=[0, 1])
    assert idc.update(torch.tensor([[float("inf"), 0.0], [0.0, float("-inf")]])) == 0.0
    assert idc.update(train[:1]) > 0
