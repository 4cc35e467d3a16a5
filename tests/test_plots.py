"""Each plot helper draws what it is given on one Axes and returns it; save_figure writes a PNG."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.axes import Axes

from utils import plots
from utils.augment import hflip, rotate, vflip
from utils.data import QuickDrawSet

CLASSES = ["cat", "dog", "alarm clock"]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def ds():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8, generator=g)
    return QuickDrawSet(images, labels, CLASSES)


def texts(ax):
    return [t.get_text() for t in ax.texts]


def test_image_grid_places_every_tile_and_label():
    images = torch.arange(5 * 784, dtype=torch.float32).reshape(5, 784) % 256
    ax = plots.image_grid(images, ["a", "b", "c", "d", "e"], ncols=2)
    assert isinstance(ax, Axes)
    mosaic = ax.images[0].get_array()
    pad, label_h = 3, 11
    assert mosaic.shape == (3 * (28 + pad + label_h) + pad, 2 * (28 + pad) + pad)
    assert texts(ax) == ["a", "b", "c", "d", "e"]
    # tile 3 (row 1, col 1) holds image 3 exactly; the empty sixth cell stays blank (masked)
    y0, x0 = (28 + pad + label_h) + pad + label_h, (28 + pad) + pad
    np.testing.assert_array_equal(mosaic[y0:y0 + 28, x0:x0 + 28], images[3].reshape(28, 28).numpy())
    assert np.ma.getmaskarray(mosaic)[-10, -10]


def test_image_grid_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        plots.image_grid(torch.zeros(2, 28, 28), ["x"])


def test_sample_grid_shows_each_class_on_given_axes(ds):
    fig, ax = plt.subplots()
    assert plots.sample_grid(ds, per_class=2, ncols=3, ax=ax) is ax
    assert texts(ax) == ["cat", "cat", "dog", "dog", "alarm clock", "alarm clock"]


def test_category_heatmaps_are_class_means_each_scaled_to_its_max(ds):
    ds.images[5:8] //= 4  # a faint class: its tile must still reach the top of the colour scale
    ax = plots.category_heatmaps(ds, ncols=3)
    assert texts(ax) == CLASSES
    mosaic = ax.images[0].get_array()
    tiles = [mosaic[3 + 11:3 + 11 + 28, x0:x0 + 28] for x0 in (3, 3 + 31, 3 + 62)]
    mean = ds.images[:5].float().mean(0).numpy()
    np.testing.assert_allclose(tiles[0], mean / mean.max(), rtol=1e-6)
    assert [float(t.max()) for t in tiles] == pytest.approx([1, 1, 1])
    assert ax.images[0].get_clim() == (0, 1)


def test_counts_bar_has_one_bar_per_class(ds):
    ax = plots.counts_bar(ds)
    assert [p.get_width() for p in ax.patches] == [5, 3, 4]
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES


def test_per_class_bars_sorted_worst_first_with_counts():
    ax = plots.per_class_bars([0.9, 0.5, 0.75], CLASSES)
    assert [round(p.get_width(), 6) for p in ax.patches] == [50.0, 75.0, 90.0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["dog", "alarm clock", "cat"]
    ax = plots.per_class_bars([0.9, 0.5, 0.75], CLASSES, counts=torch.tensor([10, 4, 1200]))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["dog (n=4)", "alarm clock (n=1,200)", "cat (n=10)"]
    with pytest.raises(ValueError):
        plots.per_class_bars([0.9, 0.5, 0.75], CLASSES, counts=[1, 2])


def test_augmentation_examples_show_the_transforms_and_each_category(ds):
    ax = plots.augmentation_examples(ds.images[[0, 5]], ["cat", "dog"])
    assert texts(ax)[:5] == ["cat\n(original)", "rotated -15°", "rotated +15°", "horizontal flip", "vertical flip"]
    assert len(ax.texts) == 10 and texts(ax)[5] == "dog\n(original)"
    mosaic = ax.images[0].get_array()
    cell_w, top = 28 + 3, 3 + 20  # two-line labels: 9 pixels a line + 2
    expected = [ds.images[0], rotate(ds.images[:1], -15)[0], rotate(ds.images[:1], 15)[0],
                hflip(ds.images[:1])[0], vflip(ds.images[:1])[0]]
    for k, img in enumerate(expected):
        x0 = 3 + k * cell_w
        np.testing.assert_array_equal(mosaic[top:top + 28, x0:x0 + 28], img.float().numpy())


def test_training_curves_plot_train_and_val_per_epoch():
    history = dict(train_loss=[1.0, 0.5, 0.4], val_loss=[0.9, 0.6, 0.7],
                   train_acc=[0.5, 0.7, 0.8], val_acc=[0.55, 0.65, 0.6], best_epoch=2)
    ax = plots.training_curves(history, "acc")
    train, val = ax.lines[:2]
    assert list(train.get_xdata()) == [1, 2, 3]
    np.testing.assert_allclose(val.get_ydata(), [55, 65, 60])
    assert ax.lines[2].get_xdata()[0] == 2  # best epoch marker
    assert list(ax.get_xticks()) == [1, 2, 3]
    axes = plots.curves(history, "V2")
    assert len(axes) == 2 and axes[0].get_title() == "V2: loss"
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), [1.0, 0.5, 0.4])
    with pytest.raises(ValueError, match="metric"):
        plots.training_curves(history, "f1")
    with pytest.raises(ValueError, match="2 drawings but 1 categories"):
        plots.augmentation_examples(torch.zeros(2, 28, 28), ["cat"])


def test_loss_axis_names_label_smoothing():
    history = dict(train_loss=[1.0], val_loss=[0.9], train_acc=[0.5], val_acc=[0.55])
    assert plots.training_curves(history, "loss").get_ylabel() == "cross-entropy loss"
    assert plots.curves(history, "V2-tuned", label_smoothing=0.1)[0].get_ylabel() == \
        "cross-entropy loss (label smoothing 0.1)"


def test_accuracy_bars_group_metrics_per_model():
    results = [dict(name=n, test=dict(top1=a, top3=a + 0.1, map3=a + 0.05)) for n, a in (("V1", 0.5), ("V2", 0.7))]
    ax = plots.accuracy_bars(results)
    assert len(ax.patches) == 6
    assert [t.get_text() for t in ax.get_xticklabels()] == ["V1", "V2"]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [50.0, 55.0, 60.0, 70.0, 75.0, 80.0]


def test_confusion_matrix_rows_normalized_and_labelled():
    cm = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 5]])
    ax = plots.confusion_matrix(cm, CLASSES)
    m = ax.images[0].get_array()
    np.testing.assert_allclose(m.sum(1), 100)
    assert m[0, 1] == pytest.approx(20)
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert texts(ax) == ["80", "20", "25", "75", "100"]  # row by row; empty cells unlabelled


def test_confusion_matrix_never_labels_a_rare_confusion_as_zero():
    cm = np.array([[996, 4, 0], [1, 3, 0], [0, 0, 5]])  # 0.4% of cats taken for dogs: would print "0"
    ax = plots.confusion_matrix(cm, CLASSES)
    assert texts(ax) == ["100", "25", "75", "100"]
    half = np.array([[995, 5, 0], [1, 3, 0], [0, 0, 5]])  # exactly 0.5%, which Python rounds to "0"
    assert texts(plots.confusion_matrix(half, CLASSES)) == ["100", "25", "75", "100"]
    assert [t.get_text() for t in plots.confusion_matrix(cm, CLASSES, normalize=False).texts] == \
        ["996", "4", "1", "3", "5"]
    with pytest.raises(ValueError, match="3 classes"):
        plots.confusion_matrix(np.eye(2), CLASSES)


def test_misclassified_grid_labels_true_and_predicted(ds):
    preds = ds.labels.clone()
    preds[[1, 6]] = torch.tensor([2, 0])
    ax = plots.misclassified_grid(ds.images, ds.labels, preds, CLASSES, n=10)
    assert texts(ax) == ["true: cat\npred: alarm clock", "true: dog\npred: cat"]
    assert "2 of 2 shown" in ax.get_title()
    none = plots.misclassified_grid(ds.images, ds.labels, ds.labels, CLASSES)
    assert texts(none) == ["no misclassified drawings"]


def test_save_figure_writes_png(tmp_path):
    ax = plots.counts_bar(QuickDrawSet(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"]))
    path = plots.save_figure(ax, "counts", tmp_path / "figs")
    assert path == tmp_path / "figs" / "counts.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    axes = plots.curves(dict(train_loss=[1], val_loss=[1], train_acc=[0], val_acc=[0]), "x")
    assert plots.save_figure(axes, "curves_x.png", tmp_path).stat().st_size > 0
    with pytest.raises(ValueError, match="plain file name"):
        plots.save_figure(ax, "../escape", tmp_path)


def test_pick_per_class_takes_distinct_rows_of_each_class_reproducibly():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    index = plots.pick_per_class(labels, 2, 3, seed=5)
    assert labels[index].tolist() == [0, 0, 1, 1, 2, 2]
    assert len(set(index.tolist())) == 6
    assert torch.equal(index, plots.pick_per_class(labels, 2, 3, seed=5))
    # fewer rows than asked: all of that class; classes past n_classes are left out
    assert labels[plots.pick_per_class(labels, 5, 2)].tolist() == [0, 0, 0, 0, 1, 1, 1]
