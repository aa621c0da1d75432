"""Sensitivity pass throughput: images per second against a plain forward, and peak memory at N and 4N.

resnet18 (torchvision, random weights, eval mode) on generated shapes at 64×64. The sensitivity
pass (``unitscope.analyses.sensitivity.sensitivity``) evaluates ``N·(D + 2)`` design rows: it
loads each base sample's images, augments every row (the six default variables: brightness,
contrast, saturation, hue, hflip, rotation; D = 7 with the image), runs the model with hooks on
layer1–layer4 and fc (spatial mean per channel) and folds the outputs into Sobol' accumulators
with ``--bootstrap`` replicates. The baseline is a plain ``model(x)`` over the same number of
rows, at the same batch size, on images already in memory. Rounds alternate the two (medians).

Peak memory: the pass runs in a fresh subprocess for N and for 4N and reports the peak resident
set size (``resource.getrusage``); with streaming accumulators it should not grow with N.

Run:  python benchmarks/sensitivity_throughput.py [--n 64] [--rounds 3] [--threads 2] [--bootstrap 100]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import unitscope
from unitscope.analyses.sensitivity import sensitivity

VARIABLES = ["brightness", "contrast", "saturation", "hue", "hflip", "rotation"]
LAYERS = ["layer1", "layer2", "layer3", "layer4", "fc"]


def _setup(threads: int) -> tuple[torch.nn.Module, object]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = unitscope.load_model("resnet18").eval()
    data = unitscope.load_dataset("shapes", "test", n=512)
    return model, data


def _sensitivity(model: torch.nn.Module, data: object, n: int, bootstrap: int, batch: int) -> float:
    t0 = time.perf_counter()
    sensitivity(model, data, VARIABLES, n=n, layers=LAYERS, bootstrap=bootstrap, batch_size=batch,
                device="cpu")
    return time.perf_counter() - t0


def _plain(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(x), batch):
            model(x[lo:lo + batch])
    return time.perf_counter() - t0


def child(n: int, bootstrap: int, threads: int, batch: int) -> None:
    """One pass in this process; print its peak RSS (MiB) as JSON."""
    model, data = _setup(threads)
    seconds = _sensitivity(model, data, n, bootstrap, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "seconds": seconds, "peak_mib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=100)
    ap.add_argument("--batch", type=int, default=252)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.bootstrap, args.threads, args.batch)
        return
    model, data = _setup(args.threads)
    rows = args.n * (len(VARIABLES) + 1 + 2)
    x = torch.stack([data[i % len(data)][0] for i in range(rows)])
    _sensitivity(model, data, 8, args.bootstrap, args.batch)  # warm-up
    _plain(model, x[:args.batch], args.batch)
    ours, plain = [], []
    for r in range(args.rounds):
        for name in (("sens", "plain") if r % 2 == 0 else ("plain", "sens")):
            if name == "sens":
                ours.append(_sensitivity(model, data, args.n, args.bootstrap, args.batch))
            else:
                plain.append(_plain(model, x, args.batch))
    s, p = statistics.median(ours), statistics.median(plain)
    print(f"resnet18 (random weights) at 64x64, N = {args.n} base samples, {rows} rows "
          f"(D = {len(VARIABLES) + 1} with the image), bootstrap {args.bootstrap}, batch {args.batch}, "
          f"threads {args.threads}")
    print(f"  plain forward:     {rows / p:8.1f} images/s ({p:.2f} s)")
    print(f"  sensitivity pass:  {rows / s:8.1f} images/s ({s:.2f} s)")
    print(f"  overhead of augmentation + accumulation: {100 * (s / p - 1):.1f} % (target <= 30 %)")
    for n in (args.n, 4 * args.n):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--bootstrap", str(args.bootstrap),
                              "--threads", str(args.threads), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  peak RSS at N = {n:5d}: {res['peak_mib']:.0f} MiB ({res['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
