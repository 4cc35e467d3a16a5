"""Figures for the study: each helper draws on one Axes (made if `ax` is None) and returns it.

Images come in as uint8 or float tensors/arrays of shape (N, 28, 28) or (N, 784). Drawings are shown
as dark ink on white paper (the bitmaps store white strokes on black).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from utils.augment import hflip, rotate, vflip

METRIC_NAMES = {"top1": "top-1", "top3": "top-3", "top5": "top-5", "map3": "MAP@3"}
SPLIT_NAMES = {"val": "validation", "test": "test", "train": "training"}


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    return plt.subplots(figsize=figsize)[1] if ax is None else ax


def _as_images(images) -> np.ndarray:
    """(N, 28, 28) or (N, 784) tensor/array -> float ndarray (N, side, side)."""
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim == 2:
        side = math.isqrt(a.shape[1])
        if side * side != a.shape[1]:
            raise ValueError(f"flat images need a square number of pixels, got {a.shape[1]}")
        a = a.reshape(len(a), side, side)
    if a.ndim != 3:
        raise ValueError(f"images must be (N, H, W), (N, 1, H, W) or (N, H*W), got shape {a.shape}")
    return a.astype(np.float32)


def image_grid(images, labels: Sequence[str], ncols: int = 8, ax: Axes | None = None,
               cmap: str = "gray_r", title: str | None = None, fontsize: float = 8,
               vmax: float | None = None) -> Axes:
    """One mosaic image of drawings, each with its label above it."""
    imgs = _as_images(images)
    n, h, w = imgs.shape
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    lines = max(str(s).count("\n") + 1 for s in labels)
    pad, label_h = 3, 9 * lines + 2  # data pixels; label_h leaves room for the text rows
    cell_w, cell_h = w + pad, h + pad + label_h
    # NaN gaps render as the Axes background, so tiles stand apart without a fake pixel value.
    canvas = np.full((nrows * cell_h + pad, ncols * cell_w + pad), np.nan, dtype=np.float32)
    ax = _axes(ax, ((1.1 + 0.15 * lines) * ncols, (1.25 + 0.3 * lines) * nrows + (0.4 if title else 0)))
    for i, label in enumerate(labels):
        r, c = divmod(i, ncols)
        x0, y0 = c * cell_w + pad, r * cell_h + pad + label_h
        canvas[y0:y0 + h, x0:x0 + w] = imgs[i]
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), w, h, fill=False, lw=0.6, ec="0.75"))
        ax.text(x0 + w / 2, y0 - 1.5, str(label), ha="center", va="bottom", fontsize=fontsize)
    ax.imshow(canvas, cmap=cmap, vmin=0, vmax=vmax if vmax is not None else np.nanmax(canvas), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def pick_per_class(labels: torch.Tensor, per_class: int, n_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of `per_class` random rows of each class 0..n_classes-1, class by class (reproducible by seed)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(n_classes):
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks)


def sample_grid(ds, per_class: int = 3, ncols: int = 9, seed: int = 0, ax: Axes | None = None) -> Axes:
    """`per_class` random drawings of every category of a QuickDrawSet, labelled."""
    index = pick_per_class(ds.labels, per_class, len(ds.classes), seed)
    labels = [ds.classes[int(i)] for i in ds.labels[index]]
    return image_grid(ds.images[index], labels, ncols=ncols, ax=ax,
                      title=f"Sample drawings ({per_class} per category)")


def category_heatmaps(ds, ncols: int = 6, ax: Axes | None = None) -> Axes:
    """Mean of each category's drawings: where the ink usually falls. Each tile is scaled to its own
    maximum, so a category drawn with little ink still shows its shape."""
    means = torch.stack([ds.images[ds.labels == c].float().mean(0) for c in range(len(ds.classes))])  # (C,28,28)
    means = means / means.amax((1, 2), keepdim=True).clamp(min=1e-9)
    return image_grid(means, list(ds.classes), ncols=ncols, ax=ax, cmap="inferno", vmax=1,
                      title="Mean drawing per category (each scaled to its own maximum)")


def _hbars(values, labels: Sequence[str], ax: Axes | None, xlabel: str, title: str, fmt: str) -> Axes:
    """Horizontal bars, first label at the top, each bar labelled with its value."""
    values = np.asarray(values, dtype=float)
    if len(values) != len(labels):
        raise ValueError(f"{len(values)} values but {len(labels)} labels")
    ax = _axes(ax, (7, 0.8 + 0.32 * len(values)))
    bars = ax.barh(np.arange(len(values)), values, color="tab:blue")
    ax.set_yticks(np.arange(len(values)), labels)
    ax.invert_yaxis()
    ax.bar_label(bars, fmt=fmt, padding=3, fontsize=8)
    ax.set_xlim(0, values.max() * 1.15 if len(values) and values.max() > 0 else 1)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return ax


def counts_bar(ds, ax: Axes | None = None) -> Axes:
    """Drawings per category."""
    return _hbars(ds.counts().numpy(), list(ds.classes), ax, "drawings", "Drawings per category", "{:,.0f}")


def per_class_bars(per_class: Sequence[float], classes: Sequence[str], counts: Sequence[int] | None = None,
                   ax: Axes | None = None, title: str = "Per-class test accuracy") -> Axes:
    """Accuracy of each class (fractions in, percent shown), worst class first; `counts`, the drawings
    each accuracy is measured on, are shown beside the class names."""
    acc = 100 * np.asarray(per_class, dtype=float)
    names = list(classes) if counts is None else [f"{c} (n={int(n):,})" for c, n in zip(classes, counts, strict=True)]
    order = np.argsort(acc, kind="stable")
    ax = _hbars(acc[order], [names[i] for i in order], ax, "accuracy (%)", title, "{:.1f}")
    ax.set_xlim(0, 105)
    return ax


def augmentation_examples(images, categories: Sequence[str], angles: Sequence[float] = (-15, 15),
                          ax: Axes | None = None) -> Axes:
    """Each drawing (a row, its category named on the original) beside its rotated, horizontally and
    vertically flipped copies."""
    x = torch.as_tensor(_as_images(images)).to(torch.uint8)  # (K,28,28)
    if len(categories) != len(x):
        raise ValueError(f"{len(x)} drawings but {len(categories)} categories")
    variants = [x] + [rotate(x, a) for a in angles] + [hflip(x), vflip(x)]
    copies = [f"rotated {a:+g}°" for a in angles] + ["horizontal flip", "vertical flip"]
    tiles = torch.stack(variants, 1).flatten(0, 1)  # (K*V,28,28), row-major: one drawing per row
    labels = [label for c in categories for label in [f"{c}\n(original)"] + copies]
    return image_grid(tiles, labels, ncols=len(variants), ax=ax, title="Augmentation examples")


def training_curves(history: dict, metric: str = "loss", ax: Axes | None = None, title: str | None = None,
                    label_smoothing: float = 0.0) -> Axes:
    """Train and validation `metric` ("loss" or "acc") per epoch, best epoch marked. `label_smoothing`:
    the run's, named on the loss axis (it raises the loss a perfect model can reach above 0)."""
    if metric not in ("loss", "acc"):
        raise ValueError(f"metric must be 'loss' or 'acc', got {metric!r}")
    scale = 100 if metric == "acc" else 1
    ax = _axes(ax, (5, 3.5))
    for split, style in (("train", "o-"), ("val", "s--")):
        ys = np.asarray(history[f"{split}_{metric}"], dtype=float) * scale
        ax.plot(np.arange(1, len(ys) + 1), ys, style, label=split, markersize=4)
    if history.get("best_epoch"):
        ax.axvline(history["best_epoch"], color="0.6", lw=1, ls=":", label="best epoch")
    ax.set_xlabel("epoch")
    smoothing = f" (label smoothing {label_smoothing:g})" if label_smoothing else ""
    ax.set_ylabel("accuracy (%)" if metric == "acc" else f"cross-entropy loss{smoothing}")
    n = len(history[f"train_{metric}"])
    if n <= 20:
        ax.set_xticks(np.arange(1, n + 1))
        ax.set_xlim(0.5, n + 0.5)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or ("Accuracy" if metric == "acc" else "Loss"))
    return ax


