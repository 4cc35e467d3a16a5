import os
import warnings

import numpy as np
import pytest
import torch

from utils import data
from utils.data import QuickDrawSet, iterate_batches, load_bitmaps, split, stratified_split, to_float


def write_bitmaps(root, name, array):
    folder = root / "numpy_bitmap"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.npy", array)
    return folder / f"{name}.npy"


def random_bitmaps(rows, seed):
    return np.random.default_rng(seed).integers(0, 256, (rows, 784), dtype=np.uint8)


# --- load_bitmaps -----------------------------------------------------------------------------

def test_load_bitmaps_stacks_first_rows_with_labels_and_names(tmp_path):
    cat, dog = random_bitmaps(5, 0), random_bitmaps(2, 1)
    write_bitmaps(tmp_path, "cat", cat)
    write_bitmaps(tmp_path, "hot dog", dog)
    with pytest.warns(UserWarning, match=r"max_per_class=3 but 'hot dog' has 2 drawings") as caught:
        ds = load_bitmaps(["hot dog", "cat"], root=tmp_path, max_per_class=3)
    assert len(caught) == 1 and "cat" not in str(caught[0].message)  # once, naming only the short one
    assert ds.classes == ["hot dog", "cat"]
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (5, 28, 28)  # dog has only 2 rows
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 1, 1, 1]
    expected = np.concatenate([dog, cat[:3]]).reshape(5, 28, 28)
    assert np.array_equal(ds.images.numpy(), expected)
    assert ds.counts().tolist() == [2, 3] and len(ds) == 5


def test_load_bitmaps_warns_once_for_every_short_category(tmp_path):
    for name, rows in [("cat", 2), ("dog", 9), ("owl", 4)]:
        write_bitmaps(tmp_path, name, random_bitmaps(rows, rows))
    with pytest.warns(UserWarning) as caught:
        load_bitmaps(["cat", "dog", "owl"], root=tmp_path, max_per_class=5)
    assert len(caught) == 1
    assert str(caught[0].message) == "max_per_class=5 but 'cat' has 2, 'owl' has 4 drawings; loading those"


