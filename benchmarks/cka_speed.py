"""CKA speed: torch-cka ``CKA.compare()`` vs unitscope, against two plain forwards, on resnet18.

Two torchvision resnet18 with random weights (seeds 0 and 1, batch norms calibrated on random
images, eval) compare 8 block outputs (``layer1.0`` … ``layer4.1``, flattened) on ``--sizes``
random 3×S×S images (``--image-size``, 224 by default), in batches of ``--batch``.
Each round runs, interleaved and in rotating order, in one process:

* ``plain``: the DataLoader loop with one forward of each model per batch (``inference_mode``);
* ``torch-cka``: ``torch_cka.CKA(a, b, model1_layers, model2_layers).compare(loader)``;
* ``unitscope``: ``unitscope.analyze(a, data, layers, [CKA(other=b, estimator="unbiased")])``,
  the same minibatch HSIC₁ estimator on the same batches;
* ``unitscope-exact``: ``CKA(other=b)``, exact linear CKA over all images on channel means.

Before timing, the unitscope matrix is compared with torch-cka's: torch-cka computes in float32 and
unitscope in float64, so on wide ResNet maps they differ by up to ~1e-2 (the script stops above
5e-2). Reported, for process CPU time (steady on a shared machine with ``--threads 1``) and wall
time: median seconds per method and size, and the median over rounds of the ratio to ``plain``
in the same round.

Run:  python benchmarks/cka_speed.py [--sizes 64 256] [--batch 32] [--rounds 3] [--threads 2]
                                   [--image-size 224]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import unitscope
from unitscope.analyses.cka import CKA

LAYERS = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]


def resnet(seed: int, size: int) -> torch.nn.Module:
    """resnet18 with random weights whose batch norms are calibrated on random images.

    With the initial running statistics (mean 0, variance 1) activations grow block after block,
    and torch-cka's float32 unbiased HSIC then cancels to negative self-similarities (NaN).
    """
    torch.manual_seed(seed)
    model = unitscope.load_model("resnet18")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        model(torch.rand(32, 3, size, size, generator=torch.Generator().manual_seed(100 + seed)))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # torch-cka warns about a shared dataloader
    from torch_cka import CKA as TorchCKA

    size = args.image_size
    a, b = resnet(0, size), resnet(1, size)
    g = torch.Generator().manual_seed(0)
    datasets = {n: torch.utils.data.TensorDataset(torch.rand(n, 3, size, size, generator=g))
                for n in args.sizes}

    def loader(n: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(datasets[n], batch_size=args.batch)

    def plain(n: int) -> None:
        with torch.inference_mode():
            for (x,) in loader(n):
                a(x)
                b(x)

    peers: dict[int, TorchCKA] = {}

    def torch_cka(n: int) -> torch.Tensor:
        # torch-cka never removes its hooks: one instance per size, on its own copies of the models
        if n not in peers:
            peers[n] = TorchCKA(copy.deepcopy(a), copy.deepcopy(b), "a", "b", model1_layers=LAYERS,
                                model2_layers=LAYERS)
        peers[n].compare(loader(n))
        return peers[n].hsic_matrix

    def ours(n: int, exact: bool = False) -> torch.Tensor:
        analysis = CKA(other=b) if exact else CKA(other=b, estimator="unbiased")
        run = unitscope.analyze(a, datasets[n], layers=LAYERS, analyses=[analysis], batch_size=args.batch,
                                device="cpu", progress=False)
        return run.arrays["cka"]["matrix"]

    for n in args.sizes:
        want, got = torch_cka(n).double(), ours(n)
        err = float((want - got).abs().max())
        print(f"n={n}: max |torch-cka - unitscope| = {err:.2e}")
        if err > 5e-2:
            raise SystemExit("unitscope and torch-cka disagree")

    methods = {"plain": plain, "torch-cka": torch_cka, "unitscope": ours,
               "unitscope-exact": lambda n: ours(n, exact=True)}
    parts(a, b, datasets[args.sizes[0]][: args.batch][0])

    clocks = {"cpu": time.process_time, "wall": time.perf_counter}
    times: dict[tuple[str, str, int], list[float]] = {}
    names = list(methods)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in args.sizes:
            for name in order:
                start = {k: f() for k, f in clocks.items()}
                methods[name](n)
                for k, f in clocks.items():
                    times.setdefault((k, name, n), []).append(f() - start[k])
    print(f"resnet18 ×2 at {size}×{size}, {len(LAYERS)} layers, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} rounds; ratio = median over rounds of (method / plain) in the same round")
    for clock in clocks:
        print(f"\n{clock} time (process CPU seconds are steadier on a shared machine)" if clock == "cpu"
              else f"\n{clock} time")
        print(f"{'method':>16} " + " ".join(f"{f'n={n} s':>10} {'ratio':>6}" for n in args.sizes))
        for name in names:
            cells = []
            for n in args.sizes:
                mine, base = times[(clock, name, n)], times[(clock, "plain", n)]
                ratio = statistics.median(m / b for m, b in zip(mine, base))
                cells.append(f"{statistics.median(mine):10.2f} {ratio:6.3f}")
            print(f"{name:>16} " + " ".join(cells))


def parts(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, reps: int = 7) -> None:
    """Per-batch CPU cost of each piece of unitscope's pass, against two plain forwards.

    End-to-end ratios of a few percent drown in the noise of a shared machine; the pieces can be
    timed one by one, many times, in process CPU seconds.
    """
    from unitscope.analyses.cka import GramOf
    from unitscope.capture import Capture
    from unitscope.stats.cka import LinearCKA, MinibatchCKA

    def cpu(f: object) -> float:
        out = []
        for _ in range(reps):
            t0 = time.process_time()
            f()
            out.append(time.process_time() - t0)
        return statistics.median(out)

    def captured(model: torch.nn.Module, reduce: object) -> list[torch.Tensor]:
        cap = Capture(model, LAYERS, {"r": reduce}, stop=True)
        with cap:
            model(x)
        return [cap.outputs["r"][k] for k in LAYERS]

    with torch.inference_mode():
        forwards = cpu(lambda: (a(x), b(x)))
        grams = cpu(lambda: (captured(a, GramOf("flatten")), captured(b, GramOf("flatten"))))
        means = cpu(lambda: (captured(a, "mean"), captured(b, "mean")))
        gram_a, gram_b = captured(a, GramOf("flatten")), captured(b, GramOf("flatten"))
        mean_a, mean_b = captured(a, "mean"), captured(b, "mean")
        minibatch = cpu(lambda: MinibatchCKA(paired=True).update_grams(gram_a, gram_b))
        exact = cpu(lambda: LinearCKA(paired=True).update(mean_a, mean_b))
    print(f"per batch of {len(x)} (CPU s, median of {reps}): two plain forwards {forwards:.3f}; two forwards "
          f"whose hooks reduce the blocks to centred Grams {grams:.3f} ({grams / forwards:.3f}×; the forward "
          f"stops after layer4) + minibatch HSIC update {minibatch:.4f} (+{minibatch / forwards:.1%}); two "
          f"forwards capturing channel means {means:.3f} ({means / forwards:.3f}×) + exact update "
          f"{exact:.4f} (+{exact / forwards:.1%})")


if __name__ == "__main__":
    main()
