"""LRP overhead: ``unitscope.attribution.attribute(method="lrp")`` against zennit used directly.

Model: torchvision vgg11 with random weights (seed 0, eval), a batch of 8×3×224×224 uniform
inputs, target class 0 for every input, relevance starting from the target logit. Both sides use
zennit's ``EpsilonPlusFlat`` with ``SequentialMergeBatchNorm`` and register the composite inside
the timed call (``with Gradient(model, composite)`` for zennit), so both pay the same
registration; unitscope adds its target check, eval/in-place bookkeeping and hook removal.
Rounds are interleaved (the order alternates) in one process after one warm-up call each; the
median and minimum time per call, the ratios unitscope / zennit of the medians, of the minima and
the median per-round ratio are printed, with every round's ratio (a shared machine is noisy: the
minima are the least disturbed).
The two relevance maps are checked to be identical first (exit status 1 if not).
Target: ratio <= 1.05.

On a GPU, relevance that differs from zennit's by no more than zennit's own call-to-call
difference (or 1e-9 of the largest relevance) counts as the same.

Run:  python benchmarks/lrp_overhead.py [--reps 5] [--batch 8] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import unitscope
from unitscope.attribution import attribute


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = unitscope.load_model("vgg11").eval().to(dev)
    x = torch.rand(args.batch, 3, 224, 224, device=dev)
    target = torch.zeros(args.batch, dtype=torch.long, device=dev)

    def start(out: torch.Tensor) -> torch.Tensor:
        s = torch.zeros_like(out)
        return s.scatter_(1, target[:, None], out.gather(1, target[:, None]))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def zennit_direct() -> torch.Tensor:
        with Gradient(model, EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])) as attributor:
            _, rel = attributor(x, start)
        sync()
        return rel

    def ours() -> torch.Tensor:
        rel = attribute(model, x, target, method="lrp")
        sync()
        return rel

    methods = {"zennit": zennit_direct, "unitscope": ours}
    results = {k: f() for k, f in methods.items()}  # warm-up, and the equality check
    same = torch.equal(results["zennit"], results["unitscope"])
    print(f"vgg11 random weights, batch {args.batch}x3x224x224, device {dev}, threads {args.threads}; "
          f"identical relevance: {same}")
    if not same:
        diff = float((results["zennit"] - results["unitscope"]).abs().max())
        # a GPU's convolution backward need not repeat bit for bit: zennit against itself is the floor
        floor = float((zennit_direct() - results["zennit"]).abs().max())
        print(f"max abs difference {diff:.3g}; zennit against its own second call {floor:.3g}")
        if dev.type != "cuda" or diff > max(floor, 1e-9 * float(results["zennit"].abs().max())):
            return 1
    times: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(args.reps):
        order = list(methods) if r % 2 == 0 else list(methods)[::-1]
        for name in order:
            t0 = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k}: median {med[k]:.3f} s per call (min {min(v):.3f}, {args.reps} rounds)")
    ratios = [a / b for a, b in zip(times["unitscope"], times["zennit"])]
    print(f"  ratio unitscope / zennit: median {med['unitscope'] / med['zennit']:.3f}, of the minima "
          f"{min(times['unitscope']) / min(times['zennit']):.3f}, median of the per-round ratios "
          f"{statistics.median(ratios):.3f} (target <= 1.05)")
    print("  per round: " + ", ".join(f"{r:.3f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
