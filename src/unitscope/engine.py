"""The pass: batches -> capture -> every analysis, on one device or sharded over ranks.

One forward per batch in ``torch.inference_mode()`` feeds every requested analysis the same
captured activations. Under ``torchrun`` each rank streams its own contiguous range of the
dataset (no sampler padding, so counts are exact), the accumulators are synced, and rank 0
writes the run. With ``out=`` a running pass checkpoints its accumulator states beside the run
directory (``OUT.partial/``) and an interrupted pass resumes from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import __version__
from .analyses.base import Analysis, Batch
from .analyses.moments import Moments
from .capture import Capture, LayerSpec, StopForward, resolve_layers
from .data.arrays import dataset_fingerprint
from .models.info import forward_checked, probe_dtype_device
from .models.modes import preserved, tf32_allowed
from .models.registry import model_fingerprint
from .results import Run, check_replaceable
from .stats.base import load_states, save_states

log = logging.getLogger(__name__)


class EmptyDatasetError(ValueError):
    """The dataset (or this rank's shard of it) has no items."""


class InputError(ValueError):
    """The data does not fit the model (wrong shape or type)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available here; use device='auto' or 'cpu'")
    return dev


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous index range ``[start, stop)`` of rank ``rank`` among ``world``.

    Shard sizes differ by at most one and nothing is padded or repeated, so counts are exact.
    """
    if not 0 <= rank < world:
        raise ValueError(f"shard {rank} of {world} does not exist; use 0 <= rank < world")
    return rank * n // world, (rank + 1) * n // world


def _world(shard: tuple[int, int] | None) -> tuple[int, int, bool]:
    """(rank, world, synced): synced means a process group will all-reduce the states."""
    if shard is not None:
        rank, world = shard
        shard_range(1, rank, world)
        return rank, world, False
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _unpack(item: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        y = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
        return item[0], y
    if isinstance(item, dict) and isinstance(item.get("x"), torch.Tensor):
        return item["x"], item.get("y")
    raise InputError(f"dataset items must be a tensor, an (input, label) pair or a dict with 'x'; "
                     f"got {type(item).__name__}")


def analyze(model: nn.Module, data: Dataset, layers: LayerSpec | None = None,
            analyses: Sequence[Analysis] | None = None, *, batch_size: int = 256,
            device: str | torch.device = "auto", num_workers: int = 0, seed: int = 0,
            progress: bool = True, calls: str = "error", shard: tuple[int, int] | None = None,
            out: str | Path | None = None, checkpoint_every: int | None = None,
            config: dict[str, Any] | None = None, tf32: bool = False) -> Run:
    """Run one streaming pass of ``model`` over ``data`` and feed every analysis.

    Args:
        model: any ``nn.Module``; it is put in eval mode for the pass and restored afterwards.
        data: a map-style dataset of tensors or ``(input, label)`` pairs; item ``i`` keeps
            global index ``i`` in every result.
        layers: the layers analyses look at unless they name their own (see
            :func:`unitscope.capture.resolve_layers`); ``None`` means every leaf module.
        analyses: the analyses to run (default: ``[unitscope.Moments()]``).
        batch_size: inputs per forward.
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda:1"``, ...
        num_workers: DataLoader worker processes.
        seed: seeds torch for anything random in the pass; recorded in the manifest.
        progress: show a tqdm bar (rank 0 only).
        calls: what to do with a module called several times in one forward: ``"error"``,
            ``"first"`` or ``"last"`` (see :class:`unitscope.capture.Capture`; ``"all"`` is refused,
            since an analysis keeps one state per layer).
        shard: ``(i, k)`` runs only the i-th of k contiguous shards, without a process group; the
            shards' run directories are combined later with ``unitscope merge``. By default the
            shard comes from an initialised ``torch.distributed`` group (``torchrun``).
        out: when given, the run is saved there (rank 0), accumulator states are checkpointed to
            ``OUT.partial/`` during the pass, and an interrupted pass resumes from them.
        checkpoint_every: checkpoint after this many batches (default: every 30 seconds).
        config: the resolved configuration to record in the manifest (the CLI passes it).
        tf32: let a GPU convolve and multiply float32 in TF32 (faster; about 1e-3 relative error,
            and shards no longer equal one pass). Off by default, unlike PyTorch's convolutions.

    Returns:
        A :class:`unitscope.Run`; ``run.table("moments")`` etc.

    Example:
        >>> import unitscope
        >>> run = unitscope.analyze(unitscope.load_model("digits-cnn"),
        ...                         unitscope.load_dataset("digits", "test"), layers="conv*",
        ...                         progress=False)
        >>> sorted(run.table("moments").layer.unique())
        ['conv1', 'conv2', 'conv3']
    """
    analyses = list(analyses) if analyses is not None else [Moments()]
    _check_analyses(analyses)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if calls == "all":  # each later call would need accumulators of its own, which a pass does not make
        raise ValueError("analyze(calls='all') is not supported: the analyses keep one state per layer; "
                         "pass calls='first' or calls='last', or select a module that runs once per forward")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 batch (or None: every 30 seconds), "
                         f"got {checkpoint_every}")
    if out is not None:
        check_replaceable(Path(out))  # before the pass, not after it
    n_total = len(data)
    if n_total == 0:
        raise EmptyDatasetError("the dataset is empty: there is nothing to analyse; check its root "
                                "or split")
    dev = resolve_device(device)
    rank, world, synced = _world(shard)
    start, stop = shard_range(n_total, rank, world)
    torch.manual_seed(seed)

    plan: dict[str, set[str]] = {}
    specs: dict[str, Any] = {}
    keys_of: dict[int, list[str]] = {}
    reds = [a.reduce if isinstance(a.reduce, str) else f"fn{i}" for i, a in enumerate(analyses)]
    for i, (a, red) in enumerate(zip(analyses, reds)):
        names = resolve_layers(model, a.layers if a.layers is not None else layers)
        specs[red] = a.reduce
        plan.setdefault(red, set()).update(names)
        keys_of[i] = names
    all_layers = sorted({n for names in plan.values() for n in names})
    needs_output = any(a.needs_output for a in analyses)

    fingerprints = {"model": model_fingerprint(model), "data": dataset_fingerprint(data)}
    if synced:
        _check_same_everywhere(fingerprints, world)
    run_key = _run_key(fingerprints, analyses, keys_of, batch_size, start, stop, seed)
    partial = Path(f"{out}.partial") if out is not None else None
    state_file = partial / f"rank{rank}-of{world}.safetensors" if partial else None
    done, resumed_nonfinite = _resume(analyses, state_file, run_key) if state_file else (0, {})
    for i, a in enumerate(analyses):
        a._passed = done > 0  # resumed states belong to this pass (see _check_analyses)
        a.start(keys_of[i])
        a.to(dev)

    t0 = time.perf_counter()
    nonfinite = {red: {name: resumed_nonfinite.get(red, {}).get(name, 0) for name in names}
                 for red, names in plan.items()}
    samples = 0
    with preserved(model), ExitStack() as others, tf32_allowed(tf32, dev):
        for m in {id(m): m for a in analyses for m in a.models()}.values():
            others.enter_context(preserved(m))  # a second model (CKA's other) goes back too
        model.eval().to(dev)
        dtype, _ = probe_dtype_device(model)  # float64 data for a float32 model (numpy arrays), etc.
        first = start + done * batch_size
        subset = Subset(data, range(first, stop))
        loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=dev.type == "cuda")
        bar = _progress(len(loader), done, progress and rank == 0)
        cap = Capture(model, all_layers, specs, calls=calls, stop=not needs_output, targets=plan)
        offset, last_ckpt, batches = first, time.monotonic(), done
        saved, consistent = done, True  # consistent: the states hold exactly `batches` batches
        with cap, torch.inference_mode():
            try:
                for item in loader:
                    x, y = _unpack(item)
                    if batches == done:
                        _check_input(model, x)
                    x = x.to(dev, dtype=dtype if dtype is not None else x.dtype, non_blocking=True)
                    y = y.to(dev, non_blocking=True) if y is not None else None
                    index = torch.arange(offset, offset + len(x), device=dev)
                    output = _forward(model, x)
                    batch = Batch(x=x, y=y, index=index, output=output)
                    consistent = False
                    for red, store in cap.outputs.items():
                        _count_nonfinite(store, nonfinite[red])
                    for a, red in zip(analyses, reds):
                        a._passed = True  # it holds data of this pass now: a second pass may not reuse it
                        a.update(cap.outputs[red], batch)
                    offset += len(x)
                    samples += len(x)
                    batches += 1
                    consistent = True
                    bar.update(1)
                    if state_file and _due(batches, last_ckpt, checkpoint_every):
                        _checkpoint(analyses, state_file, run_key, batches, nonfinite)
                        saved, last_ckpt = batches, time.monotonic()
            except KeyboardInterrupt:
                # Ctrl-C outside the updates: keep what the pass did since the last checkpoint
                if state_file and consistent and batches > saved:
                    _checkpoint(analyses, state_file, run_key, batches, nonfinite)
                    log.warning("interrupted after %d batches; saved in %s, rerun to resume", batches,
                                state_file.parent)
                raise
        bar.close()
    for a in analyses:
        a._passed = True  # also after an empty shard: its Run holds this object
    pass_s = time.perf_counter() - t0

    if synced:
        for a in analyses:
            a.sync()
        total = torch.tensor([samples], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)  # the manifest counts every rank's inputs, not rank 0's
        samples = int(total)
    t1 = time.perf_counter()
    counts = _total_nonfinite(nonfinite, synced)
    for layer, count in counts.items():
        if count:
            log.warning("layer %s produced %d non-finite activations; they are counted in the "
                        "'nonfinite' columns and left out of every statistic", layer, count)
    manifest = _manifest(model, data, analyses, all_layers, fingerprints, dev, seed, batch_size,
                         (rank, world, synced), (start, stop), counts, config)
    manifest["tf32"] = tf32
    run = Run(analyses, manifest)
    manifest["timings"] = {"pass_s": pass_s, "compute_s": time.perf_counter() - t1,
                           "samples": samples, "batches": batches - done,
                           "resumed_batches": done}
    if out is not None:
        if not synced or rank == 0:
            run.save(out)
        if synced:
            dist.barrier()
        if state_file is not None:
            state_file.unlink(missing_ok=True)
        if partial is not None and (not synced or rank == 0):
            shutil.rmtree(partial, ignore_errors=True)
    return run


