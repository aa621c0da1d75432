"""The research questions of the coverage seed, as functions returning tidy tables.

* :func:`pruning` (RQ1): are the units LRP ranks important? Zero the top-m units and compare the
  accuracy drop with zeroing m random units of the same layers.
* :func:`noise` (RQ2): Gaussian noise on the most relevant pixels (input LRP) against random
  pixels, and how coverage changes.
* :func:`adversarial` (RQ3): adversarial examples (FGSM, PGD, CW) replacing 1 / 5 / 10 % of the
  test set, and the normalised coverage change |cov(mixed) - cov(clean)| / cov(clean).
* :func:`impartiality` (RQ4): Pielou evenness of the predicted classes of test subsets (clean
  and adversarial, several sizes), and its Pearson correlation with their coverage.

Coverage is IDC by default (fitted once on the training split, end to end over the layers), or
one of the ten classic criteria by name (``criterion="nc"``...) when
:mod:`unitscope.coverage` provides them. A subset's coverage is computed from the activations of
its inputs, which are captured once per set (clean, noisy, adversarial) and indexed, so many
subsets cost no extra forward. The test split is held in memory (these are small-set studies).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from ..attacks import ATTACKS
from ..attacks import attack as run_attack
from ..attribution import attribute
from ..capture import resolve_layers
from ..data.arrays import ArrayDataset
from ..models.modes import model_device, preserved, restores_model
from ..stats.evenness import pearson, pielou
from .importance import activations, fit_idc, unit_relevance
from .masking import masked


def stack(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All inputs and labels of a (small) dataset as two tensors."""
    if len(data) == 0:
        raise ValueError("the dataset is empty")
    items = [data[i] for i in range(len(data))]
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])


class CoverageMeter:
    """A coverage criterion fitted once on training data that then measures any set of inputs.

    Args:
        model, train_data, layers: the network, its training split and the layers covered.
        criterion: ``"idc"`` (default; fitted with LRP relevance, end-to-end value) or the short
            name of a criterion of :mod:`unitscope.coverage` (``"nc"``, ``"kmnc"``...).
        m, k, k_range, seed: IDC options; ``options``: options of another criterion.
    """

    def __init__(self, model: nn.Module, train_data: Dataset, layers: Any, criterion: str = "idc",
                 m: int = 2, k: int | None = None, k_range: Sequence[int] = (2, 4), seed: int = 0,
                 batch_size: int = 128, device: str | torch.device = "cpu", **options: Any) -> None:
        self.model, self.batch_size, self.device = model, batch_size, device
        self.layers = resolve_layers(model, layers)
        self.name = criterion
        if criterion == "idc":
            self.criterion: Any = fit_idc(model, train_data, self.layers, m, k, k_range, per_class=False,
                                          batch_size=batch_size, device=device, seed=seed, **options)
        else:
            from ..coverage.base import criterion as build

            self.criterion = build(criterion, **options)
            if self.criterion.needs_fit:
                acts, _, preds = activations(model, train_data, self.layers, batch_size, device)
                self.criterion.fit(acts, preds)

    def acts(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Activations of the covered layers and the predictions for inputs ``x``."""
        data = ArrayDataset(x, torch.zeros(len(x), dtype=torch.long))
        acts, _, preds = activations(self.model, data, self.layers, self.batch_size, self.device)
        return acts, preds

    def value(self, acts: dict[str, torch.Tensor], preds: torch.Tensor,
              index: torch.Tensor | None = None) -> float:
        """Coverage of the inputs whose activations are ``acts`` (rows ``index`` only, if given)."""
        if index is not None:
            acts, preds = {k: v[index] for k, v in acts.items()}, preds[index]
        c = self.criterion.clone()
        if self.name == "idc":
            c.update(acts)
        else:
            c.update(acts, preds)
        return float(c.value())


@contextmanager
def zeroed(model: nn.Module, units: Sequence[tuple[str, int]]) -> Iterator[None]:
    """Within the block, the output channels ``units`` [(layer, unit)] of ``model`` read 0.

    Forward hooks multiply each listed layer's output by a 0/1 channel mask; they are removed on
    exit, so the model is exactly as before (its weights are never touched).
    """
    by_layer: dict[str, list[int]] = {}
    for layer, unit in units:
        by_layer.setdefault(layer, []).append(int(unit))
    with masked(model, by_layer):
        yield


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` (eval mode for the call)."""
    with preserved(model), torch.no_grad():
        model.eval()
        dev = model_device(model)
        pred = torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu()
                          for i in range(0, len(x), batch_size)])
    return int((pred == y).sum()) / len(y)  # exact count / n, not a float32 mean


