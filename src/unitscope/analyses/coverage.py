"""Coverage as an analysis: the ten criteria of :mod:`unitscope.coverage`, fed by one forward pass.

Coverage is measured in two passes: a *build* pass over training data gives the criteria their
profiles (unit ranges for KMNC/NBC/SNAC, training traces for LSC/DSC, class means and
covariances for MDSC), then a *test* pass updates every criterion from the same captured
activations, batch after batch. So the analysis has a ``fit`` step before ``analyze``::

    cov = Coverage(["nc", "kmnc", "lsc"]).fit(model, train_data)
    run = unitscope.analyze(model, test_data, analyses=[cov])
    run.table("coverage")        # criterion, layer ("all" for the whole network), value
    run.table("coverage_curve")  # criterion, n_inputs, value after every batch

or, in one call, :func:`coverage`. Criteria that need no profile (NC, TKNC, TKNP, CC) also run
without ``fit``.

Example:
    >>> import unitscope
    >>> from unitscope.analyses.coverage import Coverage
    >>> model = unitscope.load_model("digits-cnn")
    >>> cov = Coverage(["nc", "kmnc", "mdsc"], options={"mdsc": {"ridge": 1e-6}}).fit(
    ...     model, unitscope.load_dataset("digits", "train"), progress=False)
    >>> run = unitscope.analyze(model, unitscope.load_dataset("digits", "test"), analyses=[cov],
    ...                         progress=False)
    >>> sorted(run.table("coverage").query("layer == 'all'").criterion)
    ['kmnc', 'mdsc', 'nc']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from ..capture import LayerSpec, Reduction, resolve_layers
from ..coverage import cluster, surprise  # noqa: F401  (importing them registers the criteria)
from ..coverage.base import CRITERIA, Criterion, criterion
from ..coverage.neuron import NC
from ..results import Run
from ..stats.base import Accumulator, MergeError
from .base import Analysis, Batch

__all__ = ["DEFAULT_CRITERIA", "Coverage", "CoverageCurve", "coverage", "plot_coverage_curve",
           "plot_coverage_layers"]

#: every criterion, in the order of the spec
DEFAULT_CRITERIA = ("nc", "kmnc", "nbc", "snac", "tknc", "tknp", "cc", "lsc", "dsc", "mdsc")

#: the module types whose outputs are covered by default (the anchor's choice: pre-activation)
DEFAULT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class CoverageCurve(Accumulator):
    """The value of every criterion after every batch of a pass: ``n_inputs`` and ``values`` rows.

    A curve belongs to one stream of inputs: it is not merged like the criteria (see
    :meth:`Coverage.merge`).
    """

    rules: ClassVar[dict[str, str]] = {"n_inputs": "custom", "values": "custom"}

    def __init__(self, criteria: Sequence[str] = ()) -> None:
        super().__init__()
        self.criteria = list(criteria)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"criteria": self.criteria}

    def append(self, n_new: int, values: Sequence[float]) -> None:
        """Add a row: ``n_new`` more inputs were seen, after which the criteria read ``values``."""
        last = int(self._states["n_inputs"][-1]) if self.initialized and len(self._states["n_inputs"]) else 0
        row_n = torch.tensor([last + int(n_new)], dtype=torch.long)
        row_v = torch.tensor([list(values)], dtype=torch.float64)
        if not self.initialized:
            self._states = {"n_inputs": row_n, "values": row_v}
        else:
            self._states = {"n_inputs": torch.cat([self._states["n_inputs"], row_n.to(self.device)]),
                            "values": torch.cat([self._states["values"], row_v.to(self.device)])}

    def _merge_states(self, theirs: dict[str, torch.Tensor]) -> None:
        raise MergeError("a coverage curve follows one stream of inputs; merge the Coverage analysis, "
                         "which keeps the first shard's curve and appends the merged value")

    def compute(self) -> pd.DataFrame:
        """Long table: criterion, n_inputs, value."""
        if not self.initialized:
            return pd.DataFrame({"criterion": [], "n_inputs": [], "value": []})
        n = self._states["n_inputs"].cpu().numpy()
        v = self._states["values"].cpu().numpy()
        frames = [pd.DataFrame({"criterion": name, "n_inputs": n, "value": v[:, i]})
                  for i, name in enumerate(self.criteria)]
        return pd.concat(frames, ignore_index=True)


class Coverage(Analysis):
    """Coverage criteria of the selected layers, all updated from one forward pass per batch.

    Args:
        criteria: short names (see :data:`unitscope.coverage.base.CRITERIA`: ``"nc"``, ``"kmnc"``,
            ``"nbc"``, ``"snac"``, ``"tknc"``, ``"tknp"``, ``"cc"``, ``"lsc"``, ``"dsc"``, ``"mdsc"``)
            or criterion objects (e.g. ``NC(threshold=0.5)``); each at most once. Default: all ten.
        layers: the layers whose units are covered. Default: every Conv/Linear module output
            (pre-activation, the anchor's choice) when :meth:`fit` runs, otherwise the layers given
            to ``unitscope.analyze``. The surprise criteria use all of them, concatenated.
        options: per-criterion constructor options by short name, e.g. ``{"nc": {"threshold": 0.5}}``.
        reduce: how a conv map becomes one value per channel, ``"mean"`` (default) or ``"max"``;
            an ``NC(scale="map_minmax")`` criterion makes the capture keep whole maps.
        class_source: the class of an input for LSC/DSC/MDSC: ``"pred"`` (default, the model's
            argmax, as in SADL) or ``"label"`` (the dataset label, as the anchor).
        surprise_layers: the layers whose concatenated units form the activation trace of
            LSC/DSC/MDSC (default: ``layers``). SADL uses one deep layer; LSC and MDSC keep a
            d × d matrix per class, so on wide networks name a few layers here.

    Tables: ``coverage`` (criterion, layer, value; layer ``"all"`` is the criterion's value over
    all layers), ``coverage_curve`` (criterion, n_inputs, value after every batch) and
    ``coverage_diagnostics`` (criterion, diagnostic, value: KMNC's degenerate units, the surprise
    criteria's kept units, ridged classes and underflow / overflow / dropped inputs).
    """

    name = "coverage"

    def __init__(self, criteria: Sequence[str | Criterion] = DEFAULT_CRITERIA,
                 layers: LayerSpec | None = None, options: Mapping[str, Mapping[str, Any]] | None = None,
                 reduce: Reduction = "mean", class_source: str = "pred",
                 surprise_layers: LayerSpec | None = None) -> None:
        super().__init__(layers)
        self.coverage_layers = layers
        self.surprise_layers = surprise_layers
        if isinstance(criteria, (str, Criterion)):
            criteria = [criteria]
        options = {str(k).lower(): dict(v) for k, v in (options or {}).items()}
        unknown = sorted(set(options) - set(CRITERIA))
        if unknown:
            raise ValueError(f"options for unknown criteria {unknown}; known criteria: "
                             f"{', '.join(sorted(CRITERIA))}")
        built = [criterion(c, **options.get(c.lower(), {})) if isinstance(c, str) else criterion(c)
                 for c in criteria]
        if not built:
            raise ValueError("Coverage needs at least one criterion, e.g. Coverage(['nc', 'kmnc'])")
        keys = [c.key for c in built]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"criterion {dup[0]!r} is given twice; give each criterion once")
        stray = sorted(set(options) - set(keys))
        if stray:
            raise ValueError(f"options given for {stray}, which are not among the criteria {keys}")
        if class_source not in ("pred", "label"):
            raise ValueError(f"class_source={class_source!r}: use 'pred' (model prediction) or 'label'")
        if callable(reduce) or reduce not in ("mean", "max"):
            raise ValueError(f"Coverage(reduce={reduce!r}): use 'mean' or 'max'")
        self.names = [c.key for c in built]
        self.class_source = class_source
        self.reduce_option = reduce
        maps = any(isinstance(c, NC) and c.scale == "map_minmax" for c in built)
        if maps and reduce != "mean":
            raise ValueError("NC(scale='map_minmax') needs whole maps, which the other criteria then reduce "
                             "by their spatial mean; use reduce='mean', or measure NC in its own Coverage")
        self.reduce = "none" if maps else reduce
        self.needs_output = class_source == "pred" and any(c.needs_classes for c in built)
        if surprise_layers is not None:
            if not any(c.needs_classes for c in built):
                raise ValueError("surprise_layers is given but none of the criteria is LSC, DSC or MDSC")
            if _names(layers) and _names(surprise_layers):  # rebuilt from a saved run; else fit() resolves
                self.layers = list(dict.fromkeys([*layers, *surprise_layers]))  # type: ignore[misc]
        self.accumulators = {**{c.key: c for c in built}, "curve": CoverageCurve(self.names)}
        self._keys: list[str] | None = None

    @property
    def criteria(self) -> dict[str, Criterion]:
        """The live criteria by short name (after a resume or a load, the restored ones)."""
        return {k: self.accumulators[k] for k in self.names}  # type: ignore[misc]

    def config(self) -> dict[str, Any]:
        """Constructor arguments (criteria by name, their options, JSON-able)."""
        return {**super().config(), "layers": _jsonable(self.coverage_layers),
                "surprise_layers": _jsonable(self.surprise_layers),
                "criteria": list(self.criteria),
                "options": {k: c.config() for k, c in self.criteria.items()},
                "reduce": self.reduce_option, "class_source": self.class_source}

    # ------------------------------------------------------------------ build pass
    def fit(self, model: nn.Module, train_data: Dataset, *, batch_size: int = 256,
            device: str | torch.device = "auto", progress: bool = True) -> Coverage:
        """Build the profiles of the criteria that need one on ``train_data``; returns ``self``.

        One forward pass over ``train_data`` (eval mode) feeds every criterion's ``fit``; the
        criteria that need no profile are left untouched. Resolves the default layers.
        """
        from ..engine import analyze

        if self.coverage_layers is None:
            names = [n for n, m in model.named_modules() if n and isinstance(m, DEFAULT_MODULES)]
            if not names:
                raise ValueError(f"{type(model).__name__} has no Conv/Linear module; name the layers to "
                                 "cover with Coverage(layers=...)")
        else:
            names = resolve_layers(model, self.coverage_layers)
        self.coverage_layers = names
        if self.surprise_layers is not None:
            self.surprise_layers = resolve_layers(model, self.surprise_layers)
            self.layers = resolve_layers(model, [*names, *self.surprise_layers])
        else:
            self.layers = names
        todo = {k: c for k, c in self.criteria.items() if c.needs_fit}
        if todo:
            for c in todo.values():
                c.reset()
            profile = _Profile(self, todo)
            analyze(model, train_data, analyses=[profile], batch_size=batch_size, device=device,
                    progress=progress)
            for c in todo.values():
                c.freeze()
        return self

    def _classes(self, batch: Batch) -> torch.Tensor:
        if self.class_source == "label":
            if batch.y is None:
                raise ValueError("Coverage(class_source='label') needs a dataset with labels; use "
                                 "class_source='pred'")
            return batch.y
        if batch.output is None or batch.output.dim() != 2:
            raise ValueError("Coverage(class_source='pred') needs a model whose output is (n, classes) "
                             "logits; use class_source='label'")
        return batch.output.argmax(1)

    # ------------------------------------------------------------------ test pass
    def start(self, keys: list[str]) -> None:
        """Check that the pass captures the layers the criteria were fitted on."""
        for k, c in self.criteria.items():
            if c.needs_fit and not c.fitted:
                raise ValueError(f"Coverage criterion {k!r} needs a profile of training data: call "
                                 f"Coverage(...).fit(model, train_data) before analyze (or use "
                                 "unitscope.analyses.coverage.coverage())")
            want = self._layers_of(c, keys)
            if c.layers and set(c.layers) != set(want):
                raise ValueError(f"Coverage criterion {k!r} was fitted on layers {c.layers} but this pass "
                                 f"gives it {want}; use the same model and layers for fit and analyze")
        self._keys = list(keys)

    def _layers_of(self, c: Criterion, keys: list[str]) -> list[str]:
        """The captured layers criterion ``c`` covers (surprise criteria may use their own)."""
        if self.surprise_layers is None:
            return keys
        chosen = self.surprise_layers if c.needs_classes else self.coverage_layers
        return list(chosen)  # type: ignore[arg-type]

    def update(self, acts: Mapping[str, torch.Tensor], batch: Batch) -> None:
        """Update every criterion from this batch's activations; record the curve."""
        keys = self._keys if self._keys is not None else list(acts)
        classes = self._classes(batch) if any(c.needs_classes for c in self.criteria.values()) else None
        for c in self.criteria.values():
            c.update({k: acts[k] for k in self._layers_of(c, keys)}, classes)
        self.accumulators["curve"].append(len(batch.x), [c.value() for c in self.criteria.values()])

    def merge(self, other: Analysis) -> Analysis:
        """Merge the criteria of another shard; the curve keeps this shard's rows plus the merged end."""
        if not isinstance(other, Coverage):
            raise MergeError(f"cannot merge {type(other).__name__} into Coverage")
        self._passed = True  # it holds finished passes now (see Analysis.merge)
        n_other = _seen(other)
        for k in other.names:
            mine = self.accumulators.get(k)
            if mine is None:
                raise MergeError(f"cannot merge coverage runs with different criteria: {k!r}")
            mine.merge(other.accumulators[k])
        self._append_merged(n_other)
        return self

    def sync(self) -> None:
        """All-reduce the criteria over the process group; the curve gets the merged end point."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        seen = torch.tensor([_seen(self)], dtype=torch.long)
        for k in self.criteria:
            self.accumulators[k].sync()
        if dist.get_backend() == "nccl":
            seen = seen.cuda()
        dist.all_reduce(seen)
        self._append_merged(int(seen) - _seen(self))

    def _append_merged(self, n_other: int) -> None:
        if n_other:
            self.accumulators["curve"].append(n_other, [self.accumulators[k].value() for k in self.criteria])

    # ------------------------------------------------------------------ results
    def tables(self) -> dict[str, pd.DataFrame]:
        """``coverage``, ``coverage_curve`` and ``coverage_diagnostics`` (see the class docstring)."""
        rows = []
        for k, c in self.criteria.items():
            rows.append({"criterion": k, "layer": "all", "value": c.value()})
            rows += [{"criterion": k, "layer": layer, "value": v} for layer, v in c.layer_values().items()]
        table = pd.DataFrame(rows, columns=["criterion", "layer", "value"])
        curve = self.accumulators["curve"].compute()
        diagnostics = pd.DataFrame(
            [{"criterion": k, "diagnostic": name, "value": v}
             for k, c in self.criteria.items() for name, v in c.diagnostics().items()],
            columns=["criterion", "diagnostic", "value"])
        return {"coverage": table, "coverage_curve": curve, "coverage_diagnostics": diagnostics}


def _jsonable(spec: LayerSpec | None) -> Any:
    """A layer selection with module types written as their class names (as in the manifest)."""
    if isinstance(spec, type):
        return spec.__name__
    if isinstance(spec, (list, tuple)):
        return [x.__name__ if isinstance(x, type) else x for x in spec]
    return spec


def _names(spec: LayerSpec | None) -> bool:
    """Whether a layer selection is already a list of module names."""
    return isinstance(spec, (list, tuple)) and all(isinstance(x, str) for x in spec)


def _seen(a: Coverage) -> int:
    curve = a.accumulators["curve"]
    return int(curve._states["n_inputs"][-1]) if curve.initialized else 0


class _Profile(Analysis):
    """The build pass of :meth:`Coverage.fit`: feeds ``fit`` of the criteria that need a profile."""

    def __init__(self, owner: Coverage, criteria: dict[str, Criterion]) -> None:
        super().__init__(owner.layers)
        self.owner, self.criteria = owner, criteria
        self.reduce = owner.reduce
        self.needs_output = owner.needs_output
        self._keys: list[str] = []

    def config(self) -> dict[str, Any]:
        """The owner's configuration (recorded in the build pass's manifest)."""
        return self.owner.config()

    def start(self, keys: list[str]) -> None:
        """Remember the captured layers (in module order)."""
        self._keys = list(keys)

    def update(self, acts: Mapping[str, torch.Tensor], batch: Batch) -> None:
        """Fold the batch into every profile."""
        classes = self.owner._classes(batch) if any(c.needs_classes for c in self.criteria.values()) else None
        for c in self.criteria.values():
            c.fit({k: acts[k] for k in self.owner._layers_of(c, self._keys)}, classes)

    def sync(self) -> None:
        """Merge the profiles of every rank (each saw its own shard of the training data)."""
        for k in sorted(self.criteria):
            self.criteria[k].sync()

    def tables(self) -> dict[str, pd.DataFrame]:
        """None: the build pass only fills the profiles."""
        return {}


def coverage(model: nn.Module, train_data: Dataset | None, test_data: Dataset,
             layers: LayerSpec | None = None, criteria: Sequence[str | Criterion] = DEFAULT_CRITERIA,
             options: Mapping[str, Mapping[str, Any]] | None = None, surprise_layers: LayerSpec | None = None,
             **analyze_options: Any) -> Run:
    """Fit the coverage criteria on ``train_data``, then measure them on ``test_data`` (two passes).

    Args:
        model: the network.
        train_data: the build set (may be None when no criterion needs a profile).
        test_data: the inputs whose coverage is measured.
        layers, criteria, options, surprise_layers: as in :class:`Coverage`.
        **analyze_options: passed to ``unitscope.analyze`` and to :meth:`Coverage.fit`
            (``batch_size``, ``device``, ``progress``) or to analyze only (``out``, ...).

    Returns:
        The run of the test pass, with tables ``coverage`` and ``coverage_curve``.
    """
    from ..engine import analyze

    cov = Coverage(criteria, layers=layers, options=options, surprise_layers=surprise_layers)
    fit_options = {k: v for k, v in analyze_options.items() if k in ("batch_size", "device", "progress")}
    if train_data is not None:
        cov.fit(model, train_data, **fit_options)
    elif any(c.needs_fit for c in cov.criteria.values()):
        raise ValueError("these criteria need training data for their profiles: "
                         f"{[k for k, c in cov.criteria.items() if c.needs_fit]}; pass train_data")
    elif cov.layers is None:
        cov.layers = resolve_layers(model, [n for n, m in model.named_modules()
                                            if n and isinstance(m, DEFAULT_MODULES)])
    return analyze(model, test_data, analyses=[cov], **analyze_options)


def plot_coverage_curve(table: pd.DataFrame, ax: Any = None) -> Any:
    """Coverage against the number of test inputs (a ``coverage_curve`` table); returns the figure.

    Fractions share one axis in [0, 1]; counts (TKNP, CC, surprise buckets in anchor mode) are
    drawn on a second panel, since their scale differs.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(table["criterion"]))
    counts = [n for n in names if _is_count(n, table)]
    fractions = [n for n in names if n not in counts]
    panels = [p for p in (fractions, counts) if p]
    if ax is not None:
        fig, axes = ax.figure, [ax] * len(panels)
    else:
        fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.2),
                                 layout="constrained", squeeze=False)
        axes = list(axes[0])
    for panel, a in zip(panels, axes):
        for name in panel:
            rows = table[table["criterion"] == name]
            a.plot(rows["n_inputs"], rows["value"], marker=".", label=name)
        a.set_xlabel("test inputs")
        a.set_ylabel("coverage" if panel is fractions else "count")
        if panel is fractions:
            a.set_ylim(0, 1.02)
        a.legend(fontsize=8)
    return fig


