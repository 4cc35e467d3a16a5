"""The web API on a model of the 17 bitmap categories of ../shared/quickdraw, started as a real server.

1. Raw strokes agree with the official bitmaps: for the 519 raw/bitmap pairs (line i of
   full/raw/<name>.ndjson is row i of full/numpy_bitmap/<name>.npy), /predict with the raw strokes
   and /predict with the official bitmap give the same top-1 label (target: at least 98%;
   app.agreement, asked in batches).
2. Throughput under load from 127.0.0.1: 16 connections, each sending single drawings of 30 to 100
   points (real raw drawings of all categories), bounded in count and time; predictions/s and
   p50/p99 latency (targets: at least 300/s, p99 under 100 ms). wrk when installed, otherwise an
   asyncio httpx client in a separate process (which tops out near 200 requests/s here: with it,
   the figure measures the generator more than the service).
3. Afterwards the service still answers, and answers the same.

Prints the figures and writes them with the model, the load settings, the load average and the
date to reports/bench_api.json (--json PATH elsewhere).

    .venv/bin/python benchmarks/bench_api.py                     # trains V2 for a few epochs first
    .venv/bin/python benchmarks/bench_api.py --model models/v2.pt
    .venv/bin/python benchmarks/bench_api.py --epochs 1 --max-per-class 200 --seconds 2 --requests 200 \
        --json /tmp/bench_api.json                               # a quick check that it runs
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from app.agreement import agreement, bitmap_categories, train_bitmap_model
from app.launch import running_server
from tests.mirror import SHARED_DIR
from utils.strokes import read_ndjson
from utils.train import load_checkpoint

FULL = SHARED_DIR / "full"
WRK_SCRIPT = """
local bodies = {}
for line in io.lines("%(bodies)s") do bodies[#bodies + 1] = line end
local i, answered, limit = 0, 0, %(limit)d
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"}, bodies[i])
end
response = function(status)
  answered = answered + 1
  if answered >= limit then wrk.thread:stop() end
end
done = function(summary, latency)
  local e = summary.errors
  io.write(string.format('\\nRESULT {"requests": %%d, "seconds": %%f, "p50_ms": %%f, "p99_ms": %%f, ' ..
    '"max_ms": %%f, "non_2xx": %%d, "socket_errors": %%d}\\n', summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass
class BenchConfig:
    model: str | None = None     # a checkpoint; None: train V2 on the 17 categories first
    epochs: int = 3
    max_per_class: int | None = 2000
    train_threads: int = 1       # torch threads while training (1 is fastest on a busy 2-core machine)
    connections: int = 16
    seconds: float = 20.0        # load phase: at most this long ...
    requests: int = 20_000       # ... and at most this many requests
    min_points: int = 30
    max_points: int = 100
    generator: str = "auto"      # wrk | httpx | auto (wrk where installed)
    json: str = str(ROOT / "reports" / "bench_api.json")  # the report; "" writes none


def train_model(config: BenchConfig, out: Path) -> Path:
    t0 = time.perf_counter()
    history = train_bitmap_model(FULL, out, config.epochs, config.max_per_class, config.train_threads)
    print(f"trained V2 on {len(bitmap_categories(FULL))} categories, at most {config.max_per_class} drawings each, "
          f"{config.epochs} epochs: val top-1 {history['val_acc'][-1]:.2%}, {time.perf_counter() - t0:.0f} s")
    return out


def describe_model(path: Path, config: BenchConfig) -> dict:
    """Which model answered: name, classes, and how it was trained (as its checkpoint records)."""
    _, ckpt = load_checkpoint(path)
    history = ckpt["history"]
    trained = (f"here: the first {config.max_per_class} bitmaps of each category, 80% of them to train (split seed 0)"
               if config.model is None else "before: the checkpoint given")
    return dict(name=ckpt["model_name"], classes=ckpt["classes"], checkpoint=config.model, trained=trained,
                config=ckpt["config"], epochs_run=len(history.get("val_acc", [])),
                val_top1=(history.get("val_acc") or [None])[-1], test_metrics=ckpt["metrics"])


def load_bodies(config: BenchConfig) -> list[str]:
    """JSON bodies of real raw drawings (every category) with 30 to 100 points."""
    bodies = []
    for path in sorted((FULL / "raw").glob("*.ndjson")):
        for record in read_ndjson(path):
            if config.min_points <= sum(len(s[0]) for s in record["drawing"]) <= config.max_points:
                bodies.append(json.dumps({"strokes": record["drawing"]}, separators=(",", ":")))
    return bodies


def load_with_wrk(url: str, bodies: list[str], config: BenchConfig, work: Path) -> dict:
    (work / "bodies.ndjson").write_text("\n".join(bodies) + "\n")
    script = work / "load.lua"
    script.write_text(WRK_SCRIPT % {"bodies": work / "bodies.ndjson", "limit": config.requests})
    options = ["-t1", f"-c{config.connections}", f"-d{config.seconds:.0f}s", "--timeout", "5s"]
    done = subprocess.run(["wrk", *options, "-s", str(script), f"{url}/predict"], capture_output=True, text=True,
                          timeout=config.seconds + 60)
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    return {"tool": "wrk", "options": " ".join(options)} | json.loads(line.removeprefix("RESULT "))


async def _load(url: str, bodies: list[str], config: BenchConfig) -> dict:
    latencies, failures = [], 0
    deadline = time.perf_counter() + config.seconds
    sent = iter(range(config.requests))

    async def connection(client: httpx.AsyncClient):
        nonlocal failures
        for i in sent:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            answer = await client.post("/predict", content=bodies[i % len(bodies)],
                                       headers={"content-type": "application/json"})
            latencies.append(time.perf_counter() - t0)
            failures += answer.status_code != 200

    limits = httpx.Limits(max_connections=config.connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=5) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(connection(client) for _ in range(config.connections)))
        seconds = time.perf_counter() - t0
    ms = np.array(latencies) * 1e3
    return {"tool": "httpx", "options": f"{config.connections} connections, timeout 5 s", "requests": len(ms), "seconds": seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "non_2xx": failures, "socket_errors": 0}


def _load_process(url, bodies, config, queue):
    queue.put(asyncio.run(_load(url, bodies, config)))


def load_with_httpx(url: str, bodies: list[str], config: BenchConfig) -> dict:
    """The generator in its own process, so that it does not share the server's interpreter."""
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(target=_load_process, args=(url, bodies, config, queue))
    process.start()
    result = queue.get(timeout=config.seconds + 120)
    process.join()
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in vars(BenchConfig()).items():
        kind = {"model": str, "max_per_class": int}.get(name, type(value))
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    config = BenchConfig(**vars(p.parse_args(argv)))
    if not (FULL / "numpy_bitmap").is_dir():
        sys.exit(f"error: {SHARED_DIR} is absent: this benchmark needs ../shared/quickdraw")
    load_before = os.getloadavg()
    print(f"load average before: {load_before}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = Path(config.model) if config.model else train_model(config, work / "bench_v2.pt")
        described = describe_model(model, config)
        with running_server(model) as url, httpx.Client(base_url=url, timeout=120) as client:
            names = client.get("/classes").json()["classes"]
            if sorted(names) != bitmap_categories(FULL):
                sys.exit(f"error: {model} does not know the 17 bitmap categories (it has {len(names)} classes)")
            t0 = time.perf_counter()
            agree, total = agreement(client, FULL, names)
            agreement_seconds = time.perf_counter() - t0
            print(f"raw strokes vs official bitmap, top-1 agreement: {agree}/{total} = {agree / total:.2%} "
                  f"(target >= 98%) [{agreement_seconds:.1f} s]")

            bodies = load_bodies(config)
            probe = {"strokes": json.loads(bodies[0])["strokes"], "top_k": 5}
            before = client.post("/predict", json=probe).json()
            load_at_start = os.getloadavg()
            print(f"load: {config.connections} connections, {len(bodies):,} real drawings of "
                  f"{config.min_points}-{config.max_points} points, at most {config.requests:,} requests "
                  f"or {config.seconds:.0f} s; load average {load_at_start}")
            use_wrk = config.generator == "wrk" or (config.generator == "auto" and shutil.which("wrk"))
            load = load_with_wrk(url, bodies, config, work) if use_wrk else load_with_httpx(url, bodies, config)
            rate = (load["requests"] - load["non_2xx"]) / load["seconds"]
            print(f"[{load['tool']}] {load['requests']:,} requests in {load['seconds']:.1f} s: "
                  f"{rate:.0f} predictions/s "
                  f"(target >= 300), latency p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms "
                  f"(target < 100), max {load['max_ms']:.1f} ms; non-2xx {load['non_2xx']}, "
                  f"socket errors {load['socket_errors']}")

            health = client.get("/health").json()
            after = client.post("/predict", json=probe).json()
            same = after == before
            print(f"afterwards: /health {health['status']!r}, same answer to the same drawing: {same}")
    figures = dict(agreement=agree / total, agree=agree, pairs=total, agreement_seconds=agreement_seconds,
                   predictions_per_s=rate, p50_ms=load["p50_ms"], p99_ms=load["p99_ms"], max_ms=load["max_ms"],
                   failures=load["non_2xx"] + load["socket_errors"], healthy_after=health["status"] == "ok" and same)
    print(json.dumps(figures))
    if config.json:
        report = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), cpus=os.cpu_count(),
                      figures=figures, model=described, settings=asdict(config),
                      load=load | dict(max_requests=config.requests, bodies=len(bodies)),
                      loadavg=dict(before=load_before, load_start=load_at_start, after=os.getloadavg()))
        Path(config.json).parent.mkdir(parents=True, exist_ok=True)
        Path(config.json).write_text(json.dumps(report, indent=1))
        print(f"written: {config.json}")
    return figures


if __name__ == "__main__":
    main()
