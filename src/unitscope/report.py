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


def _table_html(frame: pd.DataFrame, limit: int = 40) -> str:
    note = f'<p class="note">first {limit} of {len(frame)} rows</p>' if len(frame) > limit else ""
    return frame.head(limit).to_html(index=False, float_format=lambda v: f"{v:.4g}") + note


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` for the run saved there and return its path."""
    from .families import load_all

    load_all()
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    m = run.manifest
    config = m.get("config", {})
    model_name = m.get("model", {}).get("class") or config.get("model", "model")
    data_name = m.get("data", {}).get("name") or config.get("dataset", "")
    parts = [f"<h1>unitscope report: {html.escape(str(model_name))}"
             f"{' on ' + html.escape(str(data_name)) if data_name else ''}</h1>"]
    facts = {"experiment": config.get("experiment", m.get("kind", "analyze"))}
    if "model" in m and "parameters" in m["model"]:
        facts.update({
            "model": f"{m['model']['class']} ({m['model']['parameters']:,} parameters)",
            "data": f"{m['data']['name']} ({m['data']['size']} items)",
            "layers": ", ".join(m["layers"]),
            "device / world size": f"{m['device']} / {m['world_size']}",
            "seed": m["seed"],
            "pass time": f"{m.get('timings', {}).get('pass_s', 0):.2f} s",
        })
    facts.update({"versions": ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
                  "created": m["created"]})
    parts.append("<h2 id='manifest'>Manifest</h2><table>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
        for k, v in facts.items()) + "</table>")
    bad = {k: v for k, v in m.get("nonfinite", {}).items() if v}
    if bad:
        parts.append("<p><b>Non-finite activations</b> (left out of every statistic): "
                     f"{html.escape(str(bad))}</p>")
    sections = [a.name for a in run.analyses]
    sections += [t for t in TABLE_SECTIONS if t in run.tables and t not in sections]
    for section in sections:
        parts.append(f"<h2 id='{section}'>{html.escape(section)}</h2>")
        for fig in SECTIONS.get(section, lambda r: [])(run):
            parts.append(f"<img alt='{section} figure' src='data:image/png;base64,{_png(fig)}'>")
        for name, frame in run.tables.items():
            if name == section or name.startswith(f"{section}_"):
                parts.append(_table_html(frame))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>unitscope report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