def plot_coverage_layers(table: pd.DataFrame, ax: Any = None) -> Any:
    """Per-layer coverage of the fraction criteria as grouped bars (a ``coverage`` table); returns the figure.

    Criteria without per-layer values (TKNP in network mode, the surprise criteria) and counts
    are left out; the ``"all"`` rows are drawn as a last group.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = table[[not _is_count(c, table) for c in table["criterion"]]]
    grid = rows.pivot(index="layer", columns="criterion", values="value")
    layers = [x for x in dict.fromkeys(rows["layer"]) if x != "all"] + ["all"]
    per_layer = [c for c in dict.fromkeys(rows["criterion"]) if grid[c].drop("all").notna().any()]
    grid = grid.loc[layers, per_layer]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(
        figsize=(1.5 + 0.9 * len(grid), 3.2), layout="constrained")
    width = 0.8 / max(grid.shape[1], 1)
    for i, name in enumerate(grid.columns):
        ax.bar([j + i * width for j in range(len(grid))], grid[name].fillna(0), width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(grid))], grid.index, rotation=45)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("coverage")
    ax.legend(fontsize=8, ncols=2)
    return fig


def _is_count(name: str, table: pd.DataFrame) -> bool:
    cls = CRITERIA.get(name)
    if cls is not None and cls.kind == "count":
        return True
    return bool((table.loc[table["criterion"] == name, "value"] > 1).any())
