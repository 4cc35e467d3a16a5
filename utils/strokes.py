"""Strokes to bitmaps, made as the official Quick, Draw! data was made.

Stroke files are ndjson, one drawing a line, its strokes under "drawing":
  simplified: [[x0, x1, ...], [y0, y1, ...]] per stroke, integers 0..255
  raw:        [[x...], [y...], [t...]] per stroke, device pixels and milliseconds

simplify() turns a raw drawing into the simplified format, render() turns a simplified drawing
into the 28x28 uint8 bitmap of the official numpy_bitmap files, render_file() and build_bitmaps()
do both for whole stroke files, official_pairs() sets rendered stroke files beside the bitmap files
they should reproduce. CLI:
  python -m utils.strokes --kind raw --src data/ --out data/ [--max-per-class N] [categories...]
"""
from __future__ import annotations

import argparse
import difflib
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from utils.formats import KINDS
from utils.io import atomic_write

EPSILON = 2.0       # Ramer-Douglas-Peucker tolerance of the simplification, in 0..255 units
EXTENT = 255.0      # a simplified drawing spans 0..EXTENT on its longer side
CANVAS = 256.0      # the square the simplified coordinates live in
LINE_WIDTH = 16.0   # pen diameter, in canvas units
PADDING = 16.0      # border around the canvas, in canvas units

CAIRO_HELP = ("rendering strokes needs the cairo library and its cffi binding: install them with "
              "`apt-get install libcairo2` (Debian/Ubuntu; `brew install cairo` on macOS) and "
              "`pip install cairocffi`")


def _cairo():
    """cairocffi, imported on first render so simplify() works without cairo."""
    try:
        import cairocffi
    except (ImportError, OSError) as e:  # OSError: the binding is there but libcairo is not
        raise ImportError(f"{CAIRO_HELP} ({type(e).__name__}: {e})") from e
    return cairocffi


# ---------------------------------------------------------------------------------------------
# reading and checking


