"""Multinomial logistic regression in torch with scikit-learn's L2 objective, fitted by L-BFGS.

The objective is exactly the one ``sklearn.linear_model.LogisticRegression(C=C, solver="lbfgs")``
minimises for more than two classes (``penalty="l2"``, ``fit_intercept=True``, no sample weights)::

    f(W, b) = mean_i CE(softmax(W x_i + b), y_i) + ||W||² / (2 · C · n)

with ``W`` of shape ``(classes, features)`` (sklearn's ``coef_``), ``b`` of shape ``(classes,)``
(``intercept_``, not penalised) and ``n`` training samples. Features are used as given (no
standardisation, as in phd-lab's probes), so results depend on the feature scale.

The loss and its gradient are computed in closed form (no autograd graph), and
``torch.optim.LBFGS`` with a strong-Wolfe line search minimises it. A fit that stops at
``max_iter`` is reported with ``converged=False``, never silently.

Example:
    >>> import torch
    >>> from unitscope.stats.logreg import fit_logreg, predict
    >>> _ = torch.manual_seed(0)
    >>> y = torch.arange(60) % 3
    >>> x = torch.nn.functional.one_hot(y, 3).float() + 0.01 * torch.randn(60, 3)
    >>> res = fit_logreg(x, y)
    >>> res.converged, bool((predict(x, res.weight, res.bias) == y).all())
    (True, True)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LogRegResult", "accuracy", "check_fit_options", "fit_logreg", "fit_logreg_many", "objective",
           "predict"]


@dataclass
class LogRegResult:
    """A fitted probe.

    Attributes:
        weight: ``(classes, features)``, like sklearn's ``coef_``.
        bias: ``(classes,)``, like sklearn's ``intercept_``.
        objective: the objective value at the solution (see :func:`objective`).
        converged: ``True`` when L-BFGS stopped on a tolerance before ``max_iter``.
        n_iter: L-BFGS iterations taken.
        grad_max: the largest absolute gradient entry at the solution (raw feature coordinates).
        stop: why the fit ended: ``"gradient"`` (the largest gradient entry in the fitting
            coordinates is below ``tol``), ``"no change"`` (the objective or the step stopped
            changing first: in float32 often at the resolution of float32, with ``grad_max``
            above ``tol``) or ``"max_iter"`` (``converged`` is False); ``""`` when unknown (a
            probe cached by an older version).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    objective: float
    converged: bool
    n_iter: int
    grad_max: float
    stop: str = ""


def _as_xy(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
           device: str | torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.dim() != 2:
        raise ValueError(f"features must be 2-D (samples, features), got shape {tuple(x.shape)}; "
                         "flatten them first, e.g. x.reshape(len(x), -1)")
    if y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"labels must be 1-D with one label per sample: {len(x)} samples but labels "
                         f"of shape {tuple(y.shape)}")
    if len(x) == 0:
        raise ValueError("cannot fit a probe on zero samples")
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.float32
    return x.to(device=device, dtype=dtype), y.to(device=x.device if device is None else device).long()


