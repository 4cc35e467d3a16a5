"""Full scale on this machine: pack a set larger than the reading process may use, then read it back.

The 17 bitmap categories of the local mirror (../shared/quickdraw) are tiled to --rows drawings each
(the real rows repeated in order: a benchmark of bytes, not of learning) into <data>/numpy_bitmap/, then:
  1. pack: `python -m utils.pack` in a fresh process (page cache dropped first; inside a memory cgroup if
     --pack-limit-mb is given): seconds, MB/s written, peak resident memory (ru_maxrss), beside the peak of a
     process that only imports utils.pack (torch's libraries alone are about 500 MB of it);
  2. disk: one sequential read of the train images file with 16 MB reads (cache dropped): the disk's speed,
     measured before step 3 and again after step 4 (it varies from run to run; shares are of the mean); and
     once with O_DIRECT reads as the pack reader makes them (4 MB, two in flight), the most that way gets;
  3. pack reader: PackedSplit.batches over whole epochs of the train split for --seconds or more, in a fresh
     process capped at --read-limit-mb (less than the split, so the page cache cannot hold it and every epoch
     comes from the disk): drawings/s and MB/s, against step 2;
     then the same with the split in the page cache and no cap (the reader's own CPU cost); the reader goes
     around the page cache (O_DIRECT) where the split is larger than the cache may keep, as under the cap;
  4. per-category memory maps: np.load(mmap_mode="r") per category and a random gather per batch (the route
     without a pack), same cap and duration;
  5. class mixing: a chi-square test of each of 1,000 batches' label counts against the class shares.
With --torchrun, only the distributed comparison instead (reports/bench_scale_torchrun.json): the 17 categories
packed whole from the mirror, then `v2-tuned` trained from the pack twice with the same global batch (256) and
seed: one process with 2 threads, and torchrun with 2 processes (gloo, 1 thread each, 128 drawings per rank and
--lr-batch 256, so the same rate; the precision the first run timed, so the same arithmetic): images/s of both,
and val and test top-1 (target: within 0.5 points). --dry-run checks the plumbing and writes no report.
Caps use the cgroup v1 memory controller (/sys/fs/cgroup/memory, needs root); the page cache is dropped with
/proc/sys/vm/drop_caches (root). Either missing is said in the printout and the report. Large files are deleted
at the end unless --keep. Writes reports/bench_scale.json; with --read-only, steps 2-5 alone on the pack a run with
--keep left (packed first, untimed, if missing), reports/bench_scale_read.json.

    flock -x /tmp/cpu.lock .venv/bin/python -m benchmarks.bench_scale
    flock -x /tmp/cpu.lock .venv/bin/python -m benchmarks.bench_scale --torchrun
    flock -x /tmp/cpu.lock .venv/bin/python -m benchmarks.bench_scale --read-only --keep   # steps 2-5 only
    .venv/bin/python -m benchmarks.bench_scale --rows 20000 --seconds 2 --json ""   # a quick check, no report
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from testkit.mirror import SHARED_DIR
from utils.device import describe_machine, machine_info
from utils.download import bitmap_path
from utils.io import write_json
from utils.pack import DIRECT_CHUNK, DIRECT_READS, ROW, PackedSet, PackError, _open_direct, open_source

ROOT = Path(__file__).resolve().parents[1]
CGROUP = Path("/sys/fs/cgroup/memory")
SEQ_READ = 1 << 24


@dataclass
class BenchConfig:
    categories: list[str] = field(default_factory=lambda: sorted(
        p.stem for p in (SHARED_DIR / "full" / "numpy_bitmap").glob("*.npy")))
    rows: int = 150_000           # drawings per category after tiling
    data: str = str(ROOT / "data" / "bench_scale")
    seed: int = 0
    batch_size: int = 256         # the training recipe's batch
    seconds: float = 10.0         # each read measurement runs whole epochs / batches for at least this long
    pack_limit_mb: int = 0        # memory cgroup cap of the packing process (0: none; the cap counts the page
                                  # cache, so one below the sources' size makes every gather a disk read)
    read_limit_mb: int = 1024     # memory cgroup cap of the reading processes (less than the train split)
    mix_batches: int = 1000
    keep: bool = False
    read_only: bool = False       # steps 2-5 only, on the pack left under data by a run with --keep (made if missing)
    recipe: str = "v2-tuned"      # --torchrun: the recipe both runs train
    global_batch: int = 256       # --torchrun: the recipe's batch, split over the ranks
    dry_run: bool = False         # --torchrun: two batches an epoch (a check of the plumbing, not a figure)
    epochs: int | None = None     # --torchrun: fewer epochs than the recipe's (the one-cycle schedule shortened)
    json: str | None = None       # the report's path (None: the mode's file under reports/; "": none)


# ------------------------------------------------------------------------------------------ machinery

def save_report(cfg: BenchConfig, name: str, report: dict) -> str:
    """Write the report to cfg.json, or to reports/<name> by default; "" writes none. Returns where (or "")."""
    path = str(ROOT / "reports" / name) if cfg.json is None else cfg.json
    if path:
        write_json(path, report, indent=1)
    return path


def drop_caches() -> bool:
    """Write back and drop the page cache, so the next read comes from the disk; False if not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_cgroup(name: str, limit_mb: int) -> Path | None:
    """A child memory cgroup capped at limit_mb (RSS and page cache together), or None where there is none
    (or limit_mb is 0)."""
    if not limit_mb:
        return None
    path = CGROUP / name
    try:
        path.mkdir(exist_ok=True)
        (path / "memory.limit_in_bytes").write_text(str(limit_mb << 20))
        return path
    except OSError:
        return None


