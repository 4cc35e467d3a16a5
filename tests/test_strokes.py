import json
import math
import sys
import threading

import numpy as np
import pytest

from utils import strokes
from utils.strokes import build_bitmaps, official_pairs, read_ndjson, render, render_batch, simplify

SIDE = 28
SCALE = SIDE / (256 + 2 * 16 + 16)  # device pixels per canvas unit
RADIUS = 8 * SCALE                  # half the 16-unit pen, in pixels

DOT = [[[0], [0]]]
HLINE = [[[0, 255], [0, 0]]]
SQUARE = [[[0, 255, 255, 0, 0], [0, 0, 255, 255, 0]]]
SHAPES = {
    "dot": DOT, "hline": HLINE, "square": SQUARE,
    "diagonal": [[[0, 255], [0, 255]]],
    "triangle": [[[0, 128, 255, 0], [255, 0, 255, 255]]],
    "zigzag": [[[0, 60, 120, 180, 255], [0, 200, 30, 220, 90]]],
}


def reference(stroke, side=SIDE, sub=16):
    """Geometry alone: 255 x the share of each pixel within 8 units of the polyline (supersampled),
    placed as the official renderer places it (centred on the max, 304-unit frame)."""
    pts = np.asarray(stroke, dtype=float).T  # (n, 2)
    scale = side / 304
    dev = (pts + (256 - pts.max(0)) / 2 + 24) * scale
    dev = np.vstack([dev, dev]) if len(dev) == 1 else dev
    c = (np.arange(side * sub) + 0.5) / sub
    X, Y = np.meshgrid(c, c)
    P = np.stack([X.ravel(), Y.ravel()], 1)
    dist = np.full(len(P), np.inf)
    for a, b in zip(dev[:-1], dev[1:]):
        ab = b - a
        t = np.clip((P - a) @ ab / (ab @ ab), 0, 1) if ab @ ab > 0 else np.zeros(len(P))
        dist = np.minimum(dist, np.linalg.norm(P - (a + t[:, None] * ab), axis=1))
    return (dist <= 8 * scale).reshape(side, sub, side, sub).mean((1, 3)) * 255


def random_raw(seed, n_strokes=3, n_points=40):
    """A raw-looking drawing: random walks in device pixels, with times."""
    rng = np.random.default_rng(seed)
    out, t = [], 0
    for _ in range(n_strokes):
        xy = np.cumsum(rng.integers(-9, 10, (2, n_points)), axis=1) + rng.integers(100, 600, (2, 1))
        ts = t + np.arange(n_points) * 17
        t = int(ts[-1]) + 300
        out.append([xy[0].tolist(), xy[1].tolist(), ts.tolist()])
    return out


# --- render: hand-made drawings whose bitmaps follow from the geometry -----------------------

def test_dot_is_a_disc_centred_on_the_canvas_split_evenly_over_four_pixels():
    img = render(DOT)
    assert img.shape == (SIDE, SIDE) and img.dtype == np.uint8
    # the point lands on (256/2 + 24) * 28/304 = 14.0 px: the corner shared by pixels 13 and 14
    ink = np.argwhere(img > 0)
    assert sorted(map(tuple, ink)) == [(13, 13), (13, 14), (14, 13), (14, 14)]
    quarter = math.pi * RADIUS ** 2 / 4 * 255  # each pixel holds a quarter disc: 108.7
    assert len(set(img[13:15, 13:15].ravel())) == 1
    assert abs(int(img[13, 13]) - quarter) <= 0.06 * quarter  # cairo's polygonal circle is a bit smaller
    assert np.array_equal(render([[[0, 0], [0, 0]]]), img)  # the 2-point form of the simplified files
    # centring adds (256 - max) / 2, so only the max moves the drawing: a dot at (10, 0) sits 5
    # units (0.46 px) further right
    shifted = render([[[10], [0]]]).astype(int)
    assert shifted[13, 13] < img[13, 13] < shifted[13, 14] and shifted[13, 15] > 0 == img[13, 15]
    assert np.array_equal(shifted, shifted[::-1])  # still centred vertically


