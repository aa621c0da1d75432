"""A self-contained HTML report of a run directory: manifest, figures (embedded PNG) and tables.

No network: figures are base64 PNGs and the page has no scripts. Each analysis family adds its
section through :data:`SECTIONS`; an analysis without one still gets its tables.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from .results import Run, load_run

#: analysis name -> function(run) returning a list of matplotlib figures for its section
SECTIONS: dict[str, Callable[[Run], list[Any]]] = {}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4}img{max-width:100%;margin:.5em 0}.note{color:#666;font-size:.9em}
.toc{columns:3;font-size:.9em}pre{background:#f8f8f8;padding:.5em;overflow-x:auto}
"""


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_moments(run: Run, ax: Any = None) -> Any:
    """Mean ± std of every unit, one panel per layer (from the ``moments`` table); returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    table = run.table("moments")
    layers = list(dict.fromkeys(table["layer"]))
    fig, axes = plt.subplots(len(layers), 1, figsize=(9, 1.4 * len(layers) + 0.6), squeeze=False,
                             layout="constrained")
    for axis, layer in zip(axes[:, 0], layers):
        rows = table[table["layer"] == layer]
        axis.errorbar(rows["unit"], rows["mean"], yerr=rows["std"], fmt=".", ms=3, lw=0.6)
        axis.set_ylabel(layer, rotation=0, ha="right", va="center")
        axis.margins(x=0.01)
    axes[-1, 0].set_xlabel("unit")
    fig.suptitle("activation mean ± std per unit")
    return fig


SECTIONS["moments"] = lambda run: [plot_moments(run)]


def _saturation_figures(run: Run) -> list[Any]:
    from .analyses.saturation import (
        plot_projected_accuracy,
        plot_saturation,
        plot_saturation_epochs,
        plot_saturation_per_epoch,
    )

    figures = [plot_saturation(run.table("saturation"))]
    if "saturation_epochs" in run.tables:
        figures.append(plot_saturation_per_epoch(run.tables["saturation_epochs"]))
        for split in sorted(set(run.tables["saturation_epochs"]["split"])):
            figures.append(plot_saturation_epochs(run.tables["saturation_epochs"], split))
    if "saturation_projection" in run.tables:
        figures.append(plot_projected_accuracy(run.tables["saturation_projection"]))
    return figures


SECTIONS["saturation"] = _saturation_figures

#: sections made from tables alone (no streaming analysis behind them); families append theirs
TABLE_SECTIONS: list[str] = ["receptive_field", "probes"]


def _receptive_field_figures(run: Run) -> list[Any]:
    from .analyses.receptive_fields import plot_receptive_fields

    return [plot_receptive_fields(run.table("receptive_field"))]


def plot_probes(table: pd.DataFrame, ax: Any = None) -> Any:
    """Train and test accuracy of the probe of every layer; returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3), layout="constrained")
    x = range(len(table))
    ax.plot(x, table["train_acc"], "o-", label="train")
    ax.plot(x, table["test_acc"], "s-", label="test")
    ax.set_xticks(list(x), table["layer"], rotation=45)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("probe accuracy")
    ax.legend()
    return fig


SECTIONS["receptive_field"] = _receptive_field_figures
SECTIONS["probes"] = lambda run: [plot_probes(run.table("probes"))]


#: table -> (value column, label) plotted per layer for every run of a grid, side by side
COMPARISONS: dict[str, tuple[str, str]] = {
    "saturation": ("saturation", "saturation"),
    "probes": ("test_acc", "probe test accuracy"),
    "receptive_field": ("rf_size", "receptive field (px)"),
}


def _table_html(frame: pd.DataFrame, limit: int = 40) -> str:
    note = f'<p class="note">first {limit} of {len(frame)} rows</p>' if len(frame) > limit else ""
    return frame.head(limit).to_html(index=False, float_format=lambda v: f"{v:.4g}") + note


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")