@restores_model
def pruning(model: nn.Module, train_data: Dataset, test_data: Dataset, layers: Any,
            prune_m: Sequence[int] = (1, 2, 4), repeats: int = 3, cross_layer_norm: str = "none",
            seed: int = 0, batch_size: int = 128, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Accuracy drop from zeroing the top-m most relevant units against m random units (RQ1).

    Units are ranked over all ``layers`` together by their LRP relevance summed over the
    correctly classified training inputs (``cross_layer_norm`` as in IDC). Zeroing is a mask on
    the named layer's output (see :func:`zeroed`): for a conv followed by batch norm, the channel
    after the batch norm reads its shift, not 0; select the batch norm or activation to zero that.

    Returns:
        rows ``study, selection ("important" | "random"), n_units, repeat, accuracy,
        accuracy_drop, units``; the unpruned accuracy is the row with selection ``"none"``.
    """
    from ..coverage.idc import normalise_scores

    names = resolve_layers(model, layers)
    rel = unit_relevance(model, train_data, names, batch_size=batch_size, device=device)
    scores = torch.cat([normalise_scores(rel.total[n], cross_layer_norm) for n in names])
    owners = [(n, i) for n in names for i in range(len(rel.total[n]))]
    order = torch.sort(-scores, stable=True).indices.tolist()
    x, y = stack(test_data)
    base = accuracy(model, x, y, batch_size)
    rows = [{"study": "pruning", "selection": "none", "n_units": 0, "repeat": 0, "accuracy": base,
             "accuracy_drop": 0.0, "units": ""}]
    g = torch.Generator().manual_seed(seed)
    for n in prune_m:
        if not 0 < int(n) <= len(owners):
            raise ValueError(f"prune_m={n}: choose between 1 and the {len(owners)} units of {names}")
        picks = [("important", 0, [owners[i] for i in order[: int(n)]])]
        for r in range(int(repeats)):
            draw = torch.randperm(len(owners), generator=g)[: int(n)].tolist()
            picks.append(("random", r, [owners[i] for i in draw]))
        for selection, r, units in picks:
            with zeroed(model, units):
                acc = accuracy(model, x, y, batch_size)
            rows.append({"study": "pruning", "selection": selection, "n_units": int(n), "repeat": r,
                         "accuracy": acc, "accuracy_drop": base - acc,
                         "units": " ".join(f"{la}:{u}" for la, u in units)})
    return pd.DataFrame(rows)


def check_attack(attack: str, eps: float, c: float, alpha: float | None, steps: int) -> None:
    """Raise ``ValueError`` naming the fix for an attack setting the studies cannot use."""
    if attack not in ATTACKS:
        raise ValueError(f"attack={attack!r}: use one of {', '.join(ATTACKS)}")
    for name, value, least in (("eps", eps, 0.0), ("c", c, None), ("alpha", alpha, None)):
        if name == "alpha" and value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value < least if least is not None else value <= 0):
            bound = ">= 0" if least is not None else "> 0"
            raise ValueError(f"{name}={value!r}: give a finite number {bound}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: give a positive number of PGD steps, e.g. steps=20")


def _attack_on_model_device(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, eps: float,
                            batch_size: int, c: float = 1.0, alpha: float | None = None, steps: int = 20,
                            seed: int = 0) -> torch.Tensor:
    """Adversarial inputs made where the model lives, clamped to the data's own range, back on the CPU.

    PGD takes ``steps`` steps of ``alpha`` (default ε/4: 2/255 for ε = 8/255, as in the spec's
    RQ4) from a random start drawn with ``seed``; CW takes the constant ``c`` and ignores ``eps``.
    """
    dev = model_device(model)
    bounds = (float(x.min()), float(x.max()))
    options: dict[str, Any] = {"bounds": bounds}
    if method == "pgd":
        options.update(alpha=eps / 4 if alpha is None else alpha, steps=steps, seed=seed)
    return run_attack(model, x.to(dev), y.to(dev), method, eps, batch_size, c=c, **options).cpu()


def _attack_columns(attack: str, eps: float, c: float) -> dict[str, Any]:
    """``attack, eps, c`` of a study row: CW's constant, or the L∞ radius of FGSM and PGD."""
    return {"attack": attack, "eps": math.nan if attack == "cw" else float(eps),
            "c": float(c) if attack == "cw" else math.nan}


@restores_model
def relevant_pixels(model: nn.Module, x: torch.Tensor, fraction: float,
                    batch_size: int = 128) -> torch.Tensor:
    """Boolean mask of the ``fraction`` most relevant input values of every input (|LRP|, predicted class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}: choose a fraction of the pixels in (0, 1]")
    dev = model_device(model)
    rel = torch.cat([attribute(model, x[i:i + batch_size].to(dev)).cpu()
                     for i in range(0, len(x), batch_size)])
    flat = rel.abs().flatten(1)
    q = max(1, round(fraction * flat.shape[1]))
    top = torch.sort(-flat, dim=1, stable=True).indices[:, :q]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True).view_as(x)


@restores_model
def noise(model: nn.Module, train_data: Dataset, test_data: Dataset, layers: Any, std: float = 0.3,
          fraction: float = 0.02, repeats: int = 3, criterion: str = "idc", seed: int = 0,
          batch_size: int = 128, device: str | torch.device = "cpu", exclude_important: bool = True,
          **meter_options: Any) -> pd.DataFrame:
    """Coverage change from Gaussian noise on the most relevant pixels against random pixels (RQ2).

    For every test input the ``fraction`` most relevant input values (|LRP| for the predicted
    class) get N(0, std²) noise; the baseline puts the same noise on as many random values,
    drawn from the others (``exclude_important=True``, so then ``fraction <= 0.5``) or from all.
    Noisy inputs are clamped to the test set's range (SEED).

    Returns:
        rows ``study, selection ("clean" | "important" | "random"), repeat, coverage,
        coverage_change, accuracy``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}: choose a fraction of the pixels in (0, 1]")
    if exclude_important and fraction > 0.5:
        raise ValueError(f"fraction={fraction}: the random baseline draws as many pixels from the others, "
                         "which needs fraction <= 0.5; lower it or pass exclude_important=False")
    meter = CoverageMeter(model, train_data, layers, criterion, seed=seed, batch_size=batch_size,
                          device=device, **meter_options)
    x, y = stack(test_data)
    acts, preds = meter.acts(x)
    clean = meter.value(acts, preds)
    rows = [{"study": "noise", "selection": "clean", "repeat": 0, "coverage": clean, "coverage_change": 0.0,
             "accuracy": accuracy(model, x, y, batch_size)}]
    important = relevant_pixels(model, x, fraction, batch_size)
    q = int(important[0].sum())
    lo, hi = float(x.min()), float(x.max())
    g = torch.Generator().manual_seed(seed)
    for r in range(int(repeats)):
        eps = torch.randn(x.shape, generator=g) * std
        scores = torch.rand(x.shape, generator=g).flatten(1)
        if exclude_important:
            scores = scores.masked_fill(important.flatten(1), -1.0)
        pick = scores.topk(q, dim=1).indices
        random_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, pick, True)
        for selection, mask in (("important", important), ("random", random_mask.view_as(x))):
            noisy = (x + eps * mask).clamp(lo, hi)
            a, p = meter.acts(noisy)
            cov = meter.value(a, p)
            rows.append({"study": "noise", "selection": selection, "repeat": r, "coverage": cov,
                         "coverage_change": cov - clean, "accuracy": accuracy(model, noisy, y, batch_size)})
    return pd.DataFrame(rows)


