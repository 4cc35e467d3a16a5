"""Data path at scale: the original pandas pipeline against utils.data, side by side.

10 categories x 130,000 drawings (1.3M), built by tiling the real rows of the local mirror
(../shared/quickdraw/full/numpy_bitmap) into data/bench/. Each pipeline runs in its own process so
that its peak memory (ru_maxrss) is its own, with the files already in the page cache for both.
Measured: seconds from reading the files to the first float batch, peak memory, and images/s
delivered over a fixed number of batches (no model).

    .venv/bin/python benchmarks/bench_data.py              # needs pandas (benchmarks/requirements.txt)
    .venv/bin/python benchmarks/bench_data.py --rows 20000 --batches 200   # a quick look
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, random_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.mirror import SHARED_DIR  # noqa: E402  (after the path is set)
from utils.data import iterate_batches, load_bitmaps, split, stratified_split  # noqa: E402


@dataclass
class BenchConfig:
    categories: list[str] = field(default_factory=lambda: [
        "airplane", "alarm clock", "banana", "bird", "book", "cat", "dog", "flower", "house", "rainbow"])
    rows: int = 130_000          # drawings per category
    batches: int = 2_000         # batches timed for images/s, after the first
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
    """Read every file once so both pipelines start from the page cache, not the disk."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 26):
                pass


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(pipeline, cfg: BenchConfig, batch_size: int) -> dict:
    """Seconds from reading the files to the first batch, then images/s over cfg.batches more."""
    start = time.perf_counter()
    batches = pipeline(cfg, batch_size)  # everything up to a ready batch iterator
    next(batches)
    first = time.perf_counter() - start
    start, images = time.perf_counter(), 0
    for _, (x, y) in zip(range(cfg.batches), batches):
        images += len(y)
    rate = images / (time.perf_counter() - start)
    return dict(first_batch_s=first, images_per_s=rate, peak_gb=peak_gb())


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
    return iter(DataLoader(train, batch_size=batch_size, shuffle=True))


def ours_split(cfg: BenchConfig, batch_size: int):
    """utils.data: one uint8 tensor, split() into train/val/test sets (copies), sliced batches."""
    train, _, _ = split(load_bitmaps(cfg.categories, root=cfg.data), seed=cfg.seed)
    return iterate_batches(train.images, train.labels, batch_size, generator=torch.Generator().manual_seed(cfg.seed))


def ours_index(cfg: BenchConfig, batch_size: int):
    """utils.data: one uint8 tensor, stratified_split positions (no copy), batches of the training ones."""
    ds = load_bitmaps(cfg.categories, root=cfg.data)
    train, _, _ = stratified_split(ds.labels, seed=cfg.seed)
    return iterate_batches(ds.images, ds.labels, batch_size, generator=torch.Generator().manual_seed(cfg.seed),
                           index=train)


PIPELINES = {  # name -> (label, pipeline)
    "original": ("original: pandas + DataLoader", original),
    "ours-split": ("ours: split() sets", ours_split),
    "ours-index": ("ours: stratified_split index", ours_index),
}


def run_child(cfg: BenchConfig, pipeline: str, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", pipeline, "--batch-size", str(batch_size),
           "--config", json.dumps(asdict(cfg))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{pipeline} (batch {batch_size}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=BenchConfig.rows)
    parser.add_argument("--batches", type=int, default=BenchConfig.batches)
    parser.add_argument("--data", default=BenchConfig.data)
    parser.add_argument("--threads", type=int, default=BenchConfig.threads, help="torch threads (0: default)")
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

    cfg = BenchConfig(rows=args.rows, batches=args.batches, data=args.data, threads=args.threads)
    if not (SHARED_DIR / "full" / "numpy_bitmap").is_dir():
        sys.exit(f"{SHARED_DIR} is absent: this benchmark tiles its real drawings")
    paths = build(cfg)
    total = cfg.rows * len(cfg.categories)
    print(f"{len(cfg.categories)} categories x {cfg.rows:,} drawings = {total:,}; "
          f"images/s over {cfg.batches:,} batches after the first; no model; "
          f"torch threads: {cfg.threads or 'default'}")
    load_before = os.getloadavg()[0]
    runs = [("original", 64), ("ours-split", 64), ("ours-split", 256), ("ours-index", 64), ("ours-index", 256)]
    results = {}
    for pipeline, batch_size in runs:
        warm(paths)
        results[pipeline, batch_size] = run_child(cfg, pipeline, batch_size)

    base = results["original", 64]
    w = 44
    print(f"\n{'pipeline':<{w}}{'load->1st batch':>16}{'peak memory':>13}{'images/s':>13}")
    for (pipeline, batch_size), r in results.items():
        print(f"{PIPELINES[pipeline][0] + f', batch {batch_size}':<{w}}{r['first_batch_s']:>14.2f} s"
              f"{r['peak_gb']:>10.2f} GB{r['images_per_s']:>13,.0f}")
    print(f"\n{'ours / original (batch 64)':<{w}}{'faster':>16}{'memory':>13}{'images/s':>13}")
    for (pipeline, batch_size), r in results.items():
        if pipeline != "original":
            faster = base["first_batch_s"] / r["first_batch_s"]
            memory = r["peak_gb"] / base["peak_gb"]
            rate = r["images_per_s"] / base["images_per_s"]
            met = "targets met" if faster >= 50 and memory <= 0.25 and rate >= 4 else "TARGET MISSED"
            print(f"{PIPELINES[pipeline][0] + f', batch {batch_size}':<{w}}{faster:>15.0f}x{memory:>13.3f}{rate:>12.1f}x  {met}")
    print(f"{'target':<{w}}{'>= 50x':>16}{'<= 0.250':>13}{'>= 4x':>13}")
    print(f"\nload average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
