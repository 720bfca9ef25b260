import math

import pytest
import torch
import torch.nn.functional as F

from kit.losses import BCEDiceLoss, bce_dice_loss, lovasz_hinge, soft_dice_loss, soft_dice_score

BIG = 30.0  # sigmoid(30) == 1 and sigmoid(-30) ~ 1e-13 in float32


def as_map(values, n=1):
    """(n, 1, 1, len) float tensor: a row of pixels per sample."""
    return torch.tensor(values, dtype=torch.float32).view(n, 1, 1, -1)


def test_dice_score_hand_computed():
    # 2 * |{1, 1}| / (4 + 2)
    probs, target = as_map([1, 1, 1, 1]), as_map([1, 1, 0, 0])
    assert soft_dice_score(probs, target, smooth=0.0).item() == pytest.approx(2 / 3)
    # smoothing 1: (2 * 2 + 1) / (6 + 1)
    assert soft_dice_score(probs, target, smooth=1.0).item() == pytest.approx(5 / 7)
    logits = torch.where(probs > 0, BIG, -BIG)
    assert soft_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1 / 3)


def test_dice_pools_the_batch_unless_asked_per_sample():
    # Sample 0 perfect (Dice 1); sample 1 predicts one pixel on an empty target (Dice 0).
    probs = as_map([1, 1, 1, 0], n=2)
    target = as_map([1, 1, 0, 0], n=2)
    # Batch: 2 * 2 / (3 + 2) = 0.8; per sample: mean(1, 0) = 0.5.
    assert soft_dice_score(probs, target, smooth=0.0).item() == pytest.approx(0.8)
    per_sample = soft_dice_score(probs, target, smooth=0.0, dims=(1, 2, 3))
    assert per_sample.tolist() == pytest.approx([1.0, 0.0])
    logits = torch.where(probs > 0, BIG, -BIG)
    assert soft_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.2)
    assert soft_dice_loss(logits, target, smooth=0.0, dims=(1, 2, 3)).item() == pytest.approx(0.5)


def test_empty_tile_with_confident_negative_is_nearly_free():
    logits = torch.full((2, 1, 7, 5), -BIG, requires_grad=True)
    target = torch.zeros(2, 7, 5, dtype=torch.uint8)
    loss = soft_dice_loss(logits, target)
    assert 0.0 <= loss.item() < 1e-6
    total = bce_dice_loss(logits, target)
    assert total.item() < 1e-6
    total.backward()
    assert torch.isfinite(logits.grad).all()
    # Without smoothing the empty case is 0 / eps, still finite.
    assert torch.isfinite(soft_dice_loss(logits, target, smooth=0.0))


def test_bce_dice_hand_computed():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere: BCE = ln 2 whatever the target
    target = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.uint8)
    # Dice with smoothing 1: (2 * 1 + 1) / (2 + 2 + 1) = 0.6
    expected = 0.8 * math.log(2) + 0.2 * (1 - 0.6)
    assert bce_dice_loss(logits, target).item() == pytest.approx(expected)
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(expected)


def test_weights_are_respected():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 9, 13, generator=g) * 3
    target = (torch.rand(3, 1, 9, 13, generator=g) > 0.7).float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = soft_dice_loss(logits, target)
    assert bce_dice_loss(logits, target, 1.0, 0.0).item() == pytest.approx(bce.item())
    assert bce_dice_loss(logits, target, 0.0, 1.0).item() == pytest.approx(dice.item())
    loss = BCEDiceLoss(bce_weight=0.3, dice_weight=2.0)(logits, target)
    assert loss.item() == pytest.approx(0.3 * bce.item() + 2.0 * dice.item())
    assert "bce_weight=0.3" in repr(BCEDiceLoss(bce_weight=0.3))


def test_target_layouts_and_dtypes_agree():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 11, 6, generator=g)
    mask = torch.rand(2, 11, 6, generator=g) > 0.5
    reference = bce_dice_loss(logits, mask.float().unsqueeze(1))
    for target in (mask, mask.to(torch.uint8), mask.float(), mask.unsqueeze(1).to(torch.uint8)):
        assert bce_dice_loss(logits, target).item() == pytest.approx(reference.item())


