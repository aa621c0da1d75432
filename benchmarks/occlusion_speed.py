"""Occlusion discrepancy maps: unitscope (batched, truncated, local) vs one full forward per occlusion.

The task of issue 5: occlusion maps of one unit of AlexNet's conv3 (``features.6``, random weights,
seed 0) for 10 images of 224×224 (standard normal pixels, seed 0) with an 11×11 occluder at stride
3, i.e. 72² = 5,184 occlusions per image, 51,840 in all. Each image is read at the unit's argmax.

* **naive** (the seed codebase's approach, silver-system's ``discrepancy.py``): for each occlusion,
  copy the image, paste a noise patch, run the *whole* network on a batch of one and read the unit
  from a forward hook. It is slow, so it runs on the first ``--naive-occlusions`` occlusions of the
  first image only and the total is **extrapolated** per occlusion to all 51,840 (printed as such).
* **unitscope** ``occlusion_maps(..., local=True)``: batches of occluded copies through the
  network truncated at ``features.6``; only windows that intersect the unit's analytic receptive
  field (99 px) run, on a crop holding that field. Timed whole, on all 10 images.
* with ``--truncated-only``, also ``local=False`` (every window, whole image, truncated, batched),
  extrapolated from the first image.

Both sides get the same thread count, in one process; the naive loop's values are checked against
unitscope's on the occlusions it ran.

Run:  python benchmarks/occlusion_speed.py [--threads 2] [--naive-occlusions 60] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import time

import torch

import unitscope
from unitscope.analyses.occlusion import _fill_values, _image_stats, occluder_positions, occlusion_maps

LAYER, UNIT, K, S, SIDE, IMAGES = "features.6", 0, 11, 3, 224, 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--naive-occlusions", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--truncated-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = unitscope.load_model("alexnet").eval()
    images = torch.randn(IMAGES, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    pos = occluder_positions(SIDE, SIDE, K, S)
    total = IMAGES * len(pos)
    units = torch.full((IMAGES,), UNIT)
    print(f"alexnet {LAYER} unit {UNIT}, {IMAGES} images {SIDE}×{SIDE}, occluder {K}×{K} stride {S}: "
          f"{len(pos)} occlusions per image, {total} in all; {args.threads} threads")

    def run_ours() -> tuple[float, object]:
        t0 = time.perf_counter()
        r = occlusion_maps(model, LAYER, images, units, occluder=K, stride=S, device="cpu",
                           batch_size=args.batch_size)
        return time.perf_counter() - t0, r

    occlusion_maps(model, LAYER, images[:1], units[:1], occluder=K, stride=S, device="cpu",
                   batch_size=args.batch_size)  # warm-up
    ours = occlusion_maps(model, LAYER, images[:1], units[:1], occluder=K, stride=S, device="cpu")

    # naive: one full forward per occlusion, batch of one, on the first image; the timed occlusions are
    # windows that reach the unit, so the check against unitscope compares non-zero discrepancies.
    # Half of them run before unitscope and half after, so a change of machine load hits both sides.
    reach = torch.nonzero(ours.evaluated[0].reshape(-1)).flatten()
    n = min(args.naive_occlusions, len(reach))
    chosen = reach[torch.linspace(0, len(reach) - 1, n).long()]
    image, loc = images[0], ours.locations[0].tolist()
    patches = _fill_values("uniform", _image_stats(image[None]).expand(n, -1, -1),
                           torch.zeros(n, dtype=torch.int64), chosen, 0, K, image.dtype)
    got: list[float] = []
    naive_s = 0.0

    def run_naive(part: range) -> float:
        with torch.inference_mode(), unitscope.capture(model, LAYER) as acts:
            model(image[None])  # baseline
            a0 = float(acts[LAYER][0, UNIT, loc[0], loc[1]])
            t0 = time.perf_counter()
            for p in part:
                a, b = pos[chosen[p]].tolist()
                x = image.clone()
                x[:, a:a + K, b:b + K] = patches[p]
                model(x[None])
                got.append(abs(a0 - float(acts[LAYER][0, UNIT, loc[0], loc[1]])))
            return time.perf_counter() - t0

    naive_s += run_naive(range(n // 2))
    t_ours, ours = run_ours()
    naive_s += run_naive(range(n // 2, n))
    evaluated = int(ours.evaluated.sum())
    print(f"unitscope batched+truncated+local: {t_ours:.2f} s for all {total} occlusions "
          f"({evaluated} windows reach the unit and ran)")
    per = naive_s / n
    t_naive = per * total
    mine = ours.grid[0].reshape(-1)[chosen]
    err = float((torch.tensor(got, dtype=torch.float64) - mine).abs().max() / mine.abs().max())
    print(f"naive one full forward per occlusion: {per * 1e3:.2f} ms per occlusion (timed on {n}, "
          f"half before and half after unitscope), extrapolated to {total}: {t_naive:.1f} s; max "
          f"relative difference to unitscope {err:.1e}")
    print(f"speed-up unitscope vs naive: {t_naive / t_ours:.1f}x (target >= 20x)")

    if args.truncated_only:
        t0 = time.perf_counter()
        occlusion_maps(model, LAYER, images[:1], units[:1], occluder=K, stride=S, device="cpu",
                       batch_size=args.batch_size, local=False)
        t_trunc = (time.perf_counter() - t0) * IMAGES
        print(f"batched+truncated, every window on the whole image (local=False), extrapolated from one "
              f"image: {t_trunc:.1f} s, {t_naive / t_trunc:.1f}x vs naive")


if __name__ == "__main__":
    main()
