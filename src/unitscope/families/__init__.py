"""One module per analysis family: its ``unitscope run`` experiment types, report sections and demo part.

A family module registers what it offers when it is imported:

* experiment types, with ``@EXPERIMENTS.register("name")`` and their keys in ``KEYS["name"]``
  (both from :mod:`unitscope.experiments`);
* report sections, with ``SECTIONS["name"] = figures_function`` (and ``TABLE_SECTIONS.append``
  for sections made from tables alone) from :mod:`unitscope.report`;
* a part of ``unitscope demo``: a function ``demo(ctx: DemoContext) -> None`` that adds tables
  and arrays to ``ctx.run`` (see :mod:`unitscope.demo`).

:func:`load_all` imports every module of this package in name order; the config runner, the
report writer and the demo call it, so a new family needs no edit anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

#: the order in which the demo runs the families (others follow in name order)
ORDER = ("portraits", "similarity", "coverage", "sensitivity")


def load_all() -> list[ModuleType]:
    """Import every family module (once) and return them, in :data:`ORDER` first."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    names = [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]
    return [importlib.import_module(f"{__name__}.{n}") for n in names]
