"""Data path at scale: the original pandas pipeline against utils.data, side by side.

10 categories x 130,000 drawings (1.3M), built by tiling the real rows of the local mirror
(../shared/quickdraw/full/numpy_bitmap) into data/bench/. Each measurement runs in its own process, so
that its peak memory (ru_maxrss) is its own, with the files already in the page cache. Measured, as the
median of --repeats processes: seconds from reading the files to the first float batch, peak memory, and
images/s delivered over whole epochs of the training split until --seconds have passed (no model).
Ratios are printed against this run's original pipeline and against the reference figures of the
original path (44 s, 12.8 GB, 186,000 images/s). Writes reports/bench_data.json.

    .venv/bin/python -m benchmarks.bench_data            # needs pandas (benchmarks/requirements.txt)
    .venv/bin/python -m benchmarks.bench_data --quick    # 2,000 drawings a class in a temporary folder
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, random_split

ROOT = Path(__file__).resolve().parents[1]
from testkit.mirror import SHARED_DIR
from utils.data import iterate_batches, load_bitmaps, split, stratified_split

# The original path as measured on this machine at the default scale: load to first batch, peak, rate.
REFERENCE = dict(first_batch_s=44.0, peak_gb=12.8, images_per_s=186_000)
TARGET = dict(faster=50, memory=0.25, rate=4)  # at least 50x faster, a quarter of the memory, 4x the rate


@dataclass
class BenchConfig:
    categories: list[str] = field(default_factory=lambda: [
        "airplane", "alarm clock", "banana", "bird", "book", "cat", "dog", "flower", "house", "rainbow"])
    rows: int = 130_000          # drawings per category
    seconds: float = 10.0        # images/s over whole epochs until at least this long
    repeats: int = 3             # processes per pipeline; the median is reported
    data: str = str(ROOT / "data" / "bench")
    seed: int = 0
    threads: int = 1             # torch threads in both pipelines (0: torch's default)


def build(cfg: BenchConfig) -> list[Path]:
    """<data>/numpy_bitmap/<name>.npy with cfg.rows rows: the mirror's rows repeated in order."""
    folder = Path(cfg.data) / "numpy_bitmap"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in cfg.categories:
        path = folder / f"{name}.npy"
        paths.append(path)
        if path.is_file() and np.load(path, mmap_mode="r").shape == (cfg.rows, 784):
            continue
        source = np.load(SHARED_DIR / "full" / "numpy_bitmap" / f"{name}.npy")
        tmp = path.with_suffix(".tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(cfg.rows, 784))
        for start in range(0, cfg.rows, len(source)):
            out[start:start + len(source)] = source[:cfg.rows - start]
        out.flush()
        del out
        tmp.replace(path)
    return paths


def warm(paths: list[Path]) -> None:
    """Read every file once so every pipeline starts from the page cache, not the disk."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 26):
                pass


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(pipeline, cfg: BenchConfig, batch_size: int) -> dict:
    """Seconds from reading the files to the first batch, then images/s over whole epochs for cfg.seconds."""
    start = time.perf_counter()
    epoch = pipeline(cfg, batch_size)  # everything up to a ready source of epochs
    batches = epoch()
    next(batches)
    first = time.perf_counter() - start
    images, epochs, start = 0, 0, time.perf_counter()
    while True:  # the rest of the first epoch, then fresh ones
        for _, y in batches:
            images += len(y)
        epochs += 1
        seconds = time.perf_counter() - start
        if seconds >= cfg.seconds:
            break
        batches = epoch()
    return dict(first_batch_s=first, images_per_s=images / seconds, peak_gb=peak_gb(), epochs=epochs,
                seconds=seconds)


def original(cfg: BenchConfig, batch_size: int):
    """The original study's path: pixel-column frame, per-row apply, list of (tensor, label), DataLoader."""
    frames = []
    for label, name in enumerate(cfg.categories):
        frame = pd.DataFrame(np.load(Path(cfg.data) / "numpy_bitmap" / f"{name}.npy"))
        frame["label"] = label
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    images = df[df.columns[:784]].apply(lambda row: row.values.reshape(28, 28), axis=1)
    pairs = [(torch.tensor(image, dtype=torch.float32).unsqueeze(0) / 255, label)
             for image, label in zip(images, df["label"])]
    train, _, _ = random_split(pairs, [0.8, 0.1, 0.1], generator=torch.Generator().manual_seed(cfg.seed))
    loader = DataLoader(train, batch_size=batch_size, shuffle=True)
    return lambda: iter(loader)


def ours_split(cfg: BenchConfig, batch_size: int):
    """utils.data: one uint8 tensor, split() into train/val/test sets (copies), sliced batches."""
    train, _, _ = split(load_bitmaps(cfg.categories, root=cfg.data), seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    return lambda: iterate_batches(train.images, train.labels, batch_size, generator=g)


def ours_index(cfg: BenchConfig, batch_size: int):
    """utils.data: one uint8 tensor, stratified_split positions (no copy), batches of the training ones."""
    ds = load_bitmaps(cfg.categories, root=cfg.data)
    train, _, _ = stratified_split(ds.labels, seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    return lambda: iterate_batches(ds.images, ds.labels, batch_size, generator=g, index=train)


PIPELINES = {  # name -> (label, pipeline)
    "original": ("original: pandas + DataLoader", original),
    "ours-split": ("ours: split() sets", ours_split),
    "ours-index": ("ours: stratified_split index", ours_index),
}
RUNS = [("original", 64), ("ours-split", 64), ("ours-split", 256), ("ours-index", 64), ("ours-index", 256)]


def run_child(cfg: BenchConfig, pipeline: str, batch_size: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_data", "--child", pipeline, "--batch-size", str(batch_size),
           "--config", json.dumps(asdict(cfg))]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{pipeline} (batch {batch_size}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(r: dict, base: dict) -> dict:
    """How r compares with base: times faster to the first batch, memory fraction, images/s multiple."""
    out = dict(faster=base["first_batch_s"] / r["first_batch_s"], memory=r["peak_gb"] / base["peak_gb"],
               rate=r["images_per_s"] / base["images_per_s"])
    out["met"] = (out["faster"] >= TARGET["faster"] and out["memory"] <= TARGET["memory"]
                  and out["rate"] >= TARGET["rate"])
    return out


def label(run: dict) -> str:
    return f"{PIPELINES[run['pipeline']][0]}, batch {run['batch_size']}"


def report(cfg: BenchConfig, runs: list[dict], load: dict) -> None:
    w = 44
    print(f"\nmedian of {cfg.repeats} processes")
    print(f"{'pipeline':<{w}}{'load->1st batch':>16}{'peak memory':>13}{'images/s':>13}{'epochs':>8}")
    for run in runs:
        m = run["median"]
        print(f"{label(run):<{w}}{m['first_batch_s']:>14.2f} s{m['peak_gb']:>10.2f} GB{m['images_per_s']:>13,.0f}"
              f"{m['epochs']:>8.0f}")
    print("\neach process: load->1st batch s / images/s")
    for run in runs:
        print(f"{label(run):<{w}}" + "   ".join(f"{r['first_batch_s']:.2f} / {r['images_per_s']:,.0f}"
                                                for r in run["repeats"]))
    for key, title in [("vs_baseline", "against this run's original (batch 64)"),
                       ("vs_reference", f"against the reference ({REFERENCE['first_batch_s']:.0f} s, "
                                        f"{REFERENCE['peak_gb']} GB, {REFERENCE['images_per_s']:,} images/s)")]:
        print(f"\n{title}")
        if runs[0][key] is None:
            print(f"not comparable: the reference is for {len(BenchConfig().categories)} x "
                  f"{BenchConfig.rows:,} drawings")
            continue
        print(f"{'pipeline':<{w}}{'faster':>16}{'memory':>13}{'images/s':>13}")
        for run in runs:
            r = run[key]
            if run["pipeline"] != "original" or key == "vs_reference":
                met = "targets met" if r["met"] else "TARGET MISSED"
                print(f"{label(run):<{w}}{r['faster']:>15.1f}x{r['memory']:>13.3f}{r['rate']:>12.1f}x  {met}")
        print(f"{'target':<{w}}{'>= %dx' % TARGET['faster']:>16}{'<= %.3f' % TARGET['memory']:>13}"
              f"{'>= %dx' % TARGET['rate']:>13}")
    print(f"\nload average (1/5/15 min) before: {' '.join(f'{x:.1f}' for x in load['before'])}, "
          f"after: {' '.join(f'{x:.1f}' for x in load['after'])} on {os.cpu_count()} cores")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help=f"drawings per category ({BenchConfig.rows:,})")
    parser.add_argument("--seconds", type=float, default=None, help=f"images/s timed for ({BenchConfig.seconds:g})")
    parser.add_argument("--repeats", type=int, default=BenchConfig.repeats)
    parser.add_argument("--data", default=None, help="folder for the tiled files (default: data/bench)")
    parser.add_argument("--threads", type=int, default=BenchConfig.threads, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true",
                        help="2,000 drawings a class, 1 s of batches, files in a temporary folder, no JSON")
    parser.add_argument("--json", default=None, help="results file (default: reports/bench_data.json; "
                                                     "none with --quick)")
    parser.add_argument("--child", choices=PIPELINES, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cfg = BenchConfig(**json.loads(args.config))
        if cfg.threads:
            # Tiny per-batch ops gain nothing from a second thread, and on a busy machine waiting for
            # it costs milliseconds: both pipelines run on one.
            torch.set_num_threads(cfg.threads)
        print(json.dumps(measure(PIPELINES[args.child][1], cfg, args.batch_size)))
        return

    if not (SHARED_DIR / "full" / "numpy_bitmap").is_dir():
        sys.exit(f"{SHARED_DIR} is absent: this benchmark tiles its real drawings")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = BenchConfig(rows=args.rows or (2_000 if args.quick else BenchConfig.rows),
                          seconds=args.seconds or (1.0 if args.quick else BenchConfig.seconds),
                          repeats=args.repeats, threads=args.threads,
                          data=args.data or (tmp if args.quick else BenchConfig.data))
        paths = build(cfg)
        print(f"{len(cfg.categories)} categories x {cfg.rows:,} drawings = {cfg.rows * len(cfg.categories):,}; "
              f"images/s over whole epochs of the training split for at least {cfg.seconds:g} s; no model; "
              f"torch threads: {cfg.threads or 'default'}; {cfg.repeats} processes per row")
        load = dict(before=os.getloadavg())
        runs = []
        for pipeline, batch_size in RUNS:
            repeats = []
            for _ in range(cfg.repeats):
                warm(paths)
                repeats.append(run_child(cfg, pipeline, batch_size))
            median = {k: statistics.median(r[k] for r in repeats) for k in repeats[0]}
            runs.append(dict(pipeline=pipeline, batch_size=batch_size, repeats=repeats, median=median))
        load["after"] = os.getloadavg()
    base = runs[0]["median"]
    at_reference_scale = (cfg.rows, len(cfg.categories)) == (BenchConfig.rows, len(BenchConfig().categories))
    for run in runs:
        run["vs_baseline"] = ratios(run["median"], base)
        run["vs_reference"] = ratios(run["median"], REFERENCE) if at_reference_scale else None
    report(cfg, runs, load)
    path = args.json or (None if args.quick else ROOT / "reports" / "bench_data.json")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(dict(config=asdict(cfg), cpu_count=os.cpu_count(), load_average=load,
                                              reference=REFERENCE, target=TARGET, runs=runs), indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
