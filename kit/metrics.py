"""Dice as the competition scores it, accumulated over batches or strips and computed once.

Dice = 2|X∩Y| / (|X| + |Y|), and 1 when both masks are empty. The accumulators sum the three
counts (intersection, predicted, true pixels) in int64 — whole slides exceed 2**31 pixels — and
`compute()` divides once: the mean of per-batch Dice is a different, biased number.

    score = DiceScore()
    for prob, mask in batches:
        score.update(prob > 0.5, mask)
    score.compute()

Tensors are counted on their device and copied to the host once, in ``compute``: a copy per batch
makes the CPU wait for the GPU at every batch. `Mean` does the same for a loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

Array = np.ndarray | torch.Tensor

# Elements per numpy chunk (16 Mi): whole-slide masks hold over 10**9 pixels.
_CHUNK = 1 << 24


def dice(pred: Array, target: Array) -> float:
    """Dice of two binary masks (nonzero = foreground); 1.0 when both are empty.

    Shape:
        - pred, target: any shape, equal ((N, 1, h, w) against (N, h, w) is accepted).
    """
    return dice_from_counts(*binary_counts(pred, target))


def binary_counts(pred: Array, target: Array, chunk: int = _CHUNK) -> tuple[int, int, int]:
    """(intersection, pred sum, target sum) of two binary masks, nonzero = foreground.

    Floating-point masks must hold only 0 and 1, so that probabilities passed by mistake are
    refused rather than counted as foreground. numpy masks are counted ``chunk`` elements (rows
    of them) at a time, which bounds the temporaries; the counts do not depend on it.
    """
    pred, target = _match(pred, target)
    if isinstance(pred, torch.Tensor):
        return _checked(_tensor_counts(pred, target).tolist())
    counts = []
    for p, t in _chunks(pred, target, chunk):
        for name, a in (("pred", p), ("target", t)):
            if _is_float(a) and bool(((a != 0) & (a != 1)).any()):
                raise ValueError(_NOT_BINARY.format(name))
        p, t = p != 0, t != 0
        counts.append([_count(p & t), _count(p), _count(t)])
    return tuple(_total(counts).tolist())


_NOT_BINARY = (
    "{} holds values other than 0 and 1: threshold probabilities first (prob > t), or use "
    "ThresholdSweep"
)


class DiceScore:
    """Dice over everything seen: accumulates the three counts, divides once in `compute`.

    Masks may be numpy arrays or torch tensors (on any device), bool/int, or float of 0/1.
    Tensors are counted on their device and read once, by `compute` (or `stats`): a float tensor
    holding other values than 0 and 1 is refused there, not in `update`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen."""
        self._host = np.zeros(3, dtype=np.int64)
        self._device: torch.Tensor | None = None  # of tensor batches, see `_tensor_counts`

    def update(self, pred: Array, target: Array) -> None:
        """Add a batch of binary masks (nonzero = foreground), any shape, pred and target equal."""
        pred, target = _match(pred, target)
        if not isinstance(pred, torch.Tensor):
            self._host += np.asarray(binary_counts(pred, target), dtype=np.int64)
        elif self._device is None:
            self._device = _tensor_counts(pred, target)
        else:
            self._device += _tensor_counts(pred, target).to(self._device.device)

    @property
    def stats(self) -> np.ndarray:
        """int64 (3,): intersection, predicted and true pixels of everything seen."""
        if self._device is not None:
            counts = _checked(self._device.tolist())  # the one copy from the device
            self._host += np.asarray(counts, dtype=np.int64)
            self._device = None
        return self._host

    def compute(self) -> float:
        """Dice of all masks seen; 1.0 when nothing (or nothing but empty masks) was seen."""
        return dice_from_counts(*self.stats.tolist())


class Mean:
    """Weighted mean of scalars, such as the loss of each batch: summed, then divided once.

    Tensors are summed on their device and read once, by `compute`; ``loss.item()`` at every
    step would make the CPU wait for the GPU at every step.

        loss_mean = Mean()
        for images, masks in loader:
            loss_mean.update(criterion(model(images), masks), len(images))
        loss_mean.compute()
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen."""
        self.total: float | torch.Tensor = 0.0  # sum of value * weight
        self.weight = 0.0

    def update(self, value: float | torch.Tensor, weight: float = 1.0) -> None:
        """Add ``value`` (a number or a one-element tensor, on any device) with ``weight``."""
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self.total = self.total + value * weight
        self.weight += weight

    def compute(self) -> float:
        """The weighted mean of all values seen; NaN when nothing was seen."""
        return float(self.total) / self.weight if self.weight else math.nan


class ThresholdSweep:
    """Dice at several thresholds over everything seen, masks taken as ``prob > t`` (strict).

    Args:
        thresholds: distinct finite thresholds, stored sorted.
        chunk: numpy inputs are counted about this many elements at a time (as `binary_counts`).
    """

    def __init__(self, thresholds: Iterable[float], chunk: int = _CHUNK) -> None:
        self.chunk = chunk
        values = [float(t) for t in thresholds]
        if not values or not all(math.isfinite(t) for t in values):
            raise ValueError(f"thresholds must be a non-empty list of finite numbers: {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"thresholds must be distinct: {values}")
        self.thresholds = sorted(values)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen."""
        # Per threshold: intersection, pred sum; the target sum is shared.
        self.intersection = np.zeros(len(self.thresholds), dtype=np.int64)
        self.pred_sum = np.zeros(len(self.thresholds), dtype=np.int64)
        self.target_sum = 0

    def update(self, prob: Array, target: Array) -> None:
        """Add probabilities (float, any shape) and their binary target (nonzero = foreground)."""
        prob, target = _match(prob, target)
        counts = []  # per chunk: target sum, then intersection and pred sum per threshold
        for p, t in _chunks(prob, target, self.chunk):
            t = t != 0
            row = [_count(t)]
            for th in self.thresholds:
                hit = p > th
                row += [_count(hit & t), _count(hit)]
            counts.append(row)
        total = _total(counts)
        self.target_sum += int(total[0])
        self.intersection += total[1::2]
        self.pred_sum += total[2::2]

    def compute(self) -> dict[float, float]:
        """Dice per threshold, in increasing threshold order."""
        return {
            th: dice_from_counts(int(i), int(p), self.target_sum)
            for th, i, p in zip(self.thresholds, self.intersection, self.pred_sum, strict=True)
        }

    def best(self) -> tuple[float, float]:
        """(threshold, Dice) of the highest Dice; ties go to the one nearest 0.5, then the lower."""
        scores = self.compute()
        return max(scores.items(), key=lambda item: (item[1], -abs(item[0] - 0.5)))