def _normalised_change(mixed: float, clean: float) -> float:
    return abs(mixed - clean) / clean if clean > 0 else math.nan


@restores_model
def adversarial(model: nn.Module, train_data: Dataset, test_data: Dataset, layers: Any, attack: str = "fgsm",
                eps: float = 0.3, fractions: Sequence[float] = (0.01, 0.05, 0.1), criterion: str = "idc",
                seed: int = 0, batch_size: int = 128, device: str | torch.device = "cpu", c: float = 1.0,
                alpha: float | None = None, steps: int = 20, **meter_options: Any) -> pd.DataFrame:
    """Normalised coverage change when adversarial examples replace a fraction of the test set (RQ3).

    The whole test set is attacked once (``eps``: the FGSM/PGD radius; PGD: ``steps`` steps of
    ``alpha``, default eps/4; CW: the constant ``c``). The replaced inputs are the first
    ``round(f·N)`` of one seeded permutation, so the subsets of the fractions are nested and do
    not depend on which other fractions are asked for.

    Returns:
        rows ``study, attack, eps, c, fraction, replaced, coverage_clean, coverage_mixed,
        normalised_change, attack_success`` (``eps`` NaN for CW, ``c`` NaN for FGSM and PGD; NaN
        change when the clean coverage is 0).
    """
    check_attack(attack, eps, c, alpha, steps)
    bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1]
    if bad:
        raise ValueError(f"fractions {bad}: choose fractions in (0, 1]")
    meter = CoverageMeter(model, train_data, layers, criterion, seed=seed, batch_size=batch_size,
                          device=device, **meter_options)
    x, y = stack(test_data)
    adv = _attack_on_model_device(model, x, y, attack, eps, batch_size, c, alpha, steps, seed)
    acts, preds = meter.acts(x)
    adv_acts, adv_preds = meter.acts(adv)
    clean = meter.value(acts, preds)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    rows = []
    for f in fractions:
        n = max(1, round(f * len(x)))
        idx = order[:n]
        mixed = {k: v.clone() for k, v in acts.items()}
        mixed_preds = preds.clone()
        for k in mixed:
            mixed[k][idx] = adv_acts[k][idx]
        mixed_preds[idx] = adv_preds[idx]
        cov = meter.value(mixed, mixed_preds)
        rows.append({"study": "adversarial", **_attack_columns(attack, eps, c), "fraction": f, "replaced": n,
                     "coverage_clean": clean, "coverage_mixed": cov,
                     "normalised_change": _normalised_change(cov, clean),
                     "attack_success": float((adv_preds[idx] != y[idx]).float().mean())})
    return pd.DataFrame(rows)


