import math

import numpy as np
import pytest
import torch

from kit.metrics import DiceScore, Mean, ThresholdSweep, binary_counts, dice


def test_dice_hand_computed():
    pred = np.array([[1, 1, 0], [0, 0, 0]], dtype=np.uint8)
    target = np.array([[1, 0, 0], [1, 0, 0]], dtype=np.uint8)
    assert dice(pred, target) == pytest.approx(0.5)  # 2 * 1 / (2 + 2)
    assert dice(pred * 255, target.astype(bool)) == pytest.approx(0.5)  # nonzero = foreground
    assert dice(torch.from_numpy(pred), torch.from_numpy(target)) == pytest.approx(0.5)


def test_dice_empty_conventions():
    empty = np.zeros((3, 5), np.uint8)
    one = empty.copy()
    one[2, 4] = 1
    assert dice(empty, empty) == 1.0
    assert dice(one, empty) == 0.0
    assert dice(empty, one) == 0.0
    assert DiceScore().compute() == 1.0  # nothing seen: both empty


def test_dice_refuses_mismatched_shapes_and_probabilities():
    with pytest.raises(ValueError, match=r"\(3, 5\) vs \(5, 3\)"):
        dice(np.zeros((3, 5)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="threshold probabilities first"):
        dice(np.full((2, 2), 0.7), np.ones((2, 2)))
    assert dice(np.ones((2, 2), np.float32), np.ones((2, 2))) == 1.0  # float 0/1 is fine


def test_dice_score_accumulates_counts_not_per_batch_dice():
    score = DiceScore()
    # Batch 1: one pixel, right (Dice 1).
    score.update(np.array([[1, 0, 0]]), np.array([[1, 0, 0]]))
    # Batch 2: three predicted, one true, overlapping (Dice 2 * 1 / 4 = 0.5).
    score.update(torch.tensor([[1, 1, 1]]), torch.tensor([[0, 1, 0]]))
    assert score.stats.tolist() == [2, 4, 2]
    assert score.stats.dtype == np.int64
    assert score.compute() == pytest.approx(4 / 6)  # != mean of per-batch Dice, 0.75
    assert score.compute() != pytest.approx((1.0 + 0.5) / 2)
    score.reset()
    assert score.compute() == 1.0


def test_dice_score_refuses_tensor_probabilities_when_it_reads_them():
    score = DiceScore()
    score.update(torch.tensor([0.0, 1.0]), torch.tensor([1, 1]))
    score.update(torch.tensor([[0.2, 1.0]]), torch.tensor([[1.0, 1.0]]))  # counted on the device
    with pytest.raises(ValueError, match="pred holds values other than 0 and 1"):
        score.compute()
    with pytest.raises(ValueError, match="target holds values other than 0 and 1"):
        binary_counts(torch.tensor([1, 0]), torch.tensor([0.5, 1.0]))
    score.reset()
    score.update(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([True, False, False]))
    score.update(np.array([0, 1]), np.array([1, 1]))
    assert score.stats.tolist() == [2, 3, 3] and score.compute() == pytest.approx(4 / 6)


def test_mean_weights_its_values_and_reads_tensors_once():
    mean = Mean()
    assert math.isnan(mean.compute())
    mean.update(torch.tensor(1.0, requires_grad=True), 3)  # a loss of a batch of 3
    mean.update(5.0)
    assert isinstance(mean.total, torch.Tensor) and not mean.total.requires_grad
    assert mean.compute() == pytest.approx((3 * 1.0 + 5.0) / 4)
    mean.reset()
    assert math.isnan(mean.compute())


def test_dice_score_accepts_a_channel_axis_and_mixed_libraries():
    g = np.random.default_rng(0)
    pred = g.random((2, 1, 13, 7)) > 0.5
    target = g.random((2, 13, 7)) > 0.5
    expected = dice(pred[:, 0], target)
    score = DiceScore()
    score.update(torch.from_numpy(pred), target.astype(np.uint8))
    assert score.compute() == pytest.approx(expected)
    assert binary_counts(pred, torch.from_numpy(target)) == binary_counts(pred[:, 0], target)


def test_numpy_chunking_matches_whole_count():
    g = np.random.default_rng(1)
    pred = g.random((37, 11)) > 0.4
    target = g.random((37, 11)) > 0.6
    whole = binary_counts(pred, target)
    # chunks of 50 elements: 4 rows of 11, the last chunk short
    assert binary_counts(pred, target, chunk=50) == whole
    sweep = ThresholdSweep([0.5], chunk=50)
    sweep.update(pred.astype(np.float32), target)
    assert (int(sweep.intersection[0]), int(sweep.pred_sum[0]), sweep.target_sum) == whole


def test_threshold_sweep_hand_computed_and_strict():
    prob = np.array([0.2, 0.5, 0.7, 0.9], np.float32)
    target = np.array([0, 1, 1, 0], np.uint8)
    sweep = ThresholdSweep([0.8, 0.1, 0.5])
    sweep.update(prob, target)
    scores = sweep.compute()
    assert list(scores) == [0.1, 0.5, 0.8]
    assert scores[0.1] == pytest.approx(2 * 2 / (4 + 2))
    assert scores[0.5] == pytest.approx(2 * 1 / (2 + 2))  # 0.5 itself is not > 0.5
    assert scores[0.8] == pytest.approx(0.0)
    assert sweep.best() == (0.1, pytest.approx(2 / 3))


def test_threshold_sweep_accumulates_torch_and_numpy_batches_of_any_shape():
    g = np.random.default_rng(2)
    thresholds = [0.3, 0.45, 0.5, 0.7]
    batches = [
        (g.random((2, 1, 9, 5)).astype(np.float32), g.random((2, 9, 5)) > 0.6),
        (g.random((4, 3)), g.random((4, 3)) > 0.5),
        (g.random(17).astype(np.float32), g.random(17) > 0.3),
    ]
    sweep = ThresholdSweep(thresholds)
    per_threshold = {t: DiceScore() for t in thresholds}
    for i, (prob, target) in enumerate(batches):
        if i == 1:
            prob, target = torch.from_numpy(prob), torch.from_numpy(target)
        sweep.update(prob, target)
        for t, score in per_threshold.items():
            score.update(prob > t, target)
    expected = {t: score.compute() for t, score in per_threshold.items()}
    assert sweep.compute() == pytest.approx(expected)


def test_best_breaks_ties_towards_the_default_threshold():
    sweep = ThresholdSweep([0.1, 0.3, 0.5, 0.7])
    sweep.update(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8))
    assert sweep.compute() == {0.1: 1.0, 0.3: 1.0, 0.5: 1.0, 0.7: 1.0}
    assert sweep.best() == (0.5, 1.0)


def test_threshold_sweep_validates():
    for bad in ([], [0.5, float("nan")], [0.5, 0.5]):
        with pytest.raises(ValueError, match="thresholds"):
            ThresholdSweep(bad)
    with pytest.raises(ValueError, match="shapes differ"):
        ThresholdSweep([0.5]).update(np.zeros((2, 3)), np.zeros((3, 2)))
