"""Unit portraits (Zhou et al. 2015): top-k inputs, mosaics, empirical receptive fields, evaluation.

Registers the ``unitscope run`` experiment types ``topk``, ``receptive-field-empirical`` and
``evaluate``, the report sections ``topk`` (mosaics), ``receptive_field_empirical`` and
``evaluation``, and the demo part (classifier evaluation of every demo model; top-k, mosaics and
empirical receptive fields of a few units of ``shapes-cnn``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from ..experiments import EXPERIMENTS, KEYS, LIST_KEYS, ConfigError, checkpointed_pass, write_table_run
from ..report import SECTIONS, TABLE_SECTIONS

KEYS["topk"] = {"split": "test", "layers": None, "k": 10, "reduce": "max", "batch_size": 256,
                "calls": "error", "mosaics": 4, "mosaic_mode": "mark"}
KEYS["receptive-field-empirical"] = {
    "split": "test", "layers": None, "units": 4, "k": 10, "occluder": 11, "stride": 3,
    "fill": "uniform", "draws": 1, "discrepancy": "absolute", "threshold": 0.5, "centre": "rf",
    "local": True, "batch_size": 256,
}
KEYS["evaluate"] = {"split": "test", "batch_size": 256}
LIST_KEYS.update({"mosaics", "units"})


# --------------------------------------------------------------------------- helpers
def _model_and_data(config: dict[str, Any]) -> tuple[Any, Any]:
    from ..data import load_dataset
    from ..models import load_model

    model = load_model(config["model"], weights=config.get("weights"))
    data = load_dataset(config["dataset"], split=config["split"], **(config.get("dataset_options") or {}))
    return model, data


def _check_k(k: Any, data: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k = {k!r}: give a positive integer, e.g. k = 10")
    if k > len(data):
        raise ConfigError(f"k = {k} is larger than the dataset ({len(data)} items); lower k or use a "
                          "larger split")


def choose_units(spec: Any, topk: pd.DataFrame, layer: str) -> list[int]:
    """The units of ``layer`` that a ``units`` / ``mosaics`` option names.

    An int ``n`` picks the ``n`` units with the largest top-1 score (the liveliest ones); a list
    of ints names channels; a list of ``"layer:unit"`` strings names units of any layer (those of
    ``layer`` are returned).
    """
    from ..analyses.topk import parse_unit

    rows = topk[(topk["layer"] == layer) & (topk["rank"] == 0)]
    if isinstance(spec, bool) or spec is None:
        raise ConfigError(f"units = {spec!r}: give a count (e.g. 4) or a list of units")
    if isinstance(spec, int):
        if spec < 0:
            raise ConfigError(f"units = {spec}: give a count >= 0")
        return sorted(rows.nlargest(spec, "value", keep="first")["unit"].astype(int).tolist())
    if isinstance(spec, list) and all(isinstance(u, int) and not isinstance(u, bool) for u in spec):
        width = int(topk[topk["layer"] == layer]["unit"].max()) + 1
        bad = [u for u in spec if not 0 <= u < width]
        if bad:
            raise ConfigError(f"unit {bad[0]} is out of range: layer {layer!r} has {width} units "
                              f"(0..{width - 1})")
        return list(spec)
    if isinstance(spec, list) and all(isinstance(u, str) for u in spec):
        try:
            parsed = [parse_unit(u) for u in spec]
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return [u for la, u in parsed if la == layer]
    raise ConfigError(f"units = {spec!r}: give a count, a list of channels or a list of 'layer:unit'")


def _check_named_layers(spec: Any, layers: list[str], key: str) -> None:
    """A list of ``"layer:unit"`` strings may only name layers that were ranked."""
    from ..analyses.topk import parse_unit

    if isinstance(spec, list) and all(isinstance(u, str) for u in spec):
        try:
            missing = sorted({parse_unit(u)[0] for u in spec} - set(layers))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if missing:
            raise ConfigError(f"{key} names layer {missing[0]!r}, which is not among the layers ranked "
                              f"({', '.join(layers)}); add it to layers")


def _mosaic_writer(mosaics: dict[str, Any]) -> Callable[[Path], None]:
    """A :meth:`Run.save` ``extra`` hook writing ``mosaics`` as PNGs into the run's ``mosaics/``.

    The PNGs are written inside the atomic save, before the manifest, so a failure among them
    leaves no run that looks complete (a rerun then draws them all).
    """
    from ..analyses.mosaics import save_mosaics

    def write(run_dir: Path) -> None:
        save_mosaics(mosaics, run_dir / "mosaics", scale=2)

    return write


def _layers(model: Any, config: dict[str, Any]) -> list[str]:
    from ..capture import resolve_layers

    return resolve_layers(model, config.get("layers") or "ReLU")


# --------------------------------------------------------------------------- experiment types
@EXPERIMENTS.register("topk")
def _topk(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Top-k inputs of every unit of the layers (default all ReLU layers), mosaics of a few units."""
    from ..analyses.mosaics import UNIT_MODES, unit_mosaics
    from ..analyses.topk import TopK

    if config["mosaic_mode"] not in UNIT_MODES:
        raise ConfigError(f"mosaic_mode = {config['mosaic_mode']!r}: use one of {', '.join(UNIT_MODES)}")
    model, data = _model_and_data(config)
    _check_k(config["k"], data)
    layers = _layers(model, config)
    run = checkpointed_pass(target, config, model, data, layers=layers,
                            analyses=[TopK(k=config["k"], reduce=config["reduce"])],
                            batch_size=config["batch_size"], device=config["device"],
                            num_workers=config["num_workers"], seed=config["seed"], calls=config["calls"],
                            progress=progress)
    table = run.table("topk")
    spec = config["mosaics"]
    _check_named_layers(spec, layers, "mosaics")
    if isinstance(spec, int) and not isinstance(spec, bool):
        mapped = [la for la in layers if (table.loc[table["layer"] == la, "y"] >= 0).any()]
        last = (mapped or layers)[-1]  # the deepest layer with a spatial map, for a visible field
        units = [(last, u) for u in choose_units(spec, table, last)]
    else:
        units = [(la, u) for la in layers for u in choose_units(spec, table, la)]
    mosaics = unit_mosaics(model, data, table, units, mode=config["mosaic_mode"]) if units else {}
    if mosaics:
        run.arrays["topk_mosaics"] = mosaics
    run.save(target, extra=_mosaic_writer(mosaics) if mosaics else None)