@restores_model
def impartiality(model: nn.Module, train_data: Dataset, test_data: Dataset, layers: Any,
                 sizes: Sequence[int] = (50, 100, 200), attack: str = "fgsm", eps: float = 0.3,
                 repeats: int = 3, richness: str = "total", criterion: str = "idc", seed: int = 0,
                 batch_size: int = 128, device: str | torch.device = "cpu", c: float = 1.0,
                 alpha: float | None = None, steps: int = 20, **meter_options: Any) -> pd.DataFrame:
    """Output impartiality (Pielou evenness of predictions) against coverage over test subsets (RQ4).

    Subsets of every size are drawn (seeded, ``repeats`` each) from the clean test set and from
    its adversarial version (``attack``, ``eps``, and ``c``, ``alpha``, ``steps`` as in
    :func:`adversarial`); each gets its coverage and the evenness of its predicted classes.
    Repeat r uses the first ``size`` inputs of one seeded permutation, the same for the clean and
    the adversarial set and for every size. Pearson's r over all subsets is in the column
    ``pearson_r`` (NaN with fewer than 3 subsets or a constant column).

    Returns:
        rows ``study, kind ("clean" | "adversarial"), size, repeat, coverage, evenness,
        accuracy, pearson_r``.
    """
    check_attack(attack, eps, c, alpha, steps)
    if richness not in ("total", "observed"):
        raise ValueError(f"richness={richness!r}: use 'total' (all classes) or 'observed' (the classes "
                         "predicted)")
    x, y = stack(test_data)
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or not 0 < s <= len(x)]
    if bad:
        raise ValueError(f"subset sizes {bad} do not fit a test set of {len(x)} inputs; give sizes from 1 to "
                         f"{len(x)}")
    meter = CoverageMeter(model, train_data, layers, criterion, seed=seed, batch_size=batch_size,
                          device=device, **meter_options)
    adv = _attack_on_model_device(model, x, y, attack, eps, batch_size, c, alpha, steps, seed)
    sets = {"clean": meter.acts(x), "adversarial": meter.acts(adv)}
    with torch.no_grad():
        dev = model_device(model)
        classes = int(model.eval()(x[:1].to(dev)).shape[1])
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(x), generator=g) for _ in range(int(repeats))]
    rows = []
    for kind, size, r in itertools.product(sets, sizes, range(int(repeats))):
        acts, preds = sets[kind]
        idx = orders[r][: int(size)]
        rows.append({"study": "impartiality", "kind": kind, "size": int(size), "repeat": r,
                     "coverage": meter.value(acts, preds, idx),
                     "evenness": pielou(preds[idx], classes, richness),
                     "accuracy": float((preds[idx] == y[idx]).float().mean())})
    table = pd.DataFrame(rows)
    table["pearson_r"] = pearson(table["coverage"].tolist(), table["evenness"].tolist())
    return table