def _write(out: Path, page: str) -> Path:
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def _img(fig: Any, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{_png(fig)}'>"


def grid_runs(path: str | Path) -> list[Path]:
    """The run directories one level below ``path``, sorted by name.

    Hidden directories (a save's ``.NAME.tmp-*`` or an interrupted replacement's ``.NAME.old-*``)
    and ``NAME.partial`` work directories are no runs of the grid, even with a manifest.
    """
    return sorted(p for p in Path(path).iterdir()
                  if not p.name.startswith(".") and not p.name.endswith(".partial")
                  and (p / "manifest.json").is_file())


def is_grid(path: str | Path) -> bool:
    """Whether ``path`` is a grid directory: no run of its own, finished runs one level down."""
    path = Path(path)
    return not (path / "manifest.json").is_file() and bool(grid_runs(path))


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` and return its path.

    For a run directory the page holds the manifest and one section per analysis (figures and
    tables). For a grid directory (the runs of one config, ``unitscope run`` writes them side by
    side) it writes each run's report and an index comparing the runs.

    Raises:
        RunError: ``run_dir`` is neither a run nor a directory holding runs.
    """
    from .families import load_all
    from .results import RunError

    load_all()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} does not exist; give a run directory (or a directory of runs) "
                       "written by `unitscope run` or run.save()")
    if is_grid(run_dir):
        return write_grid_report(run_dir)
    return _write(run_dir / "report.html", _run_page(load_run(run_dir)))


def _run_page(run: Run) -> str:
    from ._toml import dumps

    m = run.manifest
    config = m.get("config", {})
    model_name = m.get("model", {}).get("class") or config.get("model", "model")
    data_name = m.get("data", {}).get("name") or config.get("dataset", "")
    title = f"unitscope report: {model_name}{' on ' + str(data_name) if data_name else ''}"
    facts = {"experiment": config.get("experiment", m.get("kind", "analyze"))}
    if "model" in m and "parameters" in m["model"]:
        facts.update({
            "model": f"{m['model']['class']} ({m['model']['parameters']:,} parameters)",
            "data": f"{m['data']['name']} ({m['data']['size']} items)",
            "layers": ", ".join(m["layers"]),
            "device / world size": f"{m['device']} / {m['world_size']}",
            "seed": m["seed"],
        })
    for key, value in m.get("timings", {}).items():  # seconds end in _s; the rest are counts
        if key.endswith("_s") and isinstance(value, (int, float)):
            facts[f"time: {key.removesuffix('_s')}"] = f"{value:.2f} s"
        else:
            facts[f"pass: {key.replace('_', ' ')}"] = value
    facts.update({"versions": ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
                  "created": m.get("created", "")})
    sections = [a.name for a in run.analyses]
    sections += [t for t in TABLE_SECTIONS if t in run.tables and t not in sections]
    toc = "".join(f"<li><a href='#{html.escape(x)}'>{html.escape(x)}</a></li>"
                  for x in ["manifest", *sections])
    parts = [f"<h1>{html.escape(title)}</h1>", f"<nav><ul class='toc'>{toc}</ul></nav>",
             "<section id='manifest'><h2>manifest</h2><table>" + "".join(
                 f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                 for k, v in facts.items()) + "</table>"]
    if config:
        parts.append(f"<details><summary>config</summary><pre>{html.escape(dumps(config))}</pre></details>")
    bad = {k: v for k, v in m.get("nonfinite", {}).items() if v}
    if bad:
        parts.append("<p><b>Non-finite activations</b> (left out of every statistic): "
                     f"{html.escape(str(bad))}</p>")
    parts.append("</section>")
    owner = {name: _section_of(name, sections) for name in run.tables}
    for section in sections:
        parts.append(f"<section id='{html.escape(section)}'><h2>{html.escape(section)}</h2>")
        for fig in SECTIONS.get(section, lambda r: [])(run):
            parts.append(_img(fig, f"{section} figure"))
        for name, frame in run.tables.items():
            if owner[name] == section:
                parts.append(f"<h3>{html.escape(name)}</h3>" + _table_html(frame))
        parts.append("</section>")
    return _page(title, "".join(parts))


def _merged_order(sequences: list[list[str]]) -> list[str]:
    """One order of the layers of several runs that keeps each run's own order where it can.

    A layer the order lacks goes right after the last layer before it in its run (so ``conv4`` of
    one model lands between ``conv3`` and ``fc`` of another).

    Example:
        >>> _merged_order([["conv1", "conv3", "fc"], ["conv1", "conv3", "conv4", "fc"]])
        ['conv1', 'conv3', 'conv4', 'fc']
    """
    order: list[str] = []
    for seq in sequences:
        at = 0
        for layer in seq:
            if layer in order:
                at = order.index(layer) + 1
            else:
                order.insert(at, layer)
                at += 1
    return order


def _section_of(table: str, sections: list[str]) -> str | None:
    """The section a table belongs to: the longest section name it equals or starts with plus ``_``."""
    matches = [x for x in sections if table == x or table.startswith(f"{x}_")]
    return max(matches, key=len) if matches else None


def write_grid_report(grid: str | Path, run_reports: bool = True) -> Path:
    """Write every run's report and ``GRID/report.html``: the runs side by side.

    The index lists each run (its swept parameters, experiment, model, data, a link to its
    report) and, for every table of :data:`COMPARISONS` that two or more runs hold, one figure
    with a line per run over the layers (saturation per layer for each model, probe accuracy per
    layer for each resolution, ...). ``run_reports=False`` leaves the runs' own reports as they are.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = Path(grid)
    runs: dict[str, Run] = {}
    for sub in grid_runs(grid):
        run = load_run(sub)
        runs[sub.name] = run
        if run_reports or not (sub / "report.html").is_file():
            _write(sub / "report.html", _run_page(run))
    rows = []
    for name, run in runs.items():
        config = run.manifest.get("config", {})
        rows.append(f"<tr><td style='text-align:left'><a href='{html.escape(name)}/report.html'>"
                    f"{html.escape(name)}</a></td><td>{html.escape(str(config.get('experiment', '')))}</td>"
                    f"<td>{html.escape(str(config.get('model', '')))}</td>"
                    f"<td>{html.escape(str(config.get('dataset', '')))}</td>"
                    f"<td style='text-align:left'>{html.escape(', '.join(sorted(run.tables)))}</td></tr>")
    parts = [f"<h1>unitscope grid: {html.escape(grid.name)}</h1>",
             f"<section id='runs'><h2>runs ({len(runs)})</h2><table><tr><th>run</th><th>experiment</th>"
             f"<th>model</th><th>data</th><th>tables</th></tr>{''.join(rows)}</table></section>"]
    for table, (column, label) in COMPARISONS.items():
        having = {n: r.tables[table] for n, r in runs.items()
                  if table in r.tables and {"layer", column} <= set(r.tables[table].columns)}
        if len(having) < 2:
            continue
        order = _merged_order([list(frame["layer"].astype(str)) for frame in having.values()])
        position = {layer: i for i, layer in enumerate(order)}
        fig, ax = plt.subplots(figsize=(8, 3.5), layout="constrained")
        for name, frame in having.items():
            ax.plot([position[x] for x in frame["layer"].astype(str)], frame[column], "o-", label=name)
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        parts.append(f"<section id='compare-{table}'><h2>{html.escape(label)} per layer</h2>"
                     + _img(fig, f"{table} compared") + "</section>")
    return _write(grid / "report.html", _page(f"unitscope grid: {grid.name}", "".join(parts)))
