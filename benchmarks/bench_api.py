"""The web API on a model of the 17 bitmap categories of ../shared/quickdraw, started as a real server.

1. Raw strokes agree with the official bitmaps: for the 519 raw/bitmap pairs (line i of
   full/raw/<name>.ndjson is row i of full/numpy_bitmap/<name>.npy), /predict with the raw strokes
   and /predict with the official bitmap give the same top-1 label (target: at least 98%;
   testkit.agreement, asked in batches).
2. Throughput under load from 127.0.0.1: 16 connections, each sending single drawings of 30 to 100
   points (real raw drawings of all categories), bounded in count and time; predictions/s and
   p50/p99 latency (targets: at least 300/s, p99 under 100 ms). wrk (Debian's; lua scripts).
3. Noisy neighbours, in the same run: the same 16 connections for a quiet phase, then again while 2
   more connections send only the costliest legal requests (one per limit: a 6 KB zigzag just
   under the ink limit, 1,000 strokes of 50,000 points, 256 bitmaps in ~800 KB, a 4096x4096 image). Targets: p99 of
   the ordinary requests at most 2x their quiet p99, 0 errors, and /health (asked every 20 ms
   on its own connection throughout both phases) p99 under 50 ms.
4. Afterwards the service still answers, and answers the same.

Prints the figures with the machine (utils.device.describe_machine) and writes them with the
model, the load settings and the date to reports/bench_api.json (--json PATH elsewhere).

    flock -x /tmp/cpu.lock .venv/bin/python -m benchmarks.bench_api     # trains V2 for a few epochs first
    .venv/bin/python -m benchmarks.bench_api --model models/v2.pt
    .venv/bin/python -m benchmarks.bench_api --epochs 1 --max-per-class 200 --seconds 2 --requests 200 \\
        --json /tmp/bench_api.json                               # a quick check that it runs
"""
import argparse
import io
import json
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
from PIL import Image

from testkit.agreement import agreement, bitmap_categories, train_bitmap_model
from app.inputs import MAX_DRAWINGS, MAX_IMAGE_PIXELS, MAX_INK_LENGTH, MAX_POINTS, MAX_STROKES, SIDE, ink_length
from testkit.launch import running_server
from testkit.mirror import SHARED_DIR
from utils.checkpoint import read_checkpoint
from utils.device import describe_machine, machine_info
from utils.io import write_json
from utils.strokes import read_ndjson, render

