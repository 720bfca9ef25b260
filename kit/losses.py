"""Training losses for binary segmentation on logits: soft Dice, BCE + Dice, the Lovász hinge.

The maths lives in plain functions; `BCEDiceLoss` is a thin ``nn.Module`` holding the weights of
BCE, soft Dice and (optionally, as the 1st place of the competition) the Lovász hinge. Dice is
computed over the whole batch by default (one sum over samples and pixels): tiles with no
glomerulus then neither dominate the loss nor make it undefined.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_score(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1.0,
    eps: float = 1e-7,
    dims: Sequence[int] | None = None,
) -> torch.Tensor:
    """Soft Dice ``(2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)``.

    Args:
        probs: probabilities in [0, 1].
        target: same shape, 0/1 (or soft) labels, float.
        smooth: added to numerator and denominator; 1.0 makes an empty target met by an empty
            prediction score 1 rather than 0/0.
        eps: lower bound of the denominator, so ``smooth=0`` on empty inputs gives 0, not NaN.
        dims: dimensions summed over; None sums over everything (one score for the batch).

    Shape:
        - probs, target: any shape, equal.
        - Output: scalar when ``dims`` is None, else `probs`' shape without ``dims``.
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} differ")
    dims = tuple(range(probs.ndim)) if dims is None else tuple(dims)
    intersection = (probs * target).sum(dims)
    cardinality = probs.sum(dims) + target.sum(dims)
    return (2.0 * intersection + smooth) / (cardinality + smooth).clamp_min(eps)


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1.0,
    eps: float = 1e-7,
    dims: Sequence[int] | None = None,
) -> torch.Tensor:
    """``1 - soft Dice`` of ``sigmoid(logits)`` against `target`, meaned over what `dims` leaves.

    Args:
        logits: raw model outputs, any float dtype (computed in float32).
        target: 0/1 mask, float, uint8 or bool.
        smooth, eps: see `soft_dice_score`.
        dims: dimensions summed over; None (default) pools the whole batch; ``(1, 2, 3)`` gives
            one Dice per sample, then their mean.

    Shape:
        - logits: (N, 1, h, w).
        - target: (N, 1, h, w) or (N, h, w).
        - Output: scalar.
    """
    logits, target = _prepare(logits, target)
    return (
        1.0
        - soft_dice_score(torch.sigmoid(logits), target, smooth=smooth, eps=eps, dims=dims).mean()
    )


