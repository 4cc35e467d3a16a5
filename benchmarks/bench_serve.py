"""Serving without torch: what a serving-only install costs, and how soon it answers.

1. A new venv with only requirements-serve.txt (pip from the package index, no cache): the time to
   create it and to install, its size on disk (pip included), and whether torch came along (it must not).
2. From `python -m app` (the shipped ONNX model) to the first answered /predict with a real drawing,
   in that venv and in the project's full .venv (median of --starts fresh starts each); with
   --checkpoint also a .pt on torch in the full .venv.

Prints the figures with the machine and writes reports/bench_serve.json (--json PATH elsewhere).
Timed: run it alone on the machine.

    flock -x /tmp/cpu.lock .venv/bin/python -m benchmarks.bench_serve [--checkpoint models/v2-tuned.pt]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from app.__main__ import DEFAULT_MODEL
from benchmarks.bench_export import du, serving_venv
from testkit.launch import PROJECT_ROOT, app_process
from utils.device import describe_machine, machine_info
from utils.io import write_json

# a real raw drawing (a house, 3 strokes) as the drawing page sends it
PROBE = {"strokes": [[[10, 10, 200, 200, 10], [240, 90, 90, 240, 240]], [[10, 105, 200], [90, 10, 90]],
                     [[80, 80, 130, 130], [240, 170, 170, 240]]]}


def first_answer(python: str, model: Path, timeout: float = 120.0) -> float:
    """Seconds from starting `python -m app` to its first 200 answer to /predict."""
    t0 = time.perf_counter()
    with app_process(model, "--log-level", "warning", python=python) as (proc, url, log):
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"python -m app exited ({proc.returncode}):\n{log.read().decode()[-2000:]}")
            try:
                if httpx.post(f"{url}/predict", json=PROBE, timeout=5).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.01)
    raise TimeoutError(f"no answer from python -m app within {timeout:.0f} s")


def starts(python: str, model: Path, n: int) -> dict:
    times = [first_answer(python, model) for _ in range(n)]
    return dict(seconds=statistics.median(times), all=times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="also time a .pt on torch in the full .venv")
    p.add_argument("--starts", type=int, default=3, help="fresh starts per figure (the median is given)")
    p.add_argument("--json", default=str(PROJECT_ROOT / "reports" / "bench_serve.json"), help='"" writes none')
    args = p.parse_args(argv)
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}")
    full_venv = Path(sys.prefix)
    report = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine,
                  machine_line=describe_machine(machine), model=str(DEFAULT_MODEL.relative_to(PROJECT_ROOT)))
    with tempfile.TemporaryDirectory(prefix="serve-venv-") as tmp:
        venv = Path(tmp) / "venv"
        serve = serving_venv(venv)
        print(f"serving-only venv (requirements-serve.txt): created in {serve['create_seconds']:.1f} s, installed in "
              f"{serve['install_seconds']:.1f} s (package index, no cache), {serve['bytes'] / 1e6:.0f} MB on disk, "
              f"{len(serve['packages'])} packages, torch installed: {serve['torch_installed']}")
        serve["first_answer"] = starts(str(venv / "bin" / "python"), DEFAULT_MODEL, args.starts)
    full = dict(bytes=du(full_venv), first_answer=starts(sys.executable, DEFAULT_MODEL, args.starts))
    print(f"python -m app to the first answered /predict (shipped ONNX model, median of {args.starts}): "
          f"serving-only venv {serve['first_answer']['seconds']:.2f} s; full .venv {full['first_answer']['seconds']:.2f} s "
          f"({full['bytes'] / 1e9:.1f} GB on disk)")
    if args.checkpoint:
        full["first_answer_torch"] = starts(sys.executable, args.checkpoint, args.starts)
        print(f"  {args.checkpoint.name} on torch in the full .venv: {full['first_answer_torch']['seconds']:.2f} s")
    report |= dict(serve=serve, full=full, starts=args.starts)
    if args.json:
        write_json(args.json, report, indent=1)
        print(f"written: {args.json}")
    return report


if __name__ == "__main__":
    main()
