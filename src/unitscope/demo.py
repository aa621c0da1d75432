"""``unitscope demo``: train the small built-in models on bundled and generated data, analyse them.

Every family adds its part here as it lands; so far: training ``digits-cnn`` on scikit-learn's
digits and ``shapes-cnn`` on the generated shapes (checkpointed, so an interrupted demo resumes
and a finished training is not repeated), then the per-unit activation statistics of every
conv, ReLU and linear layer of each, with a report per model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: model -> (dataset, training options, quick training options, dataset options when quick)
RECIPES: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "digits-cnn": ("digits", {"epochs": 12, "lr": 5e-3, "batch_size": 32, "scheduler": "cosine"},
                   {"epochs": 3, "lr": 5e-3, "batch_size": 32, "scheduler": "cosine"}, {}),
    "shapes-cnn": ("shapes", {"epochs": 6, "lr": 3e-3, "batch_size": 64, "scheduler": "cosine"},
                   {"epochs": 2, "lr": 3e-3, "batch_size": 64, "scheduler": "cosine"}, {"n": 800}),
}


def run_demo(out: Path, quick: bool = False, progress: bool = True) -> list[Path]:
    """Train each demo model, analyse its test split, write runs and reports under ``out``."""
    from . import analyze, load_dataset, load_model
    from .analyses import Moments
    from .report import write_report
    from .train import train

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name, (dataset, full, short, quick_data) in RECIPES.items():
        options = short if quick else full
        data_options = quick_data if quick else {}
        train_data = load_dataset(dataset, "train", **data_options)
        test_data = load_dataset(dataset, "test", **data_options)
        torch.manual_seed(0)
        model = load_model(name)
        t1 = time.perf_counter()
        log.info("training %s on %d %s images for %d epochs", name, len(train_data), dataset,
                 options["epochs"])
        history = train(model, train_data, test_data, seed=0, device="cpu", progress=progress,
                        checkpoint_dir=out / "training" / name, **options)
        log.info("%s: test accuracy %.3f (%.1f s)", name, history[-1]["test_acc"], time.perf_counter() - t1)
        weights = out / f"{name}.pt"
        torch.save(model.state_dict(), weights)
        (out / "training" / name / "history.json").write_text(json.dumps(history, indent=1))

        layers = ["conv*", "relu*", "fc"]
        run_dir = out / name
        analyze(model, test_data, layers=layers, analyses=[Moments()], progress=progress,
                out=run_dir, seed=0,
                config={"experiment": "analyze", "model": name, "weights": str(weights),
                        "dataset": dataset, "split": "test", "layers": layers, "analyses": ["moments"],
                        "dataset_options": data_options})
        reports.append(write_report(run_dir))
        log.info("report: %s", reports[-1])
    log.info("demo finished in %.1f s", time.perf_counter() - t0)
    return reports
