"""Strokes to bitmaps against the official data in ../shared/quickdraw, and rendering speed on one core.

Prints, over the 17 bitmap categories (line i of the stroke files = row i of the .npy):
  render(simplified line i)          == official row: byte-exact share and mean abs pixel error (425 pairs)
  render(simplify(raw line i))       == official row: the same (519 pairs)
  simplify(raw line i)               == simplified line i, point for point (all 344 categories, 25 lines each)
then drawings/s for render_batch, render and simplify, pinned to one core (CPU time; wall time beside it).
Goals: >= 99% and >= 90% exact (MAE <= 0.1), >= 5,000 drawings/s for render_batch. Exit status 1 if one
is missed.

    .venv/bin/python benchmarks/bench_strokes.py
"""
import os
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
from tests.mirror import SHARED_DIR  # noqa: E402
from tests.test_strokes import official_pairs  # noqa: E402  (the pairs the tests check)
from utils.strokes import read_ndjson, render, render_batch, simplify  # noqa: E402

FULL = SHARED_DIR / "full"


def rate(fn, n: int, repeats: int = 3) -> tuple[float, float]:
    """Best of `repeats`: (items per CPU second, items per wall second)."""
    best = (0.0, 0.0)
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        best = max(best, (n / cpu, n / wall))
    return best


def main() -> int:
    if not FULL.is_dir():
        print(f"../shared/quickdraw not found: {SHARED_DIR} is absent; nothing to measure")
        return 1
    checks = []
    print(f"{'pairs':<44} {'n':>5} {'exact':>8} {'MAE':>7}")
    for kind, goal in (("simplified", 0.99), ("raw", 0.90)):
        ours, theirs = official_pairs(SHARED_DIR, kind)
        exact = (ours == theirs).all(1).mean()
        mae = np.abs(ours.astype(int) - theirs).mean()
        label = "render(simplified line i) == row i" if kind == "simplified" else \
            "render(simplify(raw line i)) == row i"
        print(f"{label:<44} {len(ours):>5} {exact:>8.2%} {mae:>7.4f}")
        checks.append(exact >= goal and (kind == "simplified" or mae <= 0.1))

    raws, simplified = [], []
    for path in sorted((FULL / "simplified").glob("*.ndjson")):
        pairs = zip(read_ndjson(FULL / "raw" / path.name), read_ndjson(path))
        for raw, official in pairs:
            raws.append(raw["drawing"])
            simplified.append(official["drawing"])
    same = sum(simplify(r) == s for r, s in zip(raws, simplified))
    print(f"{'simplify(raw line i) == simplified line i':<44} {len(raws):>5} {same / len(raws):>8.2%}")

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    n = len(simplified)
    points = sum(len(s[0]) for d in simplified for s in d) / n
    print(f"\nspeed on one core, {n} simplified drawings ({points:.0f} points each on average), best of 3:")
    for name, fn, items in (
            ("render_batch", lambda: render_batch(simplified), n),
            ("render (one call per drawing)", lambda: [render(d) for d in simplified], n),
            ("simplify (raw drawings)", lambda: [simplify(d) for d in raws[:2000]], min(2000, len(raws)))):
        cpu, wall = rate(fn, items)
        print(f"{name:<32} {cpu:>8,.0f} drawings/s CPU time   ({wall:,.0f}/s wall)")
        if name == "render_batch":
            checks.append(cpu >= 5000)
    print("all goals met" if all(checks) else f"{checks.count(False)} goal(s) MISSED")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