def run_child(args: list[str], cgroup: Path | None) -> tuple[dict | str, int, float, int | None]:
    """Run `python <args>` in a fresh process (inside cgroup if given): (its JSON line or stdout, peak RSS
    bytes, wall seconds, the cgroup's peak usage in bytes or None)."""
    cmd = [sys.executable, *args]
    if cgroup is not None:  # the shell joins the cgroup, then becomes python: nothing runs outside it
        cmd = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *cmd]
        (cgroup / "memory.max_usage_in_bytes").write_text("0")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{out}")
    peak_cgroup = int((cgroup / "memory.max_usage_in_bytes").read_text()) if cgroup is not None else None
    last = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        result = json.loads(last)
    except ValueError:
        result = out
    return result, usage.ru_maxrss * 1024, seconds, peak_cgroup


def tile(cfg: BenchConfig) -> int:
    """<data>/numpy_bitmap/<name>.npy holding cfg.rows rows each: the mirror's rows repeated. Bytes written."""
    written = 0
    for name in cfg.categories:
        path = bitmap_path(cfg.data, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        src = np.load(SHARED_DIR / "full" / "numpy_bitmap" / f"{name}.npy")
        reps = -(-cfg.rows // len(src))
        block = np.ascontiguousarray(np.tile(src, (min(reps, max(1, (64 << 20) // src.nbytes)), 1)))
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (cfg.rows, ROW)})
            left = cfg.rows
            while left:
                part = block[:min(left, len(block))]
                f.write(part.tobytes())
                left -= len(part)
            written += f.tell()
    return written


# ------------------------------------------------------------------------------------------ child measurements

def child_seq(path: str, direct: bool = False) -> dict:
    """One sequential pass over a file with large reads: the disk's speed. direct: around the page cache
    (O_DIRECT), in DIRECT_CHUNK reads DIRECT_READS at a time, as the pack reader reads a split the cache cannot
    keep (None where the file system has no O_DIRECT)."""
    if not direct:
        buf = bytearray(SEQ_READ)
        n, t0 = 0, time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(buf):
                n += got
        return dict(bytes=n, seconds=time.perf_counter() - t0)
    fd = _open_direct(path)
    if fd is None:
        return None
    local = threading.local()

    def read(i: int) -> int:
        if not hasattr(local, "buf"):
            local.buf = mmap.mmap(-1, DIRECT_CHUNK)  # page-aligned, as O_DIRECT needs
        return os.preadv(fd, [local.buf], i * DIRECT_CHUNK)

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(DIRECT_READS) as pool:
            n = sum(pool.map(read, range(-(-os.fstat(fd).st_size // DIRECT_CHUNK))))
    finally:
        os.close(fd)
    return dict(bytes=n, seconds=time.perf_counter() - t0)


def child_pack_reader(path: str, batch_size: int, seconds: float) -> dict:
    """Whole epochs of the train split through PackedSplit.batches until `seconds` have passed."""
    train = PackedSet.open(path).train
    rows = batches = epochs = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        for x, y in train.batches(batch_size, epoch=epochs):
            rows += len(y)
            batches += 1
        epochs += 1
    return dict(rows=rows, batches=batches, epochs=epochs, seconds=time.perf_counter() - t0,
                pixel_bytes=rows * ROW, direct=train.reads_directly(), cpu_seconds=time.process_time() - c0)


def child_mmap(data: str, categories: list[str], batch_size: int, seconds: float, seed: int) -> dict:
    """The route without a pack: one memory map per category, a random (category, row) gather per batch."""
    maps = [np.load(bitmap_path(data, name), mmap_mode="r") for name in categories]
    sizes = np.array([len(m) for m in maps])
    rng = np.random.default_rng(seed)
    rows = batches = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        picks = rng.integers(0, sizes.sum(), batch_size)
        cls = np.searchsorted(np.cumsum(sizes), picks, side="right")
        within = picks - np.concatenate([[0], np.cumsum(sizes)])[cls]
        images = np.empty((batch_size, ROW), np.uint8)
        for c in np.unique(cls):
            slots = np.flatnonzero(cls == c)
            slots = slots[np.argsort(within[slots])]  # each file's rows read front to back
            images[slots] = maps[c][within[slots]]
        torch.from_numpy(images)
        rows += batch_size
        batches += 1
    return dict(rows=rows, batches=batches, seconds=time.perf_counter() - t0, pixel_bytes=rows * ROW)


def chi2_reject_rate(train, batch_size: int, n_batches: int, alpha: float = 0.01) -> dict:
    """Share of batches whose label counts a chi-square test against the class shares rejects at alpha."""
    shares = train.counts().double() / len(train)
    df = torch.tensor((len(shares) - 1) / 2, dtype=torch.float64)
    rejected, seen, epoch = 0, 0, 0
    while seen < n_batches:
        for _, y in train.batches(batch_size, epoch=epoch, drop_last=True):
            expected = shares * len(y)
            stat = ((torch.bincount(y, minlength=len(shares)).double() - expected) ** 2 / expected).sum()
            rejected += bool(torch.special.gammaincc(df, stat / 2) < alpha)
            seen += 1
            if seen == n_batches:
                break
        epoch += 1
    return dict(batches=seen, rejected=rejected, rate=rejected / seen, alpha=alpha)


# ------------------------------------------------------------------------------------------ the run

def prepared(cfg: BenchConfig, out: Path) -> bool:
    """Whether <data> already holds the tiled sources and their finished pack for cfg (--read-only reuses them)."""
    try:
        ps = PackedSet.open(out)
        tiled = [open_source(cfg.data, name, None).rows_in_file for name in cfg.categories]
    except (PackError, ValueError, FileNotFoundError):
        return False
    return ps.classes == cfg.categories and ps.manifest["seed"] == cfg.seed and tiled == [cfg.rows] * len(tiled) \
        and sum(ps.manifest["rows"].values()) == cfg.rows * len(tiled)


def run(cfg: BenchConfig) -> dict:
    info = machine_info()
    print(f"machine: {describe_machine(info)}")
    data, out = Path(cfg.data), Path(cfg.data) / "packed" / "tiled"
    total = len(cfg.categories) * cfg.rows
    reuse = cfg.read_only and prepared(cfg, out)
    if reuse:
        print(f"reading the pack already at {out} ({total:,} drawings, {total * ROW / 1e9:.2f} GB)")
    else:
        need = 2.2 * len(cfg.categories) * cfg.rows * (ROW + 10)  # sources + pack, with room to spare
        free = shutil.disk_usage(ROOT).free
        if free < need + (5 << 30):
            raise SystemExit(f"needs {need / 1e9:.1f} GB of disk and leaves 5 GB; {free / 1e9:.1f} GB free")
        print(f"tiling {len(cfg.categories)} mirror categories to {cfg.rows:,} drawings each ({total:,}, "
              f"{total * ROW / 1e9:.2f} GB) into {data}")
        tile(cfg)
        shutil.rmtree(out, ignore_errors=True)
    report = dict(machine=info, config=asdict(cfg), tiled=dict(
        note="the mirror's real rows repeated in order to reach rows per category", drawings=total,
        bytes=total * ROW))
    tag = f"quickdraw_bench_{os.getpid()}"
    pack_cg = None if cfg.read_only else make_cgroup(tag + "_pack", cfg.pack_limit_mb)
    read_cg = make_cgroup(tag + "_read", cfg.read_limit_mb)
    report["cgroup"] = None if read_cg is None else dict(pack_limit_mb=None if pack_cg is None else cfg.pack_limit_mb,
                                                         read_limit_mb=cfg.read_limit_mb)
    if read_cg is None:
        print("no memory cgroup could be made (not root, or no cgroup v1 memory controller): reads are not capped")
    try:
        _, base_rss, _, _ = run_child(["-c", "import utils.pack"], None)
        report["import_baseline_rss_bytes"] = base_rss
        dropped = drop_caches()
        report["page_cache_dropped"] = dropped
        if not dropped:
            print("the page cache could not be dropped (not root): first reads may come from memory")
        pack_args = ["-m", "utils.pack", "--categories", ",".join(cfg.categories), "--data", str(data), "--out",
                     str(out), "--seed", str(cfg.seed), "--no-download", "--no-progress"]
        if cfg.read_only:
            if not reuse:
                run_child(pack_args, None)
                print("packed it first (not timed: --read-only measures the reading only)")
        else:  # 1. pack
            result, rss, seconds, cg_peak = run_child(pack_args, pack_cg)
            ps = PackedSet.open(out)
            pack_bytes = sum(f["bytes"] for f in ps.manifest["files"].values())
            report["pack"] = dict(seconds=seconds, bytes=pack_bytes, mb_per_s=pack_bytes / 1e6 / seconds,
                                  drawings_per_s=total / seconds, peak_rss_bytes=rss, cgroup_peak_bytes=cg_peak,
                                  cgroup_limit_mb=cfg.pack_limit_mb or None, phases=ps.manifest["seconds"])
            print(f"pack: {total:,} drawings, {pack_bytes / 1e9:.2f} GB in {seconds:.1f} s "
                  f"({pack_bytes / 1e6 / seconds:.0f} MB/s written; sources hashed in "
                  f"{ps.manifest['seconds']['hash_sources']:.1f} s), peak RSS "
                  f"{rss / 2**20:.0f} MiB ({(rss - base_rss) / 2**20:.0f} MiB above importing it)" +
                  (f", in a cgroup capped at {cfg.pack_limit_mb} MiB" if pack_cg else ""))
        report.update(measure_reads(cfg, data, out, read_cg))
    finally:
        for cg in (pack_cg, read_cg):
            if cg is not None:
                cg.rmdir()
        if not cfg.keep:
            shutil.rmtree(data, ignore_errors=True)
    path = save_report(cfg, "bench_scale_read.json" if cfg.read_only else "bench_scale.json", report)
    print(f"{'wrote ' + path if path else 'no report written'}{'' if cfg.keep else f'; deleted {data}'}")
    return report


def measure_reads(cfg: BenchConfig, data: Path, out: Path, read_cg: Path | None) -> dict:
    """Steps 2-5 on the pack at out (and its sources under data), each read with the page cache dropped first."""
    report = {}
    train_file = out / "train.images.npy"
    train_bytes = train_file.stat().st_size

    def disk(key: str, direct: bool = False) -> float | None:  # 2. the disk (it varies from run to run)
        drop_caches()
        seq, _, _, _ = run_child(["-m", "benchmarks.bench_scale", "--child", "seqdirect" if direct else "seq",
                                  str(train_file)], read_cg)
        how = (f"O_DIRECT, {DIRECT_CHUNK >> 20} MB reads {DIRECT_READS} at a time, as the reader reads" if direct
               else f"{SEQ_READ >> 20} MB reads through the page cache")
        if seq is None:
            report[key] = None
            print(f"disk ({how}): not measured, no O_DIRECT on this file system")
            return None
        mb = seq["bytes"] / 1e6 / seq["seconds"]
        report[key] = dict(seq, mb_per_s=mb, drawings_per_s=seq["bytes"] / ROW / seq["seconds"])
        print(f"disk: one sequential read of {train_file.name} ({train_bytes / 1e9:.2f} GB; {how}): {mb:.0f} MB/s "
              f"({seq['bytes'] / ROW / seq['seconds']:,.0f} drawings/s)")
        return mb

    # What the cap holds before any reading: importing torch brings its libraries into the page cache.
    drop_caches()
    _, _, _, report["import_cgroup_peak_bytes"] = run_child(["-c", "import utils.pack"], read_cg)
    before = disk("disk_sequential")
    direct = disk("disk_sequential_direct", direct=True)
    # 3. pack reader, 4. per-category maps
    for key, args in (
            ("pack_reader", ["--child", "read", str(out)]),
            ("category_mmap", ["--child", "mmap", str(data), ",".join(cfg.categories)])):
        drop_caches()
        r, rss, _, cg_peak = run_child(["-m", "benchmarks.bench_scale", *args, "--batch-size",
                                        str(cfg.batch_size), "--seconds", str(cfg.seconds)], read_cg)
        report[key] = dict(r, drawings_per_s=r["rows"] / r["seconds"], mb_per_s=r["pixel_bytes"] / 1e6 / r["seconds"],
                           peak_rss_bytes=rss, cgroup_peak_bytes=cg_peak)
    after = disk("disk_sequential_after")
    seq_mb = (before + after) / 2
    report["sequential_mb_per_s"] = seq_mb
    for key in ("pack_reader", "category_mmap"):
        r = report[key]
        r["share_of_sequential"] = r["mb_per_s"] / seq_mb
        r["share_of_direct_sequential"] = r["mb_per_s"] / direct if direct else None
        epochs = f", {r['epochs']} epochs" if "epochs" in r else ""
        how = (" (read around the page cache, O_DIRECT)" if r["direct"] else " (through the page cache)") \
            if "direct" in r else ""
        print(f"{key}: {r['rows']:,} drawings in {r['seconds']:.1f} s{epochs}{how}: {r['drawings_per_s']:,.0f} "
              f"drawings/s, {r['mb_per_s']:.0f} MB/s = {r['share_of_sequential']:.0%} of sequential "
              f"({seq_mb:.0f} MB/s, the mean of {before:.0f} before and {after:.0f} after)"
              + (f", {r['share_of_direct_sequential']:.0%} of the O_DIRECT read" if direct else "")
              + f"; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB"
              + (f", cgroup peak {r['cgroup_peak_bytes'] / 2**20:.0f} MiB of {cfg.read_limit_mb} (importing "
                 f"alone: {report['import_cgroup_peak_bytes'] / 2**20:.0f} MiB)" if r["cgroup_peak_bytes"] else ""))
    # The same reader with the split in the page cache and no cap: what it costs in CPU alone.
    child_seq(str(train_file))
    r, rss, _, _ = run_child(["-m", "benchmarks.bench_scale", "--child", "read", str(out), "--batch-size",
                              str(cfg.batch_size), "--seconds", str(cfg.seconds)], None)
    mb = r["pixel_bytes"] / 1e6 / r["seconds"]
    report["pack_reader_cached"] = dict(r, drawings_per_s=r["rows"] / r["seconds"], mb_per_s=mb, peak_rss_bytes=rss)
    print(f"pack_reader from the page cache, no cap: {r['rows'] / r['seconds']:,.0f} drawings/s, {mb:.0f} MB/s")
    report["pack_reader"]["target_share"] = 0.7
    report["pack_reader"]["meets_target"] = report["pack_reader"]["share_of_sequential"] >= 0.7
    # 5. class mixing
    mix = chi2_reject_rate(PackedSet.open(out).train, cfg.batch_size, cfg.mix_batches)
    mix["meets_target"] = mix["rate"] <= 0.02
    report["class_mixing"] = mix
    print(f"class mixing: {mix['rejected']} of {mix['batches']} batches of {cfg.batch_size} rejected by a "
          f"chi-square test at the 1% level ({mix['rate']:.1%}; target at most 2%)")
    return report


def compare_torchrun(cfg: BenchConfig) -> dict:
    """One process with 2 threads against torchrun with 2 single-thread processes: one recipe, seed, pack and
    global batch; each run a fresh command line, its JSON line read back."""
    info = machine_info()
    print(f"machine: {describe_machine(info)}")
    data = Path(cfg.data) / "torchrun"
    out, models = data / "packed" / "mirror", data / "models"
    names = ",".join(cfg.categories)
    report = dict(machine=info, config=asdict(cfg))
    try:
        _, rss, seconds, _ = run_child(["-m", "utils.pack", "--categories", names, "--base-url", str(SHARED_DIR),
                                        "--data", str(data / "bitmaps"), "--out", str(out), "--seed", str(cfg.seed),
                                        "--no-progress"], None)
        ps = PackedSet.open(out)
        report["pack"] = dict(seconds=seconds, peak_rss_bytes=rss, rows=ps.manifest["rows"], classes=len(ps.classes))
        print(f"packed {len(ps.classes)} categories whole from the mirror in {seconds:.1f} s: "
              + ", ".join(f"{k} {v:,}" for k, v in ps.manifest["rows"].items()))
        common = ["--recipe", cfg.recipe, "--packed", str(out), "--seed", str(cfg.seed), "--device", "cpu",
                  "--no-progress"] + ["--dry-run"] * cfg.dry_run + (["--epochs", str(cfg.epochs)] if cfg.epochs else [])
        ranks = 2
        runs = {
            "one_process_2_threads": ["-m", "utils.train", *common, "--batch-size", str(cfg.global_batch),
                                      "--num-threads", "2", "--out", str(models / "single.pt")],
            "torchrun_2_processes_1_thread": [
                "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "utils.train",
                *common, "--batch-size", str(cfg.global_batch // ranks), "--lr-batch", str(cfg.global_batch),
                "--num-threads", "1", "--out", str(models / "ddp.pt")],
        }
        same: list[str] = []  # the first run's precision for the second: only the process count differs
        for key, args in runs.items():
            args = args + same
            result, rss, seconds, _ = run_child(args, None)
            same = [f"--{'' if result['precision'][k] else 'no-'}{k.replace('_', '-')}" for k in ("bf16", "channels_last")]
            report[key] = dict(command=" ".join(args[1:] if args[0] == "-m" else args), wall_seconds=seconds,
                               peak_rss_bytes_largest_child=rss, **{k: result[k] for k in (
                                   "val", "test", "train_images_per_s", "train_seconds", "epochs", "precision",
                                   "distributed", "sizes")})
            print(f"{key}: {result['train_images_per_s']:,.0f} images/s ({result['train_seconds']:.0f} s training, "
                  f"{seconds:.0f} s in all, {result['precision']['precision']}, global batch "
                  f"{result['distributed']['global_batch']}, lr {result['distributed']['lr']:g}); val top-1 "
                  f"{result['val']['top1']:.2%}, test top-1 {result['test']['top1']:.2%}")
        a, b = (report[k] for k in runs)
        report["difference_points"] = {s: 100 * (b[s]["top1"] - a[s]["top1"]) for s in ("val", "test")}
        report["within_half_a_point"] = all(abs(d) <= 0.5 for d in report["difference_points"].values())
        report["speed_ratio"] = b["train_images_per_s"] / a["train_images_per_s"]
        print(f"torchrun / one process: {report['speed_ratio']:.2f}x images/s; top-1 differences (points): "
              + ", ".join(f"{k} {v:+.2f}" for k, v in report["difference_points"].items())
              + f" ({'within' if report['within_half_a_point'] else 'NOT within'} 0.5)")
    finally:
        if not cfg.keep:
            shutil.rmtree(data, ignore_errors=True)
    if cfg.dry_run:  # two batches an epoch: no figure to keep
        return report
    if path := save_report(cfg, "bench_scale_torchrun.json", report):
        print(f"wrote {path}")
    return report


def main(argv: list[str] | None = None) -> None:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # seq FILE | read PACK | mmap DATA NAMES
    p.add_argument("--rows", type=int, default=d.rows)
    p.add_argument("--data", default=d.data)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seconds", type=float, default=d.seconds)
    p.add_argument("--pack-limit-mb", type=int, default=d.pack_limit_mb)
    p.add_argument("--read-limit-mb", type=int, default=d.read_limit_mb)
    p.add_argument("--mix-batches", type=int, default=d.mix_batches)
    p.add_argument("--keep", action="store_true", help="keep the tiled sources and the pack")
    p.add_argument("--read-only", action="store_true",
                   help="only the reading (steps 2-5), on a pack kept by --keep (made untimed if missing); "
                        "writes reports/bench_scale_read.json")
    p.add_argument("--torchrun", action="store_true", help="only the distributed comparison (see above)")
    p.add_argument("--recipe", default=d.recipe)
    p.add_argument("--global-batch", type=int, default=d.global_batch)
    p.add_argument("--dry-run", action="store_true", help="--torchrun: two batches an epoch, a quick check")
    p.add_argument("--epochs", type=int, help="--torchrun: train this many epochs instead of the recipe's")
    p.add_argument("--json", default=None, help="the report's path (default: the mode's file under reports/; "
                                                 "\"\" writes none)")
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind in ("seq", "seqdirect"):
            result = child_seq(rest[0], direct=kind == "seqdirect")
        elif kind == "read":
            result = child_pack_reader(rest[0], args.batch_size, args.seconds)
        else:
            result = child_mmap(rest[0], rest[1].split(","), args.batch_size, args.seconds, args.seed)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(None if result is None else dict(result, peak_rss_self=peak)))
        return
    cfg = BenchConfig(rows=args.rows, data=args.data, seed=args.seed, batch_size=args.batch_size, seconds=args.seconds,
                      pack_limit_mb=args.pack_limit_mb, read_limit_mb=args.read_limit_mb,
                      mix_batches=args.mix_batches, keep=args.keep, read_only=args.read_only,
                      recipe=args.recipe, global_batch=args.global_batch,
                      dry_run=args.dry_run, epochs=args.epochs, json=args.json)
    (compare_torchrun if args.torchrun else run)(cfg)


if __name__ == "__main__":
    main()