def test_horizontal_line_is_a_band_two_pixels_high_across_the_canvas():
    img = render(HLINE).astype(int)
    assert np.array_equal(img, img[::-1]) and np.array_equal(img, img[:, ::-1])  # centred both ways
    assert not img[:13].any() and not img[15:].any()  # band y in 14 +- 0.737 px: rows 13 and 14 only
    # interior columns are covered 0.737 of a pixel high in each row: 188
    assert np.abs(img[13:15, 3:25] - RADIUS * 255).max() <= 2
    # ends: (0.5 + 24) * 28/304 = 2.26 px minus the 0.74 px cap -> ink from column 1, none in column 0
    assert not img[:, 0].any() and img[13, 1] > 0 and img[13, 1] < img[13, 2]


def test_square_outline_is_symmetric_hollow_with_its_sides_on_columns_1_and_2():
    img = render(SQUARE).astype(int)
    assert np.array_equal(img, img[::-1]) and np.array_equal(img, img[:, ::-1])
    assert np.abs(img - img.T).max() <= 6  # cairo samples x more finely than y
    assert not img[4:24, 4:24].any()  # hollow
    assert not img[0].any() and not img[:, 0].any()
    # the left side is centred on x = 2.26 px, 1.47 px wide: column 2 nearly full, column 1 half
    assert (img[4:24, 2] >= 250).all()
    half = 255 * (2 - (0.5 + 24) * SCALE + RADIUS)  # share of column 1 under the pen
    assert np.abs(img[4:24, 1] - half).max() <= 6


@pytest.mark.parametrize("name", list(SHAPES))
def test_render_matches_the_supersampled_geometry(name):
    stroke = SHAPES[name][0]
    for side in (SIDE, 64):
        got, want = render([stroke], side).astype(float), reference(stroke, side)
        assert np.abs(got - want).mean() <= 1.0
        assert np.abs(got - want).max() <= 16  # an edge pixel off by a sampling step, never a pixel
        assert got.sum() == pytest.approx(want.sum(), rel=0.06 if name == "dot" else 0.03)


def test_render_at_ten_times_the_side_downsamples_to_the_same_bitmap():
    for drawing in SHAPES.values():
        small = render(drawing).astype(float)
        big = render(drawing, side=SIDE * 10).astype(float).reshape(SIDE, 10, SIDE, 10).mean((1, 3))
        assert np.abs(small - big).mean() <= 1.0 and np.abs(small - big).max() <= 16


def test_each_stroke_is_painted_over_the_ones_before():
    once = render(HLINE).astype(int)
    twice = render(HLINE * 2).astype(int)  # the same line as two strokes: the edges get more ink
    expected = once + np.round(once * (255 - once) / 255)
    assert np.abs(twice - expected).max() <= 1
    assert (twice[once == 0] == 0).all() and (twice >= once).all() and (twice > once).any()


def test_render_batch_equals_render_one_by_one_and_clears_between_drawings():
    drawings = [SQUARE, DOT, SHAPES["zigzag"], DOT]
    batch = render_batch(drawings)
    assert batch.shape == (4, SIDE * SIDE) and batch.dtype == np.uint8
    for row, drawing in zip(batch, drawings):
        assert np.array_equal(row.reshape(SIDE, SIDE), render(drawing))
    assert render_batch(iter(drawings), side=64).shape == (4, 64 * 64)
    assert render_batch([]).shape == (0, SIDE * SIDE)


def test_render_accepts_raw_style_strokes_with_times_and_numpy_arrays():
    with_times = [[[0, 255], [0, 0], [0, 100]]]
    assert np.array_equal(render(with_times), render(HLINE))
    assert np.array_equal(render([np.array([[0, 255], [0, 0]])]), render(HLINE))


@pytest.mark.parametrize("drawing", [
    [[[0, 256], [0, 0]]],
    [[[0, 255], [-1, 0]]],
    [[[0, 100], [0, 0]], [[10, 20], [0, 255.5]]],
    random_raw(0),  # device pixels, with times
])
def test_render_refuses_coordinates_outside_0_255(drawing):
    message = r"outside 0\.\.255: not simplified: call simplify\(\) first, or use --kind raw"
    with pytest.raises(ValueError, match=message):
        render(drawing)
    with pytest.raises(ValueError, match=f"drawing 1: coordinates run .*{message}"):
        render_batch([HLINE, drawing])
    render(simplify(drawing))


