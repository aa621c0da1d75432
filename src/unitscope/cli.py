"""The ``unitscope`` command: layers, run, train, merge, report, mosaics, demo.

Works the same under ``torchrun``: when ``WORLD_SIZE`` > 1 the process group is initialised
(gloo on CPU, nccl on GPU), each rank streams its own shard and rank 0 writes the results.
Errors print one line and the fix; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("unitscope")

EXAMPLES = {
    "layers": "examples:\n  unitscope layers digits-cnn\n  unitscope layers digits-cnn --all",
    "run": ("examples:\n  unitscope run configs/moments.toml          # configs/ of the repository\n"
            "  unitscope run configs/grid.toml --run-id try2 --set seed=[0,1,2]\n"
            "  torchrun --nproc_per_node 2 -m unitscope run configs/grid.toml"),
    "train": ("examples:\n  unitscope train configs/train.toml\n"
              "  unitscope train configs/train.toml --set 'lr=[1e-3,3e-3]' --set epochs=3 --run-id lr-sweep"),
    "merge": ("examples:\n  unitscope merge runs/a/shard0 runs/a/shard1 --out runs/a/merged"),
    "report": ("examples:\n  unitscope report runs/demo/digits-cnn     # one run\n"
               "  unitscope report runs/grid                 # every run of a grid, and an index"),
    "demo": "examples:\n  unitscope demo\n  unitscope demo --quick --out /tmp/demo",
    "mosaics": ("examples:\n  unitscope mosaics runs/topk/shapes-cnn_shapes-test relu3:0 relu3:7\n"
                "  unitscope mosaics RUN relu2:5 --mode crop --k 6 --out figures/"),
}


def _experiment_types() -> str:
    """The experiment types and their keys with defaults, for ``unitscope run --help``."""
    from .experiments import COMMON, KEYS

    lines = ["\nexperiment types (experiment = ...) and their keys, with defaults:"]
    for name in sorted(KEYS):
        keys = ", ".join(f"{k}={v!r}" for k, v in KEYS[name].items())
        lines.append(f"  {name}: {keys}")
    lines.append("  every type also takes: " + ", ".join(COMMON))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``unitscope`` command."""
    parser = argparse.ArgumentParser(
        prog="unitscope", description="What the units and layers of a trained PyTorch network do.")
    parser.add_argument("--version", action="version", version=f"unitscope {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str, extra: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name] + extra,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("layers", "list a model's layers (names to use in layers=...), types, shapes, parameters")
    p.add_argument("model", help="a registered model name, e.g. digits-cnn")
    p.add_argument("--weights", help="weights file to load")
    p.add_argument("--input-shape", help="C,H,W for output shapes when the model declares none")
    p.add_argument("--all", action="store_true", help="include container modules, not only leaves")

    for name, help_text in (
            ("run", "run every experiment of a TOML/JSON config (lists expand to a grid)"),
            ("train", "train every experiment of a config (checkpoint per epoch, resumable)")):
        p = add(name, help_text, _experiment_types() if name == "run" else "")
        p.add_argument("config", help="config file (.toml or .json)")
        p.add_argument("--out", help="base directory of run directories (default: the config's out, "
                       "else runs)")
        p.add_argument("--run-id", help="subdirectory grouping this grid (default: the config file's name)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (TOML value), repeatable")
        p.add_argument("--force", action="store_true", help="redo finished experiments")

    p = add("merge", "merge shard run directories (analyze(shard=(i, k))) into one run")
    p.add_argument("shards", nargs="+", help="run directories of the shards")
    p.add_argument("--out", required=True, help="directory of the merged run")

    p = add("report", "write RUN_DIR/report.html (self-contained); for a grid directory, every run's "
            "report and an index comparing them")
    p.add_argument("run_dir", help="a run directory, or a directory of runs (a grid)")

    p = add("mosaics", "draw the top-k mosaics of chosen units from a run with a topk table")
    p.add_argument("run_dir", help="a run directory written by a 'topk' experiment")
    p.add_argument("units", nargs="+", help="units as layer:channel, e.g. relu3:7")
    p.add_argument("--out", help="directory of the PNGs (default RUN_DIR/mosaics)")
    p.add_argument("--mode", default="mark", choices=["mark", "crop", "segment"],
                   help="mark the receptive field of the maximum (default), crop to it, or segment")
    p.add_argument("--k", type=int, help="inputs per unit (default: all ranked)")

    p = add("demo", "train digits-cnn and shapes-cnn on bundled and generated data, run every analysis "
            "family on them, write the reports")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="fewer epochs, for a smoke test")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 error, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet or rank else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _maybe_init_distributed()
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the work saved so far", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1


def error_line(exc: BaseException) -> str:
    """The message of ``exc`` for the one error line: a ``KeyError``'s own text, not its repr."""
    if isinstance(exc, KeyError) and type(exc).__str__ is KeyError.__str__ and len(exc.args) == 1:
        return str(exc.args[0])
    return str(exc)


def _maybe_init_distributed() -> None:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus:
            torch.cuda.set_device(local_rank % gpus)
        # launchers other than torchrun may not say how many ranks share this node: assume all
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        dist.init_process_group(backend=distributed_backend(gpus, local_ranks))


def distributed_backend(gpus: int, local_ranks: int) -> str:
    """NCCL when every rank on this node has a GPU of its own, else gloo.

    NCCL refuses two ranks on one GPU, so ``torchrun --nproc_per_node 2`` on a one-GPU machine
    shares the GPU (ranks take ``LOCAL_RANK % gpus``) and talks over gloo.

    Example:
        >>> distributed_backend(1, 2), distributed_backend(2, 2), distributed_backend(0, 2)
        ('gloo', 'nccl', 'gloo')
    """
    return "nccl" if gpus >= max(local_ranks, 1) else "gloo"


def _cmd_layers(args: argparse.Namespace) -> int:
    from .models import default_input_shape, layer_info, load_model

    model = load_model(args.model, weights=args.weights)
    shape = tuple(int(s) for s in args.input_shape.split(",")) if args.input_shape else None
    info = layer_info(model, shape or default_input_shape(args.model))
    if not args.all:
        info = info[info["leaf"]]
    print(info.drop(columns=["leaf"]).to_string(index=False))
    return 0


def _cmd_run(args: argparse.Namespace, experiment: str | None = None) -> int:
    from .experiments import run_config

    results = run_config(args.config, out=args.out, run_id=args.run_id, overrides=args.set,
                         force=args.force, progress=not args.quiet, experiment=experiment)
    for path, status in results:
        log.info("%-8s %s", status, path)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .results import merge_runs

    run = merge_runs(args.shards)
    path = run.save(args.out)
    log.info("merged %d shards into %s", len(args.shards), path)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    log.info("wrote %s", write_report(args.run_dir))
    return 0


def _cmd_mosaics(args: argparse.Namespace) -> int:
    from .analyses.mosaics import render_mosaics

    for path in render_mosaics(args.run_dir, args.units, out=args.out, mode=args.mode, k=args.k):
        log.info("wrote %s", path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick, progress=not args.quiet)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    return _cmd_run(args, experiment="train")


COMMANDS = {"layers": _cmd_layers, "run": _cmd_run, "train": _cmd_train, "merge": _cmd_merge,
            "report": _cmd_report, "demo": _cmd_demo, "mosaics": _cmd_mosaics}


if __name__ == "__main__":
    sys.exit(main())