def plot_study(table: pd.DataFrame, ax: Any = None) -> Any:
    """The figure of a ``coverage_study`` table (whichever study made it); returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.2), layout="constrained")
    study = str(table["study"].iloc[0]) if len(table) else ""
    if study == "pruning":
        for selection, style in (("important", "o-"), ("random", "s--")):
            part = table[table["selection"] == selection].groupby("n_units")["accuracy_drop"]
            ax.errorbar(part.mean().index, part.mean(), yerr=part.std().fillna(0), fmt=style, label=selection)
        ax.set_xlabel("units zeroed")
        ax.set_ylabel("accuracy drop")
    elif study == "noise":
        part = table.groupby("selection")["coverage_change"]
        ax.bar(list(part.mean().index), part.mean(), yerr=part.std().fillna(0), color="tab:orange")
        ax.set_ylabel("coverage change")
    elif study == "adversarial":
        ax.plot(table["fraction"] * 100, table["normalised_change"], "o-")
        ax.set_xlabel("adversarial inputs (% of the test set)")
        ax.set_ylabel("normalised coverage change")
    elif study == "impartiality":
        for kind, marker in (("clean", "o"), ("adversarial", "x")):
            part = table[table["kind"] == kind]
            ax.scatter(part["coverage"], part["evenness"], marker=marker, label=kind)
        ax.set_xlabel("coverage")
        ax.set_ylabel("Pielou evenness")
        ax.set_title(f"Pearson r = {float(table['pearson_r'].iloc[0]):.3f}", fontsize=9)
    if study in ("pruning", "impartiality"):
        ax.legend(fontsize=8)
    fig.suptitle(f"coverage study: {study}")
    return fig
