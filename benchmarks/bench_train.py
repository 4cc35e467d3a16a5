"""Training recipes side by side on the 17 bitmap categories of ../shared/quickdraw (57,000 drawings).

    .venv/bin/python -m benchmarks.bench_train                  # every recipe, about 30 min on 2 cores
    .venv/bin/python -m benchmarks.bench_train --only v2-original,v2-best
    .venv/bin/python -m benchmarks.bench_train --quick          # smoke run: 200 drawings a class, 1 epoch

One stratified 80/10/10 split by seed; every model is scored on the WHOLE validation and test splits.
Recipes were chosen on validation scores only. Prints a table and writes it as JSON (reports/bench_train.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from utils.data import load_bitmaps, split
from utils.metrics import evaluate_model
from utils.models import build_model, count_parameters
from utils.train import RECIPES as TRAIN_RECIPES, TrainConfig, fit, set_seed

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "quickdraw" / "full"
# name -> (what it is, TrainConfig fields from utils.train.RECIPES)
RECIPES: dict[str, tuple[str, dict]] = {
    "v2-original": ("V2, the original recipe: Adam 1e-3, batch 64, 10 epochs, no augmentation", TRAIN_RECIPES["v2"]),
    "v2-best": ("V2, our recipe: online turns/flips/zooms/shifts, AdamW one-cycle, label smoothing 0.1, batch 256, "
                "bf16 autocast, channels-last", TRAIN_RECIPES["v2-tuned"]),
    "v1-original": ("V1, the original recipe", TRAIN_RECIPES["v1"]),
    "resnet": ("QuickDrawResNet with the same kind of recipe, 20 epochs, stopped early if 14.5 min would pass",
               TRAIN_RECIPES["resnet"]),
}
SPLITS = ("val", "test")
SCORES = ("top1", "top3", "map3")


def load(max_per_class: int | None, seed: int):
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: this benchmark reads the bitmaps of ../shared/quickdraw")
    categories = sorted(p.stem for p in (SHARED / "numpy_bitmap").glob("*.npy"))
    return split(load_bitmaps(categories, root=SHARED, max_per_class=max_per_class), seed=seed)


def run(name: str, train, val, test, seed: int, quick: bool, out_dir: Path, threads: int | None) -> dict:
    """Train one recipe from a seeded start and score its best epoch on the whole val and test splits."""
    description, fields = RECIPES[name]
    overrides = dict(seed=seed, progress=sys.stderr.isatty(), num_threads=threads, **(dict(epochs=1) if quick else {}))
    config = TrainConfig(**dict(fields, **overrides))
    load_before = os.getloadavg()
    set_seed(seed)
    model = build_model(config.model, len(train.classes))
    history = fit(model, train, val, config, out=out_dir / f"{name}.pt")
    scores = {s: evaluate_model(model, ds) for s, ds in (("val", val), ("test", test))}
    return dict(name=name, description=description, config=dataclasses.asdict(config), params=count_parameters(model),
                epochs=len(history["train_loss"]), best_epoch=history["best_epoch"], stopped=history["stopped"],
                train_seconds=history["train_seconds"], fit_seconds=history["fit_seconds"],
                images_per_s=history["train_images_per_s"], loadavg_before=load_before, loadavg_after=os.getloadavg(),
                **{s: {k: scores[s][k] for k in (*SCORES, "top5", "n")} for s in SPLITS})


def table(results: list[dict]) -> str:
    head = ["recipe", "params", "epochs", "train s", "fit s", "img/s", *(f"{s} {k}" for s in SPLITS for k in SCORES)]
    rows = [[r["name"], f"{r['params']:,}", f"{r['epochs']} ({r['best_epoch']})", f"{r['train_seconds']:.0f}",
             f"{r['fit_seconds']:.0f}", f"{r['images_per_s']:,.0f}",
             *(f"{r[s][k]:.2%}" for s in SPLITS for k in SCORES)] for r in results]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    fmt = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def verdicts(by_name: dict[str, dict]) -> list[str]:
    """The goals, checked on the figures of this run."""
    out = []
    base, best, strong = by_name.get("v2-original"), by_name.get("v2-best"), by_name.get("resnet")
    if best:
        line = f"v2-best: test top-1 {best['test']['top1']:.2%} (goal >= 92%)"
        if base:
            speedup = best["images_per_s"] / base["images_per_s"]
            line += f", {speedup:.2f}x the original recipe's training images/s (goal >= 1.4x)"
        out.append(line)
    if strong:
        out.append(f"resnet: test top-1 {strong['test']['top1']:.2%} (goal >= 94%) after {strong['fit_seconds'] / 60:.1f} "
                   f"min of training with validation (goal <= 15 min), {strong['params']:,} parameters")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(RECIPES), help=f"comma-separated recipes from {', '.join(RECIPES)}")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 drawings a class and 1 epoch per recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every recipe alike (default: torch's choice, one per core)")
    p.add_argument("--json", default=None, help="results file (default: reports/bench_train.json; none with --quick)")
    p.add_argument("--models-dir", default=str(ROOT / "models" / "bench"), help="where the checkpoints go")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")

    t0 = time.perf_counter()
    train, val, test = load(200 if args.quick else None, args.seed)
    print(f"{len(train.classes)} categories: train {len(train):,}, val {len(val):,}, test {len(test):,} drawings "
          f"(split seed {args.seed}); loaded in {time.perf_counter() - t0:.1f} s")
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; load average {os.getloadavg()}")
    results = []
    for name in names:
        print(f"\n{name}: {RECIPES[name][0]}", flush=True)
        r = run(name, train, val, test, args.seed, args.quick, Path(args.models_dir), args.threads)
        results.append(r)
        print(f"  {r['epochs']} epochs (best {r['best_epoch']}, {r['stopped']}), {r['train_seconds']:.0f} s training, "
              f"{r['images_per_s']:,.0f} images/s; val top-1 {r['val']['top1']:.2%}, test top-1 {r['test']['top1']:.2%}; "
              f"load average {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}", flush=True)
    print("\n" + table(results))
    checks = verdicts({r["name"]: r for r in results})
    print("\n".join(checks))
    print(f"load average at the end: {os.getloadavg()}")
    path = args.json or (None if args.quick else str(ROOT / "reports" / "bench_train.json"))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(dict(quick=args.quick, seed=args.seed, results=results, checks=checks,
                                              sizes=dict(train=len(train), val=len(val), test=len(test))), indent=1))
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
