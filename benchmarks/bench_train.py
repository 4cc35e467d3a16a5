"""Training recipes side by side on the 17 bitmap categories of ../shared/quickdraw (57,000 drawings).

    .venv/bin/python -m benchmarks.bench_train --seed 1                       # every run, on this CPU
    .venv/bin/python -m benchmarks.bench_train --seed 1 --runs v2,v2-tuned,qdnet --cpus native,avx2
    .venv/bin/python -m benchmarks.bench_train --quick --runs v2,v2-tuned     # smoke run: 200 a class, 1 epoch
    .venv/bin/python -m benchmarks.bench_train --steps-only --runs v2,v2-tuned --cpus native,avx2

One stratified 80/10/10 split by seed; every model is scored on the WHOLE validation and test splits.
Seed 0 is the development split: recipes and the new model were chosen on it (its test scores seen).
Seed 1 is the check: the same drawings split afresh, recipes fixed beforehand.

--cpus runs the same runs once per CPU configuration, each in its own process: "native" is this CPU as
it is, "avx2" caps oneDNN, ATen and MKL at AVX2 (utils.device.AVX2_CAP), which makes
a CPU with AMX/AVX512-BF16 behave like one without native bfloat16 (most AMD and client Intel CPUs).
Each configuration prints its table under the machine's description and writes
reports/bench_train_seed<N>_<cpu>.json.

--steps-only trains nothing: it times each run's training step (its batch size and optimizer, in each precision
and memory format the recipe may choose) in turns, in one process, so that the machine's speed, which moves
from minute to minute, moves every rate alike; it prints each rate and the ratio of each run's fastest step
to the first run's, and writes reports/bench_train_steps_<cpu>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.data import load_bitmaps, split
from utils.device import AVX2_CAP, describe_machine, machine_info
from utils.io import write_json
from utils.models import build_model, flops_per_image
from utils.report import markdown_table
from utils.train import RECIPES, describe_budget, pick_device, precision_steps, set_seed, time_candidates, train_run

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "quickdraw" / "full"
SPLITS = ("val", "test")
SCORES = ("top1", "top3", "map3")
# CPU configurations: the environment each one's process runs in.
CPUS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": AVX2_CAP,
}


def load(max_per_class: int | None, seed: int):
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: this benchmark reads the bitmaps of ../shared/quickdraw")
    categories = sorted(p.stem for p in (SHARED / "numpy_bitmap").glob("*.npy"))
    return split(load_bitmaps(categories, root=SHARED, max_per_class=max_per_class), seed=seed)


def run(name: str, train, val, test, seed: int, quick: bool, out_dir: Path, threads: int | None,
        device: torch.device) -> dict:
    """Train recipe `name` (utils.train.RECIPES) from a seeded start and score its best epoch on the whole val
    and test splits, on the device it trained on."""
    config = RECIPES[name].config(seed=seed, progress=sys.stderr.isatty(), num_threads=threads, device=str(device),
                                  **(dict(epochs=1, max_minutes=None) if quick else {}))
    load_before = os.getloadavg()
    r = train_run(config, train, val, test, out_dir / f"{name}.pt", device=device)
    return dict(name=name, description=RECIPES[name].about, config=dataclasses.asdict(config), params=r.params,
                flops_per_image=flops_per_image(r.model), precision=r.precision, budget=r.budget, epochs=r.epochs,
                best_epoch=r.history["best_epoch"], stopped=r.history["stopped"], train_seconds=r.train_seconds,
                fit_seconds=r.fit_seconds, images_per_s=r.images_per_s, loadavg_before=load_before,
                loadavg_after=os.getloadavg(), **r.metrics)


def epochs_cell(r: dict) -> str:
    """e.g. "25 (24)", or "9 (9), sized to 14.5 min" where a budget set the count."""
    cell = f"{r['epochs']} ({r['best_epoch']})"
    return cell + (f", sized to {r['budget']['minutes']:g} min of {r['budget']['max_epochs']}" if r.get("budget") else "")


def table(results: list[dict]) -> str:
    head = ["run", "params", "MFLOPs/img", "precision", "epochs (best)", "train s", "fit s", "img/s",
            *(f"{s} {k}" for s in SPLITS for k in SCORES)]
    rows = [[r["name"], f"{r['params']:,}", f"{r['flops_per_image'] / 1e6:.1f}", r["precision"]["precision"],
             epochs_cell(r), f"{r['train_seconds']:.0f}", f"{r['fit_seconds']:.0f}", f"{r['images_per_s']:,.0f}",
             *(f"{r[s][k]:.2%}" for s in SPLITS for k in SCORES)] for r in results]
    return markdown_table(head, rows)


def verdicts(by_name: dict[str, dict]) -> list[str]:
    """The goals and the claims, checked on the figures of this run."""
    out = []
    base, xl, tuned, plain = map(by_name.get, ("v2", "v2-xl", "v2-tuned", "v2-tuned-fp32"))
    speed = lambda a, b: a["images_per_s"] / b["images_per_s"]
    top1 = lambda r: r["test"]["top1"]
    if tuned:
        line = f"v2-tuned ({tuned['precision']['precision']}): test top-1 {top1(tuned):.2%} (goal >= 92%)"
        if base:
            line += f", {speed(tuned, base):.2f}x the original recipe's training images/s (goal >= 1.4x)"
        out.append(line)
    if tuned and plain:
        out.append(f"precision: v2-tuned in {tuned['precision']['precision']} trains {speed(tuned, plain):.2f}x the "
                   f"images/s of the same run in fp32 NCHW (test top-1 {top1(tuned):.2%} vs {top1(plain):.2%})")
    if xl and base:
        out.append(f"v2-xl: test top-1 {top1(xl):.2%} vs {top1(base):.2%} for v2 ({100 * (top1(xl) - top1(base)):+.2f} "
                   f"points), {xl['train_seconds'] / base['train_seconds']:.1f}x the training time")
    for name in ("resnet", "qdnet"):
        r = by_name.get(name)
        if r:
            out.append(f"{name} ({r['precision']['precision']}): test top-1 {top1(r):.2%} (goal >= 94%) after "
                       f"{r['fit_seconds'] / 60:.1f} min of training with validation (goal <= 15 min), {r['params']:,} "
                       f"parameters, {r['flops_per_image'] / 1e6:.1f} MFLOPs per image, {r['images_per_s']:,.0f} "
                       f"images/s, {describe_budget(r['budget']) or str(r['epochs']) + ' epochs'} ({r['stopped']})")
    return out


def report_path(seed: int, cpu: str) -> Path:
    """Each seed and CPU configuration its own file, so a run never replaces another's figures."""
    return ROOT / "reports" / f"bench_train_seed{seed}_{cpu}.json"