_CLASS_PAD = 16


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ wᵀ + b`` for ``P`` problems: ``x (P, n, d)``, ``w (P, k, d)``, ``b (P, k)`` -> ``(P, n, k)``.

    On the CPU the class count is padded with zero rows to a multiple of 16 for the product and
    the padding is sliced off (a view): MKL's float32 kernel forms 10 output columns at about
    half the speed of 16 (1437×1024 features: 1.63 ms against 0.81 ms for two probes, 2
    threads), and this product is two thirds of each evaluation. The logits are the same sums,
    only the kernel differs.
    """
    k = w.shape[1]
    padded = -(-k // _CLASS_PAD) * _CLASS_PAD
    if padded == k or x.device.type != "cpu":
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    wp = w.new_zeros(w.shape[0], padded, w.shape[2])
    wp[:, :k] = w
    bp = b.new_zeros(b.shape[0], 1, padded)
    bp[:, 0, :k] = b
    return torch.baddbmm(bp, x, wp.transpose(1, 2))[:, :, :k]


def _loss_grad(x: torch.Tensor, onehot: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
               lam: float, grad: bool = True, penalty: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Objectives (and gradients) of ``P`` problems that share ``n``: one value per problem.

    Shapes: ``x (P, n, d)``, ``onehot (n, k)``, ``w (P, k, d)``, ``b (P, k)``; ``penalty`` weighs
    each feature's squared weights (``(P, 1, d)``, default 1). Returns ``loss (P,)``,
    ``grad_w (P, k, d)`` and ``grad_b (P, k)``.
    """
    n = x.shape[1]
    z = _logits(x, w, b)
    lse = torch.logsumexp(z, dim=2, keepdim=True)
    wq = w if penalty is None else w * penalty
    loss = (lse.sum((1, 2)) - (z * onehot).sum((1, 2))) / n + 0.5 * lam * (w * wq).sum((1, 2))
    if not grad:
        return loss, None, None
    r = torch.exp(z - lse).sub_(onehot).div_(n)
    gw = torch.baddbmm(wq, r.transpose(1, 2), x, beta=lam)
    return loss, gw, r.sum(1)


def objective(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              C: float = 1.0) -> float:
    """Mean cross-entropy plus ``||weight||² / (2·C·n)`` — sklearn's lbfgs objective.

    Args:
        x: features ``(n, d)``.
        y: integer labels ``(n,)`` in ``[0, classes)``.
        weight: ``(classes, d)`` (sklearn's ``coef_`` works as is).
        bias: ``(classes,)`` (sklearn's ``intercept_``).
        C: inverse regularisation strength, as in sklearn.

    Example:
        >>> import torch
        >>> round(objective(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), torch.zeros(2, 2),
        ...                 torch.zeros(2)), 6)  # log(2)
        0.693147
    """
    w = torch.as_tensor(weight)
    dtype = w.dtype if w.is_floating_point() else torch.float64
    x, y = _as_xy(x, y, dtype, None)
    w = w.to(x.device, dtype)
    b = torch.as_tensor(bias).to(x.device, dtype)
    onehot = torch.nn.functional.one_hot(y, w.shape[0]).to(dtype)
    loss, _, _ = _loss_grad(x[None], onehot, w[None], b[None], 1.0 / (C * len(x)), grad=False)
    return float(loss[0])