@EXPERIMENTS.register("receptive-field-empirical")
def _receptive_field_empirical(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Empirical receptive fields of a few units per layer from their top-k images (Zhou et al.)."""
    from ..analyses.occlusion import empirical_receptive_fields
    from ..analyses.receptive_fields import receptive_fields
    from ..analyses.topk import TopK

    model, data = _model_and_data(config)
    _check_k(config["k"], data)
    size = tuple(_first_input(data).shape[-2:])
    _check_erf_options(config, size)
    layers = _layers(model, config)
    if config["centre"] == "argmax":  # centring on the map's maximum needs no 2-D layer output
        mapped = layers
    else:
        with_map = set(receptive_fields(model, size)["layer"])
        mapped = [la for la in layers if la in with_map]
    if not mapped or (config.get("layers") and len(mapped) < len(layers)):
        flat = sorted(set(layers) - set(mapped)) or layers
        raise ConfigError(f"layers {', '.join(flat)} have no 2-D map, so their units have no location "
                          "to centre on; choose conv, pool or activation layers before flattening, or "
                          "set centre = \"argmax\"")
    run = checkpointed_pass(target, config, model, data, layers=mapped, analyses=[TopK(k=config["k"])],
                            batch_size=config["batch_size"], device=config["device"],
                            num_workers=config["num_workers"], seed=config["seed"], progress=progress)
    topk = run.table("topk")
    _check_named_layers(config["units"], mapped, "units")
    tables, arrays = [], {}
    for layer in mapped:
        units = choose_units(config["units"], topk, layer)
        if not units:
            continue
        table, maps = empirical_receptive_fields(
            model, data, layer, units, topk, k=config["k"], occluder=config["occluder"],
            stride=config["stride"], fill=config["fill"], discrepancy=config["discrepancy"],
            threshold=config["threshold"], centre=config["centre"], local=config["local"],
            batch_size=config["batch_size"], device=config["device"], seed=config["seed"],
            draws=config["draws"])
        tables.append(table)
        arrays.update(maps)
    if not tables:
        raise ConfigError(f"units = {config['units']!r} names no unit of the layers {', '.join(mapped)}")
    _store_erf(run, model, data, topk, tables, arrays, config["k"])
    run.save(target, extra=_mosaic_writer(run.arrays["receptive_field_empirical_mosaics"]))


def _store_erf(run: Any, model: Any, data: Any, topk: pd.DataFrame, tables: list[pd.DataFrame],
               arrays: dict[str, Any], k: int) -> None:
    """Empirical RF tables, maps and discrepancy mosaics into ``run``."""
    from ..analyses.mosaics import unit_mosaics
    from ..analyses.occlusion import summarize_layers

    per_unit = pd.concat(tables, ignore_index=True)
    run.tables["receptive_field_empirical"] = per_unit
    run.tables["receptive_field_empirical_layers"] = summarize_layers(per_unit)
    maps = {key.removesuffix(":maps"): v for key, v in arrays.items() if key.endswith(":maps")}
    units = list(zip(per_unit["layer"], per_unit["unit"].astype(int)))
    run.arrays["receptive_field_empirical"] = {key: v for key, v in arrays.items()
                                               if not key.endswith(":maps")}
    run.arrays["receptive_field_empirical_mosaics"] = unit_mosaics(model, data, topk, units, k=k, maps=maps)


def _check_erf_options(config: dict[str, Any], size: tuple[int, int]) -> None:
    """Refuse bad occlusion options before the top-k pass, not after it."""
    from ..analyses.occlusion import DISCREPANCIES, _check_fill, occluder_positions

    try:
        _check_fill(config["fill"])
        occluder_positions(size[0], size[1], config["occluder"], config["stride"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if config["discrepancy"] not in DISCREPANCIES:
        raise ConfigError(f"discrepancy = {config['discrepancy']!r}: use one of {', '.join(DISCREPANCIES)}")
    if config["centre"] not in ("rf", "argmax"):
        raise ConfigError(f"centre = {config['centre']!r}: use 'rf' or 'argmax'")
    if not 0 < config["threshold"] <= 1:
        raise ConfigError(f"threshold = {config['threshold']}: use a fraction of the maximum in (0, 1]")


def _first_input(data: Any) -> Any:
    item = data[0]
    return item if hasattr(item, "shape") else item[0]


@EXPERIMENTS.register("evaluate")
def _evaluate(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Accuracy, per-class recall and precision and the confusion matrix of a classifier."""
    from ..analyses.evaluation import confusion_table, evaluate_classifier

    model, data = _model_and_data(config)
    table, cm = evaluate_classifier(model, data, batch_size=config["batch_size"], device=config["device"])
    write_table_run(target, "evaluation", table, config, {"evaluation_confusion": confusion_table(cm)})


# --------------------------------------------------------------------------- report sections
def _topk_figures(run: Any) -> list[Any]:
    from ..analyses.mosaics import plot_mosaics

    mosaics = run.arrays.get("topk_mosaics")
    return [plot_mosaics(mosaics)] if mosaics else []


def _erf_figures(run: Any) -> list[Any]:
    from ..analyses.mosaics import plot_mosaics
    from ..analyses.occlusion import plot_empirical_rf, plot_rf_sizes

    figures = []
    if "receptive_field_empirical_layers" in run.tables:
        figures.append(plot_rf_sizes(run.tables["receptive_field_empirical_layers"]))
    arrays = run.arrays.get("receptive_field_empirical")
    if arrays:
        figures.append(plot_empirical_rf(arrays, run.tables.get("receptive_field_empirical")))
    mosaics = run.arrays.get("receptive_field_empirical_mosaics")
    if mosaics:
        figures.append(plot_mosaics(mosaics, cols=1, title="top inputs (RF of the maximum marked) and "
                                    "their occlusion discrepancy maps"))
    return figures


def _evaluation_figures(run: Any) -> list[Any]:
    from ..analyses.evaluation import confusion_from_table, plot_confusion

    if "evaluation_confusion" not in run.tables:
        return []
    table = run.tables.get("evaluation")
    names = None
    if table is not None:
        names = table[table["class"] >= 0].sort_values("class")["name"].tolist()
    return [plot_confusion(confusion_from_table(run.tables["evaluation_confusion"]), names)]


SECTIONS["topk"] = _topk_figures
SECTIONS["receptive_field_empirical"] = _erf_figures
SECTIONS["evaluation"] = _evaluation_figures
for _name in ("topk", "receptive_field_empirical", "evaluation"):
    if _name not in TABLE_SECTIONS:
        TABLE_SECTIONS.append(_name)


# --------------------------------------------------------------------------- demo
def demo(ctx: Any) -> None:
    """Evaluate the model; on shapes-cnn also top-k, mosaics and empirical RFs of a few units."""
    from ..analyses.evaluation import confusion_table, evaluate_classifier
    from ..analyses.mosaics import unit_mosaics
    from ..analyses.occlusion import empirical_receptive_fields
    from ..analyses.topk import TopK
    from ..engine import analyze

    table, cm = evaluate_classifier(ctx.model, ctx.test_data, device="cpu")
    ctx.run.tables["evaluation"] = table
    ctx.run.tables["evaluation_confusion"] = confusion_table(cm)
    if ctx.name != "shapes-cnn":
        return
    layers = ["relu2", "relu3"]
    k = 4 if ctx.quick else 8
    top = analyze(ctx.model, ctx.test_data, layers=layers, analyses=[TopK(k=k)], progress=ctx.progress,
                  seed=ctx.seed, device="cpu").table("topk")
    ctx.run.tables["topk"] = top
    shown = [(la, u) for la in layers for u in choose_units(2 if ctx.quick else 3, top, la)]
    ctx.run.arrays["topk_mosaics"] = unit_mosaics(ctx.model, ctx.test_data, top, shown)
    tables, arrays = [], {}
    for layer in layers:
        units = choose_units(2 if ctx.quick else 4, top, layer)
        t, maps = empirical_receptive_fields(ctx.model, ctx.test_data, layer, units, top, k=k,
                                             occluder=7, stride=4 if ctx.quick else 2, device="cpu",
                                             seed=ctx.seed)
        tables.append(t)
        arrays.update(maps)
    _store_erf(ctx.run, ctx.model, ctx.test_data, top, tables, arrays, k)