def in_configuration(cpu: str) -> bool:
    """Whether this process already runs with `cpu`'s environment (native: none of the caps set)."""
    env = CPUS[cpu] or {k: "" for k in CPUS["avx2"]}
    return all(os.environ.get(k, "") == v for k, v in env.items())


def run_in_child(cpu: str, argv: list[str]) -> int:
    """This benchmark again, for one configuration, in a process with that configuration's environment."""
    env = {k: v for k, v in os.environ.items() if k not in CPUS["avx2"]}
    env.update(CPUS[cpu])
    print(f"\n=== CPU configuration {cpu}: {' '.join(f'{k}={v}' for k, v in CPUS[cpu].items()) or 'as is'} ===",
          flush=True)
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_train", *argv, "--cpus", cpu], cwd=ROOT,
                          env=env).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RECIPES),
                   help=f"comma-separated recipes (utils.train.RECIPES) from {', '.join(RECIPES)}")
    p.add_argument("--cpus", default="native", help=f"comma-separated CPU configurations from {', '.join(CPUS)}")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 drawings a class and 1 epoch per run")
    p.add_argument("--seed", type=int, default=0, help="split, weights and batch order (0: the development split)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every run alike (default: torch's choice, one per core)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps: trains and scores every run")
    p.add_argument("--json", default=None,
                   help="results file for a single configuration (default: reports/bench_train_seed<N>_<cpu>.json; "
                        "none with --quick)")
    p.add_argument("--models-dir", default=str(ROOT / "models" / "bench"), help="where the checkpoints go")
    p.add_argument("--steps-only", action="store_true",
                   help="time the runs' training steps in turns instead of training (reports/bench_train_steps_<cpu>.json)")
    p.add_argument("--step-seconds", type=float, default=12.0, help="--steps-only: seconds of timing per step")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    cpus = [c.strip() for c in args.cpus.split(",") if c.strip()]
    unknown = [n for n in names if n not in RECIPES] + [c for c in cpus if c not in CPUS]
    if unknown or not names or not cpus:
        p.error(f"unknown or no runs/CPU configurations {unknown}; choose runs from {', '.join(RECIPES)} and "
                f"configurations from {', '.join(CPUS)}")
    if len(cpus) > 1 or not in_configuration(cpus[0]):
        if args.json and len(cpus) > 1:
            p.error("--json names one file: give one configuration with it")
        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        rest = [a for i, a in enumerate(rest) if not (a == "--cpus" or a.startswith("--cpus=") or
                                                      (i > 0 and rest[i - 1] == "--cpus"))]
        return max(run_in_child(cpu, rest) for cpu in cpus)
    return (steps_only if args.steps_only else bench)(args, names, cpus[0])