def bce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 0.8,
    dice_weight: float = 0.2,
    *,
    smooth: float = 1.0,
) -> torch.Tensor:
    """``bce_weight * BCE + dice_weight * Dice loss``: BCE averaged over pixels, Dice batch-wise.

    Args:
        logits: raw model outputs, any float dtype (computed in float32).
        target: 0/1 mask, float, uint8 or bool.
        bce_weight, dice_weight: non-negative weights of the two terms.
        smooth: Dice smoothing, see `soft_dice_score`.

    Shape:
        - logits: (N, 1, h, w).
        - target: (N, 1, h, w) or (N, h, w).
        - Output: scalar.
    """
    if bce_weight < 0 or dice_weight < 0:
        raise ValueError(f"loss weights must be >= 0, got bce={bce_weight}, dice={dice_weight}")
    logits, target = _prepare(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = 1.0 - soft_dice_score(torch.sigmoid(logits), target, smooth=smooth)
    return bce_weight * bce + dice_weight * dice


def lovasz_hinge(
    logits: torch.Tensor, target: torch.Tensor, per_image: bool = True, skip_empty: bool = False
) -> torch.Tensor:
    """The Lovász hinge (Berman et al., 2018): a convex surrogate of the Jaccard loss.

    Hinge errors ``1 - logit * sign`` (sign +1 on foreground, -1 on background) sorted in
    decreasing order, weighted by the Lovász extension's gradient of the Jaccard loss at that
    order: ``sum_i relu(error_i) * g_i`` with ``g_i = J(i) - J(i - 1)``, ``J(i)`` the Jaccard loss
    when the i largest errors are the mistakes.

    Args:
        logits: raw model outputs (computed in float32).
        target: 0/1 mask, float, uint8 or bool.
        per_image: one loss per sample, then their mean; False: the batch as one image.
        skip_empty: per image only: the mean over the images with foreground (0 when none has
            any). An empty image's hinge is ``relu(1 + max logit)``: its gradient falls on one
            pixel, and the term stays near 1 for any realistic model, so on tiles that are mostly
            background it swamps the loss (the competition's 1st place applied the Lovász hinge
            to non-empty tiles only).

    Shape:
        - logits: (N, 1, h, w).
        - target: (N, 1, h, w) or (N, h, w).
        - Output: scalar.
    """
    logits, target = _prepare(logits, target)
    if not per_image:
        return _lovasz_flat(logits.flatten(), target.flatten())
    losses = [_lovasz_flat(lg.flatten(), t.flatten()) for lg, t in zip(logits, target, strict=True)]
    losses = torch.stack(losses)
    if not skip_empty:
        return losses.mean()
    kept = (target.flatten(1).amax(1) > 0).to(losses.dtype)  # no host sync: a weighted mean
    return (losses * kept).sum() / kept.sum().clamp(min=1.0)


def _lovasz_flat(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Lovász hinge of one image, (P,) logits and (P,) 0/1 labels."""
    errors = 1.0 - logits * (2.0 * labels - 1.0)
    errors, order = torch.sort(errors, descending=True)
    return torch.dot(F.relu(errors), _jaccard_gradient(labels[order]))


def _jaccard_gradient(sorted_labels: torch.Tensor) -> torch.Tensor:
    """``J(i) - J(i - 1)`` for the labels sorted by decreasing error (J(0) = 0)."""
    positives = sorted_labels.sum()
    intersection = positives - sorted_labels.cumsum(0)
    union = positives + (1.0 - sorted_labels).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


class BCEDiceLoss(nn.Module):
    """`bce_dice_loss` as a module, plus ``lovasz_weight *`` `lovasz_hinge` (per image, over the
    images with foreground: ``skip_empty``).

    Shape:
        - logits: (N, 1, h, w).
        - target: (N, 1, h, w) or (N, h, w), float, uint8 or bool 0/1.
        - Output: scalar.
    """

    def __init__(
        self,
        bce_weight: float = 0.8,
        dice_weight: float = 0.2,
        smooth: float = 1.0,
        lovasz_weight: float = 0.0,
    ):
        super().__init__()
        if min(bce_weight, dice_weight, lovasz_weight) < 0:
            raise ValueError(
                f"loss weights must be >= 0, got bce={bce_weight}, dice={dice_weight}, "
                f"lovasz={lovasz_weight}"
            )
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth
        self.lovasz_weight = lovasz_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = bce_dice_loss(logits, target, self.bce_weight, self.dice_weight, smooth=self.smooth)
        if self.lovasz_weight:
            loss = loss + self.lovasz_weight * lovasz_hinge(logits, target, skip_empty=True)
        return loss

    def extra_repr(self) -> str:
        return (
            f"bce_weight={self.bce_weight}, dice_weight={self.dice_weight}, "
            f"smooth={self.smooth}, lovasz_weight={self.lovasz_weight}"
        )


def _prepare(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits and a float32 target of the same shape (a missing channel axis is added)."""
    if target.ndim == logits.ndim - 1 and logits.ndim >= 2 and logits.shape[1] == 1:
        target = target.unsqueeze(1)
    if logits.shape != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match; "
            "expected (N, 1, h, w) logits with (N, 1, h, w) or (N, h, w) target"
        )
    # Under autocast logits may be float16: sums over a batch of pixels need float32.
    return logits.float(), target.float()