def _check_analyses(analyses: list[Analysis]) -> None:
    names = [a.name for a in analyses]
    for a in analyses:
        if not isinstance(a, Analysis):
            raise TypeError(f"analyses must be unitscope analyses (e.g. unitscope.Moments()), got "
                            f"{type(a).__name__}")
        if getattr(a, "_passed", False):  # its accumulators hold that pass, and its Run shares them
            raise ValueError(f"this {type(a).__name__} analysis already holds a pass (an analyze() call, "
                             "a loaded run or a merge), whose Run shares its state; pass a new one for "
                             "every pass (to resume an interrupted pass, pass new ones with the same out=)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"analysis {dup[0]!r} is given twice; run it once with all its layers")


def _check_same_everywhere(fingerprints: dict[str, str], world: int) -> None:
    """Refuse a distributed pass whose ranks hold different models or data.

    Each rank streams its own shard, so a model built with random weights and no common seed (or
    a dataset generated differently) on some rank would be mixed into the result without a word.
    """
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, fingerprints)
    for what in ("model", "data"):
        differ = [r for r, fp in enumerate(gathered) if fp[what] != gathered[0][what]]
        if differ:
            fix = ("seed the model the same way on every rank (torch.manual_seed before building it) "
                   "or load its weights from a file" if what == "model"
                   else "build the same dataset on every rank")
            raise InputError(f"the {what} on rank(s) {differ} differs from rank 0's (fingerprints "
                             f"differ); {fix}")


