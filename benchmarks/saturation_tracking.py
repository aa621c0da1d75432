"""Cost of tracking saturation while training digits-cnn: unitscope vs delve, against no tracking.

Interleaved in one process: each round trains a fresh digits-cnn (same seed) for E epochs with
no tracker; with unitscope's SaturationTracker (every Conv2d and Linear, channelwise, train split
only, like delve's train-mode tracking), with its default float32 products and with float64
products; with the same tracker's hooks alone (no covariance updates); and with delve's
SaturationTracker (same layers, channelwise, lsat + idim, CSV writer to a temporary folder).
Reports median seconds and three ratios to no tracking: of the medians, the median of each
round's own ratio, and of the minima (the least disturbed run of each, on a shared machine).

With ``--device cuda`` the training and both trackers run on the GPU (the tracker's own time is then
timed without synchronising, so it reads low).

Run:  python benchmarks/saturation_tracking.py [--rounds 5] [--epochs 3] [--threads N] [--batch-size 32]
      [--device cpu]   (needs the bench extra: delve)
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import tempfile
import time

import torch
from torch import nn

import unitscope
from unitscope.capture import Capture
from unitscope.train import Callback, train


class CaptureOnly(unitscope.SaturationTracker):
    """unitscope's tracker with the folds switched off: the hooks' copies alone.

    Rows are written and committed as usual; a full block is emptied without folding it.
    """

    def on_epoch_start(self, state) -> None:
        super().on_epoch_start(state)
        for block in self._blocks.values():
            block.flush = functools.partial(_discard, block)


def _discard(block) -> None:
    block.used = block.pending = 0


class TimedTracker(unitscope.SaturationTracker):
    """unitscope's tracker with a clock around its own code: hooks, block folds and callbacks.

    ``own`` sums the seconds spent inside the tracker (two ``perf_counter`` calls per hook,
    about 0.2 µs against about 40 µs of work). Its ratio to the training time is the tracker's
    cost without the run-to-run noise of a shared machine, but also without any indirect cost
    (caches the copies evict), which only the end-to-end ratios include.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.own = 0.0

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.own += time.perf_counter() - t0
        return wrapper

    def on_epoch_start(self, state) -> None:
        t0 = time.perf_counter()
        super().on_epoch_start(state)
        # the hooks were bound to the blocks' write(): rebind them to timed versions
        self._capture.remove()
        for block in self._blocks.values():
            block.write = self._timed(block.write)
            block.flush = self._timed(block.flush)
        self._capture = Capture(self.model, self.layers, {key: b.write for key, b in self._blocks.items()},
                                targets={key: {key} for key in self.layers})
        self._capture.__enter__()
        self.own += time.perf_counter() - t0

    def on_batch_end(self, state) -> None:
        t0 = time.perf_counter()
        super().on_batch_end(state)
        self.own += time.perf_counter() - t0

    def on_epoch_end(self, state, metrics) -> None:
        t0 = time.perf_counter()
        super().on_epoch_end(state, metrics)
        self.own += time.perf_counter() - t0


class DelveCallback(Callback):
    """Adapter: delve's tracker hooks the model; add_saturations() at every epoch end, as phd-lab did."""

    def __init__(self, model: nn.Module, folder: str, device: str = "cpu") -> None:
        from delve import SaturationTracker

        self.tracker = SaturationTracker(folder, save_to="csv", modules=model, stats=["lsat", "idim"],
                                         device=device, conv_method="channelwise", verbose=False)

    def on_epoch_end(self, state, metrics) -> None:
        self.tracker.add_saturations()

    def close(self) -> None:
        self.tracker.close()


OWN: list[float] = []  # the tracker's own seconds in each "unitscope" run


def one(method: str, epochs: int, data, batch_size: int = 32, device: str = "cpu") -> float:
    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    callbacks = []
    tmp = tempfile.TemporaryDirectory()
    if method == "unitscope":
        callbacks = [TimedTracker(model, (nn.Conv2d, nn.Linear))]
    elif method == "unitscope float64 products":
        callbacks = [unitscope.SaturationTracker(model, (nn.Conv2d, nn.Linear), products="float64")]
    elif method == "unitscope hooks only":
        callbacks = [CaptureOnly(model, (nn.Conv2d, nn.Linear))]
    elif method == "delve":
        callbacks = [DelveCallback(model, tmp.name, device)]
    start = time.perf_counter()
    train(model, data, epochs=epochs, lr=5e-3, batch_size=batch_size, seed=0, device=device,
          callbacks=callbacks)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if method == "delve":
        callbacks[0].close()
    if method == "unitscope":
        OWN.append(callbacks[0].own)
    tmp.cleanup()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, default=32,
                        help="training batch (32: the demo's for digits-cnn; unitscope.train's default: 64)")
    parser.add_argument("--device", default="cpu", help="where training and tracking run (cpu, cuda)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("delve").setLevel(logging.WARNING)
    data = unitscope.load_dataset("digits", "train")
    methods = ["plain", "unitscope", "unitscope float64 products", "unitscope hooks only", "delve"]
    one("plain", 1, data, args.batch_size, args.device)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            times[m].append(one(m, args.epochs, data, args.batch_size, args.device))
    base = statistics.median(times["plain"])
    print(f"digits-cnn, {len(data)} training images, batch {args.batch_size}, {args.epochs} epochs, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"on {args.device}")
    print("| method | median s | ratio of medians | median of paired ratios | ratio of minima |")
    print("|---|---:|---:|---:|---:|")
    for m in methods:
        med = statistics.median(times[m])
        paired = statistics.median(t / p for t, p in zip(times[m], times["plain"]))
        print(f"| {m} | {med:.3f} | {med / base:.3f}x | {paired:.3f}x | "
              f"{min(times[m]) / min(times['plain']):.3f}x |")
    own = statistics.median(OWN)
    rest = statistics.median(t - o for t, o in zip(times["unitscope"], OWN))
    print(f"\nunitscope's own code (hooks, folds, callbacks), timed inside its runs: median {own:.3f} s = "
          f"{own / base:.3f} of the median plain training; the rest of those runs took {rest / base:.3f}x "
          "the plain training")


if __name__ == "__main__":
    main()
