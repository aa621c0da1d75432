#!/usr/bin/env python
"""Overhead of capturing per-channel means of every Conv2d and ReLU output of a ResNet-18.

Methods (each returns the channel means ``(N, C)`` of the 20 conv outputs and the 17 ReLU calls;
the shared ``relu`` of each BasicBlock runs twice per forward):

    plain          model(x), nothing captured (the baseline)
    us_once        unitscope.Capture(..., calls="all") entered once, hooks stay for all forwards
    us_per_fwd     ``with unitscope.capture(...)`` around every forward (build + enter + exit)
    fx             torchvision create_feature_extractor on every conv/relu node, then .mean(2, 3)
    torchlens      tl.trace(...) saving those modules' outputs, then .mean(2, 3)

Timing is interleaved in one process: after warm-up, every repetition runs each method once
(the start method rotates each round) so load drift hits all methods alike; the table reports
the median. Peak memory is measured per method in a fresh subprocess (``--only METHOD``): peak
RSS (VmHWM, reset after setup) minus RSS after model load and method setup.

Before timing, the unitscope means are checked against the means of the FX extractor's maps
(and torchlens's) for every layer call; any mismatch exits with status 1.

Usage:
    python benchmarks/capture_overhead.py [--reps 15] [--batch 16] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import unitscope
from unitscope import Capture

try:
    import torchlens as tl
except ImportError:  # the bench extra is optional
    tl = None

METHODS = ["plain", "us_once", "us_per_fwd", "fx", "torchlens"]
DIAGNOSTICS = ["noop_hooks", "bare_mean_hooks"]  # --diagnose: where unitscope's overhead goes
LABELS = {
    "plain": "plain forward (baseline)",
    "us_once": "unitscope `Capture` entered once",
    "us_per_fwd": "unitscope `capture()` per forward",
    "fx": "torchvision FX `create_feature_extractor` + mean",
    "torchlens": "torchlens `trace` (selected modules) + mean",
    "noop_hooks": "diagnostic: no-op forward hooks on the same modules",
    "bare_mean_hooks": "diagnostic: minimal hand-written mean hooks",
}
SELECT = [nn.Conv2d, nn.ReLU]
ATOL = RTOL = 1e-5


# --------------------------------------------------------------------------- setup
def build(batch: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    return model, x


def selected_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, tuple(SELECT))]


def fx_return_nodes(model: nn.Module) -> dict[str, str]:
    """FX node name -> unitscope key ('layer1.0.relu_1' -> 'layer1.0.relu#1')."""
    mods = set(selected_modules(model))
    _, eval_nodes = get_graph_node_names(model)
    nodes = {}
    for node in eval_nodes:
        if node in mods:
            nodes[node] = node
        else:
            m = re.fullmatch(r"(.+)_(\d+)", node)
            if m and m.group(1) in mods:
                nodes[node] = f"{m.group(1)}#{m.group(2)}"
    return nodes


def channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=(2, 3))


class Method:
    """A timed callable plus untimed before/after steps and a teardown."""

    def __init__(self, fn: Callable[[], dict[str, torch.Tensor] | None],
                 before: Callable[[], None] | None = None, after: Callable[[], None] | None = None,
                 teardown: Callable[[], None] | None = None) -> None:
        self.fn, self.before, self.after, self.teardown = fn, before, after, teardown


def make_method(name: str, model: nn.Module, x: torch.Tensor, in_parent: bool) -> Method:
    if name == "plain":
        return Method(lambda: (model(x), None)[1])

    if name == "us_once":
        hooked = copy.deepcopy(model)  # own copy: its hooks stay registered between rounds
        cap = Capture(hooked, SELECT, {"mean": "mean"}, calls="all")
        cap.__enter__()

        def us_once() -> dict[str, torch.Tensor]:
            hooked(x)
            return dict(cap.outputs["mean"])
        return Method(us_once, teardown=cap.remove)

    if name == "us_per_fwd":
        def us_per_fwd() -> dict[str, torch.Tensor]:
            with unitscope.capture(model, SELECT, reduce="mean", calls="all") as acts:
                model(x)
            return dict(acts)
        return Method(us_per_fwd)

    if name in DIAGNOSTICS:
        hooked = copy.deepcopy(model)
        store: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def make_hook(mod_name: str) -> Callable[..., None]:
            if name == "noop_hooks":
                return lambda mod, args, out: None

            def hook(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
                k = counts.get(mod_name, 0)
                counts[mod_name] = k + 1
                store[f"{mod_name}#{k}" if k else mod_name] = out.mean(dim=(2, 3))
            return hook

        modules = dict(hooked.named_modules())
        handles = [modules[n].register_forward_hook(make_hook(n)) for n in selected_modules(hooked)]

        def diag() -> dict[str, torch.Tensor] | None:
            counts.clear()
            hooked(x)
            return dict(store) if name == "bare_mean_hooks" else None

        def teardown() -> None:
            for h in handles:
                h.remove()
        return Method(diag, teardown=teardown)

    if name == "fx":
        nodes = fx_return_nodes(model)
        extractor = create_feature_extractor(model, return_nodes=nodes).eval()

        def fx() -> dict[str, torch.Tensor]:
            return {k: channel_mean(v) for k, v in extractor(x).items()}
        return Method(fx)

    if name == "torchlens":
        if tl is None:
            raise RuntimeError("torchlens is not installed (pip install -e '.[bench]')")
        traced = copy.deepcopy(model)
        names = selected_modules(traced)
        wanted = set(names)
        opts = tl.options.CaptureOptions(layers_to_save=names, detach_saved_activations=True)

        def torchlens_fn() -> dict[str, torch.Tensor]:
            trace = tl.trace(traced, x, capture=opts)
            out = {}
            for label, call in trace.saved_module_calls.items():
                addr, _, idx = label.rpartition(":")
                if addr in wanted:
                    k = int(idx) - 1
                    out[addr if k == 0 else f"{addr}#{k}"] = channel_mean(call.out)
            return out

        before = after = None
        if in_parent:
            # torchlens wraps every torch function on its first trace and leaves them wrapped
            # (its default). Wrap before / unwrap after each call, outside the timed region, so
            # torchlens is timed in its steady state and the other methods run on plain torch.
            try:
                from torchlens.backends.torch.wrappers import unwrap_torch, wrap_torch
                before, after = wrap_torch, unwrap_torch
            except ImportError:
                opts = tl.options.CaptureOptions(layers_to_save=names, detach_saved_activations=True,
                                                 unwrap_when_done=True)
        return Method(torchlens_fn, before, after)

    raise ValueError(name)


# --------------------------------------------------------------------------- correctness
def check(results: dict[str, dict[str, torch.Tensor]], n_conv: int) -> tuple[bool, list[str]]:
    ref = results["fx"]
    lines, ok = [], True
    for name, got in results.items():
        if name == "fx" or got is None:
            continue
        missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        worst, bad = 0.0, []
        for k in ref.keys() & got.keys():
            worst = max(worst, (got[k] - ref[k]).abs().max().item())
            if got[k].shape != ref[k].shape or not torch.allclose(got[k], ref[k], rtol=RTOL, atol=ATOL):
                bad.append(k)
        good = not (missing or extra or bad)
        ok &= good
        lines.append(f"{name} vs fx: {'PASS' if good else 'FAIL'} - {len(ref.keys() & got.keys())}/"
                     f"{len(ref)} layer calls compared, max |diff| = {worst:.2e}"
                     + (f"; missing {missing}" if missing else "") + (f"; extra {extra}" if extra else "")
                     + (f"; mismatched {bad}" if bad else ""))
    lines.insert(0, f"{len(ref)} layer calls per forward: {n_conv} Conv2d outputs + "
                    f"{len(ref) - n_conv} ReLU calls (allclose rtol={RTOL}, atol={ATOL})")
    return ok, lines


# --------------------------------------------------------------------------- memory (subprocess)
def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def measure_memory_child(method: str, batch: int, threads: int, calls: int = 3) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model, x = build(batch)
    with torch.inference_mode():
        m = make_method(method, model, x, in_parent=False)
        gc.collect()
        base = rss_mib()
        try:  # reset the peak-RSS high-water mark (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            how = "VmHWM after clear_refs"
        except OSError:
            how = "ru_maxrss (not reset)"
        res = None
        for _ in range(calls):
            res = None
            res = m.fn()
        peak = rss_mib("VmHWM") if how.startswith("VmHWM") else (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        del res
    return {"method": method, "rss_after_load_mib": base, "peak_mib": peak,
            "peak_delta_mib": peak - base, "how": how}


def measure_memory(method: str, args: argparse.Namespace) -> dict[str, Any] | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--only", method,
           "--batch", str(args.batch), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory run for {method} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- machine noise
def cpu_snapshot() -> tuple[int, int, int]:
    """(all CPU jiffies, busy jiffies incl. steal, this process's jiffies) from /proc."""
    try:
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:9]]  # user..steal (guest is inside user)
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(v), sum(v) - v[3] - v[4], int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0, 0, 0