def test_simplified_drawings_of_any_raw_strokes_render():
    # the path of the web API: render(simplify(strokes)) whatever the canvas coordinates were
    drawings = [random_raw(seed) for seed in range(5)] + [
        [[[-5000.5, 1e12], [-3, 7]]], [[[1e-9, 2e-9, 3e-9], [0, 5e-10, 0]]], [[[-3], [-4]]],
        [[[0.1, 0.2], [-0.7, -0.7]], [[1e6], [-1e6]]]]
    for drawing in drawings:
        out = simplify(drawing)
        assert np.array_equal(render(out), render_batch([out])[0].reshape(SIDE, SIDE))


# --- simplify -----------------------------------------------------------------------------------

def test_simplify_aligns_scales_uniformly_and_keeps_corners():
    # 510 x 102 device pixels at (40, 70): halved to 255 x 51, the corner exactly on a resample step
    raw = [[[40, 550, 550], [70, 70, 172]]]
    assert simplify(raw) == [[[0, 255, 255], [0, 0, 51]]]
    square = [[[10, 110, 110, 10, 10], [20, 20, 120, 120, 20]]]
    assert simplify(square) == SQUARE


def test_simplify_drops_collinear_points_and_wiggles_within_epsilon():
    line = [[list(range(0, 300, 3)), list(range(0, 200, 2))]]  # 100 collinear points
    assert simplify(line) == [[[0, 255], [0, 170]]]
    assert simplify([[[0, 128, 255], [0, 1, 0]]]) == [[[0, 255], [0, 0]]]  # 1 unit off: dropped
    assert simplify([[[0, 128, 255], [0, 5, 0]]]) == [[[0, 128, 255], [0, 5, 0]]]  # 5 units: kept


def test_simplify_keeps_a_point_just_over_2_units_off_the_chord_and_drops_one_just_under():
    # x spans 0..255, so scaling leaves the points where they are. Resampled every unit, the apex
    # (128, h) itself is not a sample; the one just before it, at arc length 128, is the farthest
    # from the chord y = 0: 0.99987 h, that is 2.0297 for h = 2.03 and 1.9698 for h = 1.97
    assert simplify([[[0, 128, 255], [0, 2.03, 0]]]) == [[[0, 128, 255], [0, 2, 0]]]
    assert simplify([[[0, 128, 255], [0, 1.97, 0]]]) == [[[0, 255], [0, 0]]]
    # the tolerance applies after scaling to 0..255: ten times larger, the same outcome
    assert simplify([[[0, 1280, 2550], [0, 20.3, 0]]]) == [[[0, 128, 255], [0, 2, 0]]]
    assert simplify([[[0, 1280, 2550], [0, 19.7, 0]]]) == [[[0, 255], [0, 0]]]


def test_simplify_keeps_a_resampled_point_rather_than_the_corner():
    # An L with its corner at (100.4, 0): the samples every unit of arc length around it are (100, 0)
    # and (100.4, 0.6). Their distances to the chord from (0, 0) to (100.4, 255), times its length,
    # are 255 * 100 = 25,500 and 255 * 100.4 - 0.6 * 100.4 = 25,541.76: the second is kept, and
    # rounds to (100, 1) where the corner would round to (100, 0)
    assert simplify([[[0, 100.4, 100.4], [0, 0, 255]]]) == [[[0, 100, 100], [0, 1, 255]]]


def test_simplify_output_is_json_ints_in_range_and_ignores_times():
    for seed in range(5):
        raw = random_raw(seed)
        out = simplify(raw)
        assert len(out) == len(raw)
        values = [v for stroke in out for axis in stroke for v in axis]
        assert all(type(v) is int for v in values) and 0 <= min(values) and max(values) <= 255
        assert all(len(s[0]) == len(s[1]) >= 2 for s in out)
        assert simplify([s[:2] for s in raw]) == out
        json.dumps(out)


