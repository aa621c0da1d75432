"""``unitscope demo``: train the small built-in models on bundled and generated data, analyse them.

The demo trains ``digits-cnn`` on scikit-learn's digits and ``shapes-cnn`` on the generated
shapes (checkpointed, so an interrupted demo resumes and a finished training is not repeated)
with saturation tracked over every epoch. Then, per model: one pass over the test split for the
per-unit activation statistics and the saturation of every layer, the test accuracy of
PCA-projected layers, receptive fields, linear probes of every conv layer (features under
``OUT/probes/<model>``), each family's part (:mod:`unitscope.families`), and a report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
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


@dataclass
class DemoContext:
    """What a family's part of the demo gets: one trained model, its data, and the run to add to.

    A family's ``demo(ctx)`` adds tables (``ctx.run.tables[name] = DataFrame``) and arrays
    (``ctx.run.arrays[name] = {key: tensor}``) whose names its report section reads, and may write
    files under ``ctx.out``. It must take seconds, less with ``ctx.quick``.

    Attributes:
        name: the registered model name (``"digits-cnn"``, ``"shapes-cnn"``).
        model: the trained model, in eval mode, on the CPU.
        dataset: the dataset name; ``train_data`` / ``test_data`` are its splits.
        run: the model's run (already holding moments and saturation); saved after every family.
        out: the demo's output directory (the run is saved to ``out / name``).
        quick: the short version (``unitscope demo --quick``).
        progress: whether to show progress bars.
        seed: the seed every family uses.
    """

    name: str
    model: torch.nn.Module
    dataset: str
    train_data: Any
    test_data: Any
    run: Any
    out: Path
    quick: bool
    progress: bool
    seed: int = 0


def run_demo(out: Path, quick: bool = False, progress: bool = True) -> list[Path]:
    """Train each demo model, analyse its test split, write runs and reports under ``out``."""
    import pandas as pd

    from . import analyze, load_dataset, load_model
    from .analyses import Moments, Saturation, SaturationTracker, projected_accuracy
    from .analyses.probes import probes
    from .analyses.receptive_fields import receptive_fields
    from .families import load_all
    from .report import write_grid_report, write_report
    from .train import train

    t0 = time.perf_counter()
    check_demo_out(out)
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
        tracker = SaturationTracker(model, ["conv*", "fc"], test_data=test_data)
        ckpt_dir = out / "training" / name
        history = train(model, train_data, test_data, seed=0, device="cpu", progress=progress,
                        checkpoint_dir=ckpt_dir, callbacks=[tracker], **options)
        if not tracker.table.empty:  # epochs trained now (a finished training keeps its table)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tracker.table.to_parquet(ckpt_dir / "saturation_epochs.parquet", index=False)
        log.info("%s: test accuracy %.3f (%.1f s)", name, history[-1]["test_acc"], time.perf_counter() - t1)
        weights = out / f"{name}.pt"
        torch.save(model.state_dict(), weights)
        (out / "training" / name / "history.json").write_text(json.dumps(history, indent=1))

        layers = ["conv*", "relu*", "fc"]
        run_dir = out / name
        run = analyze(model, test_data, layers=layers,
                      analyses=[Moments(), Saturation(layers=["conv*", "fc"])], progress=progress, seed=0,
                      config={"experiment": "analyze", "model": name, "weights": str(weights),
                              "dataset": dataset, "split": "test", "layers": layers,
                              "analyses": ["moments", "saturation"], "dataset_options": data_options})
        from_pass = set(run.tables)
        if (ckpt_dir / "saturation_epochs.parquet").is_file():
            run.tables["saturation_epochs"] = pd.read_parquet(ckpt_dir / "saturation_epochs.parquet")
        run.tables["saturation_projection"] = projected_accuracy(
            model, train_data, test_data, ["conv*"], deltas=[0.8, 0.9, 0.95, 0.99, 0.999])
        run.tables["receptive_field"] = receptive_fields(model, model.input_shape[1:])
        run.tables["probes"] = probes(model, train_data, test_data, ["conv*", "fc"], downsample=2,
                                      out=out / "probes" / name, device="cpu")
        model.eval()
        ctx = DemoContext(name=name, model=model, dataset=dataset, train_data=train_data,
                          test_data=test_data, run=run, out=out, quick=quick, progress=progress)
        for family in load_all():
            part = getattr(family, "demo", None)
            if part is not None:
                t2 = time.perf_counter()
                part(ctx)
                log.info("%s: %s part of the demo in %.1f s", name, family.__name__.rsplit(".", 1)[-1],
                         time.perf_counter() - t2)
        describe_demo_run(run, name, quick, sorted(set(run.tables) - from_pass))
        run.save(run_dir)
        reports.append(write_report(run_dir))
        log.info("report: %s", reports[-1])
    reports.append(write_grid_report(out, run_reports=False))
    log.info("index of the demo's runs: %s", reports[-1])
    log.info("demo finished in %.1f s", time.perf_counter() - t0)
    return reports


#: what ``unitscope demo`` writes into its output directory (besides hidden save directories)
DEMO_ENTRIES = frozenset({*RECIPES, *(f"{name}.pt" for name in RECIPES), "training", "probes", "report.html"})


def check_demo_out(out: Path) -> None:
    """Refuse an output directory that holds anything but an earlier demo's files, before any work.

    An earlier (or interrupted) demo's directory is fine: the demo resumes there and replaces its
    runs. Anything else is somebody's files, which the demo would mix its own with.
    """
    from .results import RunError

    if not out.exists():
        return
    if not out.is_dir():
        raise RunError(f"{out} exists and is a file; choose another --out for the demo")
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in DEMO_ENTRIES and not p.name.startswith("."))  # hidden: saves
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunError(f"{out} holds files that are not the demo's ({shown}); choose another --out or an "
                       "empty directory")


def describe_demo_run(run: Any, name: str, quick: bool, added: list[str]) -> None:
    """Make a demo run's config and manifest say what made it.

    The pass (moments and saturation) is an ``analyze`` experiment; the other tables come from
    the demo's own steps. So the config keeps the pass's keys (model, weights, dataset, split:
    what ``unitscope mosaics`` reads), says ``experiment = "demo"`` (reproduced by ``unitscope
    demo``; the pass's type is ``pass_experiment``) and lists the added tables, as the manifest
    does under ``added_tables``.
    """
    config = dict(run.manifest.get("config") or {})
    run.manifest["config"] = {**config, "experiment": "demo", "pass_experiment": config.get("experiment"),
                              "quick": quick, "reproduce": "unitscope demo" + (" --quick" if quick else ""),
                              "added_tables": added}
    run.manifest["added_tables"] = added