def curves(history: dict, name: str, axes: Sequence[Axes] | None = None, label_smoothing: float = 0.0) -> np.ndarray:
    """Loss and accuracy side by side for one training run; returns the two Axes."""
    if axes is None:
        axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")[1]
    training_curves(history, "loss", axes[0], title=f"{name}: loss", label_smoothing=label_smoothing)
    training_curves(history, "acc", axes[1], title=f"{name}: accuracy")
    return np.asarray(axes)


def accuracy_bars(results: Sequence[dict], split: str = "test", metrics: Sequence[str] = ("top1", "top3", "map3"),
                  ax: Axes | None = None) -> Axes:
    """Grouped bars of `split` metrics per model; results are dicts with "name" and split -> {metric: fraction}."""
    names = [r["name"] for r in results]
    ax = _axes(ax, (max(6, 1.6 * len(names) * max(1, len(metrics)) / 2), 4))
    width = 0.8 / len(metrics)
    x = np.arange(len(names))
    for j, m in enumerate(metrics):
        bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * width, [100 * r[split][m] for r in results], width,
                      label=METRIC_NAMES.get(m, m))
        ax.bar_label(bars, fmt="{:.1f}", padding=2, fontsize=7)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never over a bar
    ax.set_title(f"Accuracy per model on the whole {SPLIT_NAMES.get(split, split)} split")
    return ax