def test_simplify_is_invariant_to_doubling_and_shifting():
    for seed in range(5):
        raw = random_raw(seed)
        moved = [[[2 * v + 101 for v in s[0]], [2 * v - 37 for v in s[1]]] for s in raw]
        assert simplify(moved) == simplify(raw)


def test_simplify_keeps_lone_points_as_two_point_strokes():
    assert simplify([[[500], [300]]]) == [[[0, 0], [0, 0]]]
    out = simplify([[[0, 100], [0, 0]], [[50], [40]]])
    assert out == [[[0, 255], [0, 0]], [[128, 128], [102, 102]]]  # 127.5 rounds half to even


def reference_simplify(raw, epsilon=2.0):
    """The simplification one stroke and one RDP split at a time, as the official data was made: the
    reference the vectorized utils.strokes.simplify must match point for point."""
    xy = np.concatenate([np.asarray(s, dtype=np.float64)[:2] for s in raw], axis=1)
    xy = xy - xy.min(axis=1, keepdims=True)
    extent = xy.max()
    if extent > 0:
        xy = xy * 255.0 / extent
    out = []
    for p in np.split(xy.T, np.cumsum([len(s[0]) for s in raw])[:-1]):
        d = np.diff(p, axis=0)
        length = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
        a, b, length = p[:-1][length > 0], p[1:][length > 0], length[length > 0]
        if len(length):
            end = np.cumsum(length)
            start = np.concatenate(([0.0], end[:-1]))
            samples = np.arange(1.0, np.floor(end[-1]) + 1.0)
            j = np.searchsorted(end, samples)
            f = ((samples - start[j]) / length[j])[:, None]
            p = np.concatenate([p[:1], a[j] * (1.0 - f) + b[j] * f] + ([p[-1:]] if len(samples) == 0 or
                                                                       (a[j[-1]] * (1.0 - f[-1]) + b[j[-1]] * f[-1] != p[-1]).any() else []))
        else:
            p = p[:1]
        keep = np.zeros(len(p), dtype=bool)
        keep[[0, -1]] = True
        spans = [(0, len(p) - 1)]
        while spans:
            i, k = spans.pop()
            if k - i < 2:
                continue
            q, (dx, dy) = p[i + 1:k], p[k] - p[i]
            if dx == 0 and dy == 0:
                dist = np.sqrt((q[:, 0] - p[i, 0]) ** 2 + (q[:, 1] - p[i, 1]) ** 2)
            else:
                dist = np.abs(dx * (p[i, 1] - q[:, 1]) - dy * (p[i, 0] - q[:, 0])) / np.sqrt(dx * dx + dy * dy)
            m = int(np.argmax(dist))
            if dist[m] > epsilon:
                keep[i + 1 + m] = True
                spans += [(i, i + 1 + m), (i + 1 + m, k)]
        kept = np.round(p[keep]).astype(int)
        kept = kept if len(kept) > 1 else np.concatenate([kept, kept])
        out.append([kept[:, 0].tolist(), kept[:, 1].tolist()])
    return out


EDGE_CASES = [DOT, [[[5, 5, 5], [1, 1, 1]]], [[[0, 0.3], [0, 0.2]], [[10, 10], [10, 10]]],
              [[[0, 100], [0, 0]], [[3], [4]]], [[[0, 100, 0], [0, 0, 0]]],  # back on itself: a closed span
              [[[0, 0, 0, 0], [0, 1, 0, 1]]], [[[0, 255, 0, 255], [0, 0, 0, 0]], [[7], [7]], [[1, 2, 1], [5, 5, 5]]]]


def test_simplify_matches_the_stroke_by_stroke_reference():
    drawings = [random_raw(seed, n_strokes=1 + seed % 4, n_points=5 + 17 * seed) for seed in range(12)] + EDGE_CASES
    for drawing in drawings:
        assert simplify(drawing) == reference_simplify(drawing)