def test_load_bitmaps_is_quiet_when_asked_for_all_or_for_no_more_than_held(tmp_path):
    write_bitmaps(tmp_path, "cat", random_bitmaps(7, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_bitmaps(["cat"], root=tmp_path)) == 7
        assert len(load_bitmaps(["cat"], root=tmp_path, max_per_class=7)) == 7


def test_load_bitmaps_reads_rows_into_the_tensor_without_a_memory_map(tmp_path, monkeypatch):
    cat = random_bitmaps(6, 3)
    write_bitmaps(tmp_path, "cat", cat)

    def no_map(*args, **kwargs):
        raise AssertionError("C-order rows are contiguous on disk: read them, do not map the file")

    monkeypatch.setattr(data.np, "load", no_map)
    ds = load_bitmaps(["cat"], root=tmp_path, max_per_class=4)
    assert np.array_equal(ds.images.numpy(), cat[:4].reshape(4, 28, 28))


def test_load_bitmaps_reads_fortran_order_and_version_2_files(tmp_path, monkeypatch):
    cat, dog = random_bitmaps(5, 4), random_bitmaps(4, 5)
    write_bitmaps(tmp_path, "cat", np.asfortranarray(cat))
    with open(tmp_path / "numpy_bitmap" / "dog.npy", "wb") as f:
        np.lib.format.write_array(f, dog, version=(2, 0))
    modes = []
    real_load = np.load

    def spy(path, *args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(data.np, "load", spy)
    ds = load_bitmaps(["cat", "dog"], root=tmp_path, max_per_class=4)
    assert np.array_equal(ds.images.numpy(), np.concatenate([cat[:4], dog]).reshape(8, 28, 28))
    assert modes == ["r"]  # only the Fortran-order file goes through a (read-only) map


def test_read_rows_fails_if_the_file_ends_early(tmp_path):
    path = write_bitmaps(tmp_path, "cat", random_bitmaps(2, 0))
    with pytest.raises(ValueError, match=r"cat\.npy ended 784 bytes early"):
        data._read_rows(path, 128, False, np.empty((3, 784), np.uint8))


def test_load_bitmaps_refuses_a_set_larger_than_available_memory(tmp_path, monkeypatch):
    for name in ("cat", "dog"):
        write_bitmaps(tmp_path, name, random_bitmaps(10, 0))
    need = 20 * (784 + 8)  # pixels and an int64 label per drawing
    monkeypatch.setattr(data, "available_memory", lambda: need - 1)
    with pytest.raises(MemoryError, match=r"20 drawings of 2 categories need .* GiB but .* GiB of memory is "
                                          r"available; load fewer with max_per_class \(at most 9 per category fits\)"
                                          r" or fewer categories"):
        load_bitmaps(["cat", "dog"], root=tmp_path)
    assert len(load_bitmaps(["cat", "dog"], root=tmp_path, max_per_class=9)) == 18  # the advice fits
    monkeypatch.setattr(data, "available_memory", lambda: need)
    assert len(load_bitmaps(["cat", "dog"], root=tmp_path)) == 20
    monkeypatch.setattr(data, "available_memory", lambda: None)  # unknown: no check
    assert len(load_bitmaps(["cat", "dog"], root=tmp_path)) == 20


def test_available_memory_is_between_zero_and_the_physical_memory():
    available = data.available_memory()
    assert 0 < available <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_load_bitmaps_missing_category_names_file_and_download_command(tmp_path):
    write_bitmaps(tmp_path, "cat", random_bitmaps(2, 0))
    with pytest.raises(FileNotFoundError, match=r"alarm clock\.npy.*python -m utils\.download \"alarm clock\""):
        load_bitmaps(["cat", "alarm clock"], root=tmp_path)


@pytest.mark.parametrize("array, what", [
    (np.zeros((3, 28, 28), np.uint8), r"\(3, 28, 28\)"),
    (np.zeros((3, 100), np.uint8), r"\(3, 100\)"),
    (np.zeros((3, 784), np.float32), "float32"),
])
def test_load_bitmaps_rejects_wrong_shape_or_dtype(tmp_path, array, what):
    path = write_bitmaps(tmp_path, "cat", array)
    with pytest.raises(ValueError, match=f"{path.name}.*{what}"):
        load_bitmaps(["cat"], root=tmp_path)


@pytest.mark.parametrize("damage", [lambda b: b"not a numpy file", lambda b: b[:-100]], ids=["foreign", "truncated"])
def test_load_bitmaps_rejects_corrupt_file(tmp_path, damage):
    path = write_bitmaps(tmp_path, "cat", random_bitmaps(2, 0))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match="cat.npy"):
        load_bitmaps(["cat"], root=tmp_path)


def test_load_bitmaps_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no categories"):
        load_bitmaps([], root=tmp_path)
    with pytest.raises(ValueError, match="repeat"):
        load_bitmaps(["cat", "cat"], root=tmp_path)
    with pytest.raises(ValueError, match="max_per_class"):
        load_bitmaps(["cat"], root=tmp_path, max_per_class=0)


def test_load_bitmaps_on_real_mirror_matches_files(shared_dir):
    folder = shared_dir / "full" / "numpy_bitmap"
    names = sorted(p.stem for p in folder.glob("*.npy"))
    ds = load_bitmaps(names, root=shared_dir / "full")
    rows = [np.load(folder / f"{n}.npy", mmap_mode="r").shape[0] for n in names]
    assert ds.counts().tolist() == rows
    # Two categories, the second with a space in its name, checked pixel by pixel.
    ds = load_bitmaps(["smiley face", "cat"], root=shared_dir / "full", max_per_class=300)
    for label, name in enumerate(ds.classes):
        expected = np.load(folder / f"{name}.npy", mmap_mode="r")[:300].reshape(300, 28, 28)
        assert np.array_equal(ds.images[ds.labels == label].numpy(), expected)
    # Real drawings: ink (255) on an empty (0) background.
    assert ds.images.max() == 255 and (ds.images == 0).float().mean() > 0.5


# --- stratified_split / split ----------------------------------------------------------------

def expected_sizes(n, fractions):
    """Reference: cumulative rounding of every class's count."""
    cuts = [0] + [round(sum(fractions[:i + 1]) * n) for i in range(len(fractions))]
    return [b - a for a, b in zip(cuts, cuts[1:])]


def test_stratified_split_is_disjoint_complete_and_proportional_per_class():
    class_sizes = [100, 50, 31, 7]
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor(class_sizes))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    parts = stratified_split(labels, seed=0)
    assert len(parts) == 3
    everything = torch.cat(parts)
    assert torch.equal(torch.sort(everything).values, torch.arange(len(labels)))  # disjoint, complete
    for c, size in enumerate(class_sizes):
        assert [int((labels[p] == c).sum()) for p in parts] == expected_sizes(size, (0.8, 0.1, 0.1))
    assert [len(p) for p in parts] == [151, 18, 19]


