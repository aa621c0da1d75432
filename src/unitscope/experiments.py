"""Config files: validation, grid expansion, run naming, and running each experiment once.

A config is a TOML (or JSON) table. A list value expands into one experiment per element,
and several lists into their cartesian product, as the seed configs did. ``layers`` and
``analyses`` are lists by nature, so a flat list is one value; give a list of lists to sweep
them. A table named after an analysis (``[moments]``) holds its options, swept the same way.

Example config::

    experiment = "analyze"
    model = "digits-cnn"
    dataset = "digits"
    split = "test"
    layers = ["relu*", "fc"]
    analyses = ["moments"]
    seed = [0, 1]            # two experiments

    [moments]
    reduce = ["mean", "max"] # times two: four experiments

``dataset_options`` is a table of options for the dataset (``root = "..."`` for image folders
and local torchvision data, ``n``/``size`` for shapes).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .analyses.base import ANALYSES, build_analysis
from .registry import Registry

log = logging.getLogger(__name__)

EXPERIMENTS: Registry = Registry("experiment type")

#: keys every experiment type accepts, with their defaults
COMMON: dict[str, Any] = {
    "experiment": "analyze", "model": None, "weights": None, "dataset": None, "seed": 0,
    "device": "auto", "num_workers": 0, "out": "runs", "dataset_options": None,
}
#: the further keys of each experiment type, with their defaults
KEYS: dict[str, dict[str, Any]] = {
    "analyze": {"split": "test", "layers": None, "batch_size": 256, "calls": "error", "analyses": None},
    "train": {"epochs": 10, "lr": 1e-3, "batch_size": 64, "optimizer": "adam", "momentum": 0.9,
              "weight_decay": 0.0, "scheduler": "none", "track_saturation": False, "layers": None,
              "delta": 0.99, "products": "float32"},
    "saturation": {"split": "test", "layers": None, "batch_size": 256, "delta": 0.99,
                   "conv": "channelwise", "rule": "textbook", "project_deltas": None, "products": "float64"},
}
KEYS["probes"] = {"layers": None, "downsample": 4, "C": 1.0, "dtype": "float32", "batch_size": 256}
KEYS["receptive-field"] = {"input_size": None}
LIST_KEYS = {"layers", "analyses", "project_deltas", "input_size"}
#: experiment types that read no dataset (families add theirs)
MODEL_ONLY = {"receptive-field", "visualize"}


class ConfigError(ValueError):
    """A config that cannot be run; the message names the key and the fix."""


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            config = json.loads(text)
        else:
            from ._toml import loads

            config = loads(text)
    except Exception as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds a {type(config).__name__}, but a config is a table of keys: "
                          'write a JSON object such as {"model": "digits-cnn", "dataset": "digits"}')
    return config


def known_keys(experiment: str) -> set[str]:
    """Every top-level key an experiment of this type accepts."""
    keys = set(COMMON) | set(KEYS.get(experiment, {}))
    return keys | set(ANALYSES.names()) if experiment == "analyze" else keys


def validate(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` on an unknown experiment type, unknown key or missing key."""
    exp = config.get("experiment", COMMON["experiment"])
    if not isinstance(exp, str) or exp not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment type {exp!r}; known: {', '.join(EXPERIMENTS.names())}")
    known = known_keys(exp)
    for key in config:
        if key not in known:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
    for key in ("model",) if exp in MODEL_ONLY else ("model", "dataset"):
        if config.get(key) is None:
            raise ConfigError(f"config key {key!r} is required (e.g. {key} = "
                              f"\"{'digits-cnn' if key == 'model' else 'digits'}\")")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_types(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` where a key of one resolved experiment has a value of the wrong kind.

    Checks the common keys (``model``, ``dataset``, ``seed``, ``num_workers``, ``batch_size``,
    ``dataset_options``) and, for ``analyze``, ``analyses`` and the analysis option tables.
    """
    for key in ("model", "dataset"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise ConfigError(f"{key} = {config[key]!r}: give a name, e.g. {key} = "
                              f"\"{'digits-cnn' if key == 'model' else 'digits'}\"")
    for key, low in (("seed", None), ("num_workers", 0), ("batch_size", 1)):
        if key not in config:
            continue
        value = config[key]
        if not _is_int(value) or (low is not None and value < low):
            least = f" >= {low}" if low is not None else ""
            raise ConfigError(f"{key} = {value!r}: give an integer{least}, e.g. {key} = {max(low or 0, 1)}")
    if config.get("dataset_options") is not None and not isinstance(config["dataset_options"], dict):
        raise ConfigError(f"dataset_options = {config['dataset_options']!r}: give a table, e.g. "
                          '[dataset_options] with root = "..."')
    if config.get("experiment", COMMON["experiment"]) != "analyze":
        return
    names = config.get("analyses")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        example = json.dumps([names] if isinstance(names, str) else ["moments"])
        raise ConfigError(f"analyses = {names!r}: analyses must be a list of analysis names, e.g. "
                          f"analyses = {example}")
    for name in names or ():
        if name in ("sensitivity", "coverage"):
            raise ConfigError(f"analyses = [{name!r}]: {name} needs its own design or a training "
                              f"profile; use experiment = \"{name}\" instead of experiment = \"analyze\"")
    for name in ANALYSES.names():
        if name in config and not isinstance(config[name], dict):
            raise ConfigError(f"{name} = {config[name]!r}: the options of an analysis are a table, e.g. "
                              f"[{name}] with its keys")


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if "." in k:
            table, key = k.split(".", 1)
            out.setdefault(table, {})[key] = v
        else:
            out[k] = v
    return out


def _is_sweep(key: str, value: Any) -> bool:
    if not isinstance(value, list):
        return False
    if key.split(".")[-1] in LIST_KEYS and "." not in key:
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def expand(config: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The experiments of a config: ``(resolved config, the swept values that name it)`` each."""
    validate(config)
    exp = config.get("experiment", COMMON["experiment"])
    defaults = {**COMMON, **KEYS[exp]}
    flat = _flatten({**{k: v for k, v in defaults.items() if v is not None}, **config})
    swept = {k: v for k, v in flat.items() if _is_sweep(k, v)}
    for k, v in swept.items():
        if not v:
            raise ConfigError(f"config key {k!r} is an empty list: nothing to run")
    fixed = {k: v for k, v in flat.items() if k not in swept}
    experiments = []
    for combo in itertools.product(*swept.values()):
        chosen = dict(zip(swept, combo))
        resolved = _unflatten({**fixed, **chosen})
        check_types(resolved)
        experiments.append((resolved, chosen))
    return experiments


def run_name(config: dict[str, Any], swept: dict[str, Any]) -> str:
    """A directory name from the model, the data and the swept parameters.

    Characters unsafe in a file name become ``-``; when that changed the name, a short hash of
    the unchanged name is appended, so ``layers=["conv*"]`` and ``layers=["conv?"]`` stay apart.
    """
    split = f"-{config['split']}" if "split" in config else ""
    data = f"_{config['dataset']}" if config.get("dataset") else ""
    parts = [f"{config['model']}{data}{split}"]
    parts += [f"{k}={_short(v)}" for k, v in swept.items() if k not in ("model", "dataset", "split")]
    raw = "_".join(parts)
    name = re.sub(r"[^A-Za-z0-9_.=,+-]", "-", raw)
    if name != raw:
        name += "-" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return name


def _short(v: Any) -> str:
    return "+".join(map(str, v)) if isinstance(v, list) else str(v)


def run_config(path: str | Path, out: str | Path | None = None, run_id: str | None = None,
               overrides: list[str] | None = None, force: bool = False,
               progress: bool = True, experiment: str | None = None) -> list[tuple[Path, str]]:
    """Run every experiment of a config file; return ``(run directory, status)`` pairs.

    A finished experiment (complete run directory with the same resolved config) is skipped;
    an interrupted one resumes from its checkpoint. ``experiment`` forces the experiment type
    (``unitscope train`` passes ``"train"``).
    """
    config = load_config(path)
    if experiment is not None:
        if config.get("experiment", experiment) != experiment:
            raise ConfigError(f"{path} is an experiment of type {config['experiment']!r}; "
                              f"run it with `unitscope run`")
        config["experiment"] = experiment
    for item in overrides or []:
        key, value = parse_override(item)
        table, _, sub = key.partition(".")
        if sub:
            if table in config and not isinstance(config[table], dict):
                raise ConfigError(f"--set {item}: {table!r} is a plain key ({table} = {config[table]!r}), "
                                  f"not a table, so it takes no sub-keys; write --set {table}=...")
            config.setdefault(table, {})[sub] = value
        else:
            config[key] = value
    base = Path(out if out is not None else config.get("out", COMMON["out"]))
    run_id = run_id or Path(path).stem
    planned: dict[Path, dict[str, Any]] = {}
    experiments = expand(config)
    for resolved, swept in experiments:
        target = base / run_id / run_name(resolved, swept)
        if target in planned:
            raise ConfigError(f"the grid points {planned[target]} and {swept} would share the run "
                              f"directory {target}; make their values differ in more than "
                              "punctuation, or split the config")
        planned[target] = swept
    results = []
    for (resolved, _), target in zip(experiments, planned):
        results.append((target, run_experiment(resolved, target, force=force, progress=progress)))
    return results


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` with ``value`` read as TOML (so ``seed=3``, ``layers=["fc"]`` work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: write key=value, e.g. --set batch_size=64")
    key, raw = item.split("=", 1)
    from ._toml import loads

    try:
        value = loads(f"v = {raw}")["v"]
    except Exception:
        value = raw
    return key.strip(), value


def run_experiment(config: dict[str, Any], target: Path, force: bool = False,
                   progress: bool = True) -> str:
    """Run one resolved experiment into ``target``; return ``"done"`` or ``"skipped"``.

    Experiments keep what an interrupted attempt should resume from in ``TARGET.partial``
    (checkpoints, a finished pass, features); it is removed once the experiment has written its run.

    A ``target`` that exists and is neither empty nor a run directory is refused before any work
    (:func:`unitscope.results.check_replaceable`): its files would be replaced. The experiment
    starts from ``torch.manual_seed(seed)`` (the config's ``seed``, default 0), so a model
    without a weights file gets the same random weights on every run.
    """
    import torch

    from .results import check_replaceable, is_complete

    check_replaceable(target)
    if is_complete(target) and not force:
        recorded = json.loads((target / "manifest.json").read_text()).get("config", {})
        if recorded == json.loads(json.dumps(config)):
            return "skipped"
        diff = sorted(k for k in set(recorded) | set(config) if recorded.get(k) != config.get(k))
        raise ConfigError(f"{target} holds a finished run with another config (differs in "
                          f"{', '.join(diff)}); use another --run-id, or --force to overwrite it")
    torch.manual_seed(int(config.get("seed", 0)))
    EXPERIMENTS[config["experiment"]](config, target, progress)
    # the run is written: the work an interrupted attempt kept for resuming is spent
    shutil.rmtree(Path(f"{target}.partial"), ignore_errors=True)
    return "done"


@EXPERIMENTS.register("analyze")
def _analyze(config: dict[str, Any], target: Path, progress: bool) -> None:
    """One streaming pass with the listed analyses."""
    from .data import load_dataset
    from .engine import analyze
    from .models import load_model

    names = config.get("analyses") or ["moments"]
    analyses = []
    for name in names:
        options = config.get(name, {})
        known = [p for p in inspect.signature(ANALYSES[name]).parameters if p != "self"]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"[{name}] options: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
        analyses.append(build_analysis(name, options))
    model = load_model(config["model"], weights=config.get("weights"))
    data = load_dataset(config["dataset"], split=config["split"], **config.get("dataset_options", {}))
    analyze(model, data, layers=config.get("layers"), analyses=analyses,
            batch_size=config["batch_size"], device=config["device"],
            num_workers=config["num_workers"], seed=config["seed"], calls=config["calls"],
            progress=progress, out=target, config=config)


@EXPERIMENTS.register("train")
def _train(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Train a model: epoch checkpoints in ``TARGET.partial/checkpoints`` while it runs, then the run.

    The finished run (checkpoints, final weights, metrics, saturation per epoch) is written
    atomically (:func:`_finish_training`), so an interrupted training leaves no run directory,
    and rerunning the command resumes from the last checkpoint. ``--force`` over a finished run
    starts from that run's checkpoints (linked, not moved), so a longer training continues it
    (a cosine or step schedule keeps the length it was built for).
    """
    from .data import load_dataset
    from .models import load_model
    from .results import is_complete
    from .train import train

    partial = Path(f"{target}.partial")
    ckpt_dir = partial / "checkpoints"
    earlier = target / "checkpoints"  # a finished run's, or an older version's unfinished ones
    if earlier.is_dir() and not ckpt_dir.exists():
        if is_complete(target):
            _link_tree(earlier, ckpt_dir)
        else:
            _move_out_of_run(target, earlier, ckpt_dir)
    model = load_model(config["model"], weights=config.get("weights"))
    options = config.get("dataset_options", {})
    train_data = load_dataset(config["dataset"], split="train", **options)
    test_data = load_dataset(config["dataset"], split="test", **options)
    callbacks = []
    if config["track_saturation"]:
        from .analyses.saturation import DEFAULT_LAYERS, SaturationTracker

        callbacks.append(SaturationTracker(model, config.get("layers") or DEFAULT_LAYERS,
                                           delta=config["delta"], test_data=test_data,
                                           products=config["products"]))
    history = train(model, train_data, test_data, epochs=config["epochs"], lr=config["lr"],
                    batch_size=config["batch_size"], optimizer=config["optimizer"],
                    momentum=config["momentum"], weight_decay=config["weight_decay"],
                    scheduler=config["scheduler"], seed=config["seed"], device=config["device"],
                    num_workers=config["num_workers"], checkpoint_dir=ckpt_dir,
                    progress=progress, callbacks=callbacks)
    saturation = callbacks[0].table if callbacks and not callbacks[0].table.empty else None
    _finish_training(target, model, history, config, ckpt_dir, saturation)


def _move_out_of_run(target: Path, kept: Path, dest: Path) -> None:
    """Move work an older version kept inside an unfinished run directory (``kept``) to ``dest``
    in ``TARGET.partial``, and remove ``target`` if that left it empty."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    kept.rename(dest)
    if not any(target.iterdir()):
        target.rmdir()


def _link_tree(source: Path, dest: Path) -> None:
    """``dest`` as a copy of the files of ``source``: hard links where possible (checkpoints are
    replaced, never rewritten in place), copies otherwise."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)


def _finish_training(target: Path, model: Any, history: list[dict[str, Any]], config: dict[str, Any],
                     ckpt_dir: Path, saturation: Any = None) -> None:
    """Write the training run atomically: weights, metrics, saturation, checkpoints, manifest last.

    The checkpoints are moved in just before the manifest and handed back if that fails.
    """
    import platform
    import time

    import pandas as pd
    import torch

    from . import __version__
    from ._toml import dumps
    from .models import model_fingerprint
    from .results import atomic_directory, check_replaceable

    check_replaceable(target)
    with atomic_directory(target) as tmp:
        torch.save(model.state_dict(), tmp / "weights.pt")
        pd.DataFrame(history).to_parquet(tmp / "metrics.parquet", index=False)
        if saturation is not None:
            saturation.to_parquet(tmp / "saturation_epochs.parquet", index=False)
        (tmp / "config.toml").write_text(dumps(config))
        manifest = {"status": "complete", "kind": "training",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": {"unitscope": __version__, "torch": torch.__version__,
                                 "python": platform.python_version()},
                    "model": {"class": type(model).__name__, "fingerprint": model_fingerprint(model)},
                    "final": history[-1] if history else {}, "config": config}
        _move_in_and_seal(tmp, ckpt_dir if ckpt_dir.is_dir() else None, "checkpoints", manifest)


@EXPERIMENTS.register("saturation")
def _saturation(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Saturation of every layer on a split; with ``project_deltas``, PCA-projected test accuracy."""
    from .analyses.saturation import DEFAULT_LAYERS, Saturation, projected_accuracy
    from .data import load_dataset
    from .models import load_model
    from .stats.saturation import check_delta

    for delta in config.get("project_deltas") or ():
        try:
            check_delta(delta)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"project_deltas = {config['project_deltas']!r}: {exc}") from None
    model = load_model(config["model"], weights=config.get("weights"))
    options = config.get("dataset_options", {})
    data = load_dataset(config["dataset"], split=config["split"], **options)
    layers = config.get("layers") or list(DEFAULT_LAYERS)
    analysis = Saturation(delta=config["delta"], conv=config["conv"], rule=config["rule"],
                          products=config["products"])
    run = checkpointed_pass(target, config, model, data, layers=layers, analyses=[analysis],
                            batch_size=config["batch_size"], device=config["device"], seed=config["seed"],
                            progress=progress)
    if config.get("project_deltas"):
        run.tables["saturation_projection"] = projected_accuracy(
            model, load_dataset(config["dataset"], split="train", **options),
            load_dataset(config["dataset"], split="test", **options), layers,
            deltas=config["project_deltas"], batch_size=config["batch_size"], device=config["device"],
            rule=config["rule"])
    run.save(target)


def checkpointed_pass(target: Path, config: dict[str, Any], model: Any, data: Any, **options: Any) -> Any:
    """``unitscope.analyze`` for an experiment that does more after its pass, resumable.

    The pass checkpoints into ``TARGET.partial/pass.partial`` and its finished run is kept in
    ``TARGET.partial/pass``, so an experiment interrupted during or after its pass resumes the
    pass or reuses it (when it was made with the same config) on the next run;
    :func:`run_experiment` removes ``TARGET.partial`` once the experiment's own run is written.
    """
    from .data.arrays import dataset_fingerprint
    from .engine import analyze
    from .models.registry import model_fingerprint
    from .results import is_complete, load_run

    done = Path(f"{target}.partial") / "pass"
    if is_complete(done):
        run = load_run(done)
        same = (run.manifest.get("config") == json.loads(json.dumps(config, default=str))
                and run.manifest.get("model", {}).get("fingerprint") == model_fingerprint(model)
                and run.manifest.get("data", {}).get("fingerprint") == dataset_fingerprint(data))
        if same:  # same config, weights and data: a retrained weights file is not reused
            log.info("reusing the finished pass in %s", done)
            return run
    return analyze(model, data, out=done, config=config, **options)


@EXPERIMENTS.register("probes")
def _probes(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Logistic-regression probes per layer on extracted features (kept in the run as ``features/``).

    The options are checked before anything is loaded or written. Features are extracted into
    ``TARGET.partial/features`` (an interrupted extraction resumes from there, as an analysis pass
    resumes from ``TARGET.partial``; features of another model, such as another random
    initialisation, are recomputed) and moved into the run directory when it is written whole.
    """
    from .analyses.probes import check_options, probes
    from .analyses.saturation import DEFAULT_LAYERS
    from .data import load_dataset
    from .features import downsample_name
    from .models import load_model
    from .results import is_complete

    if config["dtype"] not in ("float32", "float64"):
        raise ConfigError(f"dtype={config['dtype']!r}: use float32 or float64")
    try:
        check_options(config["C"], config["dtype"], 1000, 1e-6)
        downsample_name(config["downsample"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    partial = Path(f"{target}.partial")
    features = partial / "features"
    legacy = target / "features"  # left by versions that extracted into the run directory itself
    if legacy.is_dir() and not is_complete(target) and not features.exists():
        _move_out_of_run(target, legacy, features)
    model = load_model(config["model"], weights=config.get("weights"))
    options = config.get("dataset_options", {})
    table = probes(model, load_dataset(config["dataset"], "train", **options),
                   load_dataset(config["dataset"], "test", **options),
                   config.get("layers") or list(DEFAULT_LAYERS), downsample=config["downsample"],
                   out=features, C=config["C"], dtype=config["dtype"],
                   batch_size=config["batch_size"], device=config["device"], overwrite=True)
    write_table_run(target, "probes", table, config, features=features)


@EXPERIMENTS.register("receptive-field")
def _receptive_field(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Analytic receptive fields, border and unproductive layers, FLOPs and parameters."""
    from .analyses.flops import flops
    from .analyses.receptive_fields import receptive_fields, unproductive_layers
    from .models import default_input_shape, load_model

    model = load_model(config["model"], weights=config.get("weights"))
    shape = default_input_shape(config["model"])
    size = config.get("input_size") or (shape[1:] if shape else None)
    if size is None:
        raise ConfigError("input_size is required for a model without a registered input shape, "
                          "e.g. input_size = [224, 224]")
    table = receptive_fields(model, tuple(size) if isinstance(size, list) else size)
    extra = {"receptive_field_unproductive": unproductive_layers(table)}
    if shape:
        extra["receptive_field_flops"] = flops(model, tuple(shape[:1]) + tuple(table.attrs["input_size"]))
    write_table_run(target, "receptive_field", table, config, extra)


def write_table_run(target: Path, name: str, table: Any, config: dict[str, Any],
                     extra: dict[str, Any] | None = None, features: Path | None = None) -> None:
    """Save tables that come from no streaming pass as a run directory, atomically.

    The directory is built beside ``target`` and renamed into place (see
    :func:`unitscope.results.atomic_directory`), so a failure leaves the previous run or nothing.
    ``extra`` holds further tables by name; ``features``, a directory, is moved into the run as
    ``features/``.
    """
    import platform
    import time

    import torch

    from . import __version__
    from ._toml import dumps
    from .results import atomic_directory, check_replaceable

    check_replaceable(target)
    with atomic_directory(target) as tmp:
        (tmp / "tables").mkdir()
        table.to_parquet(tmp / "tables" / f"{name}.parquet", index=False)
        for key, frame in (extra or {}).items():
            frame.to_parquet(tmp / "tables" / f"{key}.parquet", index=False)
        (tmp / "config.toml").write_text(dumps(config))
        manifest = {"status": "complete", "kind": name, "schema_version": 1,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": {"unitscope": __version__, "torch": torch.__version__,
                                 "python": platform.python_version()},
                    "config": config}
        _move_in_and_seal(tmp, features, "features", manifest)


def _move_in_and_seal(tmp: Path, source: Path | None, name: str, manifest: dict[str, Any]) -> None:
    """Move ``source`` (kept work: checkpoints, features) into ``tmp/name``, then write the manifest.

    The move comes last but the manifest, and a failure of either hands ``source`` back, so the
    temporary directory's removal never takes work that a rerun would resume from.
    """
    moved = False
    try:
        if source is not None:
            source.rename(tmp / name)
            moved = True
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    except BaseException:
        if moved:
            (tmp / name).rename(source)
        raise


def _load_families() -> None:
    from .families import load_all

    load_all()


_load_families()
