"""``unitscope demo``: train the small built-in models on bundled data, analyse them, report.

Every family adds its part here as it lands; so far: training ``digits-cnn`` on scikit-learn's
digits and the per-unit activation statistics of every conv, ReLU and linear layer.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def run_demo(out: Path, quick: bool = False, progress: bool = True) -> Path:
    """Train ``digits-cnn``, analyse its test set, write the run and its report under ``out``."""
    from . import analyze, load_dataset, load_model
    from .analyses import Moments
    from .report import write_report
    from .train import train

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    train_data, test_data = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = load_model("digits-cnn")
    epochs = 3 if quick else 10
    log.info("training digits-cnn on %d digits for %d epochs", len(train_data), epochs)
    history = train(model, train_data, test_data, epochs=epochs, lr=3e-3, batch_size=32, seed=0,
                    device="cpu")
    log.info("test accuracy %.3f after %d epochs (%.1f s)", history[-1]["test_acc"], epochs,
             time.perf_counter() - t0)
    weights = out / "digits-cnn.pt"
    torch.save(model.state_dict(), weights)

    run_dir = out / "digits-cnn"
    analyze(model, test_data, layers=["conv*", "relu*", "fc"], analyses=[Moments()],
            progress=progress, out=run_dir, seed=0,
            config={"experiment": "analyze", "model": "digits-cnn", "weights": str(weights),
                    "dataset": "digits", "split": "test", "layers": ["conv*", "relu*", "fc"],
                    "analyses": ["moments"]})
    (out / "training.json").write_text(json.dumps(history, indent=1))
    report = write_report(run_dir)
    log.info("report: %s (%.1f s in all)", report, time.perf_counter() - t0)
    return report