def permutation_then_stable_sort(labels, fractions, seed):
    """Reference: one seeded permutation of all drawings, stably sorted by class, each class cut in turn."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = order[torch.argsort(labels[order], stable=True)]
    parts, start = [[] for _ in fractions], 0
    for size in torch.bincount(labels).tolist():
        for p, n in enumerate(expected_sizes(size, fractions)):
            parts[p] += order[start:start + n].tolist()
            start += n
    return [sorted(p) for p in parts]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "shuffled"])
@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.5, 0.5), (0.0, 0.3, 0.7), (1.0,)])
def test_stratified_split_matches_reference_membership(grouped, fractions):
    # The same drawings land in each part for a seed as with the reference, so splits stay reproducible.
    labels = torch.repeat_interleave(torch.arange(5), torch.tensor([40, 1, 0, 17, 9]))
    if not grouped:
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(2))]
    for seed in (0, 5):
        got = [p.tolist() for p in stratified_split(labels, fractions, seed)]
        assert got == permutation_then_stable_sort(labels, fractions, seed)


def test_stratified_split_is_reproducible_by_seed_and_shuffled():
    labels = torch.arange(1000) % 5
    a, b = stratified_split(labels, seed=3), stratified_split(labels, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = stratified_split(labels, seed=4)
    assert not torch.equal(a[1], c[1])
    # Not simply the first rows of each class: a class's test rows are spread over its drawings.
    test_rows_of_class0 = a[2][labels[a[2]] == 0]
    assert test_rows_of_class0.max() - test_rows_of_class0.min() > 500


def test_stratified_split_custom_fractions_and_empty_labels():
    labels = torch.zeros(10, dtype=torch.int64)
    parts = stratified_split(labels, fractions=(0.5, 0.5))
    assert [len(p) for p in parts] == [5, 5]
    assert [len(p) for p in stratified_split(torch.zeros(0, dtype=torch.int64))] == [0, 0, 0]


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.9, 0.2, -0.1), ()])
def test_stratified_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(torch.zeros(10, dtype=torch.int64), fractions)


def test_split_keeps_images_with_their_labels_and_classes():
    images = torch.arange(60, dtype=torch.uint8)[:, None, None].expand(60, 28, 28).contiguous()
    ds = QuickDrawSet(images, torch.arange(60) % 3, ["a", "b", "c"])
    train, val, test = split(ds, seed=7)
    assert [len(train), len(val), len(test)] == [48, 6, 6]
    for part in (train, val, test):
        assert part.classes == ["a", "b", "c"]
        assert torch.equal(part.labels, part.images[:, 0, 0].long() % 3)
    assert train.counts().tolist() == [16, 16, 16] and test.counts().tolist() == [2, 2, 2]
    odd = ds.subset(ds.labels == 1)  # a bool mask works as well as positions
    assert torch.equal(odd.images[:, 0, 0].long(), torch.arange(1, 60, 3))


def test_quickdrawset_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        QuickDrawSet(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ["a"])


# --- to_float / iterate_batches --------------------------------------------------------------

def test_to_float_scales_to_unit_range_with_channel():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8)[:, None, None].expand(3, 28, 28)
    x = to_float(images)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 28, 28)
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    assert torch.equal(to_float(images[:, None]), x)
    with pytest.raises(TypeError, match="uint8"):
        to_float(x)


def indexed_set(n):
    """Image i is filled with i % 256 and labelled i, so a batch shows which drawings it holds."""
    images = (torch.arange(n) % 256).to(torch.uint8)[:, None, None].expand(n, 28, 28).contiguous()
    return images, torch.arange(n)


def test_iterate_batches_covers_every_drawing_once_per_epoch():
    images, labels = indexed_set(300)
    batches = list(iterate_batches(images, labels, 64, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [64, 64, 64, 64, 44]
    seen = torch.cat([y for _, y in batches])
    assert torch.equal(torch.sort(seen).values, labels) and not torch.equal(seen, labels)  # shuffled
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (len(y), 1, 28, 28) and y.dtype == torch.int64
        assert 0 <= x.min() and x.max() <= 1
        assert torch.equal(torch.round(x[:, 0, 5, 5] * 255).long(), y % 256)  # images match labels


def test_iterate_batches_order_seed_and_drop_last():
    images, labels = indexed_set(10)
    in_order = torch.cat([y for _, y in iterate_batches(images, labels, 4, shuffle=False)])
    assert torch.equal(in_order, labels)
    runs = [torch.cat([y for _, y in iterate_batches(images, labels, 4, generator=torch.Generator().manual_seed(5))])
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    dropped = [len(y) for _, y in iterate_batches(images, labels, 4, drop_last=True)]
    assert dropped == [4, 4]


def test_iterate_batches_over_an_index_visits_only_those_drawings():
    images, labels = indexed_set(50)
    train, val, _ = stratified_split(labels % 5, seed=1)
    seen = torch.cat([y for _, y in iterate_batches(images, labels, 8, index=train,
                                                    generator=torch.Generator().manual_seed(0))])
    assert torch.equal(torch.sort(seen).values, train) and not torch.equal(seen, train)
    in_order = torch.cat([y for _, y in iterate_batches(images, labels, 3, shuffle=False, index=val)])
    assert torch.equal(in_order, val)


def test_iterate_batches_applies_transform_to_float_batch():
    images, labels = indexed_set(8)
    plain = list(iterate_batches(images, labels, 3, shuffle=False))
    turned = list(iterate_batches(images, labels, 3, shuffle=False, transform=lambda x: 1 - x))
    for (x, y), (tx, ty) in zip(plain, turned):
        assert torch.equal(y, ty) and torch.allclose(tx, 1 - x)


def test_iterate_batches_rejects_bad_arguments():
    images, labels = indexed_set(8)
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(images, labels, 0))
    with pytest.raises(ValueError, match="8 images but 7 labels"):
        next(iterate_batches(images, labels[:7], 4))
