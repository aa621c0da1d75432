"""Coverage speed: all ten criteria updated in one pass vs one plain forward vs one pass per criterion.

A digits-cnn is trained briefly (``--epochs`` epochs with ``unitscope.train.train``, seed 0, Adam lr
3e-3; ``--epochs 0`` keeps the random weights, whose predictions are too uniform for DSC, so the
surprise criteria then use labels). The criteria cover the outputs of conv1, conv2, conv3 and fc
(122 units, spatial means) and are fitted once on the digits train split (1437 inputs; not timed).
On the digits test split (360 inputs, batches of ``--batch-size``), each round times, interleaved:

* ``forward``: the plain forward over every batch (eval, inference mode), the reference;
* ``unitscope``: one forward per batch with capture hooks, all ten criteria updated from the same
  activations (what ``Coverage`` does inside ``unitscope.analyze``);
* ``unitscope-7``: the same with the seven criteria that need no distances to training traces
  (NC, KMNC, NBC, SNAC, TKNC, TKNP, CC);
* ``per-criterion``: the peer approach (NeuraL-Coverage's scripts, SEED's loop): for each
  criterion a full pass of its own, forward with hooks then that criterion's update; the peer
  code itself is not installable here (pinned torch 1.9, pyflann), so its structure is
  reproduced with unitscope's criteria, which isolates the cost of the extra forwards.

Also printed: the time each criterion's updates take in the one-pass run (median over rounds),
and ``unitscope.analyze`` end to end (data loading, manifest and tables included).

Run:  python benchmarks/coverage_speed.py [--rounds 7] [--threads 2] [--epochs 5] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import unitscope
from unitscope.analyses.coverage import DEFAULT_CRITERIA, Coverage
from unitscope.capture import Capture

LAYERS = ["conv1", "conv2", "conv3", "fc"]
#: the seven criteria without a surprise adequacy (no distances to the training traces)
ELEMENTWISE = ("nc", "kmnc", "nbc", "snac", "tknc", "tknp", "cc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="where the passes run (training stays on the CPU)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    tr, te = unitscope.load_dataset("digits", "train"), unitscope.load_dataset("digits", "test")
    if args.epochs:
        from unitscope.train import evaluate, train

        train(model, tr, epochs=args.epochs, lr=3e-3, seed=0, device="cpu")
        acc = evaluate(model, te, device="cpu")["acc"]
        print(f"digits-cnn trained {args.epochs} epochs: test acc {acc:.4f}")
    else:
        print("digits-cnn with random weights (surprise criteria use labels)")
    model.eval().to(dev)
    source = "pred" if args.epochs else "label"
    cov = Coverage(DEFAULT_CRITERIA, layers=LAYERS, class_source=source).fit(model, tr, device=dev,
                                                                            progress=False)
    # fit() froze the profiles (variance masks, KDE factors, bounds); clones share that preparation
    fitted = {k: c.clone().to(dev) for k, c in cov.criteria.items()}
    x_all = torch.stack([te[i][0] for i in range(len(te))]).to(dev)
    y_all = torch.tensor([int(te[i][1]) for i in range(len(te))]).to(dev)
    batches = list(zip(x_all.split(args.batch_size), y_all.split(args.batch_size)))

    def classes(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out.argmax(1) if source == "pred" else y

    def plain() -> None:
        with torch.inference_mode():
            for x, _ in batches:
                model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    per_criterion_time = {k: [] for k in DEFAULT_CRITERIA}

    def one_pass(names: tuple[str, ...] = DEFAULT_CRITERIA) -> dict[str, float]:
        crits = {k: fitted[k].clone() for k in names}
        spent = dict.fromkeys(crits, 0.0)
        with Capture(model, LAYERS, {"mean": "mean"}) as cap, torch.inference_mode():
            for x, y in batches:
                out = model(x)
                acts, cls = dict(cap.outputs["mean"]), classes(out, y)
                for k, c in crits.items():
                    t0 = time.perf_counter()
                    c.update(acts, cls)
                    spent[k] += time.perf_counter() - t0
        if names == DEFAULT_CRITERIA:
            for k, s in spent.items():
                per_criterion_time[k].append(s)
        return {k: c.value() for k, c in crits.items()}

    def per_criterion() -> dict[str, float]:
        values = {}
        for k, c in fitted.items():
            crit = c.clone()
            with Capture(model, LAYERS, {"mean": "mean"}) as cap, torch.inference_mode():
                for x, y in batches:
                    out = model(x)
                    crit.update(dict(cap.outputs["mean"]), classes(out, y))
            values[k] = crit.value()
        return values

    def end_to_end() -> None:
        again = Coverage(DEFAULT_CRITERIA, layers=LAYERS, class_source=source)
        for k in again.names:
            again.accumulators[k] = fitted[k].clone()
        unitscope.analyze(model, te, analyses=[again], batch_size=args.batch_size, device=dev,
                          progress=False)

    methods = {"forward": plain, "unitscope": one_pass, "per-criterion": per_criterion, "analyze": end_to_end,
               "unitscope-7": lambda: one_pass(ELEMENTWISE)}
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    results = {}
    for r in range(args.rounds):
        order = list(methods) if r % 2 == 0 else list(methods)[::-1]
        for name in order:
            t0 = time.perf_counter()
            out = methods[name]()
            times[name].append(time.perf_counter() - t0)
            if out is not None:
                results[name] = out
    if results["unitscope"] != results["per-criterion"] or any(
            results["unitscope-7"][k] != results["unitscope"][k] for k in ELEMENTWISE):
        raise RuntimeError(f"the two ways disagree: {results}")

    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(f"\n{len(te)} test inputs on {dev}, batch {args.batch_size}, threads {args.threads}, "
          f"rounds {args.rounds} "
          "(median and minimum; on a shared machine the minimum is the steadier estimate):")
    for k in med:
        print(f"  {k:14s} median {med[k] * 1e3:8.2f} ms ({med[k] / med['forward']:5.2f}x forward)   "
              f"min {low[k] * 1e3:8.2f} ms ({low[k] / low['forward']:5.2f}x forward)")
    print(f"  one pass vs per-criterion passes: {med['per-criterion'] / med['unitscope']:.2f}x faster "
          f"(median), {low['per-criterion'] / low['unitscope']:.2f}x (min)")
    print("\nper-criterion update time inside the one pass (median ms, share of the pass):")
    for k, v in per_criterion_time.items():
        m = statistics.median(v[1:] or v)
        print(f"  {k:5s} {m * 1e3:7.2f} ms  {m / med['unitscope']:.0%}   value {results['unitscope'][k]:.4g}")


if __name__ == "__main__":
    main()
