"""ONNX export and int8 quantization of a model of the 17 bitmap categories of ../shared/quickdraw.

1. Export parity on the whole test split the checkpoint was scored on: top-1 agreement and the largest
   logit difference between torch and ONNX Runtime (utils.export, which refuses anything short of 100%
   and 1e-4).
2. int8 (static, QDQ, calibrated on training drawings): test top-1, top-3 and MAP@3 beside float's;
   then the same for other quantization settings (not written), and for a calibration on blank drawings,
   which the export refuses.
3. File sizes, and inference speed in drawings/s through app.backends (what the service calls) for
   torch, ONNX float and ONNX int8, with 1 and 2 intra-op threads, at batch 1 and batch 256 (best of
   three rounds on real test drawings; batch 1 also as ms per call).
4. With --fresh-venv: a new virtual environment with only requirements-serve.txt (no torch): install
   time and size (pip from the package index, no cache), then the time to import app.backends and answer
   a first prediction there, beside the same with torch in the project's environment.

Prints the figures with the machine (utils.device.machine_info) and writes reports/bench_export.json.
Timed: run it alone on the machine.

    .venv/bin/python -m utils.train --recipe v2-tuned --categories <the 17> --data data \
        --base-url ../shared/quickdraw --out models/v2-tuned.pt
    .venv/bin/python -m benchmarks.bench_export --checkpoint models/v2-tuned.pt --fresh-venv
    .venv/bin/python -m benchmarks.bench_export --quick   # short speed rounds, no report
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from app.backends import OnnxBackend, load_backend
from testkit.mirror import SHARED_DIR
from utils.checkpoint import load_checkpoint
from utils.device import cpu_flags, describe_machine, machine_info
from utils.export import (QuantSettings, calibration_sample, export, int8_path, onnx_logits, quantize_int8,
                          rebuild_split, scores)
from utils.io import write_json

PROJECT = Path(__file__).resolve().parents[1]
FULL = SHARED_DIR / "full"
REPORT = PROJECT / "reports" / "bench_export.json"
# What int8 and float speed depend on: ONNX Runtime picks its kernels from these at run time.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
FIRST_PREDICTION = """
import sys, time
t = time.perf_counter()
import numpy as np
from app.backends import OnnxBackend, load_backend
backend = load_backend(sys.argv[1], threads=1)
backend.probabilities(np.zeros((1, 28, 28), np.uint8))
print(time.perf_counter() - t, "torch" in sys.modules)
"""


# Quantization settings beside the default (QuantSettings()): each changes one thing.
VARIANTS = {"8-bit weights (no reduce_range)": dict(reduce_range=False), "per-tensor weights": dict(per_channel=False),
            "Entropy calibration": dict(method="Entropy"), "256 calibration drawings": dict(calibration_size=256)}
BLANK = "calibrated on 256 blank drawings"


def variants(float_model: Path, train, test) -> dict:
    """Test scores of int8 models made with other settings, and with a useless calibration set."""
    out = {}
    for name, changes in [*VARIANTS.items(), (BLANK, {})]:
        settings = QuantSettings(**changes)
        sample = (np.zeros((256, 28, 28), np.uint8) if name == BLANK
                  else calibration_sample(train, settings.calibration_size, settings.seed))
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print as they go
            model = quantize_int8(float_model.read_bytes(), sample, settings)
        out[name] = scores(onnx_logits(OnnxBackend(model), test.images.numpy()), test.labels)
        print(f"{name:<34} {out[name]['top1']:>10.2%} {out[name]['top3']:>8.2%} {out[name]['map3']:>8.4f}", flush=True)
    return out


def drawings_per_s(backend, images: np.ndarray, batch: int, drawings: int, rounds: int = 3) -> float:
    """Best of `rounds`: drawings/s of backend.probabilities on consecutive batches of `images`."""
    batches = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    calls = max(1, drawings // batch)
    backend.probabilities(batches[0])  # first-call costs (allocations, kernel choice) are not throughput
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(calls):
            backend.probabilities(batches[i % len(batches)])
        best = max(best, calls * batch / (time.perf_counter() - t0))
    return best


def speed(models: dict[str, Path], images: np.ndarray, quick: bool) -> list[dict]:
    rows = []
    torch_threads = torch.get_num_threads()
    for threads in (1, 2):
        for name, path in models.items():
            backend = load_backend(path, threads=threads)
            for batch, drawings in ((1, 300 if quick else 3000), (256, 2560 if quick else 25600)):
                rate = drawings_per_s(backend, images, batch, drawings, rounds=1 if quick else 3)
                rows.append(dict(backend=name, threads=threads, batch=batch, drawings_per_s=rate,
                                 ms_per_call=1000 * batch / rate))
                print(f"{name:<11} {threads:>7} {batch:>6} {rate:>13,.0f} {1000 * batch / rate:>12.3f}", flush=True)
    torch.set_num_threads(torch_threads)  # TorchBackend sets it process-wide
    return rows


def run(command: list[str], **kwargs) -> tuple[float, str]:
    """(wall seconds, stdout) of a command that must succeed."""
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0, done.stdout


def first_prediction(python: str, model: Path, repeats: int = 3) -> dict:
    """Median of `repeats` fresh processes: seconds from interpreter start to a first answer, and the
    share spent importing app.backends, loading the model and predicting once."""
    whole, inside, torch_loaded = [], [], set()
    for _ in range(repeats):
        seconds, out = run([python, "-c", FIRST_PREDICTION, str(model)], cwd=PROJECT)
        inner, loaded = out.split()
        whole.append(seconds)
        inside.append(float(inner))
        torch_loaded.add(loaded == "True")
    return dict(process_seconds=statistics.median(whole), import_load_predict_seconds=statistics.median(inside),
                torch_imported=torch_loaded == {True})


def du(path: Path) -> int:
    """Bytes of the files under path (as du -sb counts them, without following links)."""
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())


def serving_venv(venv: Path) -> dict:
    """Create venv and install requirements-serve.txt into it (package index, no cache): the times, its
    size on disk, its packages, and whether torch came along."""
    base = getattr(sys, "_base_executable", sys.executable)
    create_seconds, _ = run([base, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    install_seconds, _ = run([python, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                              "-q", "-r", str(PROJECT / "requirements-serve.txt")])
    _, packages = run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"])
    _, has_torch = run([python, "-c", "import importlib.util; print(importlib.util.find_spec('torch') is not None)"])
    return dict(create_seconds=create_seconds, install_seconds=install_seconds, bytes=du(venv),
                packages={p["name"]: p["version"] for p in json.loads(packages)},
                torch_installed=has_torch.strip() == "True")


def fresh_venv(onnx_model: Path, checkpoint: Path) -> dict:
    """Install requirements-serve.txt into a new venv under /tmp; its cost, and a first prediction in it."""
    with tempfile.TemporaryDirectory(prefix="serve-venv-") as tmp:
        venv = Path(tmp) / "venv"
        serve = serving_venv(venv) | dict(onnx=first_prediction(str(venv / "bin" / "python"), onnx_model))
    site = Path(torch.__file__).parents[1]
    # torch's own folder, and the CUDA libraries and compiler its default wheel brings along
    full = dict(site_packages_bytes=du(site), torch_bytes={name: du(site / name) for name in ("torch", "nvidia", "triton")
                                                           if (site / name).is_dir()},
                onnx=first_prediction(sys.executable, onnx_model), torch=first_prediction(sys.executable, checkpoint))
    return dict(serve=serve, full=full)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=PROJECT / "models" / "v2-tuned.pt",
                   help="trained on the 17 bitmap categories (see above)")
    p.add_argument("--out", type=Path, help="ONNX file to write (default: the checkpoint's path with .onnx)")
    p.add_argument("--fresh-venv", action="store_true", help="also measure a serving-only install (needs the index)")
    p.add_argument("--quick", action="store_true", help="short speed rounds, no report")
    p.add_argument("--json", type=Path, default=REPORT)
    args = p.parse_args(argv)
    if not (FULL / "numpy_bitmap").is_dir():
        sys.exit(f"error: {SHARED_DIR} is absent: this benchmark needs ../shared/quickdraw")
    if not args.checkpoint.is_file():
        sys.exit(f"error: {args.checkpoint} not found; train it first (see python -m benchmarks.bench_export --help)")
    info = machine_info()
    flags = sorted(set(ISA_FLAGS) & cpu_flags())
    print(f"{describe_machine(info)}, onnxruntime {onnxruntime.__version__}; CPU flags {' '.join(flags)}; "
          f"load average {info['load_average']}", flush=True)

    out = args.out or args.checkpoint.with_suffix(".onnx")
    exported = export(args.checkpoint, out, data=FULL, int8=True)
    parity = exported["parity"]
    print(f"\nexport parity on the whole test split ({parity['n']:,} drawings): top-1 agreement "
          f"{parity['top1_agreement']:.2%} ({parity['top1_disagreements']} disagreements), max |logit difference| "
          f"{parity['max_logit_diff']:.2g} [{exported['seconds']:.1f} s to export, quantize and check both]")
    _, ckpt = load_checkpoint(args.checkpoint)
    print(f"\n{'model':<11} {'test top-1':>10} {'top-3':>8} {'MAP@3':>8} {'file':>12}")
    print(f"{'checkpoint':<11} {ckpt['metrics']['test']['top1']:>10.2%} {ckpt['metrics']['test']['top3']:>8.2%} "
          f"{ckpt['metrics']['test']['map3']:>8.4f} {args.checkpoint.stat().st_size:>12,}")
    for name in ("float", "int8"):
        s = exported[name]
        print(f"{'ONNX ' + name:<11} {s['top1']:>10.2%} {s['top3']:>8.2%} {s['map3']:>8.4f} {s['bytes']:>12,}")

    train, test = rebuild_split(ckpt, FULL)
    print(f"\n{'int8 made otherwise':<34} {'test top-1':>10} {'top-3':>8} {'MAP@3':>8}")
    other = variants(out, train, test)
    models = {"torch": args.checkpoint, "ONNX float": out, "ONNX int8": int8_path(out)}
    print(f"\n{'backend':<11} {'threads':>7} {'batch':>6} {'drawings/s':>13} {'ms per call':>12}", flush=True)
    rows = speed(models, test.images.numpy(), args.quick)

    report = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=info, cpu_flags=flags,
                  machine_line=describe_machine(info), onnxruntime=onnxruntime.__version__,
                  checkpoint=str(args.checkpoint), checkpoint_bytes=args.checkpoint.stat().st_size,
                  recorded=ckpt["metrics"], export=exported, int8_variants=other, speed=rows)
    if args.fresh_venv:
        venv = fresh_venv(out, args.checkpoint)
        serve, full = venv["serve"], venv["full"]
        print(f"\nserving-only venv (requirements-serve.txt, {len(serve['packages'])} packages, torch installed: "
              f"{serve['torch_installed']}): install {serve['install_seconds']:.1f} s, "
              f"{serve['bytes'] / 2**20:,.0f} MiB")
        print(f"  import app.backends + load + first prediction: ONNX {serve['onnx']['import_load_predict_seconds']:.2f} s "
              f"({serve['onnx']['process_seconds']:.2f} s with interpreter start; torch imported: "
              f"{serve['onnx']['torch_imported']})")
        parts = ", ".join(f"{name} {size / 2**20:,.0f} MiB" for name, size in full["torch_bytes"].items())
        print(f"project venv: site-packages {full['site_packages_bytes'] / 2**20:,.0f} MiB ({parts}); first prediction ONNX "
              f"{full['onnx']['import_load_predict_seconds']:.2f} s, torch {full['torch']['import_load_predict_seconds']:.2f} s "
              f"({full['torch']['process_seconds']:.2f} s with interpreter start)")
        report["fresh_venv"] = venv
    report["load_average_after"] = list(os.getloadavg())
    print(f"\nload average after: {report['load_average_after']}")
    if not args.quick:
        write_json(args.json, report, indent=1)
        print(f"written: {args.json}")
    return report


if __name__ == "__main__":
    main()