def other_cpu_share(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """Share of the machine's CPU time used by other processes (or stolen) between a and b."""
    total = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / total) if total > 0 else 0.0


def ratio_ci(a: list[float], b: list[float], n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of median(a) / median(b), resampling rounds (a[i], b[i]) together."""
    rng, idx = random.Random(0), range(len(a))
    rs = sorted(statistics.median(a[i] for i in s) / statistics.median(b[i] for i in s)
                for s in ([rng.choice(idx) for _ in idx] for _ in range(n)))
    return rs[int(0.025 * n)], rs[int(0.975 * n) - 1]


def hook_time(model: nn.Module, x: torch.Tensor, forwards: int = 10) -> tuple[float, float]:
    """Median time spent inside unitscope's hooks per forward, and its share of the forward."""
    acc = [0.0]

    class TimedCapture(Capture):
        def _make_hook(self, name: str) -> Callable[..., None]:
            hook = super()._make_hook(name)

            def timed(*a: Any) -> None:
                t0 = time.perf_counter()
                hook(*a)
                acc[0] += time.perf_counter() - t0
            return timed

    inside, share = [], []
    with torch.inference_mode(), TimedCapture(model, SELECT, {"mean": "mean"}, calls="all"):
        for i in range(forwards + 2):
            gc.collect()
            acc[0] = 0.0
            t0 = time.perf_counter()
            model(x)
            total = time.perf_counter() - t0
            if i >= 2:
                inside.append(acc[0])
                share.append(acc[0] / total)
    return statistics.median(inside), statistics.median(share)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15, help="timed rounds (each runs every method once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quiet", type=float, default=0.05,
                   help="a round counts as quiet when other processes used at most this share of the CPU")
    p.add_argument("--json", metavar="PATH", help="also write the raw per-round times and settings here")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--diagnose", action="store_true",
                   help="also time no-op hooks and minimal mean hooks (where unitscope's overhead goes)")
    p.add_argument("--only", choices=METHODS + DIAGNOSTICS, help=argparse.SUPPRESS)  # memory child
    args = p.parse_args(argv)

    if args.only:
        print(json.dumps(measure_memory_child(args.only, args.batch, args.threads)))
        return 0

    torch.set_num_threads(args.threads)
    methods = [m for m in METHODS if m != "torchlens" or tl is not None]
    if args.diagnose:
        methods += DIAGNOSTICS
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    model, x = build(args.batch)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())

    with torch.inference_mode():
        impl = {name: make_method(name, model, x, in_parent=True) for name in methods}

        # correctness, on the first (warm-up) call of each method
        results = {}
        for name, m in impl.items():
            if m.before:
                m.before()
            results[name] = m.fn()
            if m.after:
                m.after()
        ok, lines = check(results, n_conv)
        print("## correctness\n")
        print("\n".join(f"- {line}" for line in lines))
        if not ok:
            print("\nCORRECTNESS CHECK FAILED", file=sys.stderr)
            return 1
        del results

        times: dict[str, list[float]] = {name: [] for name in methods}
        others: list[float] = []  # per timed round: the largest other-process CPU share
        for r in range(args.warmup + args.reps):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            worst = 0.0
            for name in order:
                m = impl[name]
                gc.collect()
                if m.before:
                    m.before()
                c0 = cpu_snapshot()
                t0 = time.perf_counter()
                res = m.fn()
                dt = time.perf_counter() - t0
                worst = max(worst, other_cpu_share(c0, cpu_snapshot()))
                del res
                if m.after:
                    m.after()
                if r >= args.warmup:
                    times[name].append(dt)
            if r >= args.warmup:
                others.append(worst)
        for m in impl.values():
            if m.teardown:
                m.teardown()
    load_end = os.getloadavg()

    mem = {} if args.no_memory else {name: measure_memory(name, args) for name in methods}

    quiet = [i for i, o in enumerate(others) if o <= args.quiet]
    med = {n: statistics.median(ts) for n, ts in times.items()}
    paired = {n: statistics.median(t / b for t, b in zip(times[n], times["plain"])) for n in methods}
    qmed = {n: statistics.median(times[n][i] for i in quiet) for n in methods} if quiet else {}
    ci = {n: ratio_ci(times[n], times["plain"]) for n in methods}
    tl_version = getattr(tl, "__version__", "not installed")
    versions = (f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                f"torchlens {tl_version}, python {platform.python_version()}")
    print(f"\n## capture overhead: resnet18, batch {args.batch}x3x224x224, CPU, "
          f"{args.threads} threads, {args.reps} reps after {args.warmup} warm-up rounds\n")
    print(f"{versions}; {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})\n")
    print("| method | median s / forward | ratio to plain | 95% CI of ratio | median per-round ratio "
          f"| min s | quiet rounds ({len(quiet)}/{len(others)}): median s | quiet: ratio to plain "
          f"| peak RSS - RSS after load (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in methods:
        mm = mem.get(n)
        mtxt = f"{mm['peak_delta_mib']:.0f}" if mm else "n/a"
        qtxt = (f"{qmed[n]:.3f} | {qmed[n] / qmed['plain']:.3f}x" if qmed else "n/a | n/a")
        print(f"| {LABELS[n]} | {med[n]:.3f} | {med[n] / med['plain']:.3f}x "
              f"| {ci[n][0]:.2f}-{ci[n][1]:.2f}x | {paired[n]:.3f}x "
              f"| {min(times[n]):.3f} | {qtxt} | {mtxt} |")
    print("\nratio to plain = median / median of the plain forward (95% CI: bootstrap over rounds); "
          "per-round ratio = median over "
          "rounds of (method / plain in the same round); quiet rounds = rounds in which no timed call "
          f"saw more than {args.quiet:.0%} of the machine's CPU used by other processes "
          "(from /proc/stat minus this process; other-process share per round: "
          + ", ".join(f"{o:.0%}" for o in others) + ")")
    if args.diagnose:
        inside, share = hook_time(model, x)
        print(f"\ntime inside unitscope's hooks (Capture, mean, calls='all'): {inside * 1e3:.1f} ms per "
              f"forward, {share:.1%} of the forward (median of 10)")
    if mem:
        any_m = next((v for v in mem.values() if v), None)
        if any_m:
            print(f"\nmemory: fresh process per method, 3 calls, peak = {any_m['how']}; "
                  f"RSS after model load + input + setup: "
                  + ", ".join(f"{n} {v['rss_after_load_mib']:.0f}" for n, v in mem.items() if v) + " MiB")
    print(f"\nload average (1 min) at start {load_start[0]:.2f}, after timing {load_end[0]:.2f}; "
          f"total wall time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "versions": versions, "times": times,
                       "other_cpu_share": others, "memory": mem}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
