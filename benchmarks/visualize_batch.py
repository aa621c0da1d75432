"""Feature visualisation: 16 channels optimised in one batch vs 16 separate runs, unitscope and lucent.

A torchvision resnet18 with random weights (batch norms calibrated on random images, eval)
visualises ``--channels`` channels of ``--layer`` at ``--size`` px with FFT parameterisation,
colour decorrelation, the standard transforms, ImageNet normalisation and Adam (lr 0.05), for
``--steps`` steps. Four ways, interleaved over ``--rounds`` rounds in one process:

* ``unitscope-batch``: ``unitscope.visualize(model, targets)``, every channel in one batch;
* ``unitscope-separate``: one ``visualize`` call per channel;
* ``lucent-batch``: ``render_vis`` with ``param.image(size, batch=C)`` and the sum of
  ``objectives.channel(layer, c, batch=i)``;
* ``lucent-separate``: one ``render_vis`` per channel (lucent's usual use).

lucent's images are kept at ``size`` (``fixed_image_size``), as unitscope does; lucent runs the
whole network each step, unitscope stops the forward at the last target layer. lucent works on
its own copy of the model, whose hooks are cleared after every call (lucent never removes them).
Reported for process CPU time and wall time: median seconds per round, channel-steps per second
and the median over rounds of the ratio to ``unitscope-batch``.

Run:  python benchmarks/visualize_batch.py [--channels 16] [--steps 8] [--size 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import unitscope
from unitscope.visualize import visualize


def resnet(size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = unitscope.load_model("resnet18")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(32, 3, size, size, generator=torch.Generator().manual_seed(100)))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layer", default="layer2.0.conv1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from lucent.optvis import objectives, param, render

    model = resnet(args.size)
    lucent_model = copy.deepcopy(model)  # lucent hooks every module of the model it is given
    channels = list(range(args.channels))
    lucent_layer = args.layer.replace(".", "_")
    common = {"size": args.size, "steps": args.steps, "device": "cpu", "preprocess": "imagenet"}

    def us_batch() -> None:
        visualize(model, [f"{args.layer}:{c}" for c in channels], **common)

    def us_separate() -> None:
        for c in channels:
            visualize(model, [f"{args.layer}:{c}"], seed=c, **common)

    def lucent(batch: list[int]) -> None:
        objective = sum(objectives.channel(lucent_layer, c, batch=i) for i, c in enumerate(batch))
        render.render_vis(lucent_model, objective, lambda: param.image(args.size, batch=len(batch)),
                          thresholds=(args.steps,), progress=False, show_image=False,
                          fixed_image_size=args.size)
        for m in lucent_model.modules():  # lucent never removes its hooks; they would pile up
            m._forward_hooks.clear()

    def lucent_batch() -> None:
        lucent(channels)

    def lucent_separate() -> None:
        for c in channels:
            lucent([c])

    methods = {"unitscope-batch": us_batch, "unitscope-separate": us_separate,
               "lucent-batch": lucent_batch, "lucent-separate": lucent_separate}
    clocks = {"cpu": time.process_time, "wall": time.perf_counter}
    times: dict[tuple[str, str], list[float]] = {}
    names = list(methods)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = {k: f() for k, f in clocks.items()}
            methods[name]()
            for k, f in clocks.items():
                times.setdefault((k, name), []).append(f() - start[k])
    print(f"resnet18 {args.layer}, {args.channels} channels, {args.steps} steps at {args.size} px, "
          f"{args.threads} threads, median of {args.rounds} rounds")
    for clock in clocks:
        base = times[(clock, "unitscope-batch")]
        print(f"\n{clock} time")
        print(f"{'method':>20} {'s':>8} {'channel-steps/s':>16} {'time / unitscope-batch':>23}")
        for name in names:
            t = statistics.median(times[(clock, name)])
            ratio = statistics.median(m / b for m, b in zip(times[(clock, name)], base))
            print(f"{name:>20} {t:8.2f} {args.channels * args.steps / t:16.2f} {ratio:23.2f}")


if __name__ == "__main__":
    main()
