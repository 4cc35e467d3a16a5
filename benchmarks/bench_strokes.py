"""Strokes to bitmaps against the official data in ../shared/quickdraw, and rendering speed on one core.

Prints, pairing line i of a stroke file with line or row i of the same category (up to the shorter file):
  render(simplified line i)     == official bitmap row i: byte-exact share and mean abs pixel error
                                   (the 17 bitmap categories, 425 pairs)
  render(simplify(raw line i))  == official bitmap row i: the same (519 pairs)
  simplify(raw line i)          == simplified line i, point for point (all 344 simplified categories, 7,853 pairs)
then drawings/s for render_batch, render and simplify, pinned to one core (CPU time; wall time beside it),
the cairo version and the load average. Goals: >= 99% and >= 90% exact (MAE <= 0.1), >= 5,000 drawings/s
for render_batch. Writes reports/bench_strokes.json; exit status 1 if a goal is missed.

    .venv/bin/python benchmarks/bench_strokes.py
    .venv/bin/python benchmarks/bench_strokes.py --quick   # smoke run: 2 categories, 10 lines each, no report
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import cairocffi
import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
from testkit.mirror import SHARED_DIR
from utils.strokes import official_pairs, read_ndjson, render, render_batch, simplify

FULL = SHARED_DIR / "full"
REPORT = PROJECT / "reports" / "bench_strokes.json"


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 categories, 10 lines each, no report")
    args = parser.parse_args()
    if not FULL.is_dir():
        print(f"../shared/quickdraw not found: {SHARED_DIR} is absent; nothing to measure")
        return 1
    bitmap_names = sorted(p.stem for p in (FULL / "numpy_bitmap").glob("*.npy"))
    stroke_files = sorted((FULL / "simplified").glob("*.ndjson"))
    limit = None
    if args.quick:
        bitmap_names, stroke_files, limit = bitmap_names[:2], stroke_files[:2], 10
    load_before = os.getloadavg()
    print(f"cairo {cairocffi.cairo_version_string()} (cairocffi {cairocffi.version}); "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} on {os.cpu_count()} cores")
    figures, checks = {}, []
    print(f"\n{'pairs':<44} {'n':>5} {'exact':>8} {'MAE':>7}")
    for kind, goal, label in (("simplified", 0.99, "render(simplified line i) == row i"),
                              ("raw", 0.90, "render(simplify(raw line i)) == row i")):
        ours, theirs = official_pairs(FULL, kind, bitmap_names, limit)
        exact = float((ours == theirs).all(1).mean())
        mae = float(np.abs(ours.astype(int) - theirs).mean())
        print(f"{label:<44} {len(ours):>5} {exact:>8.2%} {mae:>7.4f}")
        figures[f"render_{kind}"] = dict(pairs=len(ours), exact=exact, mae=mae)
        checks.append(exact >= goal and (kind == "simplified" or mae <= 0.1))

    raws, simplified = [], []
    for path in stroke_files:
        for raw, official in zip(read_ndjson(FULL / "raw" / path.name, limit), read_ndjson(path, limit)):
            raws.append(raw["drawing"])
            simplified.append(official["drawing"])
    same = sum(simplify(r) == s for r, s in zip(raws, simplified))
    print(f"{'simplify(raw line i) == simplified line i':<44} {len(raws):>5} {same / len(raws):>8.2%}")
    figures["simplify"] = dict(pairs=len(raws), same=same / len(raws))

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    n = len(simplified)
    points = sum(len(s[0]) for d in simplified for s in d) / n
    print(f"\nspeed on one core, {n} simplified drawings ({points:.0f} points each on average), best of 3:")
    speed = figures["drawings_per_s"] = {}
    for name, fn, items in (
            ("render_batch", lambda: render_batch(simplified), n),
            ("render (one call per drawing)", lambda: [render(d) for d in simplified], n),
            ("simplify (raw drawings)", lambda: [simplify(d) for d in raws[:2000]], min(2000, len(raws)))):
        cpu, wall = rate(fn, items)
        print(f"{name:<32} {cpu:>8,.0f} drawings/s CPU time   ({wall:,.0f}/s wall)")
        speed[name.split()[0]] = dict(cpu=cpu, wall=wall)
        if name == "render_batch":
            checks.append(cpu >= 5000)
    load_after = os.getloadavg()
    print(f"load average at the end {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print("all goals met" if all(checks) else f"{checks.count(False)} goal(s) MISSED")
    if not args.quick:
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(json.dumps(dict(
            figures, goals_met=all(checks), cairo=cairocffi.cairo_version_string(), cairocffi=cairocffi.version,
            cores=os.cpu_count(), loadavg_before=load_before, loadavg_after=load_after), indent=1) + "\n")
        print(f"-> {REPORT.relative_to(PROJECT)}")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