def test_simplify_matches_the_reference_on_every_raw_drawing_of_the_mirror(shared_dir):
    drawings = [r["drawing"] for path in sorted((shared_dir / "full" / "raw").glob("*.ndjson"))
                for r in read_ndjson(path)]
    assert len(drawings) > 9000
    differ = [i for i, d in enumerate(drawings) if simplify(d) != reference_simplify(d)]
    assert differ == []


def test_render_raw_batch_draws_each_drawing_as_render_of_simplify_one_by_one():
    drawings = [random_raw(seed, n_strokes=1 + seed % 3) for seed in range(8)] + EDGE_CASES
    alone = np.stack([render(simplify(d)) for d in drawings])
    assert np.array_equal(strokes.render_raw_batch(drawings), alone)
    assert np.array_equal(strokes.render_raw_batch(drawings[::-1]), alone[::-1])  # no drawing leaks into another
    assert all(np.array_equal(strokes.render_raw(d), a) for d, a in zip(drawings, alone))
    assert strokes.render_raw_batch([]).shape == (0, SIDE, SIDE)
    with pytest.raises(ValueError, match=r"drawing 2: stroke 0 has NaN"):
        strokes.render_raw_batch(drawings[:2] + [[[[0, float("nan")], [0, 1]]]])
    with pytest.raises(ValueError, match=r"drawing 1: the drawing spans more than a float can hold"):
        strokes.render_raw_batch([DOT, [[[-1e308, 1e308], [0, 0]]]])


def test_simplify_works_without_cairo_and_render_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cairocffi", None)  # import cairocffi -> ImportError
    monkeypatch.setattr(strokes, "_canvases", threading.local())  # no canvas made before in this thread
    assert simplify(HLINE) == HLINE
    with pytest.raises(ImportError, match=r"apt-get install libcairo2.*pip install cairocffi"):
        render(HLINE)


# --- bad input ----------------------------------------------------------------------------------

BAD = [
    ([], "empty"),
    ("not strokes", "list of strokes"),
    ({"drawing": HLINE}, "record"),
    ([[[1, 2], [3]]], "2 x but 1 y"),
    ([[[1, 2], [3, 4], [5]]], "2 x but 1 t"),
    ([[[1, float("nan")], [3, 4]]], "NaN or infinite"),
    ([[[1, 2], [3, float("inf")]]], "NaN or infinite"),
    ([[[], []]], "no points"),
    ([[1, 2], [3, 4]], "stroke 0 is nested wrongly"),
    ([[[[1, 2]], [[3, 4]]]], "nested wrongly"),
    ([[["a", "b"], [1, 2]]], "must be numbers"),
    ([[[1, 2]]], "stroke 0 must be"),
    ([HLINE[0], [[1, 2], [3, 4], [5, 6], [7, 8]]], "stroke 1 must be"),
]


@pytest.mark.parametrize("drawing,message", BAD)
def test_bad_drawings_raise_value_errors_naming_the_problem(drawing, message):
    with pytest.raises(ValueError, match=message):
        simplify(drawing)
    with pytest.raises(ValueError, match=message):
        render(drawing)
    with pytest.raises(ValueError, match=f"drawing 1: .*{message}"):
        render_batch([HLINE, drawing])


def test_bad_side_raises():
    for side in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="side"):
            render(HLINE, side=side)


# --- files ----------------------------------------------------------------------------------------

def write_ndjson(path, drawings, word="thing"):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"word": word, "key_id": str(i), "drawing": d}) for i, d in enumerate(drawings)]
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_read_ndjson_reads_records_up_to_limit_and_names_bad_lines(tmp_path):
    path = write_ndjson(tmp_path / "a.ndjson", [HLINE, SQUARE, DOT])
    assert [r["drawing"] for r in read_ndjson(path)] == [HLINE, SQUARE, DOT]
    assert [r["key_id"] for r in read_ndjson(path, limit=2)] == ["0", "1"]
    assert read_ndjson(path, limit=0) == []
    path.write_text(json.dumps({"drawing": HLINE}) + "\n{oops\n")
    with pytest.raises(ValueError, match="drawing 2 is not valid JSON"):
        read_ndjson(path)
    path.write_text(json.dumps({"word": "x"}) + "\n")
    with pytest.raises(ValueError, match="drawing 1 has no 'drawing'"):
        read_ndjson(path)