def predict(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The predicted class of each row of ``x``: ``argmax(x @ weight.T + bias)``."""
    x = torch.as_tensor(x)
    w = weight.to(x.device)
    xx = x.to(w.dtype) if x.dtype != w.dtype else x
    return torch.addmm(bias.to(x.device, w.dtype), xx, w.T).argmax(1)


def accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """The fraction of rows of ``x`` whose predicted class equals ``y``."""
    return float((predict(x, weight, bias).cpu() == torch.as_tensor(y).cpu()).double().mean())


def check_fit_options(C: float, max_iter: int, tol: float) -> tuple[float, int, float]:
    """``(C, max_iter, tol)`` as plain numbers, or ``ValueError`` naming the option and its fix.

    One-element tensors and arrays (``torch.logspace`` sweeps) become Python numbers, and a whole
    float ``max_iter`` (``1e3``) an int. Shared by :func:`fit_logreg_many` and
    :func:`unitscope.analyses.probes.check_options`, which runs it before any feature is extracted.
    """
    C, max_iter, tol = (_plain(v) for v in (C, max_iter, tol))
    if isinstance(C, bool) or not isinstance(C, numbers.Real) or not (math.isfinite(C) and C > 0):
        raise ValueError(f"C={C!r}: C is the inverse L2 strength and must be a positive finite number, "
                         "e.g. C=1.0 (smaller C, stronger regularisation)")
    if isinstance(max_iter, float) and max_iter.is_integer():
        max_iter = int(max_iter)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r}: give a positive integer, e.g. max_iter=1000")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol={tol!r}: give a gradient tolerance >= 0, e.g. tol=1e-6")
    return float(C), int(max_iter), float(tol)


def _plain(value: object) -> object:
    """A one-element tensor or array as its Python number; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if type(value).__module__ == "numpy" and getattr(value, "size", 0) == 1:
        return value.item()  # type: ignore[attr-defined]
    return value


def fit_logreg(x: torch.Tensor, y: torch.Tensor, C: float = 1.0, *, num_classes: int | None = None,
               dtype: torch.dtype = torch.float32, max_iter: int = 1000, tol: float = 1e-6,
               history_size: int = 20, precondition: bool = True,
               device: str | torch.device | None = None) -> LogRegResult:
    """Fit a multinomial logistic regression probe by minimising :func:`objective` with L-BFGS.

    Args:
        x: features ``(n, d)`` (any float dtype; cast to ``dtype``).
        y: integer labels ``(n,)``.
        C: inverse regularisation strength (sklearn's ``C``); must be > 0.
        num_classes: number of classes (default ``y.max() + 1``). Always multinomial, also
            for two classes (sklearn fits a single binomial vector there, a different objective).
        dtype: ``torch.float32`` (default, fast) or ``torch.float64`` (tighter agreement).
        max_iter: L-BFGS iterations at most; reaching it gives ``converged=False``.
        tol: stop when the largest absolute gradient entry falls below this.
        history_size: L-BFGS memory.
        precondition: fit in centred, scaled coordinates (``(x - mean) / sqrt(var + 1/(C·n))``)
            and map the solution back. This is an exact change of variables: the objective and
            its minimiser are those of the raw features (the penalty is rescaled to match), only
            the conditioning improves, so L-BFGS needs far fewer iterations. ``tol`` applies to
            the gradient in these coordinates; ``grad_max`` reports the raw-coordinate gradient.
        device: where to fit (default: where ``x`` is).

    Returns:
        A :class:`LogRegResult`; weight and bias are in ``dtype`` on the fitting device.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0]]); y = torch.tensor([0, 0, 1, 1])
        >>> r = fit_logreg(x, y, dtype=torch.float64)
        >>> r.weight.shape, r.converged
        (torch.Size([2, 1]), True)
    """
    return fit_logreg_many([x], y, C, num_classes=num_classes, dtype=dtype, max_iter=max_iter, tol=tol,
                           history_size=history_size, precondition=precondition, device=device)[0]


def fit_logreg_many(xs: Sequence[torch.Tensor], y: torch.Tensor, C: float = 1.0, *,
                    num_classes: int | None = None, dtype: torch.dtype = torch.float32,
                    max_iter: int = 1000, tol: float = 1e-6, history_size: int = 20,
                    precondition: bool = True,
                    device: str | torch.device | None = None) -> list[LogRegResult]:
    """Fit one probe per feature matrix of ``xs`` (same samples and labels), all in one L-BFGS run.

    Probes whose features have the same width (the positions of pixelwise probes, layers of equal
    width) are fitted in one L-BFGS run, their objectives and gradients evaluated as one batched
    matrix product. The probes are independent, so the minimiser of the sum of their objectives is
    the tuple of their minimisers, and the gradient of the sum is their gradients side by side:
    stopping when its largest entry is below ``tol`` stops every probe on the criterion of
    :func:`fit_logreg`. One run costs one line search and one set of dispatches per iteration for
    all its probes instead of one per probe. Probes of different widths get separate runs, as their
    curvatures differ too much for one shared step length to suit them all.

    Args:
        xs: feature matrices ``(n, d_i)``, one per probe (the widths may differ).
        y: the labels ``(n,)`` every probe is fitted on.
        C, num_classes, dtype, max_iter, tol, history_size, precondition, device: as in
            :func:`fit_logreg`; ``n_iter`` and ``converged`` are those of the probe's joint run.

    Returns:
        One :class:`LogRegResult` per matrix of ``xs``, in order.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> y = torch.arange(90) % 3
        >>> onehot = torch.nn.functional.one_hot(y, 3).float()
        >>> xs = [onehot + 0.1 * torch.randn(90, 3), torch.cat([onehot, torch.randn(90, 5)], 1)]
        >>> [(r.weight.shape[1], r.converged) for r in fit_logreg_many(xs, y)]
        [(3, True), (8, True)]
    """
    C, max_iter, tol = check_fit_options(C, max_iter, tol)
    if not xs:
        raise ValueError("fit_logreg_many needs at least one feature matrix")
    pairs = [_as_xy(x, y, dtype, device) for x in xs]
    y = pairs[0][1]
    n = len(y)
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise ValueError(f"labels must lie in [0, {k}); got range [{int(y.min())}, {int(y.max())}]")
    if k < 2:
        raise ValueError("a probe needs at least two classes; the labels hold only one")
    onehot = torch.nn.functional.one_hot(y, k).to(dtype)
    lam = 1.0 / (C * n)
    groups: dict[int, list[int]] = {}
    for i, (x, _) in enumerate(pairs):
        groups.setdefault(x.shape[1], []).append(i)
    results: list[LogRegResult | None] = [None] * len(pairs)
    for members in groups.values():
        fitted = _fit_batch(torch.stack([pairs[i][0] for i in members]), onehot, lam, dtype, max_iter, tol,
                            history_size, precondition)
        for i, res in zip(members, fitted):
            results[i] = res
    return [r for r in results if r is not None]


def _fit_batch(x: torch.Tensor, onehot: torch.Tensor, lam: float, dtype: torch.dtype, max_iter: int,
               tol: float, history_size: int, precondition: bool) -> list[LogRegResult]:
    """One L-BFGS run over ``P`` probes of equal width: ``x`` is ``(P, n, d)``."""
    k, d = onehot.shape[1], x.shape[2]
    if precondition:
        # exact change of variables: xc = (x - mu) / s, v = w * s, b' = b + w @ mu; the objective
        # (penalty ||v / s||²) and its minimiser are unchanged, only the conditioning improves
        mu = x.mean(1, keepdim=True)
        s = (x.var(1, unbiased=False, keepdim=True) + lam).sqrt_()
        x_fit, q = (x - mu).div_(s), s.reciprocal().square_()
    else:
        x_fit, q = x, None
    theta = torch.zeros(x.shape[0], k, d + 1, dtype=dtype, device=x.device, requires_grad=True)

    def closure() -> torch.Tensor:
        with torch.no_grad():
            loss, gw, gb = _loss_grad(x_fit, onehot, theta[:, :, :d], theta[:, :, d], lam, penalty=q)
            theta.grad = torch.cat([gw, gb.unsqueeze(2)], dim=2)
        # summed in float64: a float32 sum would hide the small changes of each probe's objective
        # from L-BFGS's tolerance_change test and stop it early
        return loss.double().sum()

    max_eval = int(max_iter * 1.25) + 1
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tol,
                            tolerance_change=1e-12 if dtype == torch.float64 else 1e-9,
                            history_size=history_size, line_search_fn="strong_wolfe")
    opt.step(closure)
    n_iter = int(opt.state[theta].get("n_iter", 0))
    evals = int(opt.state[theta].get("func_evals", 0))
    converged = n_iter < max_iter and evals < max_eval
    with torch.no_grad():
        _, gw, gb = _loss_grad(x_fit, onehot, theta[:, :, :d], theta[:, :, d], lam, penalty=q)
        stationary = torch.maximum(gw.abs().amax((1, 2)), gb.abs().amax(1)) <= tol  # the fitting coordinates
        w = theta[:, :, :d].detach().clone()
        b = theta[:, :, d].detach().clone()
        if precondition:
            w.div_(s)
            b -= torch.bmm(w, mu.transpose(1, 2)).squeeze(2)
        loss, gw, gb = _loss_grad(x, onehot, w, b, lam)
        gmax = torch.maximum(gw.abs().amax((1, 2)), gb.abs().amax(1))
    stops = ["max_iter" if not converged else "gradient" if bool(ok) else "no change" for ok in stationary]
    return [LogRegResult(weight=w[j].clone(), bias=b[j].clone(), objective=float(loss[j]),
                         converged=converged, n_iter=n_iter, grad_max=float(gmax[j]), stop=stops[j])
            for j in range(x.shape[0])]
