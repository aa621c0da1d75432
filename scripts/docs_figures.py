"""Render the figures the docs show, from a demo output directory.

Usage: python scripts/docs_figures.py RUNS_DIR [--out docs/figures]

RUNS_DIR is the output of ``unitscope demo`` (one run directory per model). Every report section
of every run is rendered as its report renders it, and the first figure of each section is saved
as ``<model>-<section>.png``, which the pages under docs/ link to.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import unitscope
from unitscope.families import load_all
from unitscope.report import SECTIONS, TABLE_SECTIONS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = ap.parse_args()
    load_all()
    args.out.mkdir(parents=True, exist_ok=True)
    for run_dir in sorted(p for p in args.runs.iterdir() if (p / "manifest.json").is_file()):
        run = unitscope.load_run(run_dir)
        names = [a.name for a in run.analyses] + [t for t in TABLE_SECTIONS if t in run.tables]
        for name in dict.fromkeys(names):
            figures = SECTIONS.get(name, lambda r: [])(run)
            if figures:
                path = args.out / f"{run_dir.name}-{name}.png"
                figures[0].savefig(path, dpi=60, bbox_inches="tight")
                print(path)
            for fig in figures:
                plt.close(fig)


if __name__ == "__main__":
    main()
