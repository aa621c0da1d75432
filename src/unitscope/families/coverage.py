"""Coverage and importance: ``unitscope run`` types, report sections and the demo part.

Experiment types:

* ``idc``: importance-driven coverage of a test split (tables ``idc``, ``idc_units``);
* ``attribution``: attributions of the first ``n`` inputs of a split (table ``attribution``,
  arrays ``attribution`` with the inputs and their maps);
* ``coverage-study``: one of the research questions of :mod:`unitscope.analyses.studies`
  (``study = "pruning" | "noise" | "adversarial" | "impartiality"``; table ``coverage_study``);
* ``coverage``: the ten classic criteria (NC ... MDSC) in one pass, when
  :mod:`unitscope.analyses.coverage` is installed.

Report sections ``idc``, ``attribution``, ``coverage_study`` (and ``coverage``).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..experiments import EXPERIMENTS, KEYS, LIST_KEYS, ConfigError, write_table_run
from ..report import SECTIONS, TABLE_SECTIONS

log = logging.getLogger(__name__)

HAS_CRITERIA = importlib.util.find_spec("unitscope.analyses.coverage") is not None

KEYS["idc"] = {"split": "test", "layers": None, "m": 2, "k": None, "k_range": [2, 4], "per_class": True,
               "train_filter": "correct", "batch_size": 128, "composite": "epsilon_plus_flat",
               "cross_layer_norm": "none", "importance": "sum", "round_centroids": None, "n_init": 10,
               "drop_zeros": False, "min_values": 0}
KEYS["attribution"] = {"split": "test", "n": 8, "method": "lrp", "layer": None, "target": "pred",
                       "composite": "epsilon_plus_flat"}
KEYS["coverage-study"] = {"study": "impartiality", "split": "test", "layers": None, "m": 2, "k": None,
                          "k_range": [2, 4], "batch_size": 128, "prune_m": [1, 2, 4], "repeats": 3,
                          "noise_std": 0.3, "pixel_fraction": 0.02, "exclude_important": True,
                          "attack": "fgsm", "eps": 0.3, "c": 1.0, "alpha": None, "steps": 20,
                          "fractions": [0.01, 0.05, 0.1], "sizes": [50, 100, 200], "richness": "total",
                          "criterion": "idc"}
LIST_KEYS.update({"k_range", "prune_m", "fractions", "sizes"})
if HAS_CRITERIA:
    KEYS["coverage"] = {"split": "test", "layers": None, "criteria": None, "batch_size": 256}
    LIST_KEYS.add("criteria")


def default_layers(model: nn.Module) -> list[str]:
    """Every Conv/Linear module except the last one (the classifier), as SEED's IDC does."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                                          nn.Linear))]
    if len(names) < 2:
        raise ConfigError("the model has fewer than two Conv/Linear layers; set layers = [...] explicitly")
    return names[:-1]


def _load(config: dict[str, Any]) -> tuple[nn.Module, Any, Any]:
    from ..data import load_dataset
    from ..models import load_model

    model = load_model(config["model"], weights=config.get("weights"))
    model.eval()
    options = config.get("dataset_options") or {}
    return (model, load_dataset(config["dataset"], "train", **options),
            load_dataset(config["dataset"], config.get("split", "test"), **options))


def _device(config: dict[str, Any]) -> torch.device:
    from ..engine import resolve_device

    return resolve_device(config.get("device", "auto"))