def _check_input(model: nn.Module, x: torch.Tensor) -> None:
    expected = getattr(model, "input_shape", None)
    if not torch.is_floating_point(x):
        raise InputError(f"inputs must be floating point tensors, got {x.dtype}; convert images "
                         "with torchvision.transforms.v2.ToDtype(torch.float32, scale=True)")
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        raise InputError(f"inputs have shape {tuple(x.shape[1:])} but {type(model).__name__} expects "
                         f"{tuple(expected)} (channels, height, width); resize the data or pick the "
                         "matching model")


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The model's output tensor (None when a capture stopped the forward or it is not a tensor)."""
    try:
        out = forward_checked(model, x, hint="check that the dataset's samples have the shape the model "
                                             "takes")
    except StopForward:
        return None
    return out if isinstance(out, torch.Tensor) else None


def _count_nonfinite(store: dict[str, torch.Tensor], counts: dict[str, Any]) -> None:
    for key, t in store.items():
        if torch.is_floating_point(t):
            counts[key] = counts.get(key, 0) + (~torch.isfinite(t)).sum()


def _total_nonfinite(nonfinite: dict[str, dict[str, Any]], synced: bool) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in nonfinite.values():
        for key, c in counts.items():
            total[key] = max(total.get(key, 0), int(c))
    if synced:
        keys = sorted(total)
        t = torch.tensor([total[k] for k in keys], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        total = dict(zip(keys, t.tolist()))
    return total


def _progress(total: int, done: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # disable=None lets tqdm switch itself off when stderr is not a terminal (logs, CI)
    return tqdm(total=total + done, initial=done, disable=None if enabled else True, unit="batch",
                desc="unitscope", leave=False, file=sys.stderr)


def _due(batches: int, last: float, every: int | None) -> bool:
    if every is not None:
        return batches % every == 0
    return time.monotonic() - last > 30.0


def _run_key(fingerprints: dict[str, str], analyses: list[Analysis], keys_of: dict[int, list[str]],
             batch_size: int, start: int, stop: int, seed: int) -> str:
    blob = json.dumps({"fp": fingerprints, "analyses": [[a.name, a.config()] for a in analyses],
                       "layers": keys_of, "batch_size": batch_size, "range": [start, stop],
                       "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _checkpoint(analyses: list[Analysis], path: Path, run_key: str, batches: int,
                nonfinite: dict[str, dict[str, Any]]) -> None:
    """Save the accumulators, the batches they cover and the non-finite counts so far."""
    path.parent.mkdir(parents=True, exist_ok=True)
    accs = {f"{a.name}:{k}": acc for a in analyses for k, acc in a.accumulators.items()}
    counts = {red: {name: int(c) for name, c in per.items()} for red, per in nonfinite.items()}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_states(tmp, accs, meta={"run_key": run_key, "batches": batches, "nonfinite": counts})
    os.replace(tmp, path)


def _resume(analyses: list[Analysis], path: Path, run_key: str) -> tuple[int, dict[str, dict[str, int]]]:
    """Load a matching checkpoint into ``analyses``.

    Returns the number of batches it covers and the non-finite counts up to there (by reduction
    and layer), so a resumed run reports the same counts as an uninterrupted one.
    """
    if not path.is_file():
        return 0, {}
    try:
        accs, meta = load_states(path)
    except ValueError as exc:
        log.warning("ignoring unreadable checkpoint %s (%s); starting the pass over", path, exc)
        return 0, {}
    if meta.get("run_key") != run_key:
        log.warning("checkpoint %s belongs to another configuration; starting the pass over", path)
        return 0, {}
    for a in analyses:
        prefix = f"{a.name}:"
        a.accumulators = {k[len(prefix):]: v for k, v in accs.items() if k.startswith(prefix)}
    log.info("resuming from %s after %d batches", path, meta["batches"])
    return int(meta["batches"]), meta.get("nonfinite", {})


def _manifest(model: nn.Module, data: Dataset, analyses: list[Analysis], layers: list[str],
              fingerprints: dict[str, str], dev: torch.device, seed: int, batch_size: int,
              world: tuple[int, int, bool], span: tuple[int, int], nonfinite: dict[str, int],
              config: dict[str, Any] | None) -> dict[str, Any]:
    import numpy
    import pandas

    rank, size, synced = world
    return {
        "status": "complete",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"unitscope": __version__, "torch": torch.__version__,
                     "numpy": numpy.__version__, "pandas": pandas.__version__,
                     "python": platform.python_version()},
        "platform": platform.platform(),
        "device": str(dev),
        "seed": seed,
        "batch_size": batch_size,
        "world_size": size if synced else 1,
        "shard": None if synced or size == 1 else {"index": rank, "count": size},
        "model": {"class": type(model).__name__, "fingerprint": fingerprints["model"],
                  "parameters": sum(p.numel() for p in model.parameters())},
        "data": {"name": getattr(data, "name", type(data).__name__), "size": len(data),
                 "fingerprint": fingerprints["data"], "range": list(span) if not synced else [0, len(data)]},
        "layers": layers,
        "analyses": [{"name": a.name, "config": a.config()} for a in analyses],
        "nonfinite": nonfinite,
        "config": config or {},
    }

