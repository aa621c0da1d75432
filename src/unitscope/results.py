"""The run directory: what an analysis run leaves behind, written atomically, read back whole.

::

    RUN/
      manifest.json          versions, seeds, world size, model and data fingerprints, timings
      config.toml            the resolved configuration (when the run came from a config)
      tables/<name>.parquet  tidy tables, one row per layer / unit / input
      arrays/<name>.safetensors   what is not tabular (matrices, maps)
      states/<name>.safetensors   accumulator states: resume, offline merge

A save builds the directory beside its target and renames it into place, so an interrupted save
leaves the previous run or nothing, never a half-written directory.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .analyses.base import Analysis, build_analysis
from .stats.base import load_states, save_states

SCHEMA_VERSION = 1


class RunError(ValueError):
    """A run directory that is missing, incomplete or unreadable."""


class Run:
    """The results of one pass: tidy tables, arrays, accumulator states and a manifest.

    Tables are computed where the pass ran (a GPU's eigendecompositions stay there); the arrays and
    the analyses' states are then moved to the CPU, whatever the pass's device.

    Example:
        >>> import tempfile, unitscope
        >>> run = unitscope.analyze(unitscope.load_model("digits-cnn"),
        ...                         unitscope.load_dataset("digits", "test"), layers="fc", progress=False)
        >>> run.table("moments").shape
        (10, 8)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     unitscope.load_run(run.save(f"{d}/run")).table("moments").equals(run.table("moments"))
        True
    """

    def __init__(self, analyses: list[Analysis], manifest: dict[str, Any],
                 tables: dict[str, pd.DataFrame] | None = None,
                 arrays: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        self.analyses = analyses
        self.manifest = manifest
        if tables is None:
            tables = {}
            for a in analyses:
                tables.update(a.tables())
        if arrays is None:
            arrays = {a.name: {k: t.detach().cpu() for k, t in a.arrays().items()} for a in analyses}
            arrays = {k: v for k, v in arrays.items() if v}
        for a in analyses:  # results live on the host, as a loaded run's do, and free the GPU
            a.to("cpu")
        self.tables = tables
        self.arrays = arrays

    def table(self, name: str) -> pd.DataFrame:
        """The tidy table ``name`` (e.g. ``"moments"``) as a pandas DataFrame."""
        if name not in self.tables:
            have = ", ".join(sorted(self.tables)) or "none"
            raise KeyError(f"this run has no table {name!r}; it has: {have}")
        return self.tables[name]

    def analysis(self, name: str) -> Analysis:
        """The analysis object ``name``, with its accumulators (to merge, inspect or recompute)."""
        for a in self.analyses:
            if a.name == name:
                return a
        have = ", ".join(a.name for a in self.analyses) or "none"
        raise KeyError(f"this run has no analysis {name!r}; it has: {have}")

    def save(self, path: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
        """Write the run directory to ``path`` atomically (replacing a previous run there).

        Args:
            path: the run directory to write.
            extra: called with the temporary directory after the tables, arrays and states are
                written and before the manifest, to add files of its own (e.g. PNG mosaics). If it
                raises, nothing replaces ``path`` and the error propagates, so the run is either
                complete with those files or not there.

        Raises:
            RunError: ``path`` exists and is neither empty nor a run directory (its files would
                be deleted).
        """
        path = Path(path)
        check_replaceable(path)
        with atomic_directory(path) as tmp:
            (tmp / "tables").mkdir()
            for name, frame in self.tables.items():
                frame.to_parquet(tmp / "tables" / f"{name}.parquet", index=False)
            if self.arrays:
                from safetensors.torch import save_file

                (tmp / "arrays").mkdir()
                for name, arrays in self.arrays.items():
                    save_file({k: v.detach().cpu().contiguous() for k, v in arrays.items()},
                              str(tmp / "arrays" / f"{name}.safetensors"))
            (tmp / "states").mkdir()
            for a in self.analyses:
                save_states(tmp / "states" / f"{a.name}.safetensors", a.accumulators,
                            meta={"analysis": a.name, "config": a.config()})
            if self.manifest.get("config"):
                from ._toml import dumps

                (tmp / "config.toml").write_text(dumps(self.manifest["config"]))
            if extra is not None:
                extra(tmp)
            manifest = {**self.manifest, "schema_version": SCHEMA_VERSION}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        return path


def check_replaceable(path: Path) -> None:
    """Refuse to replace ``path`` unless it is missing, empty or a run directory.

    A run directory has a ``manifest.json`` (finished or not), or holds only ``features/`` or
    only ``checkpoints/`` (an unfinished probes run or training of an earlier version, which
    the experiment moves out and resumes from). Anything else is somebody's files: replacing it
    would delete them, so this raises :class:`RunError` (call it before any work).
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise RunError(f"{path} exists and is a file, not a run directory; choose another output path")
    entries = {p.name for p in path.iterdir()}
    if not entries or "manifest.json" in entries or entries in ({"features"}, {"checkpoints"}):
        return
    shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
    raise RunError(f"{path} exists and is not a unitscope run (no manifest.json; it holds {shown}); "
                   "choose another output path or delete that directory yourself")


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a fresh sibling directory; on success it replaces ``path``, on error it is removed.

    Callers check first that ``path`` may be replaced (:func:`check_replaceable`). When ``path``
    exists, leftovers of earlier replacements of it that were cut short (hidden
    ``.NAME.old-*`` siblings, and ``.NAME.tmp-*`` ones untouched for an hour: a younger one may be
    another process's save in progress) are removed first; when it is missing they are kept, so
    :func:`_recover` can still put the previous run back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        now = time.time()
        for stale in _siblings(path):
            if ".old-" in stale.name or now - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{tag}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _siblings(path: Path) -> list[Path]:
    """The hidden ``.NAME.old-TAG`` and ``.NAME.tmp-TAG`` directories that saves to ``path`` make."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(old|tmp)-[0-9a-f]{{8}}")
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]


def _recover(path: Path) -> None:
    """Finish a replacement that was interrupted between its two renames."""
    if path.exists():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if olds:
        olds[-1].rename(path)


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a finished run (a manifest with status ``complete``)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("status") == "complete"
    except json.JSONDecodeError:
        return False


def load_run(path: str | Path) -> Run:
    """Read a run directory written by :meth:`Run.save` back into a :class:`Run`.

    Raises:
        RunError: the directory does not exist or holds no readable manifest.
    """
    path = Path(path)
    _recover(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise RunError(f"{path} is not a unitscope run directory (no manifest.json); "
                       "point to a directory written by run.save() or `unitscope run`")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{manifest_file} is corrupt ({exc}); rerun the analysis") from exc
    tables = {}
    for p in sorted((path / "tables").glob("*.parquet")):
        try:
            tables[p.stem] = pd.read_parquet(p)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise RunError(f"{p} is corrupt ({type(exc).__name__}: {exc}); rerun the analysis") from exc
    arrays: dict[str, dict[str, torch.Tensor]] = {}
    if (path / "arrays").is_dir():
        from safetensors.torch import load_file

        arrays = {p.name.removesuffix(".safetensors"): load_file(str(p))
                  for p in sorted((path / "arrays").glob("*.safetensors"))}
    analyses = [load_analysis_states(p) for p in sorted((path / "states").glob("*.safetensors"))]
    return Run(analyses, manifest, tables=tables, arrays=arrays)


def load_analysis_states(path: str | Path) -> Analysis:
    """Rebuild an analysis, accumulators included, from a ``states/<name>.safetensors`` file."""
    accumulators, meta = load_states(path)
    if "analysis" not in meta:
        raise RunError(f"{path} holds accumulator states but names no analysis")
    analysis = build_analysis(meta["analysis"], meta.get("config", {}))
    analysis.accumulators = accumulators
    analysis._passed = True  # it holds a finished pass: analyze() must not add another to it
    return analysis


def merge_runs(paths: list[str | Path]) -> Run:
    """Combine the run directories of shards run separately (``analyze(shard=(i, k))``) into one run.

    The shards must come from the same model, data, analyses, layers and seed and together cover
    the dataset exactly once; their accumulators are merged, so the result equals one pass over
    everything.
    """
    if not paths:
        raise RunError("nothing to merge: name the shard run directories")
    runs = [load_run(p) for p in paths]
    for p, r in zip(paths, runs):
        if "model" not in r.manifest or "data" not in r.manifest or not r.analyses:
            kind = r.manifest.get("kind", "unknown")
            raise RunError(f"{p} is not an analysis pass (its kind is {kind!r}); only runs of "
                           "analyze(shard=...) or `unitscope run` analyze experiments can be merged")
    first = runs[0].manifest
    for p, r in zip(paths, runs):
        m = r.manifest
        for key in ("model", "data"):
            if m[key]["fingerprint"] != first[key]["fingerprint"]:
                raise RunError(f"{p} analysed another {key} than {paths[0]} (fingerprints differ)")
        if m["analyses"] != first["analyses"]:
            raise RunError(f"{p} ran other analyses than {paths[0]}: {m['analyses']} vs {first['analyses']}")
        if m.get("layers") != first.get("layers"):
            raise RunError(f"{p} captured layers {m.get('layers')}, {paths[0]} {first.get('layers')}; "
                           "rerun the shards with the same layers")
        if m.get("seed") != first.get("seed"):
            raise RunError(f"{p} ran with seed {m.get('seed')}, {paths[0]} with {first.get('seed')}; "
                           "rerun the shards with the same seed")
    spans = sorted((tuple(r.manifest["data"]["range"]), str(p)) for p, r in zip(paths, runs))
    size, covered = first["data"]["size"], 0
    for (start, stop), p in spans:
        if start != covered:
            what = ("overlaps the previous shard" if start < covered
                    else f"leaves items {covered}..{start - 1} out")
            raise RunError(f"shard {p} covers items {start}..{stop - 1}, which {what}")
        covered = stop
    if covered != size:
        raise RunError(f"the shards cover items 0..{covered - 1} of {size}; "
                       "the shards after that are missing")
    analyses = runs[0].analyses
    for r in runs[1:]:
        for a, b in zip(analyses, r.analyses):
            a.merge(b)
    timings = [r.manifest.get("timings", {}) for r in runs]
    manifest = {**first, "shard": None, "merged_from": [str(p) for p in paths],
                "data": {**first["data"], "range": [0, size]},
                "nonfinite": {k: sum(r.manifest["nonfinite"].get(k, 0) for r in runs)
                              for k in first["nonfinite"]},
                "timings": {"pass_s": sum(t.get("pass_s", 0.0) for t in timings),
                            "samples": sum(t.get("samples", 0) for t in timings)}}
    return Run(analyses, manifest)
