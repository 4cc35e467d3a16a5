"""QuickDrawNet variants at the float32 AVX2 budget, on the development split (seed 0), chosen on validation.

    flock -x /tmp/cpu.lock .venv/bin/python -m benchmarks.bench_qdnet          # about 40 minutes here
    .venv/bin/python -m benchmarks.bench_qdnet --quick                        # smoke run: 200 a class

1. In a child process under the AVX2 cap (benchmarks.bench_train.CPUS["avx2"]): each variant's float32
   channels-last training step at its batch size on random drawings (the best step of --step-seconds), a
   2048 x 2048 float32 matrix product's GFLOP/s, the design's step under torch.compile (its first two steps,
   then its best), and a torch.profiler breakdown of the design's step (the convolutions' share and speed).
2. As the CPU is: each variant trained for the epochs that its float32 step would fit into the budget under
   the cap, as a share of the CHECK_EPOCHS that an earlier check run's budget sized for the design there in
   batches of 256 (the first variant): round(CHECK_EPOCHS x its step rate / that variant's), at most 40. They
   train in bfloat16 channels-last for speed (the precision the recipe picks on a CPU with native bf16) and are
   scored on the whole val and test splits; the choice is made on validation top-1, the test column is shown only.
Writes reports/bench_qdnet.json (none with --quick). With --variants, only those are trained and their rows
replace the report's rows of the same names; every row keeps the step rate its epochs were sized from.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from benchmarks.bench_train import CPUS, ROOT, load
from utils.device import describe_machine, machine_info, set_seed
from utils.io import write_json
from utils.models import QuickDrawNet, count_parameters, flops_per_image
from utils.report import markdown_table
from utils.train import RECIPES, fit, score_split

# The epochs that the qdnet recipe's budget sized under the AVX2 cap (bench_train, seed 1) when it trained in
# batches of 256 for at most 14.5 minutes: the yardstick of every row, so that rows run at different times
# compare.
CHECK_EPOCHS = 19
BATCH_256 = dict(batch_size=256, lr=3e-3)  # the recipe's batches before batches of 128 were chosen here


@dataclass(frozen=True)
class Variant:
    name: str
    widths: tuple[int, int] = (48, 96)
    settings: dict = field(default_factory=dict)  # TrainConfig fields over the qdnet recipe's


VARIANTS = (
    Variant("QuickDrawNet in batches of 256, peak rate 3e-3", settings=BATCH_256),
    Variant("the same, seed 2 (other weights and batch order)", settings=dict(BATCH_256, seed=2)),
    Variant("batches of 256, weight decay 0.05", settings=dict(BATCH_256, weight_decay=0.05)),
    Variant("batches of 128, peak rate 2.1e-3 (the recipe)", settings=dict(batch_size=128, lr=2.1e-3)),
    Variant("batches of 128, seed 2", settings=dict(batch_size=128, lr=2.1e-3, seed=2)),
    Variant("batches of 64, peak rate 1.5e-3", settings=dict(batch_size=64, lr=1.5e-3)),
    Variant("batches of 64, seed 2", settings=dict(batch_size=64, lr=1.5e-3, seed=2)),
    Variant("batches of 256, widths 32 / 96", widths=(32, 96), settings=BATCH_256),
    Variant("batches of 256, widths 40 / 80", widths=(40, 80), settings=BATCH_256),
    Variant("batches of 256, widths 64 / 128", widths=(64, 128), settings=BATCH_256),
)


def best_step_rate(model: nn.Module, batch_size: int, seconds: float) -> tuple[float, float]:
    """(images/s of the fastest float32 channels-last training step, seconds of the first two steps)."""
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 17, (batch_size,))
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        opt.step()
    t = time.perf_counter()
    step()
    step()
    first = time.perf_counter() - t
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return batch_size / best, first


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9


def conv_profile(batch_size: int, steps: int = 10) -> dict:
    """The design's step under torch.profiler: the convolutions' share of it and their GFLOP/s (forward and
    backward: 3x the forward FLOPs)."""
    from torch.profiler import ProfilerActivity, profile
    model = QuickDrawNet(17).to(memory_format=torch.channels_last).train()
    best_step_rate(model, batch_size, 0.5)  # warm-up
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 17, (batch_size,))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    flops = 3 * flops_per_image(model) * batch_size * steps
    return dict(conv_share=conv / total, conv_gflops=flops / (conv / 1e6) / 1e9, step_ms=total / 1e3 / steps)


def step_key(v: Variant) -> str:
    """What a step's speed depends on: the network's widths and the batch size."""
    return f"widths {v.widths[0]}/{v.widths[1]}, batch {RECIPES['qdnet'].config(**v.settings).batch_size}"


def steps_part(args) -> dict:
    """Part 1, in the AVX2-capped child."""
    rates = {}
    for v in VARIANTS:
        if (key := step_key(v)) not in rates:
            batch = RECIPES["qdnet"].config(**v.settings).batch_size
            rates[key], _ = best_step_rate(QuickDrawNet(17, widths=v.widths), batch, args.step_seconds)
            print(f"  float32 channels-last step, {key}: {rates[key]:,.0f} images/s", flush=True)
    batch = RECIPES["qdnet"].config().batch_size
    eager, eager_first = best_step_rate(QuickDrawNet(17), batch, args.step_seconds)
    compiled, compiled_first = best_step_rate(torch.compile(QuickDrawNet(17)), batch, args.step_seconds)
    out = dict(machine=machine_info(), step_images_per_s=rates, matmul_gflops=matmul_gflops(),
               compile=dict(eager=eager, eager_first_two_s=eager_first, compiled=compiled,
                            compiled_first_two_s=compiled_first), profile=conv_profile(batch))
    print(f"  matrix product: {out['matmul_gflops']:.0f} GFLOP/s; torch.compile: first two steps "
          f"{compiled_first:.1f} s, then {compiled:,.0f} images/s (eager {eager:,.0f}); convolutions "
          f"{out['profile']['conv_share']:.0%} of the step at {out['profile']['conv_gflops']:.0f} GFLOP/s", flush=True)
    return out


def timed_under_avx2(args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CPUS["avx2"]} | CPUS["avx2"]
    print(f"=== steps under the AVX2 cap ({' '.join(f'{k}={v}' for k, v in CPUS['avx2'].items())}) ===", flush=True)
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_qdnet", "--part", "steps", "--step-seconds",
                           str(args.step_seconds)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=True)
    *lines, last = done.stdout.strip().splitlines()
    print("\n".join(lines), flush=True)
    return json.loads(last)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 200 drawings a class, 1 epoch, short timings")
    p.add_argument("--step-seconds", type=float, default=3.0)
    p.add_argument("--variants", nargs="+", metavar="NAME", choices=[v.name for v in VARIANTS],
                   help="train only these (default: all); the report keeps the other rows it has")
    p.add_argument("--part", choices=["steps"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part == "steps":
        print(json.dumps(steps_part(args)))
        return 0
    if args.quick:
        args.step_seconds = 0.2
    info = machine_info()
    print(describe_machine(info), flush=True)
    avx2 = timed_under_avx2(args)
    print(f"AVX2 cap: {describe_machine(avx2['machine'])}")
    rates = avx2["step_images_per_s"]
    base = rates[step_key(VARIANTS[0])]
    train, val, test = load(200 if args.quick else None, 0)
    device = torch.device("cpu")
    results = []
    for v in (v for v in VARIANTS if args.variants is None or v.name in args.variants):
        epochs = 1 if args.quick else min(40, round(CHECK_EPOCHS * rates[step_key(v)] / base))
        config = RECIPES["qdnet"].config(**{"seed": 0, "progress": False, "max_minutes": None, "bf16": True,
                                            "channels_last": True, "epochs": epochs, "device": "cpu", **v.settings})
        set_seed(config.seed)
        model = QuickDrawNet(len(train.classes), widths=v.widths)
        t = time.perf_counter()
        history = fit(model, train, val, config, device=device)
        scores = {s: score_split(model, ds, device, bf16=True) for s, ds in (("val", val), ("test", test))}
        results.append(dict(name=v.name, widths=v.widths, settings=v.settings, epochs=epochs,
                            params=count_parameters(model), flops_per_image=flops_per_image(model),
                            avx2_step_images_per_s=rates[step_key(v)], seconds=time.perf_counter() - t,
                            best_epoch=history["best_epoch"],
                            **{s: {k: scores[s][k] for k in ("top1", "top3")} for s in scores}))
        print(f"{v.name}: {epochs} epochs, val top-1 {scores['val']['top1']:.2%}, test top-1 "
              f"{scores['test']['top1']:.2%} ({results[-1]['seconds']:.0f} s)", flush=True)
    path = ROOT / "reports" / "bench_qdnet.json"
    if args.variants and not args.quick and path.exists():  # the rows not run this time, as they were
        kept = {r["name"]: r for r in json.loads(path.read_text())["results"]} | {r["name"]: r for r in results}
        results = [kept[v.name] for v in VARIANTS if v.name in kept]
    rows = [[r["name"], f"{r['params']:,}", f"{r['flops_per_image'] / 1e6:.1f}", f"{r['avx2_step_images_per_s']:,.0f}",
             r["epochs"], f"{r['val']['top1']:.2%}", f"{r['test']['top1']:.2%}"] for r in results]
    print(f"\n{describe_machine(info)}; steps timed under the AVX2 cap\n" + markdown_table(
        ["variant", "params", "MFLOPs/image", "fp32 step, AVX2 cap (images/s)", "epochs", "val top-1", "test top-1"],
        rows))
    if not args.quick:
        write_json(path, dict(machine=info, machine_line=describe_machine(info), avx2=avx2,
                              check_epochs=CHECK_EPOCHS, split_seed=0, results=results), indent=1)
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
