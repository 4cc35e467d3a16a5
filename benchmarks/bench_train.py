"""Training recipes side by side on the 17 bitmap categories of ../shared/quickdraw (57,000 drawings).

    .venv/bin/python -m benchmarks.bench_train                  # every run, about 45 min on 2 cores
    .venv/bin/python -m benchmarks.bench_train --only v2,v2-tuned,v2-tuned-fp32
    .venv/bin/python -m benchmarks.bench_train --seed 1         # writes reports/bench_train_seed1.json
    .venv/bin/python -m benchmarks.bench_train --quick          # smoke run: 200 drawings a class, 1 epoch

One stratified 80/10/10 split by seed; every model is scored on the WHOLE validation and test splits.
Seed 0 is the development split: the epoch counts of v2-tuned and resnet were raised after a first run's
test scores on it were seen. Seed 1 is the check: the same drawings split afresh, recipes fixed beforehand.
Prints a table and writes it as JSON (reports/bench_train.json for seed 0, bench_train_seed<N>.json else).
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
from utils.models import build_model, count_parameters
from utils.train import RECIPES, TrainConfig, fit, pick_device, score_and_save, set_seed

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "quickdraw" / "full"
# name -> (what it is, TrainConfig fields from utils.train.RECIPES)
RUNS: dict[str, tuple[str, dict]] = {
    "v1": ("V1, the original recipe: Adam 1e-3, batch 64, 10 epochs, no augmentation", RECIPES["v1"]),
    "v2": ("V2, the original recipe", RECIPES["v2"]),
    "v2-xl": ("V2-XL: V2, the original recipe, on the training split plus its rotated and flipped copies",
              RECIPES["v2-xl"]),
    "v2-tuned": ("V2, our recipe: online turns/flips/zooms/shifts, AdamW one-cycle, label smoothing 0.1, batch 256, "
                 "bf16 autocast, channels-last", RECIPES["v2-tuned"]),
    # What bfloat16 and channels-last alone bring to v2-tuned's speed: the same run without them.
    "v2-tuned-fp32": ("v2-tuned with bf16 autocast and channels-last off (float32, NCHW), all else the same",
                      dict(RECIPES["v2-tuned"], bf16=False, channels_last=False)),
    "resnet": ("QuickDrawResNet with the same kind of recipe, 20 epochs, stopped early if 14.5 min would pass",
               RECIPES["resnet"]),
}
SPLITS = ("val", "test")
SCORES = ("top1", "top3", "map3")


def load(max_per_class: int | None, seed: int):
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: this benchmark reads the bitmaps of ../shared/quickdraw")
    categories = sorted(p.stem for p in (SHARED / "numpy_bitmap").glob("*.npy"))
    return split(load_bitmaps(categories, root=SHARED, max_per_class=max_per_class), seed=seed)


def run(name: str, train, val, test, seed: int, quick: bool, out_dir: Path, threads: int | None,
        device: torch.device) -> dict:
    """Train one run from a seeded start and score its best epoch on the whole val and test splits, on the
    device it trained on."""
    description, fields = RUNS[name]
    overrides = dict(seed=seed, progress=sys.stderr.isatty(), num_threads=threads, device=str(device),
                     **(dict(epochs=1) if quick else {}))
    config = TrainConfig(**dict(fields, **overrides))
    load_before = os.getloadavg()
    set_seed(seed)
    model = build_model(config.model, len(train.classes))
    out = out_dir / f"{name}.pt"
    history = fit(model, train, val, config, out=out, device=device)
    _, scores = score_and_save(out, model, config, train.classes, history, device, val=val, test=test)
    return dict(name=name, description=description, config=dataclasses.asdict(config), params=count_parameters(model),
                epochs=len(history["train_loss"]), best_epoch=history["best_epoch"], stopped=history["stopped"],
                train_seconds=history["train_seconds"], fit_seconds=history["fit_seconds"],
                images_per_s=history["train_images_per_s"], loadavg_before=load_before, loadavg_after=os.getloadavg(),
                **scores)


def table(results: list[dict]) -> str:
    head = ["run", "params", "epochs (best)", "stopped", "train s", "fit s", "img/s",
            *(f"{s} {k}" for s in SPLITS for k in SCORES)]
    rows = [[r["name"], f"{r['params']:,}", f"{r['epochs']}/{r['config']['epochs']} ({r['best_epoch']})", r["stopped"],
             f"{r['train_seconds']:.0f}", f"{r['fit_seconds']:.0f}", f"{r['images_per_s']:,.0f}",
             *(f"{r[s][k]:.2%}" for s in SPLITS for k in SCORES)] for r in results]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    fmt = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def verdicts(by_name: dict[str, dict]) -> list[str]:
    """The goals and the claims, checked on the figures of this run."""
    out = []
    base, xl, tuned, plain, strong = map(by_name.get, ("v2", "v2-xl", "v2-tuned", "v2-tuned-fp32", "resnet"))
    speed = lambda a, b: a["images_per_s"] / b["images_per_s"]
    top1 = lambda r: r["test"]["top1"]
    if tuned:
        line = f"v2-tuned: test top-1 {top1(tuned):.2%} (goal >= 92%)"
        if base:
            line += f", {speed(tuned, base):.2f}x the original recipe's training images/s (goal >= 1.4x)"
        out.append(line)
    if tuned and plain:
        line = (f"bf16 + channels-last: v2-tuned trains {speed(tuned, plain):.2f}x the images/s of the same run "
                f"without them (test top-1 {top1(tuned):.2%} with, {top1(plain):.2%} without)")
        if base:
            line += (f"; of its {speed(tuned, base):.2f}x over the original recipe, {speed(tuned, plain):.2f}x comes "
                     f"from them and {speed(plain, base):.2f}x from the rest of the recipe (batch 256 etc.)")
        out.append(line)
    if xl and base:
        out.append(f"v2-xl: test top-1 {top1(xl):.2%} vs {top1(base):.2%} for v2 ({100 * (top1(xl) - top1(base)):+.2f} "
                   f"points), {xl['train_seconds'] / base['train_seconds']:.1f}x the training time")
    if strong:
        out.append(f"resnet: test top-1 {top1(strong):.2%} (goal >= 94%) after {strong['fit_seconds'] / 60:.1f} "
                   f"min of training with validation (goal <= 15 min), {strong['params']:,} parameters, "
                   f"{strong['epochs']} of {strong['config']['epochs']} epochs ({strong['stopped']})")
    return out


def report_path(seed: int) -> Path:
    """Each seed its own file, so a run never replaces another seed's figures."""
    return ROOT / "reports" / ("bench_train.json" if seed == 0 else f"bench_train_seed{seed}.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(RUNS), help=f"comma-separated runs from {', '.join(RUNS)}")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 drawings a class and 1 epoch per run")
    p.add_argument("--seed", type=int, default=0, help="split, weights and batch order (0: the development split)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every run alike (default: torch's choice, one per core)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps: trains and scores every run")
    p.add_argument("--json", default=None,
                   help="results file (default: reports/bench_train.json for seed 0, reports/bench_train_seed<N>.json "
                        "otherwise; none with --quick)")
    p.add_argument("--models-dir", default=str(ROOT / "models" / "bench"), help="where the checkpoints go")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    device = pick_device(args.device)

    t0 = time.perf_counter()
    train, val, test = load(200 if args.quick else None, args.seed)
    print(f"{len(train.classes)} categories: train {len(train):,}, val {len(val):,}, test {len(test):,} drawings "
          f"(split seed {args.seed}); loaded in {time.perf_counter() - t0:.1f} s")
    print(f"torch {torch.__version__} on {device}, {args.threads or torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; load average {os.getloadavg()}")
    results = []
    for name in names:
        print(f"\n{name}: {RUNS[name][0]}", flush=True)
        r = run(name, train, val, test, args.seed, args.quick, Path(args.models_dir), args.threads, device)
        results.append(r)
        print(f"  {r['epochs']} epochs (best {r['best_epoch']}, {r['stopped']}), {r['train_seconds']:.0f} s training, "
              f"{r['images_per_s']:,.0f} images/s; val top-1 {r['val']['top1']:.2%}, test top-1 {r['test']['top1']:.2%}; "
              f"load average {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}", flush=True)
    print("\n" + table(results))
    checks = verdicts({r["name"]: r for r in results})
    print("\n".join(checks))
    print(f"load average at the end: {os.getloadavg()}")
    path = args.json or (None if args.quick else report_path(args.seed))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(dict(quick=args.quick, seed=args.seed, device=str(device),
                                              torch=torch.__version__, results=results, checks=checks,
                                              sizes=dict(train=len(train), val=len(val), test=len(test))), indent=1))
        print(f"written: {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
