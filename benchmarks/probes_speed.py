"""Probe fitting speed: scikit-learn lbfgs vs unitscope's torch L-BFGS, on digits-cnn features.

A digits-cnn is trained briefly (seed 0, Adam lr 3e-3, ``--epochs`` epochs), the outputs of every conv and
ReLU layer are extracted on the digits train (1437) and test (360) splits with
``unitscope.features.extract_features`` and adaptive-average-pooled to 4×4 (C·16 features; conv3
and relu3 are already 4×4). Each round fits one probe per layer with both methods, interleaved
(the order alternates between rounds), single process, ``--threads`` threads for both:

* scikit-learn ``LogisticRegression(C=1, solver="lbfgs", max_iter=10000)`` (default tol 1e-4) on
  the float32 features as given (no standardisation), and
* ``unitscope.stats.logreg.fit_logreg(C=1, dtype=float32)`` with its defaults (tol 1e-6 on the
  largest gradient entry, max_iter 1000), one layer after another, and
* ``unitscope.stats.logreg.fit_logreg_many`` (same options): all six layers in one joint L-BFGS
  run, which is what ``unitscope.probes`` does.

Reported: median total fit seconds over rounds, their ratio, per-layer test accuracies, and the
objective of each solution (computed in float64 by ``unitscope.stats.logreg.objective``).

With ``--device cuda`` unitscope fits on the GPU (features copied there and weights back inside the
timed region, as ``unitscope.probes`` does with ``device="auto"``); scikit-learn stays on the CPU.

Run:  python benchmarks/probes_speed.py [--rounds 5] [--threads 2] [--epochs 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

import unitscope
from unitscope.features import extract_features
from unitscope.stats.logreg import accuracy, fit_logreg, fit_logreg_many, objective
from unitscope.train import evaluate, train

LAYERS = ["conv1", "relu1", "conv2", "relu2", "conv3", "relu3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-6,
                    help="unitscope's gradient tolerance (its default 1e-6; sklearn's tol is 1e-4)")
    ap.add_argument("--device", default="cpu", help="where unitscope fits (cpu, cuda)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    tr, te = unitscope.load_dataset("digits", "train"), unitscope.load_dataset("digits", "test")
    train(model, tr, epochs=args.epochs, lr=3e-3, seed=0, device="cpu")
    model_acc = evaluate(model, te, device="cpu")["acc"]
    with tempfile.TemporaryDirectory() as out:
        s_tr = extract_features(model, tr, LAYERS, 4, out=out, split="train", device="cpu")
        s_te = extract_features(model, te, LAYERS, 4, out=out, split="test", device="cpu")
        data = {la: (s_tr.features(la, as_tensor=True), s_te.features(la, as_tensor=True)) for la in LAYERS}
        y_tr, y_te = s_tr.labels(), s_te.labels()
    print(f"digits-cnn trained {args.epochs} epochs: test acc {model_acc:.4f}; threads {args.threads}; "
          f"unitscope on {args.device}")

    def fit_sklearn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        with warnings.catch_warnings():
            # a ConvergenceWarning would make the comparison unfair
            warnings.simplefilter("error", category=ConvergenceWarning)
            m = LogisticRegression(C=1.0, solver="lbfgs", max_iter=10000).fit(x.numpy(), y_tr.numpy())
        return torch.from_numpy(m.coef_), torch.from_numpy(m.intercept_), int(m.n_iter_[0])

    def fit_ours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        r = fit_logreg(x, y_tr, 1.0, num_classes=10, tol=args.tol, device=args.device)
        if not r.converged:
            raise RuntimeError("unitscope probe did not converge")
        return r.weight.cpu(), r.bias.cpu(), r.n_iter

    def fit_joint(xs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        rs = fit_logreg_many(xs, y_tr, 1.0, num_classes=10, tol=args.tol, device=args.device)
        if not all(r.converged for r in rs):
            raise RuntimeError("unitscope joint probes did not converge")
        return [(r.weight.cpu(), r.bias.cpu(), r.n_iter) for r in rs]

    def one_by_one(fit):
        return lambda xs: [fit(x) for x in xs]

    methods = {"sklearn": one_by_one(fit_sklearn), "unitscope": one_by_one(fit_ours),
               "unitscope joint": fit_joint}
    times: dict[str, list[float]] = {k: [] for k in methods}
    last: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, int]]] = {k: {} for k in methods}
    xs = [data[la][0] for la in LAYERS]
    with threadpool_limits(args.threads):
        for name in methods:  # warm-up (thread pools, first-call allocations)
            methods[name](xs[:1])
        for r in range(args.rounds):
            order = list(methods) if r % 2 == 0 else list(methods)[::-1]
            for name in order:
                t0 = time.perf_counter()
                last[name] = dict(zip(LAYERS, methods[name](xs)))
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nrounds {args.rounds}; total fit seconds over {len(LAYERS)} layers (median, min):")
    for k in methods:
        print(f"  {k}: {med[k]:.3f} s (min {min(times[k]):.3f})")
    for k in list(methods)[1:]:
        ratios = [a / b for a, b in zip(times["sklearn"], times[k])]
        print(f"  speed-up of {k} (median sklearn / median {k}): {med['sklearn'] / med[k]:.1f}x; "
              "per round " + ", ".join(f"{r:.1f}x" for r in ratios))
    names = list(methods)
    print("\n| layer | features | " + " | ".join(f"{k} iters" for k in names) + " | "
          + " | ".join(f"{k} test acc" for k in names) + " | "
          + " | ".join(f"{k} objective" for k in names) + " |")
    print("|---|---:|" + "---:|" * (3 * len(names)))
    same = True
    for la in LAYERS:
        xtr, xte = data[la]
        cells = []
        for k in names:
            w, b, it = last[k][la]
            cells.append((it, accuracy(xte, y_te, w.float(), b.float()),
                          objective(xtr.double(), y_tr, w.double(), b.double())))
        same &= all(c[1] == cells[0][1] for c in cells)
        print(f"| {la} | {xtr.shape[1]} | " + " | ".join(str(c[0]) for c in cells) + " | "
              + " | ".join(f"{c[1]:.4f}" for c in cells) + " | "
              + " | ".join(f"{c[2]:.6f}" for c in cells) + " |")
    print(f"\nidentical test accuracy on every layer: {same}")


if __name__ == "__main__":
    main()