def confusion_matrix(cm, classes: Sequence[str], normalize: bool = True, ax: Axes | None = None,
                     title: str = "Confusion matrix") -> Axes:
    """Confusion matrix (rows = true, columns = predicted); by default each row in % of its true class."""
    m = np.asarray(cm, dtype=float)
    if m.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix of shape {m.shape} does not match {len(classes)} classes")
    if normalize:
        m = 100 * m / np.maximum(m.sum(1, keepdims=True), 1)
    ax = _axes(ax, (1.5 + 0.5 * len(classes), 1 + 0.5 * len(classes)))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=100 if normalize else None)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the true class" if normalize else "drawings")
    if len(classes) <= 25:  # beyond that the numbers no longer fit in the cells
        for (i, j), v in np.ndenumerate(m):
            label = f"{v:.0f}"
            if label != "0":  # a rare confusion (0.5% rounds to even) would read as a misleading "0"
                ax.text(j, i, label, ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 * m.max() else "black")
    ax.set_xticks(np.arange(len(classes)), classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title + (" (% of each true class)" if normalize else ""))
    return ax


def misclassified_grid(images, labels, preds, classes: Sequence[str], n: int = 24, ncols: int = 8,
                       seed: int = 0, ax: Axes | None = None) -> Axes:
    """Up to `n` drawings (chosen at random, fixed seed) whose prediction is wrong, true vs predicted."""
    labels, preds = torch.as_tensor(labels), torch.as_tensor(preds)
    wrong = torch.nonzero(labels != preds).flatten()
    if len(wrong) == 0:
        ax = _axes(ax, (4, 2))
        ax.text(0.5, 0.5, "no misclassified drawings", ha="center", va="center")
        ax.set_axis_off()
        return ax
    pick = wrong[torch.randperm(len(wrong), generator=torch.Generator().manual_seed(seed))[:n]].sort().values
    texts = [f"true: {classes[labels[i]]}\npred: {classes[preds[i]]}" for i in pick.tolist()]
    title = f"Misclassified test drawings ({len(pick)} of {len(wrong):,} shown, {len(labels):,} in the split)"
    return image_grid(torch.as_tensor(_as_images(images))[pick], texts, ncols=ncols, ax=ax, title=title, fontsize=7)


def save_figure(fig_or_ax, name: str, directory: str | Path = "reports/figures", dpi: int = 120) -> Path:
    """Write the figure holding `fig_or_ax` (Figure, Axes or array of Axes) as <directory>/<name>.png."""
    obj = np.asarray(fig_or_ax, dtype=object).flat[0] if isinstance(fig_or_ax, (np.ndarray, list, tuple)) else fig_or_ax
    fig = obj.get_figure() if isinstance(obj, Axes) else obj
    if not hasattr(fig, "savefig"):
        raise TypeError(f"save_figure needs a Figure or Axes, got {type(fig_or_ax).__name__}")
    name = name if name.endswith(".png") else f"{name}.png"
    if Path(name).name != name:
        raise ValueError(f"figure name must be a plain file name, got {name!r}")
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    return path