ROOT = Path(__file__).resolve().parents[1]
FULL = SHARED_DIR / "full"
# One wrk run: requests cycle through the body files listed (one "content-type<TAB>path" a line) on
# every connection; stops after `limit` answers or the duration; prints its figures as JSON.
WRK_SCRIPT = """
local bodies, types = {}, {}
for line in io.lines("%(list)s") do
  local kind, path = line:match("([^\\t]+)\\t(.+)")
  local f = io.open(path, "rb"); bodies[#bodies + 1] = f:read("*a"); f:close()
  types[#types + 1] = kind
end
local i, answered, limit, pause = 0, 0, %(limit)d, %(pause)d
request = function()
  i = i %% #bodies + 1
  if types[i] == "GET" then return wrk.format("GET", "%(path)s") end
  return wrk.format("POST", "%(path)s", {["Content-Type"] = types[i]}, bodies[i])
end
if pause > 0 then delay = function() return pause end end
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
    seconds: float = 20.0        # each load phase: at most this long ...
    requests: int = 20_000       # ... and at most this many requests
    min_points: int = 30
    max_points: int = 100
    heavy_connections: int = 2   # noisy neighbours: connections sending only the costliest legal requests
    health_every_ms: int = 20    # /health asked this often, on its own connection, during the load phases
    json: str = str(ROOT / "reports" / "bench_api.json")  # the report; "" writes none


def train_model(config: BenchConfig, out: Path) -> Path:
    t0 = time.perf_counter()
    history = train_bitmap_model(FULL, out, config.epochs, config.max_per_class, config.train_threads)
    print(f"trained V2 on {len(bitmap_categories(FULL))} categories, at most {config.max_per_class} drawings each, "
          f"{config.epochs} epochs: val top-1 {history['val_acc'][-1]:.2%}, {time.perf_counter() - t0:.0f} s")
    return out


def describe_model(path: Path, config: BenchConfig) -> dict:
    """Which model answered: name, classes, and how it was trained (as its checkpoint records)."""
    ckpt = read_checkpoint(path)
    history = ckpt["history"]
    trained = (f"here: the first {config.max_per_class} bitmaps of each category, 80% of them to train (split seed 0)"
               if config.model is None else "before: the checkpoint given")
    return dict(name=ckpt["model_name"], classes=ckpt["classes"], checkpoint=config.model, trained=trained,
                config=ckpt["config"], epochs_run=len(history.get("val_acc", [])),
                val_top1=(history.get("val_acc") or [None])[-1], test_metrics=ckpt.get("metrics"))


def load_bodies(config: BenchConfig) -> list[str]:
    """JSON bodies of real raw drawings (every category) with 30 to 100 points."""
    bodies = []
    for path in sorted((FULL / "raw").glob("*.ndjson")):
        for record in read_ndjson(path):
            if config.min_points <= sum(len(s[0]) for s in record["drawing"]) <= config.max_points:
                bodies.append(json.dumps({"strokes": record["drawing"]}, separators=(",", ":")))
    return bodies


def costliest_requests() -> dict[str, tuple[str, bytes]]:
    """name -> (content type, body): for each limit, a request just inside it."""
    zigzag = [[[0, 100] * 490, [round(i * 0.3, 1) for i in range(980)]]]  # ~250,000 units of ink in 6 KB
    assert ink_length(zigzag) < MAX_INK_LENGTH
    per = MAX_POINTS // MAX_STROKES  # 1,000 strokes of 50 points, 50,000 points in all
    points = [[list(range(d, d + per)), [(i * d) % 97 for i in range(per)]] for d in range(MAX_STROKES)]
    bitmaps = [{"bitmap": [255 if (i + d) % 3 else 0 for i in range(SIDE * SIDE)]} for d in range(MAX_DRAWINGS)]
    side = int(MAX_IMAGE_PIXELS ** 0.5)
    image = io.BytesIO()
    page = 255 - render([[[10, 245, 128, 10], [20, 20, 230, 20]], [[30, 220], [200, 60]]], side=side)
    Image.fromarray(page).save(image, "PNG")  # dark strokes on white, 4096x4096
    as_json = {"zigzag": {"strokes": zigzag}, "points": {"strokes": points},
               "bitmaps": {"drawings": bitmaps, "top_k": 1}}
    out = {name: ("application/json", json.dumps(body, separators=(",", ":")).encode())
           for name, body in as_json.items()}
    boundary = "costly-image-boundary"
    out["image"] = (f"multipart/form-data; boundary={boundary}",
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
                    f"Content-Type: image/png\r\n\r\n".encode() + image.getvalue() + f"\r\n--{boundary}--\r\n".encode())
    return out


def single_costs(url: str, heavy: dict[str, tuple[str, bytes]]) -> dict[str, dict]:
    """Each costly request alone: its status, size and time."""
    out = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, (kind, body) in heavy.items():
            path = "/predict/image" if kind.startswith("multipart") else "/predict"
            t0 = time.perf_counter()
            status = client.post(path, content=body, headers={"content-type": kind}).status_code
            out[name] = dict(status=status, bytes=len(body), seconds=time.perf_counter() - t0)
    return out


def wrk(url: str, path: str, bodies: list[tuple[str, bytes]], connections: int, seconds: float, limit: int,
        work: Path, name: str, pause_ms: int = 0) -> subprocess.Popen:
    """Start one wrk run (bodies as (content type or "GET", bytes)); its result comes from wrk_result()."""
    listing = work / f"{name}.list"
    lines = []
    for i, (kind, body) in enumerate(bodies):
        (work / f"{name}.{i}").write_bytes(body)
        lines.append(f"{kind}\t{work / f'{name}.{i}'}")
    listing.write_text("\n".join(lines) + "\n")
    script = work / f"{name}.lua"
    script.write_text(WRK_SCRIPT % {"list": listing, "limit": limit, "pause": pause_ms, "path": path})
    options = ["-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "10s"]
    proc = subprocess.Popen(["wrk", *options, "-s", str(script), url + path], stdout=subprocess.PIPE, text=True)
    proc.options = " ".join(options)
    return proc


def wrk_result(proc: subprocess.Popen, timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    return {"tool": "wrk", "options": proc.options} | json.loads(line.removeprefix("RESULT "))


def load_phase(url: str, bodies: list[str], config: BenchConfig, work: Path, heavy: dict | None) -> dict:
    """The ordinary load for config.seconds, /health paced beside it, and the costly requests if given."""
    ordinary = [("application/json", b.encode()) for b in bodies]
    name = "noisy" if heavy else "quiet"
    runs = {"ordinary": wrk(url, "/predict", ordinary, config.connections, config.seconds, config.requests, work,
                            f"{name}-ordinary"),
            "health": wrk(url, "/health", [("GET", b"")], 1, config.seconds, 10**9, work, f"{name}-health",
                          pause_ms=config.health_every_ms)}
    if heavy:
        image, json_bodies = [heavy["image"]], [v for k, v in heavy.items() if k != "image"]
        # one connection for the JSON bodies, one for the images: each its own route
        runs["heavy_json"] = wrk(url, "/predict", json_bodies, 1, config.seconds, 10**9, work, f"{name}-json")
        runs["heavy_image"] = wrk(url, "/predict/image", image, config.heavy_connections - 1, config.seconds, 10**9,
                                  work, f"{name}-image")
    return {k: wrk_result(p, config.seconds + 120) for k, p in runs.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in vars(BenchConfig()).items():
        kind = {"model": str, "max_per_class": int}.get(name, type(value))
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    config = BenchConfig(**vars(p.parse_args(argv)))
    if not (FULL / "numpy_bitmap").is_dir():
        sys.exit(f"error: {SHARED_DIR} is absent: this benchmark needs ../shared/quickdraw")
    if not shutil.which("wrk"):
        sys.exit("error: wrk not found: `bash scripts/setup.sh --bench` installs it (apt-get install wrk)")
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}; load average before: {machine['load_average']}")
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
            heavy = costliest_requests()
            costs = single_costs(url, heavy)
            for name, cost in costs.items():
                print(f"costliest legal request '{name}': {cost['bytes']:,} bytes, status {cost['status']}, "
                      f"{cost['seconds'] * 1e3:.0f} ms alone")
            probe = {"strokes": json.loads(bodies[0])["strokes"], "top_k": 5}
            before = client.post("/predict", json=probe).json()
            print(f"load: {config.connections} connections, {len(bodies):,} real drawings of "
                  f"{config.min_points}-{config.max_points} points, at most {config.requests:,} requests "
                  f"or {config.seconds:.0f} s per phase; /health every {config.health_every_ms} ms")
            phases = {}
            for name, noisy in (("quiet", None), ("noisy", heavy)):
                phases[name] = load_phase(url, bodies, config, work, noisy)
                o, h = phases[name]["ordinary"], phases[name]["health"]
                rate = (o["requests"] - o["non_2xx"]) / o["seconds"]
                print(f"[{name}] ordinary: {o['requests']:,} requests, {rate:.0f} predictions/s, p50 "
                      f"{o['p50_ms']:.1f} ms, p99 {o['p99_ms']:.1f} ms, max {o['max_ms']:.1f} ms, non-2xx "
                      f"{o['non_2xx']}, socket errors {o['socket_errors']}; /health p99 {h['p99_ms']:.1f} ms "
                      f"(max {h['max_ms']:.1f}) of {h['requests']}")
                for k in ("heavy_json", "heavy_image"):
                    if k in phases[name]:
                        r = phases[name][k]
                        print(f"[{name}] {k}: {r['requests']} requests, p50 {r['p50_ms']:.0f} ms, "
                              f"p99 {r['p99_ms']:.0f} ms, non-2xx {r['non_2xx']}, socket errors {r['socket_errors']}")
            health = client.get("/health").json()
            after = client.post("/predict", json=probe).json()
            same = after == before
            print(f"afterwards: /health {health['status']!r}, same answer to the same drawing: {same}")
    quiet, noisy = phases["quiet"], phases["noisy"]
    errors = sum(r["non_2xx"] + r["socket_errors"] for phase in phases.values() for r in phase.values())
    figures = dict(agreement=agree / total, agree=agree, pairs=total, agreement_seconds=agreement_seconds,
                   predictions_per_s=(quiet["ordinary"]["requests"] - quiet["ordinary"]["non_2xx"])
                   / quiet["ordinary"]["seconds"],
                   p50_ms=quiet["ordinary"]["p50_ms"], p99_ms=quiet["ordinary"]["p99_ms"],
                   noisy_p99_ms=noisy["ordinary"]["p99_ms"],
                   noisy_p99_ratio=noisy["ordinary"]["p99_ms"] / quiet["ordinary"]["p99_ms"],
                   health_p99_ms=max(quiet["health"]["p99_ms"], noisy["health"]["p99_ms"]),
                   heavy_answered=noisy["heavy_json"]["requests"] + noisy["heavy_image"]["requests"],
                   errors=errors, healthy_after=health["status"] == "ok" and same)
    targets = dict(noisy_p99_ratio=figures["noisy_p99_ratio"] <= 2, health_p99=figures["health_p99_ms"] < 50,
                   no_errors=errors == 0, agreement=figures["agreement"] >= 0.98)
    print(f"noisy neighbours: ordinary p99 {figures['noisy_p99_ms']:.1f} ms vs {figures['p99_ms']:.1f} ms quiet "
          f"= {figures['noisy_p99_ratio']:.2f}x (target <= 2); /health p99 {figures['health_p99_ms']:.1f} ms "
          f"(target < 50); errors {errors} (target 0); targets met: {all(targets.values())}")
    print(json.dumps(figures))
    if config.json:
        report = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine,
                      machine_line=describe_machine(machine), figures=figures, targets=targets, model=described,
                      settings=asdict(config), costliest=costs, phases=phases,
                      bodies=len(bodies), load_average_after=list(os.getloadavg()))
        write_json(config.json, report, indent=1)
        print(f"written: {config.json}")
    return figures


if __name__ == "__main__":
    main()