@EXPERIMENTS.register("idc")
def _idc(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Importance-driven coverage: LRP relevance on the training split, k-means, the test split."""
    from ..analyses.importance import idc

    model, train, test = _load(config)
    torch.manual_seed(config["seed"])
    tables = idc(model, train, test, config.get("layers") or default_layers(model), m=config["m"],
                 k=config.get("k"), k_range=tuple(config["k_range"]), per_class=config["per_class"],
                 train_filter=config["train_filter"], batch_size=config["batch_size"], device=_device(config),
                 composite=config["composite"], cross_layer_norm=config["cross_layer_norm"],
                 importance=config["importance"], round_centroids=config.get("round_centroids"),
                 seed=config["seed"], n_init=config["n_init"], drop_zeros=config["drop_zeros"],
                 min_values=config["min_values"])
    write_table_run(target, "idc", tables["idc"], config, {"idc_units": tables["idc_units"]})


def attribution_tables(model: nn.Module, data: Any, n: int = 8, method: str = "lrp",
                       layer: str | None = None, target: str = "pred", composite: str = "epsilon_plus_flat",
                       device: str | torch.device = "cpu") -> tuple[Any, dict[str, torch.Tensor]]:
    """Attributions of the first ``n`` items of ``data``: (summary table, arrays for the heatmaps)."""
    import pandas as pd

    from ..attribution import attribute

    if target not in ("pred", "label"):
        raise ConfigError(f"target={target!r}: use 'pred' (the predicted class) or 'label'")
    n = min(int(n), len(data))
    if n < 1:
        raise ConfigError("n must be >= 1 and the dataset non-empty")
    items = [data[i] for i in range(n)]
    x = torch.stack([it[0] for it in items]).to(device)
    y = torch.tensor([int(it[1]) for it in items])
    model.to(device)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).cpu()
    tgt = pred if target == "pred" else y
    options = {"composite": composite} if method == "lrp" else {}
    rel = attribute(model, x, tgt, method=method, layer=layer, **options).cpu()
    flat = rel.reshape(n, -1)
    table = pd.DataFrame({"index": range(n), "label": y.numpy(), "pred": pred.numpy(), "target": tgt.numpy(),
                          "method": method, "layer": layer or "input",
                          "relevance_sum": flat.sum(1).numpy(),
                          "relevance_abs_max": flat.abs().amax(1).numpy(),
                          "positive_fraction": (flat > 0).float().mean(1).numpy()})
    arrays = {"inputs": x.cpu(), "relevance": rel, "target": tgt}
    return table, arrays


@EXPERIMENTS.register("attribution")
def _attribution(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Attribution maps of the first ``n`` inputs of a split (LRP or a captum method)."""
    from .. import __version__
    from ..results import Run

    model, _, data = _load(config)
    table, arrays = attribution_tables(model, data, config["n"], config["method"], config.get("layer"),
                                       config["target"], config["composite"], _device(config))
    manifest = {"status": "complete", "kind": "attribution", "versions": {"unitscope": __version__,
                                                                          "torch": torch.__version__},
                "created": _now(), "config": config}
    Run([], manifest, {"attribution": table}, {"attribution": arrays}).save(target)


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@EXPERIMENTS.register("coverage-study")
def _study(config: dict[str, Any], target: Path, progress: bool) -> None:
    """One research question: pruning, noise, adversarial or impartiality (table ``coverage_study``)."""
    from ..analyses import studies

    check_study(config)
    model, train, test = _load(config)
    layers = config.get("layers") or default_layers(model)
    run = {"seed": config["seed"], "batch_size": config["batch_size"], "device": _device(config)}
    meter = {**run, "criterion": config["criterion"]}
    if config["criterion"] == "idc":
        meter.update(m=config["m"], k=config.get("k"), k_range=tuple(config["k_range"]))
    study = config["study"]
    if study == "pruning":
        table = studies.pruning(model, train, test, layers, prune_m=config["prune_m"],
                                repeats=config["repeats"], **run)
    elif study == "noise":
        table = studies.noise(model, train, test, layers, std=config["noise_std"],
                              fraction=config["pixel_fraction"], repeats=config["repeats"],
                              exclude_important=config["exclude_important"], **meter)
    else:
        attack = {key: config.get(key) for key in ("attack", "eps", "c", "alpha", "steps")}
        if study == "adversarial":
            table = studies.adversarial(model, train, test, layers, fractions=config["fractions"], **attack,
                                        **meter)
        else:
            table = studies.impartiality(model, train, test, layers, sizes=config["sizes"],
                                         repeats=config["repeats"], richness=config["richness"], **attack,
                                         **meter)
    write_table_run(target, "coverage_study", table, config)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_study(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` for a ``coverage-study`` setting it cannot use, before any model work."""
    from ..analyses.studies import check_attack

    study = config["study"]
    if study not in ("pruning", "noise", "adversarial", "impartiality"):
        raise ConfigError(f"study = {study!r}: use \"pruning\", \"noise\", \"adversarial\" or "
                          "\"impartiality\"")
    k_range = config["k_range"]
    if not (isinstance(k_range, list) and len(k_range) == 2 and all(_count(v, 2) for v in k_range)
            and k_range[0] <= k_range[1]):
        raise ConfigError(f"k_range = {k_range!r}: give [low, high] cluster counts with 2 <= low <= high, "
                          "e.g. k_range = [2, 4]")
    if not _count(config["repeats"]):
        raise ConfigError(f"repeats = {config['repeats']!r}: give a positive integer, e.g. repeats = 3")
    if study == "pruning" and not all(_count(v) for v in config["prune_m"]):
        raise ConfigError(f"prune_m = {config['prune_m']!r}: give positive unit counts, e.g. "
                          "prune_m = [1, 2, 4]")
    if study == "noise":
        if not (_number(config["noise_std"]) and config["noise_std"] >= 0):
            raise ConfigError(f"noise_std = {config['noise_std']!r}: give a standard deviation >= 0")
        fraction = config["pixel_fraction"]
        if not (_number(fraction) and 0 < fraction <= 1):
            raise ConfigError(f"pixel_fraction = {fraction!r}: give a fraction of the pixels in (0, 1]")
        if config["exclude_important"] not in (True, False):
            raise ConfigError(f"exclude_important = {config['exclude_important']!r}: give true or false")
    if study in ("adversarial", "impartiality"):
        try:
            check_attack(config["attack"], config["eps"], config["c"], config.get("alpha"), config["steps"])
        except ValueError as exc:
            raise ConfigError(str(exc).replace("=", " = ", 1)) from None
    if study == "adversarial" and not all(_number(f) and 0 < f <= 1 for f in config["fractions"]):
        raise ConfigError(f"fractions = {config['fractions']!r}: give fractions of the test set in (0, 1]")
    if study == "impartiality":
        if not all(_count(v) for v in config["sizes"]):
            raise ConfigError(f"sizes = {config['sizes']!r}: give positive subset sizes, e.g. "
                              "sizes = [50, 100]")
        if config["richness"] not in ("total", "observed"):
            raise ConfigError(f"richness = {config['richness']!r}: use \"total\" (all classes) or "
                              "\"observed\"")


if HAS_CRITERIA:
    @EXPERIMENTS.register("coverage")
    def _coverage(config: dict[str, Any], target: Path, progress: bool) -> None:
        """The ten coverage criteria fitted on the training split, measured on a split in one pass."""
        from ..analyses.coverage import DEFAULT_CRITERIA, coverage

        model, train, test = _load(config)
        coverage(model, train, test, layers=config.get("layers"),
                 criteria=config.get("criteria") or DEFAULT_CRITERIA, batch_size=config["batch_size"],
                 device=config["device"], progress=progress, seed=config["seed"], out=target, config=config)


# ---------------------------------------------------------------------- report sections
def _idc_figures(run: Any) -> list[Any]:
    from ..analyses.importance import plot_idc, plot_important_units

    figures = [plot_idc(run.table("idc"))]
    if "idc_units" in run.tables:
        figures.append(plot_important_units(run.table("idc_units")))
    return figures


def _attribution_figures(run: Any) -> list[Any]:
    from ..attribution import plot_heatmaps

    arrays = run.arrays.get("attribution")
    if not arrays or arrays["relevance"].dim() < 3:
        return []
    table = run.table("attribution")
    labels = [f"{r.label}→{r.target}" for r in table.itertuples()] if "label" in table else None
    return [plot_heatmaps(arrays["inputs"], arrays["relevance"], labels=labels)]


def _study_figures(run: Any) -> list[Any]:
    from ..analyses.studies import plot_study

    return [plot_study(run.table("coverage_study"))]


SECTIONS["idc"] = _idc_figures
SECTIONS["attribution"] = _attribution_figures
SECTIONS["coverage_study"] = _study_figures
TABLE_SECTIONS.extend(s for s in ("idc", "attribution", "coverage_study") if s not in TABLE_SECTIONS)
if HAS_CRITERIA:
    def _coverage_figures(run: Any) -> list[Any]:
        from ..analyses.coverage import plot_coverage_curve

        return [plot_coverage_curve(run.table("coverage_curve"))] if "coverage_curve" in run.tables else []

    SECTIONS.setdefault("coverage", _coverage_figures)
    if "coverage" not in TABLE_SECTIONS:
        TABLE_SECTIONS.append("coverage")


# ---------------------------------------------------------------------- the demo part
def demo(ctx: Any) -> None:
    """digits-cnn: IDC of the test split, LRP heatmaps of six test digits, the ten criteria."""
    if ctx.name != "digits-cnn":
        return
    import time

    from ..analyses.importance import idc

    t0 = time.perf_counter()
    layers = ["conv1", "conv2", "conv3"]
    options = {"k": 2, "n_init": 2} if ctx.quick else {"k_range": (2, 4), "n_init": 3}
    tables = idc(ctx.model, ctx.train_data, ctx.test_data, layers, m=2, seed=ctx.seed, **options)
    ctx.run.tables.update(tables)
    table, arrays = attribution_tables(ctx.model, ctx.test_data, n=6)
    ctx.run.tables["attribution"] = table
    ctx.run.arrays["attribution"] = arrays
    t1 = time.perf_counter()
    if HAS_CRITERIA:
        from ..analyses.coverage import coverage

        run = coverage(ctx.model, ctx.train_data, ctx.test_data, layers=[*layers, "fc"], batch_size=256,
                       device="cpu", progress=False, seed=ctx.seed)
        ctx.run.tables.update({k: v for k, v in run.tables.items() if k.startswith("coverage")})
    log.info("coverage demo: IDC and attributions %.1f s, ten criteria %.1f s", t1 - t0,
             time.perf_counter() - t1)
