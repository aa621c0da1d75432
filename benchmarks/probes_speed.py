"""Probe fitting speed: scikit-learn lbfgs vs unitscope's torch L-BFGS, on digits-cnn features.

A digits-cnn is trained briefly (seed 0, Adam lr 3e-3, ``--epochs`` epochs), the outputs of every conv and
ReLU layer are extracted on the digits train (1437) and test (360) splits with
``unitscope.features.extract_features`` and adaptive-average-pooled to 4×4 (C·16 features; conv3
and relu3 are already 4×4). Each round fits one probe per layer with both methods, interleaved
(the order alternates between rounds), single process, ``--threads`` threads for both:

* scikit-learn ``LogisticRegression(C=1, solver="lbfgs", max_iter=10000)`` (default tol 1e-4) on
  the float32 features as given (no standardisation), and
* ``unitscope.stats.logreg.fit_logreg(C=1, dtype=float32)`` with its defaults (tol 1e-6 on the
  largest gradient entry, max_iter 1000).

Reported: median total fit seconds over rounds, their ratio, per-layer test accuracies, and the
objective of each solution (computed in float64 by ``unitscope.stats.logreg.objective``).

Run:  python benchmarks/probes_speed.py [--rounds 5] [--threads 2] [--epochs 10]
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
from unitscope.stats.logreg import accuracy, fit_logreg, objective
from unitscope.train import evaluate, train

LAYERS = ["conv1", "relu1", "conv2", "relu2", "conv3", "relu3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
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
    print(f"digits-cnn trained {args.epochs} epochs: test acc {model_acc:.4f}; threads {args.threads}")

    def fit_sklearn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        with warnings.catch_warnings():
            # a ConvergenceWarning would make the comparison unfair
            warnings.simplefilter("error", category=ConvergenceWarning)
            m = LogisticRegression(C=1.0, solver="lbfgs", max_iter=10000).fit(x.numpy(), y_tr.numpy())
        return torch.from_numpy(m.coef_), torch.from_numpy(m.intercept_), int(m.n_iter_[0])

    def fit_ours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        r = fit_logreg(x, y_tr, 1.0, num_classes=10)
        if not r.converged:
            raise RuntimeError("unitscope probe did not converge")
        return r.weight, r.bias, r.n_iter

    methods = {"sklearn": fit_sklearn, "unitscope": fit_ours}
    times: dict[str, list[float]] = {k: [] for k in methods}
    last: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, int]]] = {k: {} for k in methods}
    with threadpool_limits(args.threads):
        for name in methods:  # warm-up (thread pools, first-call allocations)
            methods[name](data["conv1"][0])
        for r in range(args.rounds):
            order = list(methods) if r % 2 == 0 else list(methods)[::-1]
            for name in order:
                t0 = time.perf_counter()
                for la in LAYERS:
                    last[name][la] = methods[name](data[la][0])
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nrounds {args.rounds}; total fit seconds over {len(LAYERS)} layers (median, min):")
    for k in methods:
        print(f"  {k}: {med[k]:.3f} s (min {min(times[k]):.3f})")
    print(f"  speed-up (median sklearn / median unitscope): {med['sklearn'] / med['unitscope']:.1f}x")
    ratios = [a / b for a, b in zip(times["sklearn"], times["unitscope"])]
    print("  per-round ratios: " + ", ".join(f"{r:.1f}x" for r in ratios))
    print("\n| layer | features | sklearn iters | unitscope iters | sklearn test acc | unitscope test acc "
          "| sklearn train acc | unitscope train acc | sklearn objective | unitscope objective |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    same = True
    for la in LAYERS:
        xtr, xte = data[la]
        cells = []
        for k in methods:
            w, b, it = last[k][la]
            cells.append((it, accuracy(xte, y_te, w.float(), b.float()),
                          accuracy(xtr, y_tr, w.float(), b.float()),
                          objective(xtr.double(), y_tr, w.double(), b.double())))
        same &= cells[0][1] == cells[1][1]
        s, u = cells
        print(f"| {la} | {xtr.shape[1]} | {s[0]} | {u[0]} | {s[1]:.4f} | {u[1]:.4f} | {s[2]:.4f} "
              f"| {u[2]:.4f} | {s[3]:.6f} | {u[3]:.6f} |")
    print(f"\nidentical test accuracy on every layer: {same}")


if __name__ == "__main__":
    main()