def test_half_precision_logits_give_a_float32_loss():
    logits = torch.randn(2, 1, 8, 8).half()
    target = torch.zeros(2, 8, 8)
    loss = bce_dice_loss(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(bce_dice_loss(logits.float(), target).item())


def test_gradients_are_finite_for_extreme_logits():
    logits = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0]).view(1, 1, 1, 5).requires_grad_()
    target = as_map([1, 0, 1, 1, 0])
    bce_dice_loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    # Wrong confident pixels are pushed the right way.
    assert logits.grad[0, 0, 0, 0] < 0 and logits.grad[0, 0, 0, 4] > 0


def test_bad_inputs_raise():
    logits = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\).*\(2, 1, 4, 5\)"):
        bce_dice_loss(logits, torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="do not match"):
        soft_dice_loss(logits, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="weights must be >= 0"):
        bce_dice_loss(logits, torch.zeros(2, 4, 4), bce_weight=-1.0)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        BCEDiceLoss(dice_weight=-0.1)
    with pytest.raises(ValueError, match="differ"):
        soft_dice_score(torch.zeros(4), torch.zeros(5))


def test_lovasz_hinge_hand_computed():
    # errors 1 - logit * sign = [-1, 0, 1.5, 4]; sorted by error the labels are [1, 0, 0, 1],
    # Jaccard losses [1/2, 2/3, 3/4, 1], gradient [1/2, 1/6, 1/12, 1/4]: 4/2 + 1.5/6 = 2.25
    logits = torch.tensor([[[[2.0, -1.0, 0.5, -3.0]]], [[[5.0, -5.0, 5.0, -5.0]]]])
    target = torch.tensor([[[[1, 0, 0, 1]]], [[[1, 0, 1, 0]]]])
    assert lovasz_hinge(logits[:1], target[:1]).item() == pytest.approx(2.25)
    assert lovasz_hinge(logits[1:], target[1:]).item() == 0.0  # all right by a margin
    assert lovasz_hinge(logits, target).item() == pytest.approx(1.125)  # mean of the images
    # as one image of 8 pixels: 4 * (1 - 3/4) + 1.5 * ((1 - 3/5) - (1 - 3/4)) = 1.225
    assert lovasz_hinge(logits, target, per_image=False).item() == pytest.approx(1.225)


def test_lovasz_hinge_can_leave_empty_images_out():
    # image 0 as above (2.25); image 1 has no foreground: errors 1 + logit = [4, 0, 1.5, -1],
    # Jaccard losses all 1, gradient [1, 0, 0, 0]: relu(4) = 4
    logits = torch.tensor([[[[2.0, -1.0, 0.5, -3.0]]], [[[3.0, -1.0, 0.5, -2.0]]]])
    target = torch.tensor([[[[1, 0, 0, 1]]], [[[0, 0, 0, 0]]]])
    assert lovasz_hinge(logits[1:], target[1:]).item() == pytest.approx(4.0)
    assert lovasz_hinge(logits, target).item() == pytest.approx((2.25 + 4.0) / 2)
    assert lovasz_hinge(logits, target, skip_empty=True).item() == pytest.approx(2.25)
    assert lovasz_hinge(logits[1:], target[1:], skip_empty=True).item() == 0.0
    # BCEDiceLoss leaves them out: an empty image adds nothing beyond BCE + Dice
    base = BCEDiceLoss()(logits[1:], target[1:]).item()
    assert BCEDiceLoss(lovasz_weight=1.0)(logits[1:], target[1:]).item() == pytest.approx(base)


def test_lovasz_weight_adds_the_hinge_to_bce_dice():
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    base = BCEDiceLoss()(logits, target)
    both = BCEDiceLoss(lovasz_weight=0.5)(logits, target)
    hinge = lovasz_hinge(logits, target, skip_empty=True)
    assert both.item() == pytest.approx(base.item() + 0.5 * hinge.item())
    logits.requires_grad_(True)
    BCEDiceLoss(lovasz_weight=1.0)(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="lovasz=-1"):
        BCEDiceLoss(lovasz_weight=-1)
