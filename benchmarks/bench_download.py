"""Download benchmark: `python -m utils.download` (the real CLI) against ../shared/quickdraw served on 127.0.0.1.

Three categories with --max-per-class 700. Prints, per file, the bytes the mirror sent against
header + 700 x 784 (at most 110% allowed) and whether the array equals the mirror's first 700 rows;
then the bytes a second run moves (0 expected); then a run killed half-way through (a slowed mirror)
and started again, which must resume from its .part files and end with the same correct arrays.

Then every fault mode of the test mirror (testkit/mirror.py): a first run fetches 350 rows, a second
grows them to 700 while the mirror misbehaves (statuses, dropped bodies, ignored ranges, no validators,
200 HTML pages, a same-size new version of each file). Each mode must end with arrays equal to the true
rows of the file served, or with a non-zero exit and an error naming the file; a wrong array with exit
0 fails the benchmark. Writes the figures and the machine to reports/bench_download.json (--json elsewhere).
Exit status 1 if any check fails.

    flock -x /tmp/cpu.lock .venv/bin/python -m benchmarks.bench_download
"""
import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from testkit.mirror import SHARED_DIR, Faults, header_size, reverse_rows, serve
from utils.device import describe_machine, machine_info
from utils.io import write_json

PROJECT = Path(__file__).resolve().parents[1]
CATEGORIES = ("cat", "alarm clock", "smiley face")
N = 700
ROW = 28 * 28
CUT = 1 << 16  # a dropped body stops after this many bytes

# name: (the first run's faults, the second run's faults); the first fetches N // 2 rows, the second N.
MODES = {
    "healthy": (Faults(), Faults()),
    "500 and 503, then 206": (Faults(), Faults(script=[500, 503])),
    "503 to every request": (Faults(), Faults(script=[503] * 100)),
    "404 for one file": (Faults(), Faults(script=[404])),
    "bodies dropped mid-way": (Faults(script=["drop"], drop_after=CUT), Faults(script=["drop"] * 2, drop_after=CUT)),
    "Range ignored (200, whole file)": (Faults(ignore_range=True), Faults(ignore_range=True)),
    "no validators": (Faults(validators=False), Faults(validators=False)),
    "206 for another range than the one asked": (Faults(), Faults(misrange=True)),
    "200 HTML page to resumes": (Faults(), Faults(html="if-range")),
    "dropped, then 200 HTML page to the resume": (Faults(script=["drop"] * 3 + [503] * 100, drop_after=CUT),
                                                   Faults(html="if-range")),
    "200 HTML page to every request": (Faults(), Faults(html="always")),
    "same-size new version, with validators": (Faults(), Faults(new_version=True)),
    "same-size new version, no validators": (Faults(validators=False), Faults(validators=False, new_version=True)),
    "dropped, then same-size new version, no validators": (
        Faults(validators=False, script=["drop"] * 3 + [503] * 100, drop_after=CUT),
        Faults(validators=False, new_version=True)),
}


def start_cli(url: str, root: Path, n: int = N, retries: int = 5) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "utils.download", *CATEGORIES, "--max-per-class", str(n),
                             "--root", str(root), "--base-url", url, "--workers", "3", "--no-progress",
                             "--retries", str(retries)],
                            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(url: str, root: Path, n: int = N, retries: int = 5) -> tuple[int, str, str]:
    """(exit status, last line printed, the error it printed from "error:" on) of one CLI run."""
    proc = start_cli(url, root, n, retries)
    out, err = proc.communicate(timeout=300)
    lines = out.strip().splitlines()
    return proc.returncode, (lines[-1] if lines else ""), err[err.find("error:"):].strip() if "error:" in err else ""


def remote(name: str) -> Path:
    return SHARED_DIR / "full" / "numpy_bitmap" / f"{name}.npy"


def true_rows(name: str, new_version: bool = False) -> np.ndarray:
    return np.load(io.BytesIO(reverse_rows(remote(name)))) if new_version else np.load(remote(name), mmap_mode="r")