def test_build_bitmaps_renders_both_kinds_like_render_batch(tmp_path):
    raws = [random_raw(seed) for seed in range(6)]
    write_ndjson(tmp_path / "src" / "raw" / "hot dog.ndjson", raws)
    write_ndjson(tmp_path / "src" / "simplified" / "hot dog.ndjson", [simplify(r) for r in raws])
    write_ndjson(tmp_path / "src" / "simplified" / "cat.ndjson", [SQUARE, DOT])
    expected = render_batch([simplify(r) for r in raws])
    for kind in ("raw", "simplified"):
        paths = build_bitmaps(tmp_path / "src", tmp_path / kind, kind, ["hot dog"], progress=False)
        assert paths == {"hot dog": tmp_path / kind / "numpy_bitmap" / "hot dog.npy"}
        assert np.array_equal(np.load(paths["hot dog"]), expected)
    paths = build_bitmaps(tmp_path / "src" / "simplified", tmp_path / "all", max_per_class=4, progress=False)
    assert sorted(paths) == ["cat", "hot dog"]
    assert np.array_equal(np.load(paths["cat"]), render_batch([SQUARE, DOT]))
    assert np.array_equal(np.load(paths["hot dog"]), expected[:4])
    assert sorted(p.name for p in (tmp_path / "all" / "numpy_bitmap").iterdir()) == ["cat.npy", "hot dog.npy"]


def test_build_bitmaps_errors_name_the_category_or_the_drawing(tmp_path):
    write_ndjson(tmp_path / "raw" / "hot dog.ndjson", [random_raw(0), [[[1, 2], [3]]]])
    with pytest.raises(FileNotFoundError, match="'hot_dog' \\(closest: hot dog\\)"):
        build_bitmaps(tmp_path, tmp_path / "out", "raw", ["hot_dog"], progress=False)
    with pytest.raises(ValueError, match="hot dog.ndjson: drawing 2: stroke 0 has 2 x but 1 y"):
        build_bitmaps(tmp_path, tmp_path / "out", "raw", progress=False)
    assert not (tmp_path / "out" / "numpy_bitmap" / "hot dog.npy").exists()


def test_build_bitmaps_writes_atomically(tmp_path, monkeypatch):
    write_ndjson(tmp_path / "simplified" / "cat.ndjson", [SQUARE, DOT])
    target = tmp_path / "out" / "numpy_bitmap" / "cat.npy"
    build_bitmaps(tmp_path, tmp_path / "out", max_per_class=1, progress=False)
    before = target.read_bytes()

    def save_half_then_fail(f, array):
        f.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        build_bitmaps(tmp_path, tmp_path / "out", progress=False)
    assert target.read_bytes() == before  # the old complete file, not a partial one
    assert [p.name for p in target.parent.iterdir()] == ["cat.npy"]  # no temporary file left