def _tensor_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """int64 (5,) on the masks' device: intersection, pred sum, target sum, then how many values
    of a float ``pred`` and ``target`` are neither 0 nor 1 (0 for other dtypes), for `_checked`.
    """
    invalid = [
        ((a != 0) & (a != 1)).sum() if a.is_floating_point() else a.new_zeros((), dtype=torch.long)
        for a in (pred, target)
    ]
    p, t = pred != 0, target != 0
    return torch.stack([(p & t).sum(), p.sum(), t.sum(), *invalid])


def _checked(counts: list[int]) -> tuple[int, int, int]:
    """The Dice counts of `_tensor_counts`, once its last two say the masks were binary."""
    for name, invalid in zip(("pred", "target"), counts[3:], strict=True):
        if invalid:
            raise ValueError(_NOT_BINARY.format(name))
    return tuple(counts[:3])


def dice_from_counts(intersection: int, pred_sum: int, target_sum: int) -> float:
    """Dice from the three counts (`binary_counts`): 2 I / (P + T), 1.0 when both are 0.

    Counts of several processes summed first give the Dice of all they saw, exactly.
    """
    total = pred_sum + target_sum
    return 1.0 if total == 0 else 2.0 * intersection / total


def _match(pred: Array, target: Array) -> tuple[Array, Array]:
    """`pred`, `target` of one library and one shape; a singleton channel axis 1 may be dropped."""
    if isinstance(pred, torch.Tensor) != isinstance(target, torch.Tensor):
        # Mixed inputs: move the numpy side to the tensor's device (targets are the small ones).
        if isinstance(pred, torch.Tensor):
            target = torch.as_tensor(np.asarray(target), device=pred.device)
        else:
            pred = torch.as_tensor(np.asarray(pred), device=target.device)
    elif not isinstance(pred, torch.Tensor):
        pred, target = np.asarray(pred), np.asarray(target)
    if pred.ndim == target.ndim + 1 and pred.ndim >= 2 and pred.shape[1] == 1:
        pred = pred[:, 0]
    elif target.ndim == pred.ndim + 1 and target.ndim >= 2 and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return pred, target


def _chunks(a: Array, b: Array, chunk: int) -> Iterable[tuple[Array, Array]]:
    """Aligned pieces of two equal-shape numpy arrays, ~``chunk`` elements each (tensors whole).

    Chunks bound the temporary boolean arrays made from whole-slide masks.
    """
    if isinstance(a, torch.Tensor) or a.ndim == 0 or a.size <= chunk:
        yield a, b
        return
    step = max(1, chunk // max(1, a[0].size))
    for start in range(0, a.shape[0], step):
        yield a[start : start + step], b[start : start + step]


def _count(mask: Array) -> Array:
    """Foreground count of a boolean mask: a Python int, or an int64 tensor left on its device."""
    return mask.sum() if isinstance(mask, torch.Tensor) else np.count_nonzero(mask)


def _total(counts: list[list[Array]]) -> np.ndarray:
    """Column sums of per-chunk counts as int64, with one device-to-host copy for tensors."""
    if isinstance(counts[0][0], torch.Tensor):
        return torch.stack([torch.stack(row) for row in counts]).sum(0).cpu().numpy()
    return np.asarray(counts, dtype=np.int64).sum(0)


def _is_float(a: Array) -> bool:
    if isinstance(a, torch.Tensor):
        return a.is_floating_point()
    return np.issubdtype(a.dtype, np.floating)
