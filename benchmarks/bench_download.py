"""Download benchmark: `python -m utils.download` (the real CLI) against ../shared/quickdraw served on 127.0.0.1.

Three categories with --max-per-class 700. Prints, per file, the bytes the mirror sent against
header + 700 x 784 (at most 110% allowed) and whether the array equals the mirror's first 700 rows;
then the bytes a second run moves (0 expected); then a run killed half-way through (a slowed mirror)
and started again, which must resume from its .part files and end with the same correct arrays.
Writes the figures, with the date and load average, to reports/bench_download.json (--json elsewhere).
Exit status 1 if any check fails.

    .venv/bin/python benchmarks/bench_download.py
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
from tests.mirror import SHARED_DIR, Faults, header_size, serve

CATEGORIES = ("cat", "alarm clock", "smiley face")
N = 700
ROW = 28 * 28


def start_cli(url: str, root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "utils.download", *CATEGORIES, "--max-per-class", str(N),
                             "--root", str(root), "--base-url", url, "--workers", "3", "--no-progress"],
                            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(url: str, root: Path) -> str:
    """The CLI's last line (its own count of bytes moved); exits if the run fails."""
    proc = start_cli(url, root)
    out, err = proc.communicate(timeout=300)
    if proc.returncode:
        sys.exit(f"python -m utils.download failed ({proc.returncode}):\n{err}")
    return out.strip().splitlines()[-1]


def remote(name: str) -> Path:
    return SHARED_DIR / "full" / "numpy_bitmap" / f"{name}.npy"


def equal_first_rows(root: Path) -> dict[str, bool]:
    out = {}
    for name in CATEGORIES:
        local = root / "numpy_bitmap" / f"{name}.npy"
        out[name] = local.exists() and np.array_equal(np.load(local), np.load(remote(name), mmap_mode="r")[:N])
    return out


def report(label: str, ok: bool, checks: dict) -> None:
    checks[label] = ok
    print(f"{label:<88} {'ok' if ok else 'FAIL'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=str(PROJECT / "reports" / "bench_download.json"), help="results file")
    args = p.parse_args(argv)
    if not (SHARED_DIR / "full").is_dir():
        print(f"../shared/quickdraw not found: {SHARED_DIR} is absent; nothing to measure")
        return 2
    budget = {name: header_size(remote(name)) + N * ROW for name in CATEGORIES}
    checks: dict[str, bool] = {}
    figures = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), loadavg_before=os.getloadavg(),
                   categories=CATEGORIES, max_per_class=N, files={})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "fresh"
        with serve(SHARED_DIR) as mirror:
            t0 = time.perf_counter()
            said = run_cli(mirror.url, root)
            seconds = time.perf_counter() - t0
            moved = {name: mirror.sent(f"/{name}.npy") for name in CATEGORIES}
            before = mirror.bytes_sent
            run_cli(mirror.url, root)
            second = mirror.bytes_sent - before
        equal = equal_first_rows(root)
        print(f"python -m utils.download {' '.join(map(repr, CATEGORIES))} --max-per-class {N}, "
              f"mirror on 127.0.0.1")
        print(f"{'category':<12} {'header':>6} {'hdr+700x784':>12} {'moved':>10} {'ratio':>6}  equal first {N}")
        for name in CATEGORIES:
            ratio = moved[name] / budget[name]
            print(f"{name:<12} {budget[name] - N * ROW:>6} {budget[name]:>12,} {moved[name]:>10,} {ratio:>6.3f}  "
                  f"{equal[name]}")
            figures["files"][name] = dict(header=budget[name] - N * ROW, needed=budget[name], moved=moved[name],
                                          ratio=ratio, equal=equal[name])
            checks[f"{name}: moved at most 110% of needed"] = ratio <= 1.10
            checks[f"{name}: equals the first {N} rows"] = equal[name]
        print(f"first run: {seconds:.2f} s (process start included); the CLI said: {said}")
        figures.update(first_run_seconds=seconds, second_run_bytes=second)
        report(f"second run: {second:,} bytes moved (expected 0)", second == 0, checks)

        # Killed half-way: a slowed mirror (4 KiB every 20 ms per connection), SIGKILL once half is sent;
        # then the same mirror (same URL: another one's bytes would not be resumed), at full speed.
        root = Path(tmp) / "killed"
        with serve(SHARED_DIR, Faults(delay=0.02, chunk=4096)) as mirror:
            proc = start_cli(mirror.url, root)
            while mirror.bytes_sent < sum(budget.values()) // 2 and proc.poll() is None:
                time.sleep(0.005)
            proc.kill()
            proc.communicate()
            at_kill = mirror.bytes_sent
            before = -1
            while before != mirror.bytes_sent:  # the answers to the killed process stop at their next write
                before = mirror.bytes_sent
                time.sleep(0.2)
            folder = root / "numpy_bitmap"
            finals = list(folder.glob("*.npy"))
            parts = sum(p.stat().st_size for p in folder.glob("*.npy.part"))
            survivors_ok = all(equal_first_rows(root)[p.stem] for p in finals)  # a final file must be a right one
            print(f"killed run: killed after {at_kill:,} of {sum(budget.values()):,} bytes sent; left "
                  f"{len(finals)} final files, {len(list(folder.glob('*.part')))} .part files ({parts:,} bytes)")
            report("killed run: no final file that is wrong", survivors_ok and parts > 0, checks)
            mirror.faults = Faults()
            run_cli(mirror.url, root)
            rerun = mirror.bytes_sent - before
        equal = equal_first_rows(root)
        report(f"rerun: moved {rerun:,} bytes = needed - .part bytes ({sum(budget.values()) - parts:,})",
               rerun == sum(budget.values()) - parts, checks)
        report(f"rerun: arrays equal the first {N} mirror rows: {list(equal.values())}", all(equal.values()), checks)
        figures.update(killed_after_bytes=at_kill, killed_final_files=len(finals), killed_part_bytes=parts,
                       rerun_bytes=rerun, rerun_expected_bytes=sum(budget.values()) - parts)
    failed = list(checks.values()).count(False)
    print("all checks passed" if not failed else f"{failed} check(s) FAILED")
    figures.update(loadavg_after=os.getloadavg(), checks=checks, passed=not failed)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