def test_simplified_kind_refuses_raw_strokes_naming_the_file_and_drawing(tmp_path, capsys):
    path = write_ndjson(tmp_path / "simplified" / "cat.ndjson", [SQUARE, [[[0, 255], [0, 0], [0, 90]]]])
    with pytest.raises(ValueError, match=r"cat.ndjson: drawing 2: its strokes carry a time row.*--kind raw"):
        build_bitmaps(tmp_path, tmp_path / "out", progress=False)
    write_ndjson(path, [SQUARE, DOT, [[[0, 10], [0, 10]], [[40, 600], [50, 300]]]])  # pixels, no times
    with pytest.raises(ValueError, match=r"cat.ndjson: drawing 3: coordinates run x 0..600, y 0..300, "
                                         r"outside 0\.\.255: not simplified"):
        build_bitmaps(tmp_path, tmp_path / "out", progress=False)
    write_ndjson(path, [random_raw(seed) for seed in range(3)])
    with pytest.raises(SystemExit):
        strokes.main(["--src", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert "cat.ndjson: drawing 1: its strokes carry a time row" in capsys.readouterr().err
    assert not (tmp_path / "out" / "numpy_bitmap").exists()


def test_official_pairs_set_line_i_beside_row_i_up_to_the_shorter_file(tmp_path):
    (tmp_path / "numpy_bitmap").mkdir()
    np.save(tmp_path / "numpy_bitmap" / "cat.npy", render_batch([SQUARE, DOT, HLINE]))
    np.save(tmp_path / "numpy_bitmap" / "dog.npy", render_batch([DOT]))
    np.save(tmp_path / "numpy_bitmap" / "cow.npy", render_batch([DOT]))  # no strokes: left out
    write_ndjson(tmp_path / "simplified" / "cat.ndjson", [SQUARE, HLINE])  # shorter than its .npy
    write_ndjson(tmp_path / "simplified" / "dog.ndjson", [DOT, SQUARE, HLINE])  # longer
    write_ndjson(tmp_path / "raw" / "dog.ndjson", [[[[7], [9], [0]]]])
    ours, theirs = official_pairs(tmp_path)
    assert ours.shape == theirs.shape == (3, 784) and ours.dtype == theirs.dtype == np.uint8
    assert np.array_equal(ours, render_batch([SQUARE, HLINE, DOT]))
    assert np.array_equal(theirs, render_batch([SQUARE, DOT, DOT]))
    ours, theirs = official_pairs(tmp_path, "raw")
    assert np.array_equal(ours, theirs) and len(ours) == 1
    ours, theirs = official_pairs(tmp_path, categories=["dog", "cat"], limit=1)
    assert np.array_equal(ours, render_batch([DOT, SQUARE])) and np.array_equal(ours, theirs)


def test_cli_builds_the_named_categories(tmp_path, capsys):
    write_ndjson(tmp_path / "simplified" / "cat.ndjson", [SQUARE, DOT, HLINE])
    write_ndjson(tmp_path / "simplified" / "dog.ndjson", [HLINE])
    strokes.main(["--kind", "simplified", "--src", str(tmp_path), "--out", str(tmp_path / "out"),
                  "--max-per-class", "2", "--no-progress", "cat"])
    assert "1 classes, 2 bitmaps" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out" / "numpy_bitmap").iterdir()] == ["cat.npy"]
    assert np.array_equal(np.load(tmp_path / "out" / "numpy_bitmap" / "cat.npy"), render_batch([SQUARE, DOT]))
    with pytest.raises(SystemExit):
        strokes.main(["--src", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress", "cow"])
    assert "'cow'" in capsys.readouterr().err


# --- the official data --------------------------------------------------------------------------

@pytest.mark.parametrize("kind,pairs", [("simplified", 425), ("raw", 519)])
def test_render_of_official_strokes_is_the_official_bitmap_byte_for_byte(shared_dir, kind, pairs):
    ours, theirs = official_pairs(shared_dir / "full", kind)
    assert len(ours) == pairs
    assert np.flatnonzero((ours != theirs).any(1)).tolist() == []  # the rows that differ, if any


def test_simplify_of_official_raw_strokes_is_the_official_simplified_drawing(shared_dir):
    full = shared_dir / "full"
    total, differ = 0, []
    for path in sorted((full / "simplified").glob("*.ndjson"))[::8]:  # 43 categories, 974 drawings
        simplified = read_ndjson(path)
        for raw, official in zip(read_ndjson(full / "raw" / path.name), simplified):
            assert raw["key_id"] == official["key_id"]
            if simplify(raw["drawing"]) != official["drawing"]:
                differ.append((path.stem, raw["key_id"]))
            total += 1
    assert total == 974 and differ == []


def test_build_bitmaps_from_official_raw_strokes_gives_the_official_rows(shared_dir, tmp_path):
    paths = build_bitmaps(shared_dir / "full", tmp_path, "raw", ["smiley face", "cat"], max_per_class=10,
                          progress=False)
    for name, path in paths.items():
        built = np.load(path)
        official = np.load(shared_dir / "full" / "numpy_bitmap" / f"{name}.npy", mmap_mode="r")[:10]
        assert built.shape == (10, 784) and built.dtype == np.uint8
        assert np.array_equal(built, official)
