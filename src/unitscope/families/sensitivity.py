"""Sensitivity: Sobol' indices of every unit to parametrised augmentations and the analyses built on them.

Registers the ``unitscope run`` experiment type ``sensitivity``, the report section
``sensitivity`` (checkpoint-wise summaries, single-unit plots, correlation of the variables'
profiles, guided masking, ground-truth checks) and the demo part on ``shapes-cnn``: the indices of
every unit to brightness, contrast, saturation, hue, flips and rotation, and a check against the
generated shapes' known hue (units that track hue should be sensitive to hue).

Variables are given by name; ``"name=low:high"`` (or ``"name.param=low:high"``) sets a range::

    experiment = "sensitivity"
    model = "shapes-cnn"
    dataset = "shapes"
    variables = ["brightness=0.5:1.5", "hue", "hflip", "rotation"]
    n = 256
    layers = ["relu3", "relu4", "fc"]
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..analyses import sensitivity as _sensitivity_analysis  # noqa: F401  (registers the analysis)
from ..demo import DemoContext
from ..experiments import EXPERIMENTS, KEYS, LIST_KEYS, ConfigError
from ..report import SECTIONS, TABLE_SECTIONS
from ..results import Run

log = logging.getLogger(__name__)

DEFAULT_VARIABLES = ["brightness", "contrast", "saturation", "hue", "hflip", "rotation"]
KEYS["sensitivity"] = {"split": "test", "variables": None, "n": 256, "layers": None, "reduce": "mean",
                       "bootstrap": 100, "second_order": False, "batch_size": 256, "lda": True,
                       "lda_repeats": 10, "masking": False, "mask_fraction": 0.1, "mask_index": "ST",
                       "mask_samples": 512, "mask_augment": False,
                       "contrast": False, "contrast_images": 256, "contrast_draws": 4,
                       "shapley": False, "shapley_permutations": 64, "shapley_outer": 16, "shapley_inner": 4,
                       "hsv_segment": None}
LIST_KEYS.update({"variables", "hsv_segment"})


def parse_variable(spec: str) -> Any:
    """``"hue"`` -> ``"hue"``; ``"brightness=0.5:1.5"`` -> ``("brightness", (0.5, 1.5))``;
    ``"roll.dx=-0.1:0.1"`` -> ``("roll", {"dx": (-0.1, 0.1)})``."""
    if not isinstance(spec, str):
        raise ConfigError(f"variables: {spec!r} must be a string like \"hue\" or \"brightness=0.5:1.5\"")
    if "=" not in spec:
        return spec.strip()
    name, rng = spec.split("=", 1)
    try:
        low, high = (float(t) for t in rng.split(":"))
    except ValueError:
        raise ConfigError(f"variables: {spec!r}: write the range as low:high, "
                          "e.g. \"brightness=0.5:1.5\"") from None
    name = name.strip()
    if "." in name:
        var, param = name.split(".", 1)
        return (var, {param: (low, high)})
    return (name, (low, high))


def parse_variables(specs: list[str]) -> list[Any]:
    """Parse every entry of ``variables`` (merging several ``name.param=`` ranges of one variable)."""
    out: dict[str, Any] = {}
    for spec in specs:
        item = parse_variable(spec)
        if isinstance(item, str):
            out.setdefault(item, None)
        elif isinstance(item[1], dict):
            prev = out.get(item[0])
            out[item[0]] = {**(prev if isinstance(prev, dict) else {}), **item[1]}
        else:
            out[item[0]] = item[1]
    return list(out.items())


@EXPERIMENTS.register("sensitivity")
def _sensitivity(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Sobol' indices of every unit to augmentations; optionally guided masking, the one-at-a-time
    Wilcoxon contrast, Shapley effects and HSV single-plane segments (tables ``sensitivity_masking``,
    ``_contrast``, ``_shapley``, ``_hsv``, ``_hsv_compare``)."""
    from ..analyses.sensitivity import Sensitivity, sensitivity
    from ..augment import AugmentError
    from ..data import load_dataset
    from ..models import load_model

    model = load_model(config["model"], weights=config.get("weights"))
    options = config.get("dataset_options", {})
    data = load_dataset(config["dataset"], split=config["split"], **options)
    try:
        analysis = Sensitivity(parse_variables(config.get("variables") or DEFAULT_VARIABLES), n=config["n"],
                               layers=config.get("layers") or ["Conv2d", "Linear"], reduce=config["reduce"],
                               second_order=config["second_order"], bootstrap=config["bootstrap"],
                               seed=config["seed"])
    except (AugmentError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    run = sensitivity(model, data, analysis=analysis, batch_size=config["batch_size"],
                      device=config["device"], progress=progress, config=config,
                      checkpoint=Path(f"{target}.partial") / "sensitivity.safetensors")
    if config["reduce"] == "map" and config["lda"]:
        run.tables["sensitivity_lda"] = lda_table(run, repeats=config["lda_repeats"])
    if config["masking"]:
        from ..analyses.masking import guided_masking

        run.tables["sensitivity_masking"] = guided_masking(
            model, data, run.table("sensitivity"), fraction=config["mask_fraction"],
            index=config["mask_index"], samples=config["mask_samples"], seed=config["seed"],
            batch_size=config["batch_size"], device=config["device"],
            augment=analysis.config()["variables"] if config["mask_augment"] else None)
        _add_single_class(run, model, data, config["seed"], config["device"])
    variables, layers = analysis.config()["variables"], run.manifest["layers"]
    reduce = "mean" if config["reduce"] == "map" else config["reduce"]
    if config["contrast"]:
        from ..analyses.sensitivity import contrast

        run.tables["sensitivity_contrast"] = contrast(
            model, data, variables, layers, images=config["contrast_images"], draws=config["contrast_draws"],
            reduce=reduce, seed=config["seed"], batch_size=config["batch_size"], device=config["device"])
    if config["shapley"]:
        from ..analyses.sensitivity import shapley

        run.tables["sensitivity_shapley"] = shapley(
            model, data, variables, layers, n_perm=config["shapley_permutations"],
            n_outer=config["shapley_outer"], n_inner=config["shapley_inner"], reduce=reduce,
            seed=config["seed"], batch_size=config["batch_size"], device=config["device"])
    if config.get("hsv_segment"):
        from ..analyses.sensitivity import hsv_segments

        run.tables["sensitivity_hsv"], run.tables["sensitivity_hsv_compare"] = hsv_segments(
            model, data, variables, config["hsv_segment"], n=config["n"], reduce=reduce, seed=config["seed"],
            batch_size=config["batch_size"], device=config["device"])
    run.save(target)


def _add_single_class(run: Run, model: torch.nn.Module, data: Any, seed: int, device: str = "cpu",
                      samples: int = 512) -> None:
    """``sensitivity_single_class`` when the classifier layer was analysed (one unit per class)."""
    from ..analyses.masking import output_layers, single_class

    table = run.table("sensitivity")
    outs = output_layers(model.eval().cpu(), data[0][0][None]) & set(table["layer"])
    for layer in sorted(outs):
        top = max(1, min(5, table[table["layer"] == layer]["unit"].nunique() // 4))
        run.tables["sensitivity_single_class"] = single_class(model, data, table, layer, top=top,
                                                              samples=samples, seed=seed, device=device)


def lda_table(run: Run, repeats: int = 10) -> pd.DataFrame:
    """LDA accuracy of telling the variable from a channel's S1 and ST maps, per layer (map runs)."""
    from ..analyses.sensitivity import lda_signature

    rows = []
    arrays = run.arrays.get("sensitivity", {})
    for key in sorted(k for k in arrays if k.endswith("/ST")):
        layer = key[:-3]
        for index in ("S1", "ST"):
            maps = arrays[f"{layer}/{index}"]
            if maps.dim() != 4 or maps.shape[1] < 5:
                continue
            acc, _ = lda_signature(maps, n_repeats=repeats)
            rows.append((layer, index, acc, 1 / maps.shape[0]))
    return pd.DataFrame(rows, columns=["layer", "index", "lda_accuracy", "chance"])


# --------------------------------------------------------------------------- figures
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_layer_summary(table: pd.DataFrame, ax: Any = None) -> Any:
    """Checkpoint-wise aggregated S1 (solid) and ST (outline) of every variable per layer."""
    plt = _plt()
    layers = list(dict.fromkeys(table["layer"]))
    variables = list(dict.fromkeys(table["variable"]))
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(
        figsize=(max(6, 1.2 * len(layers) * len(variables) / 3), 3.2), layout="constrained")
    width = 0.8 / len(variables)
    colors = plt.get_cmap("tab10")
    for i, var in enumerate(variables):
        rows = table[table["variable"] == var].set_index("layer").reindex(layers)
        x = np.arange(len(layers)) + (i - (len(variables) - 1) / 2) * width
        ax.bar(x, rows["ST_agg"], width, facecolor="none", edgecolor=colors(i % 10))
        ax.bar(x, rows["S1_agg"], width, color=colors(i % 10), label=var,
               yerr=rows["S1_agg_conf"].fillna(0), error_kw={"lw": 0.6})
    ax.set_xticks(range(len(layers)), layers, rotation=30)
    ax.set_ylabel("aggregated index")
    ax.set_title("per layer: S1 (filled) and ST (outline), variance-weighted over units")
    ax.legend(fontsize=7, ncols=min(len(variables), 4))
    return fig


def plot_units(table: pd.DataFrame, layer: str | None = None, per_variable: int = 1) -> Any:
    """Single-unit sensitivity plots: the units of ``layer`` most sensitive (ST) to each variable."""
    plt = _plt()
    layer = layer or list(dict.fromkeys(table["layer"]))[-1]
    rows = table[(table["layer"] == layer) & ~table["constant"].astype(bool)]
    variables = list(dict.fromkeys(rows["variable"]))
    picked: list[int] = []
    for var in variables:
        best = rows[rows["variable"] == var].sort_values("ST", ascending=False)["unit"]
        picked += [u for u in best if u not in picked][:per_variable]
    fig, axes = plt.subplots(1, max(len(picked), 1), figsize=(2.2 * max(len(picked), 1), 2.6),
                             squeeze=False, layout="constrained", sharey=True)
    x = np.arange(len(variables))
    for ax, unit in zip(axes[0], picked):
        u = rows[rows["unit"] == unit].set_index("variable").reindex(variables)
        ax.bar(x - 0.2, u["S1"], 0.4, yerr=u["S1_conf"].fillna(0), label="S1", error_kw={"lw": 0.6})
        ax.bar(x + 0.2, u["ST"], 0.4, yerr=u["ST_conf"].fillna(0), label="ST", error_kw={"lw": 0.6})
        ax.set_xticks(x, variables, rotation=90, fontsize=7)
        ax.set_title(f"{layer}:{unit}", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_ylabel("Sobol' index")
    return fig


def plot_correlation(corr: pd.DataFrame) -> Any:
    """Spearman correlation of the variables' ST profiles across units, one heatmap per layer."""
    plt = _plt()
    layers = list(dict.fromkeys(corr["layer"]))
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers), 2.6), squeeze=False,
                             layout="constrained")
    im = None
    for ax, layer in zip(axes[0], layers):
        wide = corr[corr["layer"] == layer].pivot(index="variable_a", columns="variable_b", values="spearman")
        names = list(dict.fromkeys(corr[corr["layer"] == layer]["variable_a"]))
        wide = wide.loc[names, names]
        im = ax.imshow(wide.to_numpy(), vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_title(layer, fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes[0, -1], shrink=0.8, label="Spearman")
    return fig


def plot_factor_check(table: pd.DataFrame) -> Any:
    """Ground truth: how well a unit tracks the shapes' hue (R²) against its ST to the hue variable."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
    for layer, rows in table.groupby("layer", sort=False):
        ax.scatter(rows["hue_r2"], rows["ST_hue"], s=10, label=layer)
    ax.set_xlabel("R² of the unit on the shape's hue (cos, sin)")
    ax.set_ylabel("ST of the hue variable")
    ax.legend(fontsize=7)
    return fig


def _section(run: Run) -> list[Any]:
    t = run.tables
    figures = []
    if "sensitivity_layers" in t and len(t["sensitivity_layers"]):
        figures.append(plot_layer_summary(t["sensitivity_layers"]))
    if "sensitivity" in t and len(t["sensitivity"]):
        figures.append(plot_units(t["sensitivity"]))
    if "sensitivity_correlation" in t and len(t["sensitivity_correlation"]):
        figures.append(plot_correlation(t["sensitivity_correlation"]))
    if "sensitivity_factors" in t and len(t["sensitivity_factors"]):
        figures.append(plot_factor_check(t["sensitivity_factors"]))
    if "sensitivity_masking" in t and len(t["sensitivity_masking"]):
        from ..analyses.masking import plot_masking

        figures.append(plot_masking(t["sensitivity_masking"]))
    return figures


SECTIONS["sensitivity"] = _section
TABLE_SECTIONS.append("sensitivity")


# --------------------------------------------------------------------------- ground truth on shapes
class Subset:
    """The first ``n`` items of a dataset, keeping its ``factors`` (for :func:`hue_tracking`)."""

    def __init__(self, data: Any, n: int) -> None:
        self.data, self.n = data, min(n, len(data))
        self.factors = data.factors[:self.n]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.data[i]


def hue_tracking(model: torch.nn.Module, data: Any, layers: list[str], batch_size: int = 256) -> pd.DataFrame:
    """R² of every unit's (spatial-mean) activation regressed on the shape's hue, as (cos, sin) of 2π·hue.

    Needs a dataset with ``factors`` (the generated shapes); one pass, least squares per unit.
    """
    from ..capture import capture

    factors = data.factors
    hue = factors[:, 1].double() * 2 * math.pi
    design = torch.stack([torch.ones_like(hue), torch.cos(hue), torch.sin(hue)], 1)
    acts: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    model.eval()
    with capture(model, layers, reduce="mean") as out, torch.inference_mode():
        for lo in range(0, len(data), batch_size):
            x = torch.stack([data[i][0] for i in range(lo, min(lo + batch_size, len(data)))])
            model(x)
            for k in layers:
                acts[k].append(out[k].double())
    frames = []
    for k in layers:
        y = torch.cat(acts[k])
        coef = torch.linalg.lstsq(design, y).solution
        resid = y - design @ coef
        total = ((y - y.mean(0)) ** 2).sum(0)
        r2 = torch.where(total > 0, 1 - (resid ** 2).sum(0) / torch.where(total > 0, total, 1), math.nan)
        frames.append(pd.DataFrame({"layer": k, "unit": np.arange(y.shape[1]), "hue_r2": r2.numpy()}))
    return pd.concat(frames, ignore_index=True)


def demo(ctx: DemoContext) -> None:
    """On shapes-cnn: indices of every unit to six augmentations and the image, and the hue check."""
    if ctx.name != "shapes-cnn":
        return
    from ..analyses.sensitivity import sensitivity

    layers = ["relu1", "relu2", "relu3", "relu4", "fc"]
    run = sensitivity(ctx.model, ctx.test_data, DEFAULT_VARIABLES, n=16 if ctx.quick else 64, layers=layers,
                      bootstrap=16 if ctx.quick else 50, seed=ctx.seed, batch_size=256, device="cpu",
                      progress=ctx.progress)
    for name, table in run.tables.items():
        ctx.run.tables[name] = table
    check = hue_tracking(ctx.model, Subset(ctx.test_data, 256 if ctx.quick else 512), ["relu3", "relu4"])
    st = run.table("sensitivity")
    st = st[st["variable"] == "hue"][["layer", "unit", "ST"]].rename(columns={"ST": "ST_hue"})
    ctx.run.tables["sensitivity_factors"] = check.merge(st, on=["layer", "unit"])
    from ..analyses.masking import guided_masking

    ctx.run.tables["sensitivity_masking"] = guided_masking(
        ctx.model, ctx.test_data, run.table("sensitivity"), fraction=0.2, samples=64 if ctx.quick else 128,
        random_repeats=1 if ctx.quick else 2, seed=ctx.seed, device="cpu")
    _add_single_class(ctx.run, ctx.model, ctx.test_data, ctx.seed, samples=64 if ctx.quick else 128)
