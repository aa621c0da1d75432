"""Training with per-epoch checkpoints, exact resume, metrics and callbacks.

``train(model, train_data, test_data, epochs=..., checkpoint_dir=...)`` writes
``epoch-NNN.pt`` after every epoch (model, optimiser, scheduler, metrics, RNG state). Called
again with the same directory it resumes after the last finished epoch, and a finished training
is not repeated. The order of batches in epoch ``e`` depends only on ``(seed, e)``, so a resumed
training ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .engine import resolve_device
from .models.modes import preserved
from .stats.classification import accuracy, confusion_matrix, matthews_corrcoef

log = logging.getLogger(__name__)

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
SCHEDULERS = ("none", "cosine", "step")
_CKPT = re.compile(r"epoch-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or belongs to another training."""


@dataclass
class TrainState:
    """What callbacks see: the model, the optimiser, the epoch (from 1) and the current batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int
    batch: int = 0
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None


class Callback:
    """Observe training: subclass and override what you need (the defaults do nothing)."""

    def on_epoch_start(self, state: TrainState) -> None:
        """Before the first batch of an epoch."""

    def on_batch_end(self, state: TrainState) -> None:
        """After the optimiser step of every training batch (``state.x``, ``logits``, ``loss`` set)."""

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        """After the epoch's evaluation; ``metrics`` is that epoch's row of the history."""

    def state_dict(self) -> dict[str, Any] | None:
        """What this callback has gathered so far, saved in every epoch checkpoint.

        Plain Python values (dicts, lists, numbers, strings) or tensors; ``None`` (the default)
        saves nothing. A resumed training gives it back through :meth:`load_state_dict`, so a
        callback that records every epoch keeps the epochs before the interruption.
        """
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned, when training resumes from a checkpoint."""

    def close(self) -> None:
        """When training ends or stops on an exception: release hooks and the like."""


def _batches(data: Dataset, batch_size: int, num_workers: int = 0,
             generator: torch.Generator | None = None) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=generator is not None,
                      generator=generator, num_workers=num_workers)


def _xy(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ValueError("training needs (input, label) items")
    return item[0], item[1]


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 512,
             device: str | torch.device = "auto", num_classes: int | None = None) -> dict[str, Any]:
    """Loss, accuracy, top-5 accuracy, Matthews coefficient and confusion matrix on ``data``.

    Example:
        >>> import unitscope
        >>> from unitscope.train import evaluate
        >>> m = evaluate(unitscope.load_model("digits-cnn"), unitscope.load_dataset("digits", "test"))
        >>> sorted(m)
        ['acc', 'confusion', 'loss', 'mcc', 'top5']
    """
    dev = resolve_device(device)
    confusion, top5, loss, n = None, 0, 0.0, 0
    with preserved(model):
        model.eval().to(dev)  # outside inference mode: moved parameters stay normal tensors
        with torch.inference_mode():
            for item in _batches(data, batch_size):
                x, y = _xy(item)
                x, y = x.to(dev), y.to(dev)
                logits = model(x)
                k = num_classes or logits.shape[1]
                cm = confusion_matrix(logits.argmax(1), y, k)
                confusion = cm if confusion is None else confusion + cm
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                top5 += int((top == y[:, None]).any(1).sum())
                loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                n += len(y)
    if confusion is None:
        raise ValueError("cannot evaluate on an empty dataset")
    return {"loss": loss / n, "acc": accuracy(confusion), "top5": top5 / n,
            "mcc": matthews_corrcoef(confusion), "confusion": confusion.cpu()}


