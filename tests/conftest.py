"""Shared fixtures: tiny models and data, and a check that no hook is left on any module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unitscope


def hook_counts(model: nn.Module) -> int:
    """Total number of hooks registered on every module of ``model``."""
    total = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs"):
            total += len(getattr(m, attr, {}) or {})
    return total


@pytest.fixture
def digits_model() -> nn.Module:
    torch.manual_seed(0)
    return unitscope.load_model("digits-cnn")


@pytest.fixture(scope="session")
def digits_test():
    return unitscope.load_dataset("digits", "test")


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """The output directory of one ``unitscope demo --quick`` run, shared by the tests that read it."""
    from unitscope.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["-q", "demo", "--quick", "--out", str(out)]) == 0
    return out
