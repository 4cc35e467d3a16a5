import math

import pytest
import torch
from torch import nn

from utils.data import QuickDrawSet
from utils.metrics import (confusion_matrix, evaluate_model, map_at_k, per_class_accuracy, predict_logits,
                           topk_accuracy)

# Four drawings, four classes; the true label ranks 1st, 2nd, 3rd and 4th in turn.
LOGITS = torch.tensor([[0.10, 0.70, 0.20, 0.00],   # true 1: rank 1
                       [0.50, 0.30, 0.15, 0.05],   # true 1: rank 2
                       [0.10, 0.20, 0.40, 0.30],   # true 1: rank 3 (after 2 and 3)
                       [0.40, 0.30, 0.20, 0.10]])  # true 3: rank 4
LABELS = torch.tensor([1, 1, 1, 3])


def test_topk_by_hand():
    assert topk_accuracy(LOGITS, LABELS, 1) == pytest.approx(1 / 4)
    assert topk_accuracy(LOGITS, LABELS, 2) == pytest.approx(2 / 4)
    assert topk_accuracy(LOGITS, LABELS, 3) == pytest.approx(3 / 4)
    assert topk_accuracy(LOGITS, LABELS, 5) == 1.0  # k beyond the class count: every label is in


def test_map3_by_hand():
    # Kaggle MAP@3 with one true label: 1/rank if within the top 3, else 0
    assert map_at_k(LOGITS, LABELS, 3) == pytest.approx((1 + 1 / 2 + 1 / 3 + 0) / 4)
    assert map_at_k(LOGITS, LABELS, 1) == pytest.approx(topk_accuracy(LOGITS, LABELS, 1))


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        topk_accuracy(LOGITS, LABELS[:3])
    with pytest.raises(ValueError, match="no samples"):
        map_at_k(LOGITS[:0], LABELS[:0])


def test_confusion_matrix_against_a_brute_force_count():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=g)
    pred = torch.randint(0, 5, (200,), generator=g)
    expected = torch.zeros(5, 5, dtype=torch.int64)
    for t, p in zip(labels.tolist(), pred.tolist()):
        expected[t, p] += 1
    cm = confusion_matrix(pred, labels, 5)
    assert cm.dtype == torch.int64 and torch.equal(cm, expected)


def test_confusion_rows_are_true_classes_and_per_class_accuracy():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 0]), torch.tensor([0, 1, 1, 1]), 3)
    assert cm.tolist() == [[1, 0, 0], [2, 1, 0], [0, 0, 0]]
    acc = per_class_accuracy(cm)
    assert acc[:2].tolist() == pytest.approx([1.0, 1 / 3])
    assert math.isnan(acc[2])  # no drawing of class 2: undefined, not 0
    with pytest.raises(ValueError, match="labels outside 0..2"):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)


class Brightness(nn.Module):
    """Logits (m - 0.5, 0.5 - m) of the mean ink m, behind a dropout that must be off in eval mode."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.9)

    def forward(self, x):
        m = self.drop(x.mean((1, 2, 3))) - 0.5
        return torch.stack([m, -m], 1)


def test_predict_logits_is_batched_in_eval_mode_and_restores_the_mode():
    images = torch.arange(10, dtype=torch.uint8).mul(25).view(10, 1, 1).expand(10, 28, 28).contiguous()
    model = Brightness().train()
    logits = predict_logits(model, images, batch_size=3)
    expected = images.float().mean((1, 2)) / 255 - 0.5
    torch.testing.assert_close(logits, torch.stack([expected, -expected], 1))
    assert model.training


def test_evaluate_model_scores_the_whole_split():
    images = torch.zeros(6, 28, 28, dtype=torch.uint8)
    images[:4] = 200  # inked -> predicted class 0, blank -> class 1
    ds = QuickDrawSet(images, torch.tensor([0, 0, 0, 1, 1, 1]), ["ink", "blank"])
    scores = evaluate_model(Brightness(), ds, batch_size=4)
    # predictions 0,0,0,0,1,1: drawing 3 is the one mistake, its true class ranked 2nd
    assert scores["n"] == 6
    assert scores["confusion"] == [[3, 0], [1, 2]]
    assert scores["top1"] == pytest.approx(5 / 6)
    assert scores["per_class"] == pytest.approx([1.0, 2 / 3])
    assert scores["top3"] == scores["top5"] == 1.0
    assert scores["map3"] == pytest.approx((5 + 0.5) / 6)