def train(model: nn.Module, train_data: Dataset, test_data: Dataset | None = None, *,
          epochs: int = 5, lr: float = 1e-3, batch_size: int = 64, optimizer: str = "adam",
          momentum: float = 0.9, weight_decay: float = 0.0, scheduler: str = "none",
          seed: int = 0, device: str | torch.device = "auto", num_workers: int = 0,
          checkpoint_dir: str | Path | None = None, callbacks: Sequence[Callback] = (),
          progress: bool = False) -> list[dict[str, Any]]:
    """Train ``model`` in place with cross-entropy; return one metrics row per epoch.

    Args:
        model: the network (trained in place, left in eval mode).
        train_data, test_data: datasets of ``(input, label)`` items; test metrics need test_data.
        epochs, lr, batch_size: the usual.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        weight_decay: L2 penalty passed to the optimiser.
        scheduler: ``"none"``, ``"cosine"`` (to 0 over ``epochs``) or ``"step"`` (×0.1 at 50 % and 75 %).
        seed: seeds initialisation-free randomness (shuffling, dropout).
        checkpoint_dir: write ``epoch-NNN.pt`` there after every epoch and resume from the last.
        callbacks: :class:`Callback` objects that observe batches and epochs.
        progress: show a progress bar per epoch.

    Each row holds ``epoch``, ``lr``, ``train_loss``, ``train_acc`` and, with test data,
    ``test_loss``, ``test_acc``, ``test_top5``, ``test_mcc``.

    Example:
        >>> import unitscope
        >>> from unitscope.train import train
        >>> model = unitscope.load_model("digits-cnn")
        >>> history = train(model, unitscope.load_dataset("digits", "train"), epochs=1)
        >>> sorted(history[0])
        ['epoch', 'lr', 'train_acc', 'train_loss']
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULERS)}")
    if len(train_data) == 0:
        raise ValueError("the training set is empty")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model.to(dev)
    options = {"lr": lr, "weight_decay": weight_decay}
    if optimizer == "sgd":
        options["momentum"] = momentum
    opt = OPTIMIZERS[optimizer](model.parameters(), **options)
    sched = _scheduler(opt, scheduler, epochs)
    identity = {"optimizer": optimizer, "lr": lr, "batch_size": batch_size, "seed": seed,
                "momentum": momentum, "weight_decay": weight_decay, "scheduler": scheduler}
    history: list[dict[str, Any]] = []
    start = 1
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        start, history = _resume(ckpt_dir, model, opt, sched, identity, callbacks, epochs)
        if start > epochs:
            log.info("training in %s finished %d epochs already; not repeated", ckpt_dir, start - 1)
            model.eval()
            return history[:epochs]
    loss_fn = nn.CrossEntropyLoss()
    try:
        for epoch in range(start, epochs + 1):
            model.train()
            state = TrainState(model=model, optimizer=opt, epoch=epoch)
            for cb in callbacks:
                cb.on_epoch_start(state)
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            total_loss, correct, seen = 0.0, 0, 0
            for b, item in enumerate(_progress(_batches(train_data, batch_size, num_workers, gen),
                                               progress, f"epoch {epoch}/{epochs}")):
                x, y = _xy(item)
                x, y = x.to(dev), y.to(dev)
                opt.zero_grad()
                logits = model(x)
                loss = loss_fn(logits, y)
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
                if callbacks:
                    state.batch, state.x, state.y = b, x, y
                    state.logits, state.loss = logits.detach(), loss.detach()
                    for cb in callbacks:
                        cb.on_batch_end(state)
            row: dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"],
                                   "train_loss": total_loss / seen, "train_acc": correct / seen}
            if sched is not None:
                sched.step()
            if test_data is not None:
                m = evaluate(model, test_data, device=dev)
                row.update(test_loss=m["loss"], test_acc=m["acc"], test_top5=m["top5"], test_mcc=m["mcc"])
            history.append(row)
            log.info("epoch %d/%d: %s", epoch, epochs, ", ".join(
                f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lr")))
            model.eval()
            for cb in callbacks:
                cb.on_epoch_end(state, row)
            if ckpt_dir is not None:
                _save_checkpoint(ckpt_dir, epoch, model, opt, sched, history, identity,
                                 _callback_states(callbacks))
    finally:
        _close(callbacks)
    model.eval()
    return history


def _close(callbacks: list[Any]) -> None:
    """Call every callback's ``close`` (callbacks need not subclass :class:`Callback`), also after an
    interruption, so that no hook outlives the training; a failing close is logged, not raised."""
    for cb in callbacks:
        close = getattr(cb, "close", None)
        if close is None:
            continue
        try:
            close()
        except Exception:  # the training's own exception, if any, is the one to see
            log.exception("closing callback %s failed", type(cb).__name__)


def _scheduler(opt: torch.optim.Optimizer, name: str, epochs: int) -> Any:
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[max(1, epochs // 2), max(1, 3 * epochs // 4)], gamma=0.1)
    return None


def _progress(loader: DataLoader, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, disable=None if enabled else True, leave=False, unit="batch")


def checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``epoch-NNN.pt`` in ``directory``, by epoch."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CKPT.search(p.name))]
    return sorted(found)


def _callback_states(callbacks: Sequence[Any]) -> list[Any]:
    """Every callback's :meth:`Callback.state_dict`, checked to load back with ``weights_only=True``.

    A state that would not load (a numpy scalar, an arbitrary object) would make every later
    resume fail, so it is refused here, at the first epoch, naming the callback.
    """
    import io

    states = []
    for cb in callbacks:
        state = getattr(cb, "state_dict", lambda: None)()  # duck-typed callbacks may have none
        if state is not None:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            try:
                torch.load(buffer, weights_only=True)
            except Exception as exc:
                raise TypeError(f"{type(cb).__name__}.state_dict() returns values a checkpoint cannot "
                                f"load safely ({_first_lines(exc)}); return plain Python "
                                "values (dict, list, int, float, str) or tensors") from None
        states.append(state)
    return states


def _save_checkpoint(directory: Path, epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: Any, history: list[dict[str, Any]], identity: dict[str, Any],
                     callback_states: list[dict[str, Any] | None] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch-{epoch:03d}.pt"
    tmp = directory / f".epoch-{epoch:03d}.pt.tmp{os.getpid()}"
    torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "history": history, "identity": identity, "rng": torch.get_rng_state(),
                "callbacks": callback_states or []}, tmp)
    os.replace(tmp, path)
    return path


def _resume(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
            identity: dict[str, Any], callbacks: Sequence[Callback] = (),
            epochs: int | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Load the checkpoint to continue from: the latest, or epoch ``epochs`` when more were trained.

    The checkpoint is read and its settings compared before anything is loaded, and a load that
    fails part-way puts the model, optimiser and random state back, so a refused checkpoint
    leaves the caller's model as it was.
    """
    found = checkpoints(directory)
    if not found:
        return 1, []
    epoch, path = found[-1]
    shorter = epochs is not None and epoch > epochs  # a longer training finished here: stop at `epochs`
    if shorter:
        if epochs < 1:
            return 1, []
        wanted = dict(found).get(epochs)
        if wanted is None:
            raise CheckpointError(f"{directory} holds checkpoints up to epoch {epoch} but none of epoch "
                                  f"{epochs}; train for {epoch} epochs or use another output directory")
        epoch, path = epochs, wanted
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({_first_lines(exc)}); it was not "
                              "overwritten. Delete it to resume from the epoch before, or use another "
                              "output directory") from exc
    if not isinstance(ckpt, dict) or ckpt.get("identity") != identity:
        old = ckpt.get("identity", {}) if isinstance(ckpt, dict) else {}
        diff = sorted(k for k in identity if old.get(k) != identity[k])
        raise CheckpointError(f"the checkpoints in {directory} belong to a training with other "
                              f"settings ({', '.join(diff)} differ); use another output directory")
    if shorter and identity.get("scheduler") == "cosine" and epochs > 1:
        # a cosine schedule's length sets every epoch's rate after the first (a step schedule's does not)
        raise CheckpointError(f"{directory} holds a longer training with a cosine schedule; its epoch-"
                              f"{epochs} weights are not those of a {epochs}-epoch cosine training; use "
                              "another output directory")
    saved = ({k: v.detach().clone() for k, v in model.state_dict().items()}, opt.state_dict(),
             torch.get_rng_state(), sched.state_dict() if sched is not None else None)
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None and ckpt["scheduler"] is not None:
            sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
    except Exception as exc:
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
        torch.set_rng_state(saved[2])
        if sched is not None:
            sched.load_state_dict(saved[3])
        raise CheckpointError(f"checkpoint {path} does not fit this training ({_first_lines(exc)}); "
                              "the model was left as it was; use another output directory") from exc
    states = ckpt.get("callbacks") or []
    if len(states) == len(callbacks):  # the same callbacks, in order, as when it was saved
        for cb, cb_state in zip(callbacks, states):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
    elif any(s is not None for s in states):
        log.warning("the checkpoint %s saved %d callback states but this training has %d callbacks; "
                    "their records of the epochs before %d are not restored", path, len(states),
                    len(callbacks), epoch + 1)
    log.info("resuming from %s (epoch %d)", path, epoch)
    return epoch + 1, list(ckpt["history"])


def _first_lines(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, its non-empty lines joined, cut to 240 characters."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:240]}"