def step_rates(names: list[str], train, device: torch.device, seconds: float) -> dict[str, dict[str, float]]:
    """{run: {precision: training images/s}}: every candidate step of every run, timed in turns (each one's
    fastest step, as the runs' own precision timing does), on the same drawings."""
    steps, batch = {}, {}
    for name in names:
        config = RECIPES[name].config(device=str(device))
        set_seed(0)
        model = build_model(config.model, len(train.classes))
        for precision, (step, _) in precision_steps(model, train, config, device).items():
            steps[name, precision], batch[name, precision] = step, min(config.batch_size, len(train))
    rates: dict[str, dict[str, float]] = {name: {} for name in names}
    for (name, precision), rate in time_candidates(steps, batch, seconds=seconds, rounds=6).items():
        rates[name][precision] = round(rate, 1)
    return rates


def steps_only(args, names: list[str], cpu: str) -> int:
    device = pick_device(args.device)
    info = machine_info()
    train, _, _ = load(200 if args.quick else None, args.seed)
    print(f"{describe_machine(info)}; CPU configuration {cpu}; load average {os.getloadavg()}", flush=True)
    rates = step_rates(names, train, device, 1.0 if args.quick else args.step_seconds)
    best = {name: max(r.values()) for name, r in rates.items()}
    lines = [f"{name}: {', '.join(f'{k} {v:,.0f}' for k, v in rates[name].items())} images/s; fastest "
             f"{best[name]:,.0f}, {best[name] / best[names[0]]:.2f}x {names[0]}'s" for name in names]
    print("\n".join(lines) + f"\nload average at the end: {os.getloadavg()}")
    path = args.json or (None if args.quick else ROOT / "reports" / f"bench_train_steps_{cpu}.json")
    if path:
        write_json(path, dict(quick=args.quick, cpu_configuration=cpu, env=CPUS[cpu], machine=info,
                              machine_line=describe_machine(info), device=str(device), runs=names,
                              step_seconds=args.step_seconds, images_per_s=rates,
                              ratio_to_first={n: best[n] / best[names[0]] for n in names}), indent=1)
        print(f"written: {path}")
    return 0


def bench(args, names: list[str], cpu: str) -> int:
    device = pick_device(args.device)
    info = machine_info()
    t0 = time.perf_counter()
    train, val, test = load(200 if args.quick else None, args.seed)
    print(f"{describe_machine(info)}; CPU configuration {cpu}")
    print(f"{len(train.classes)} categories: train {len(train):,}, val {len(val):,}, test {len(test):,} drawings "
          f"(split seed {args.seed}); loaded in {time.perf_counter() - t0:.1f} s; on {device}, "
          f"{args.threads or torch.get_num_threads()} threads; load average {os.getloadavg()}", flush=True)
    results = []
    models_dir = Path(args.models_dir) / cpu
    path = args.json or (None if args.quick else report_path(args.seed, cpu))
    for name in names:
        print(f"\n{name}: {RECIPES[name].about}", flush=True)
        r = run(name, train, val, test, args.seed, args.quick, models_dir, args.threads, device)
        results.append(r)
        budget = describe_budget(r["budget"])
        print(f"  precision {r['precision']['precision']} ({r['precision']['how']}"
              f"{', images/s ' + str(r['precision']['images_per_s']) if r['precision']['images_per_s'] else ''}); "
              f"{r['epochs']} epochs{' (' + budget + ')' if budget else ''}, best {r['best_epoch']}, "
              f"{r['train_seconds']:.0f} s training, {r['fit_seconds']:.0f} s with validation, "
              f"{r['images_per_s']:,.0f} images/s; val top-1 {r['val']['top1']:.2%}, test top-1 {r['test']['top1']:.2%}; "
              f"load average {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}", flush=True)
        checks = verdicts({r["name"]: r for r in results})
        if path:  # after every run: an interrupted benchmark keeps what it measured
            write_json(path, dict(quick=args.quick, seed=args.seed, cpu_configuration=cpu, env=CPUS[cpu],
                                  machine=info, machine_line=describe_machine(info), device=str(device),
                                  runs=names, results=results, checks=checks,
                                  sizes=dict(train=len(train), val=len(val), test=len(test))), indent=1)
    print(f"\n{describe_machine(info)}; CPU configuration {cpu}\n" + table(results))
    print("\n".join(checks))
    print(f"load average at the end: {os.getloadavg()}")
    if path:
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