def iter_ndjson(path, limit: int | None = None) -> Iterator[dict]:
    """Records of an ndjson stroke file, one per line, first `limit` only; errors name the line."""
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    with open(path, encoding="utf-8") as f:
        lines = (line for line in f if line.strip())
        for lineno, line in enumerate(itertools.islice(lines, limit), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: drawing {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "drawing" not in record:
                raise ValueError(f"{path}: drawing {lineno} has no 'drawing' field")
            yield record


def read_ndjson(path, limit: int | None = None) -> list[dict]:
    """The first `limit` records (all if None) of a simplified or raw ndjson stroke file."""
    return list(iter_ndjson(path, limit))


def _strokes(drawing) -> tuple[np.ndarray, list[int]]:
    """Check a drawing ([[xs], [ys]] or [[xs], [ys], [ts]] per stroke).

    Returns every point as float64 (2, N), strokes one after another, and the stroke lengths.
    """
    if isinstance(drawing, dict):
        raise ValueError("expected a drawing (a list of strokes), got a record: pass record['drawing']")
    if isinstance(drawing, (str, bytes)) or not isinstance(drawing, (Sequence, np.ndarray)):
        raise ValueError(f"a drawing must be a list of strokes, got {type(drawing).__name__}")
    if len(drawing) == 0:
        raise ValueError("the drawing is empty: it has no strokes")
    parts = []
    for i, stroke in enumerate(drawing):
        try:
            a = np.asarray(stroke, dtype=np.float64)
        except (TypeError, ValueError):
            a = None
        if a is None or a.ndim != 2 or a.shape[0] not in (2, 3) or a.shape[1] == 0:
            _explain(i, stroke)
        parts.append(a[:2])
    xy = np.concatenate(parts, axis=1)
    if not np.isfinite(xy).all():
        bad = next(i for i, a in enumerate(parts) if not np.isfinite(a).all())
        raise ValueError(f"stroke {bad} has NaN or infinite coordinates")
    return xy, [a.shape[1] for a in parts]


def _simplified(drawing, times: bool = True) -> tuple[np.ndarray, list[int]]:
    """_strokes() of a drawing that must be in simplified units, as raw ones would land off the canvas;
    times=False also refuses time rows, the mark of raw strokes in a file said to be simplified."""
    xy, lengths = _strokes(drawing)
    if not times and any(len(stroke) == 3 for stroke in drawing):
        raise ValueError("its strokes carry a time row, so they are raw: use --kind raw")
    low, high = xy.min(axis=1), xy.max(axis=1)
    if low.min() < 0 or high.max() > EXTENT:
        raise ValueError(f"coordinates run x {low[0]:g}..{high[0]:g}, y {low[1]:g}..{high[1]:g}, outside "
                         f"0..{EXTENT:g}: not simplified: call simplify() first, or use --kind raw")
    return xy, lengths


def _explain(i: int, stroke) -> None:
    """Raise the ValueError saying what is wrong with stroke i (one that numpy could not take)."""
    if (isinstance(stroke, (str, bytes, dict)) or not isinstance(stroke, (Sequence, np.ndarray))
            or len(stroke) not in (2, 3)):
        raise ValueError(f"stroke {i} must be [[x...], [y...]] or [[x...], [y...], [t...]]")
    lengths = []
    for name, values in zip("xyt", stroke):
        try:
            v = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"stroke {i}: its {name} values must be numbers") from None
        if v.ndim != 1:
            raise ValueError(f"stroke {i} is nested wrongly: its {name} values must be a flat list")
        lengths.append(len(v))
    if lengths[0] == 0:
        raise ValueError(f"stroke {i} has no points")
    for name, n in zip("yt", lengths[1:]):
        if n != lengths[0]:
            raise ValueError(f"stroke {i} has {lengths[0]} x but {n} {name} values")
    raise ValueError(f"stroke {i} must be [[x...], [y...]] or [[x...], [y...], [t...]]")


# ---------------------------------------------------------------------------------------------
# simplification: align to 0, scale to 0..255, resample every 1 unit, RDP at 2.0, round
# The arithmetic below (operation order, sqrt of squares, lerp form, first farthest point,
# round half to even) is what reproduces the official simplified files point for point.
# Every stroke of a drawing goes through the same numpy calls, and RDP splits every span of a
# level at once: a drawing costs a few dozen numpy calls, not a few dozen per stroke and per split.


def _resample(p: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each stroke of p (N, 2) (lengths (S,) points each) resampled: its first point, points every
    1 unit of its arc length from there, then its last point. -> points (R, 2) and counts (S,)."""
    starts = np.cumsum(lengths) - lengths
    d = np.diff(p, axis=0)                         # (N-1, 2): segment k runs from point k to k+1
    length = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
    moving = length > 0
    moving[starts[1:] - 1] = False                 # no segment joins a stroke to the next
    a, b, length = p[:-1][moving], p[1:][moving], length[moving]    # (M, 2), (M, 2), (M,)
    segments = np.bincount(np.repeat(np.arange(len(lengths)), lengths)[:-1][moving], minlength=len(lengths))
    first = np.cumsum(segments) - segments         # (S,) each stroke's first moving segment
    # arc length at each segment's end: one cumsum per stroke (a sum running on from the strokes
    # before would round differently), and the samples 1, 2, ... along it
    ends, samples, holders = [], [], []
    for f, n in zip(first.tolist(), segments.tolist()):
        if n:
            end = np.cumsum(length[f:f + n])
            s = np.arange(1.0, np.floor(end[-1]) + 1.0)
            ends.append(end)
            samples.append(s)
            holders.append(np.searchsorted(end, s) + f)  # the segment holding each sample
        else:
            samples.append(np.empty(0))
    count = np.array([len(s) for s in samples])    # (S,) samples per stroke
    last = p[starts + lengths - 1]                 # (S, 2)
    out_count = 1 + count + (segments > 0)         # first point, samples, last point (dropped below)
    if ends:
        end = np.concatenate(ends)
        start = np.concatenate(([0.0], end[:-1]))
        start[first[segments > 0]] = 0.0
        s, j = np.concatenate(samples), np.concatenate(holders)
        f = ((s - start[j]) / length[j])[:, None]
        inner = a[j] * (1.0 - f) + b[j] * f        # (sum(count), 2)
        before_last = p[starts]
        before_last[count > 0] = inner[np.cumsum(count)[count > 0] - 1]
        out_count -= (segments > 0) & (before_last == last).all(axis=1)  # the last sample is the last point
    else:
        inner = np.empty((0, 2))
    out_start = np.cumsum(out_count) - out_count
    out = np.empty((out_count.sum(), 2))
    out[out_start] = p[starts]
    out[np.repeat(out_start + 1 - (np.cumsum(count) - count), count) + np.arange(len(inner))] = inner
    with_last = out_count > 1 + count
    out[(out_start + out_count - 1)[with_last]] = last[with_last]
    return out, out_count


def _rdp(x: np.ndarray, y: np.ndarray, counts: np.ndarray, epsilon: float) -> np.ndarray:
    """Ramer-Douglas-Peucker on each stroke of the points x, y (R,) (counts (S,) points each), distance
    to the infinite chord line; -> the points kept, bool (R,). Each pass splits every open span."""
    j = np.cumsum(counts) - 1
    i = j - counts + 1
    keep = np.zeros(len(x), dtype=bool)
    keep[i] = keep[j] = True
    wide = j - i >= 2
    while wide.any():
        i, j = i[wide], j[wide]
        n = j - i - 1                              # (K,) points inside each span
        off = np.cumsum(n) - n
        at = np.arange(off[-1] + n[-1]) + np.repeat(i + 1 - off, n)  # (Q,) the inside points, span by span
        ax, ay = x[i], y[i]
        dx, dy = x[j] - ax, y[j] - ay              # (K,)
        closed = (dx == 0) & (dy == 0)
        norm = np.sqrt(dx * dx + dy * dy)
        norm[closed] = 1.0
        qx, qy = x[at], y[at]
        ax, ay = np.repeat(ax, n), np.repeat(ay, n)
        dist = np.abs(np.repeat(dx, n) * (ay - qy) - np.repeat(dy, n) * (ax - qx)) / np.repeat(norm, n)
        if closed.any():                           # a closed span: distance to its end point
            c = np.repeat(closed, n)
            ex, ey = qx[c] - ax[c], qy[c] - ay[c]
            dist[c] = np.sqrt(ex * ex + ey * ey)
        top = np.maximum.reduceat(dist, off)       # (K,)
        # the first farthest point breaks ties, as the official data
        k = np.minimum.reduceat(np.where(dist == np.repeat(top, n), at, len(x)), off)
        split = top > epsilon
        k = k[split]
        keep[k] = True
        i, j = np.concatenate([i[split], k]), np.concatenate([k, j[split]])
        wide = j - i >= 2
    return keep


def _simplify(drawings: Sequence[tuple[np.ndarray, list[int]]], epsilon: float = EPSILON) -> list[tuple[np.ndarray, np.ndarray]]:
    """Checked raw drawings, each its points (2, N) and stroke lengths -> each its simplified points
    int64 (2, K) and stroke lengths (S,); a lone point stays a 2-point stroke. The drawings go through
    the same numpy calls: many cost little more than one."""
    sizes = np.array([xy.shape[1] for xy, _ in drawings])
    first = np.cumsum(sizes) - sizes
    xy = np.concatenate([xy for xy, _ in drawings], axis=1)  # (2, N)
    with np.errstate(over="ignore"):  # a span past the float range is refused just below
        xy = xy - np.repeat(np.minimum.reduceat(xy, first, axis=1), sizes, axis=1)  # each drawing aligned to 0
    extent = np.maximum.reduceat(xy, first, axis=1).max(axis=0)  # (D,)
    if not np.isfinite(extent).all():
        where = f"drawing {int(np.argmin(np.isfinite(extent)))}: " if len(drawings) > 1 else ""
        raise ValueError(f"{where}the drawing spans more than a float can hold")
    # multiply first: halves like 127.5 come out exact; a drawing of one point stays at 0
    xy = xy * EXTENT / np.repeat(np.where(extent > 0, extent, 1.0), sizes)
    lengths = np.concatenate([np.asarray(n, dtype=np.int64) for _, n in drawings])
    points, counts = _resample(xy.T, lengths)
    keep = _rdp(points[:, 0].copy(), points[:, 1].copy(), counts, epsilon)
    kept = np.add.reduceat(keep, np.cumsum(counts) - counts)  # (S,)
    q = np.round(points[keep]).astype(np.int64)  # half to even
    if (kept == 1).any():  # its first and last points are one: draw it twice
        q = np.repeat(q, np.repeat(np.where(kept == 1, 2, 1), kept), axis=0)
        kept = np.maximum(kept, 2)
    strokes = np.cumsum([len(n) for _, n in drawings])[:-1]
    kept = np.split(kept, strokes)
    q = np.split(q.T, np.cumsum([k.sum() for k in kept])[:-1], axis=1)
    return list(zip(q, kept))


def simplify(raw_drawing, epsilon: float = EPSILON) -> list[list[list[int]]]:
    """Raw strokes (any units, times ignored) -> simplified [[xs], [ys]] per stroke, ints 0..255."""
    (q, kept), = _simplify([_strokes(raw_drawing)], epsilon)
    xs, ys = q.tolist()
    bounds = np.cumsum(kept).tolist()
    return [[xs[a:b], ys[a:b]] for a, b in zip([0] + bounds[:-1], bounds)]


# ---------------------------------------------------------------------------------------------
# rendering


class _Canvas:
    """A cairo surface and context set up as the official renderer, reused across drawings."""
    broken = False

    def __init__(self, side: int):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 1:
            raise ValueError(f"side must be a positive integer, got {side!r}")
        cairo = _cairo()
        self.side = int(side)
        self.surface = cairo.ImageSurface(cairo.FORMAT_ARGB32, self.side, self.side)
        self.ctx = cairo.Context(self.surface)
        self.ctx.set_antialias(cairo.ANTIALIAS_BEST)
        self.ctx.set_line_cap(cairo.LINE_CAP_ROUND)
        self.ctx.set_line_join(cairo.LINE_JOIN_ROUND)
        self.ctx.set_line_width(LINE_WIDTH)
        margin = 2 * PADDING + LINE_WIDTH
        scale = self.side / (CANVAS + margin)
        self.ctx.scale(scale, scale)
        self.ctx.translate(margin / 2, margin / 2)
        # the path is built through cairocffi's C-level API: a wrapper call per point would cost
        # as much as the rasterization itself
        self.lib, self.ffi, self.ptr = cairo.cairo, cairo.ffi, self.ctx._pointer
        # native uint32 pixels; & 0xFF is the first byte (blue) on little-endian machines
        stride = self.surface.get_stride() // 4
        pixels = np.frombuffer(self.surface.get_data(), dtype=np.uint32)
        self.pixels = pixels.reshape(self.side, stride)[:, :self.side]

    def draw(self, xy: np.ndarray, lengths: list[int], out: np.ndarray) -> None:
        """Render checked points (2, N), stroke lengths summing to N, into out (side, side) uint8."""
        lib, ptr = self.lib, self.ptr
        lib.cairo_set_source_rgb(ptr, 0.0, 0.0, 0.0)
        lib.cairo_paint(ptr)
        xy = xy + ((CANVAS - xy.max(axis=1)) / 2)[:, None]  # centre on the drawing's extent
        xs, ys = xy.tolist()
        lib.cairo_set_source_rgb(ptr, 1.0, 1.0, 1.0)
        start = 0
        for n in lengths:
            stop = start + n
            lib.cairo_move_to(ptr, xs[start], ys[start])
            if n == 1:  # a lone point is a dot, as its 2-point simplified form draws
                lib.cairo_line_to(ptr, xs[start], ys[start])
            for x, y in zip(xs[start + 1:stop], ys[start + 1:stop]):
                lib.cairo_line_to(ptr, x, y)
            lib.cairo_stroke(ptr)  # one stroke() per stroke: overlaps add up as in the official data
            start = stop
        status = lib.cairo_status(ptr)
        if status:  # a context in error stays in error: this canvas is not used again
            self.broken = True
            raise RuntimeError(f"cairo: {self.ffi.string(lib.cairo_status_to_string(status)).decode()}")
        self.surface.flush()
        np.bitwise_and(self.pixels, 0xFF, out=out, casting="unsafe")


_canvases = threading.local()  # per thread: a cairo context is not to be shared


def _canvas(side: int) -> _Canvas:
    """This thread's canvas of that side, made on first use (a surface costs as much as a small drawing);
    sides over 256 get a new one each time, freed after the picture."""
    if type(side) is not int or not 0 < side <= 256:
        return _Canvas(side)  # which also refuses a bad side
    found = getattr(_canvases, "by_side", None)
    if found is None:
        found = _canvases.by_side = {}
    if side not in found or found[side].broken:
        found[side] = _Canvas(side)
    return found[side]


def render(drawing, side: int = 28) -> np.ndarray:
    """A simplified drawing (0..255 units, ValueError outside) -> uint8 (side, side) bitmap, white ink on black."""
    xy, lengths = _simplified(drawing)
    canvas = _canvas(side)
    out = np.empty((canvas.side, canvas.side), dtype=np.uint8)
    canvas.draw(xy, lengths, out)
    return out


def render_raw(raw_drawing, side: int = 28, epsilon: float = EPSILON) -> np.ndarray:
    """render(simplify(raw_drawing)) without the lists between them: raw strokes -> uint8 (side, side)."""
    return render_raw_batch([raw_drawing], side, epsilon)[0]


def render_raw_batch(raw_drawings: Sequence, side: int = 28, epsilon: float = EPSILON) -> np.ndarray:
    """Many raw drawings -> uint8 (N, side, side), each as render(simplify(drawing)), simplified all
    at once (a batch of drawings costs a few times one, not N times); errors name the drawing."""
    canvas = _canvas(side)
    checked = []
    for i, drawing in enumerate(raw_drawings):
        try:
            checked.append(_strokes(drawing))
        except ValueError as e:
            raise ValueError(f"drawing {i}: {e}" if len(raw_drawings) > 1 else str(e)) from None
    out = np.empty((len(checked), canvas.side, canvas.side), dtype=np.uint8)
    for i, (q, kept) in enumerate(_simplify(checked, epsilon) if checked else ()):
        canvas.draw(q, kept.tolist(), out[i])
    return out


def render_batch(drawings: Iterable, side: int = 28) -> np.ndarray:
    """Many simplified drawings -> uint8 (N, side*side), one reused surface; errors name the index."""
    drawings = drawings if isinstance(drawings, Sequence) else list(drawings)
    canvas = _canvas(side)
    side = canvas.side
    out = np.empty((len(drawings), side, side), dtype=np.uint8)
    for i, drawing in enumerate(drawings):
        try:
            xy, lengths = _simplified(drawing)
        except ValueError as e:
            raise ValueError(f"drawing {i}: {e}") from None
        canvas.draw(xy, lengths, out[i])
    return out.reshape(len(drawings), side * side)


# ---------------------------------------------------------------------------------------------
# building bitmap files from stroke files


def _stroke_dir(src, kind: str) -> Path:
    """<src>/<kind>/ as the downloads lay it out, or src itself when it holds the ndjson files."""
    src = Path(src)
    return src / kind if (src / kind).is_dir() else src


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through atomic_write, so a file on disk is always complete."""
    with atomic_write(path) as f:
        np.save(f, array)


def _file_drawings(path: Path, kind: str, limit: int | None) -> Iterator[list]:
    """The first `limit` drawings of a stroke file in the simplified format; errors name the drawing."""
    for n, record in enumerate(iter_ndjson(path, limit), start=1):
        try:
            if kind == "raw":
                yield simplify(record["drawing"])
            else:
                _simplified(record["drawing"], times=False)
                yield record["drawing"]
        except ValueError as e:
            raise ValueError(f"{path}: drawing {n}: {e}") from None


def render_file(path, kind: str = "simplified", limit: int | None = None, side: int = 28,
                chunk: int = 4096) -> np.ndarray:
    """Bitmaps (N, side*side) uint8 of the first `limit` drawings of a stroke file (raw ones simplified
    first), row i = drawing i; rendered chunk by chunk to bound memory."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    drawings = _file_drawings(Path(path), kind, limit)
    parts = [np.empty((0, side * side), dtype=np.uint8)]
    while batch := list(itertools.islice(drawings, chunk)):
        parts.append(render_batch(batch, side))
    return np.concatenate(parts)


def build_bitmaps(src, out, kind: str = "simplified", categories: Iterable[str] | None = None,
                  max_per_class: int | None = None, side: int = 28,
                  progress: bool = True) -> dict[str, Path]:
    """Stroke files <src>/<kind>/<name>.ndjson -> <out>/numpy_bitmap/<name>.npy, (N, side*side) uint8.

    Same rows as the official numpy_bitmap files (row i = drawing i); raw strokes are simplified
    first. categories=None builds every stroke file found.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if max_per_class is not None and max_per_class < 0:
        raise ValueError(f"max_per_class must be >= 0, got {max_per_class}")
    _Canvas(side)  # a bad side or a missing cairo fails here, before any file is read
    folder = _stroke_dir(src, kind)
    available = sorted(p.stem for p in folder.glob("*.ndjson"))
    names = available if categories is None else list(categories)
    if not available:
        raise FileNotFoundError(f"no .ndjson stroke files in {folder}")
    missing = [n for n in names if n not in available]
    if missing:
        hints = {n: difflib.get_close_matches(n.replace("_", " "), available, n=3) for n in missing}
        detail = "; ".join(f"{n!r} (closest: {', '.join(h) or 'none'})" for n, h in hints.items())
        raise FileNotFoundError(f"no {kind} strokes file in {folder} for {detail}")
    paths = {}
    bar = names
    if progress:
        from tqdm import tqdm
        bar = tqdm(names, desc=f"{kind} -> bitmaps", unit="class")
    for name in bar:
        target = Path(out) / "numpy_bitmap" / f"{name}.npy"
        _save_npy(target, render_file(folder / f"{name}.ndjson", kind, max_per_class, side))
        paths[name] = target
    return paths


def official_pairs(root, kind: str = "simplified", categories: Iterable[str] | None = None,
                   limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rendered, official) uint8 (N, 784): line i of <root>/<kind>/<name>.ndjson rendered beside row i
    of <root>/numpy_bitmap/<name>.npy, the first `limit` of each category, up to the shorter file.

    categories=None takes every category that has both files.
    """
    root = Path(root)
    folder = _stroke_dir(root, kind)
    if categories is None:
        categories = [p.stem for p in sorted((root / "numpy_bitmap").glob("*.npy"))
                      if (folder / f"{p.stem}.ndjson").is_file()]
    ours, theirs = [np.empty((0, 784), np.uint8)], [np.empty((0, 784), np.uint8)]
    for name in categories:
        official = np.load(root / "numpy_bitmap" / f"{name}.npy", mmap_mode="r")
        n = len(official) if limit is None else min(limit, len(official))
        ours.append(render_file(folder / f"{name}.ndjson", kind, n))
        theirs.append(official[:len(ours[-1])])
    return np.concatenate(ours), np.concatenate(theirs)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m utils.strokes", description=(
        "Render Quick, Draw! stroke files into numpy_bitmap/<name>.npy, as the official bitmaps."))
    parser.add_argument("categories", nargs="*", help="category names (default: every stroke file)")
    parser.add_argument("--kind", choices=KINDS, default="simplified")
    parser.add_argument("--src", required=True, help="folder holding <kind>/<name>.ndjson (or the ndjson files)")
    parser.add_argument("--out", required=True, help="writes <out>/numpy_bitmap/<name>.npy")
    parser.add_argument("--max-per-class", type=int, default=None)
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        paths = build_bitmaps(args.src, args.out, args.kind, args.categories or None,
                              args.max_per_class, args.side, progress=not args.no_progress)
    except (ValueError, OSError, ImportError) as e:
        parser.error(str(e))
    rows = sum(np.load(p, mmap_mode="r").shape[0] for p in paths.values())
    print(f"{len(paths)} classes, {rows} bitmaps -> {Path(args.out) / 'numpy_bitmap'} "
          f"in {time.perf_counter() - t0:.1f}s")
    return paths


if __name__ == "__main__":
    main()
