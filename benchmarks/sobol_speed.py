"""Sobol' indices of many outputs: SALib's ``sobol.analyze`` looped over outputs vs unitscope, one process.

The design is ``unitscope.stats.sobol.saltelli_sample(D, N)`` laid out as SALib's matrix
(``SaltelliDesign.salib_matrix``; first and total order only, ``N·(D + 2)`` rows). The outputs are
``--outputs`` smooth non-additive functions of the ``D`` inputs (random weights, seed 0):
``y_m = sin(x·w_m) + 0.5·(x·v_m)²``. Both sides compute S1 (Saltelli 2010), ST (Jansen) and
bootstrap half-widths with ``--resamples`` resamples:

* SALib: ``sobol.analyze(problem, Y[:, m], calc_second_order=False, num_resamples=R, seed=1)`` for
  every output ``m`` (it takes 1-D outputs only);
* unitscope: ``unitscope.stats.sobol.sobol_indices(y_a, y_b, y_ab, bootstrap=R)`` on all outputs
  at once (Poisson bootstrap, so the half-widths are a different resampling of the same estimator).

Reported: seconds per side (SALib once, unitscope median of ``--rounds``), the ratio, the largest
difference of S1 and ST (must be float64 rounding), and the median ratio of the half-widths.

Run:  python benchmarks/sobol_speed.py [--outputs 512] [--d 6] [--n 1024] [--resamples 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from unitscope.stats.sobol import saltelli_sample, sobol_indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outputs", type=int, default=512)
    ap.add_argument("--d", type=int, default=6)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--resamples", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from SALib.analyze import sobol
    from threadpoolctl import threadpool_limits

    d, n, m = args.d, args.n, args.outputs
    x = saltelli_sample(d, n, seed=0).salib_matrix()  # (n·(d+2), d)
    rng = np.random.default_rng(0)
    w, v = rng.normal(size=(d, m)), rng.normal(size=(d, m)) / np.sqrt(d)
    y = np.sin(x @ w) + 0.5 * (x @ v) ** 2  # (rows, outputs)
    problem = {"num_vars": d, "names": [f"x{i}" for i in range(d)], "bounds": [[0.0, 1.0]] * d}
    rows = torch.from_numpy(y).view(n, d + 2, m)
    y_a, y_b, y_ab = rows[:, 0], rows[:, -1], rows[:, 1:1 + d].movedim(1, 0)

    with threadpool_limits(args.threads):
        sobol_indices(y_a[:64], y_b[:64], y_ab[:, :64], bootstrap=args.resamples)  # warm-up
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            ours = sobol_indices(y_a, y_b, y_ab, bootstrap=args.resamples)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = {k: np.zeros((d, m)) for k in ("S1", "ST", "S1_conf", "ST_conf")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for j in range(m):
                r = sobol.analyze(problem, y[:, j], calc_second_order=False, num_resamples=args.resamples,
                                  seed=1)
                for k in ref:
                    ref[k][:, j] = r[k]
        salib_s = time.perf_counter() - t0
    ours_s = statistics.median(times)
    print(f"{m} outputs, D = {d}, N = {n} ({n * (d + 2)} rows), {args.resamples} bootstrap resamples, "
          f"threads {args.threads}")
    print(f"  SALib loop over outputs: {salib_s:.3f} s")
    print(f"  unitscope (median of {args.rounds}): {ours_s:.4f} s (min {min(times):.4f})")
    print(f"  speed-up: {salib_s / ours_s:.0f}x (target >= 150x)")
    print(f"  max |S1 - SALib S1|: {np.abs(ours.S1.numpy() - ref['S1']).max():.2e}")
    print(f"  max |ST - SALib ST|: {np.abs(ours.ST.numpy() - ref['ST']).max():.2e}")
    for k in ("S1_conf", "ST_conf"):
        ratio = ours.__getattribute__(k).numpy() / ref[k]
        print(f"  {k} unitscope / SALib: median {np.median(ratio):.3f}, "
              f"5-95 % [{np.quantile(ratio, 0.05):.2f}, {np.quantile(ratio, 0.95):.2f}]")


if __name__ == "__main__":
    main()
