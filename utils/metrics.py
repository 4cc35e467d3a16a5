"""Scores on a whole held-out split: top-k accuracy, MAP@3, confusion matrix, per-class accuracy."""
from __future__ import annotations

import torch
from torch import nn

from utils.data import QuickDrawSet, to_float


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("no samples to score")


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1024, device="cpu",
                   bf16: bool = False) -> torch.Tensor:
    """Logits (N, C) float32 on the CPU for uint8 images (N,28,28), in eval mode, batch by batch.

    The model is moved to `device`; its train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    try:
        out = []
        for start in range(0, len(images), batch_size):
            x = to_float(images[start:start + batch_size].to(device))  # (B,1,28,28)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out.append(model(x).float().cpu())
        if not out:
            raise ValueError("no images to predict")
        return torch.cat(out)
    finally:
        model.train(was_training)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k') bool: where the true label stands among the k highest logits (k' = min(k, C))."""
    _check(logits, labels)
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N,k')
    return top == labels[:, None]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose true label is among the k highest logits."""
    return topk_hits(logits, labels, k).any(1).float().mean().item()


def map_at_k(logits: torch.Tensor, labels: torch.Tensor, k: int = 3) -> float:
    """Mean average precision at k with one true label (Kaggle Quick, Draw!): 1/rank if ranked <= k, else 0."""
    hits = topk_hits(logits, labels, k).float()  # (N,k')
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32)  # (k',)
    return (hits / ranks).sum(1).mean().item()


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    pred, labels = pred.long().flatten(), labels.long().flatten()
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} predictions but {len(labels)} labels")
    for name, t in (("pred", pred), ("labels", labels)):
        if len(t) and (t.min() < 0 or t.max() >= n_classes):
            raise ValueError(f"{name} outside 0..{n_classes - 1}")
    return torch.bincount(labels * n_classes + pred, minlength=n_classes * n_classes).view(n_classes, n_classes)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """Recall per true class, (C,) float; NaN for a class with no samples."""
    return cm.diagonal().double() / cm.sum(1).double()


def evaluate_model(model: nn.Module, ds: QuickDrawSet, device="cpu", batch_size: int = 1024) -> dict:
    """Every metric of the study on the whole of ds."""
    logits = predict_logits(model, ds.images, batch_size=batch_size, device=device)
    cm = confusion_matrix(logits.argmax(1), ds.labels, len(ds.classes))
    return {
        "top1": topk_accuracy(logits, ds.labels, 1),
        "top3": topk_accuracy(logits, ds.labels, 3),
        "top5": topk_accuracy(logits, ds.labels, 5),
        "map3": map_at_k(logits, ds.labels, 3),
        "per_class": per_class_accuracy(cm).tolist(),
        "confusion": cm.tolist(),
        "n": len(ds),
    }