def equal_first_rows(root: Path, n: int = N, new_version: bool = False) -> dict[str, bool]:
    out = {}
    for name in CATEGORIES:
        local = root / "numpy_bitmap" / f"{name}.npy"
        out[name] = local.exists() and np.array_equal(np.load(local), true_rows(name, new_version)[:n])
    return out


def report(label: str, ok: bool, checks: dict) -> None:
    checks[label] = ok
    print(f"{label:<88} {'ok' if ok else 'FAIL'}")


def fault_modes(tmp: Path, checks: dict) -> dict:
    """Each mode: final arrays equal to the true rows, or a non-zero exit naming the file; never wrong with 0."""
    print(f"\nfault modes: a first run of {N // 2} rows, then {N} rows while the mirror misbehaves (--retries 2)")
    print(f"{'mode':<52} {'exit':>4} {'read':>9} {'sent':>10}  {'verdict':<13} message")
    results = {}
    for mode, (first, second) in MODES.items():
        root = tmp / mode.replace(" ", "_")
        with serve(SHARED_DIR, first) as mirror:
            run_cli(mirror.url, root, N // 2, retries=2)
            mirror.faults, before = second, mirror.bytes_sent
            status, said, message = run_cli(mirror.url, root, N, retries=2)
            sent = mirror.bytes_sent - before  # written to the socket, read by the client or not
        read = int(said.split(", ")[-1].split()[0].replace(",", "")) if status == 0 else None  # the CLI's count
        # Every final file present must hold true rows (of the old version if the new one was not fetched).
        finals = {}
        for name in CATEGORIES:
            local = root / "numpy_bitmap" / f"{name}.npy"
            if local.exists():
                got = np.load(local)
                finals[name] = (len(got), any(np.array_equal(got, true_rows(name, new)[:len(got)])
                                              for new in {second.new_version, False}))
        equal = all(equal_first_rows(root, N, second.new_version).values())
        clear = status != 0 and message.startswith("error:") and ".npy" in message
        if status == 0:
            verdict = "equal" if equal else "WRONG, exit 0"
        else:
            verdict = "clear error" if clear else "unclear error"
        ok = verdict in ("equal", "clear error") and all(right for _, right in finals.values())
        said = " ".join(line.strip() for line in message.splitlines()[:2])
        print(f"{mode:<52} {status:>4} {'-' if read is None else f'{read:,}':>9} {sent:>10,}  {verdict:<13} "
              f"{said[:150]}")
        checks[f"fault mode {mode!r}: {verdict}"] = ok
        results[mode] = dict(exit=status, bytes_read=read, bytes_sent=sent, verdict=verdict, equal=equal, message=message,
                             final_files={k: dict(rows=r, true_rows=t) for k, (r, t) in finals.items()}, ok=ok)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=str(PROJECT / "reports" / "bench_download.json"), help="results file")
    args = p.parse_args(argv)
    if not (SHARED_DIR / "full").is_dir():
        print(f"../shared/quickdraw not found: {SHARED_DIR} is absent; nothing to measure")
        return 2
    print(f"machine: {describe_machine()}")
    budget = {name: header_size(remote(name)) + N * ROW for name in CATEGORIES}
    checks: dict[str, bool] = {}
    figures = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine_info(),
                   categories=CATEGORIES, max_per_class=N, files={})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "fresh"
        with serve(SHARED_DIR) as mirror:
            t0 = time.perf_counter()
            status, said, message = run_cli(mirror.url, root)
            seconds = time.perf_counter() - t0
            moved = {name: mirror.sent(f"/{name}.npy") for name in CATEGORIES}
            before = mirror.bytes_sent
            run_cli(mirror.url, root)
            second = mirror.bytes_sent - before
        if status:
            sys.exit(f"python -m utils.download failed:\n{message}")
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
        figures["fault_modes"] = fault_modes(Path(tmp), checks)
    failed = list(checks.values()).count(False)
    print("all checks passed" if not failed else f"{failed} check(s) FAILED")
    figures.update(loadavg_after=os.getloadavg(), checks=checks, passed=not failed)
    write_json(args.json, figures, indent=1)
    print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
