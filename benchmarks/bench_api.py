"""The web API under load, on the 17 bitmap categories of ../shared/quickdraw, started as a real server
(`python -m app --workers N`, the shipped model unless --model names another).

1. Raw strokes agree with the official bitmaps: for the 519 raw/bitmap pairs (line i of
   full/raw/<name>.ndjson is row i of full/numpy_bitmap/<name>.npy), /predict with the raw strokes
   and /predict with the official bitmap give the same top-1 label (target: at least 98%;
   testkit.agreement, asked in batches).
2. Throughput under load from 127.0.0.1: 16 connections, each sending single drawings of 30 to 100
   points (real raw drawings of all categories, as the drawing page sends them), bounded in count and
   time; predictions/s and p50/p99 latency (targets: at least 600/s, p99 under 100 ms). wrk (Debian's;
   a lua script that counts every status).
3. Noisy neighbours, in the same run: the same 16 connections for a quiet phase, then again while 2
   more connections send only the costliest legal requests (one per limit: a 6 KB zigzag just under
   the ink limit, 1,000 strokes of 50,000 points, 256 bitmaps in ~700 KB, a 4096x4096 image) and one
   request just over a limit (50,001 points: answered 413 by design, counted apart from errors).
   Targets: p99 of the ordinary requests at most 2x their quiet p99, 0 errors (an error is a status
   other than the ones the requests sent are designed to get, or a transport failure), and /health (asked
   every 20 ms on its own connection throughout both phases) p99 under 50 ms.
4. Afterwards the service still answers, and answers a probe drawing as before the load: the same
   top-1 label and probabilities within 1e-4 (what differed is printed).
5. With --compare CHECKPOINT: the same quiet load on the same network served each way, one server
   at a time: the shipped int8 ONNX model, the checkpoint's float and int8 ONNX exports (utils.export,
   made here) and the checkpoint on torch, with 1 and 2 workers; torch also capped to AVX2
   (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 in the server's environment, checked through
   oneDNN's own report of the ISA it runs).

Prints the figures with the machine (utils.device.describe_machine) and writes them with the
model, the load settings and the date to reports/bench_api.json (with --compare, reports/bench_api_compare.json;
--json PATH elsewhere).

    flock -x /tmp/cpu.lock .venv/bin/python -m benchmarks.bench_api                  # the shipped model, 2 workers
    flock -x /tmp/cpu.lock .venv/bin/python -m benchmarks.bench_api --compare models/qdnet.pt
    .venv/bin/python -m benchmarks.bench_api --seconds 2 --requests 200 --json /tmp/bench_api.json  # a quick check
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

from app.__main__ import DEFAULT_MODEL
from app.backends import load_backend
from app.inputs import MAX_DRAWINGS, MAX_IMAGE_PIXELS, MAX_INK_LENGTH, MAX_POINTS, MAX_STROKES, SIDE, ink_length
from testkit.agreement import agreement, bitmap_categories
from testkit.launch import running_server
from testkit.mirror import SHARED_DIR
from utils.device import AVX2_CAP, describe_machine, machine_info
from utils.io import write_json
from utils.report import markdown_table
from utils.strokes import read_ndjson, render

ROOT = Path(__file__).resolve().parents[1]
FULL = SHARED_DIR / "full"
# One wrk run: requests cycle through the body files listed (one "content-type<TAB>expected status<TAB>path"
# a line) on every connection; stops after `limit` answers or the duration; prints its figures as JSON,
# with the statuses answered and the statuses the requests sent were designed to get.
WRK_SCRIPT = """
local bodies, types, expected = {}, {}, {}
for line in io.lines("%(list)s") do
  local kind, status, path = line:match("([^\\t]+)\\t(%%d+)\\t(.+)")
  local f = io.open(path, "rb"); bodies[#bodies + 1] = f:read("*a"); f:close()
  types[#types + 1] = kind
  expected[#expected + 1] = status
end
local i, answered, limit, pause = 0, 0, %(limit)d, %(pause)d
statuses, asked = {}, {}
request = function()
  i = i %% #bodies + 1
  asked[expected[i]] = (asked[expected[i]] or 0) + 1
  if types[i] == "GET" then return wrk.format("GET", "%(path)s") end
  return wrk.format("POST", "%(path)s", {["Content-Type"] = types[i]}, bodies[i])
end
if pause > 0 then delay = function() return pause end end
response = function(status)
  answered = answered + 1
  statuses[tostring(status)] = (statuses[tostring(status)] or 0) + 1
  if answered >= limit then wrk.thread:stop() end
end
local threads = {}
setup = function(thread) threads[#threads + 1] = thread end
local function add(into, from)
  for k, v in pairs(from) do into[k] = (into[k] or 0) + v end
end
local function json(counts)
  local parts = {}
  for k, v in pairs(counts) do parts[#parts + 1] = string.format('"%%s": %%d', k, v) end
  return "{" .. table.concat(parts, ", ") .. "}"
end
done = function(summary, latency)
  local e, counts, wanted = summary.errors, {}, {}
  for _, t in ipairs(threads) do add(counts, t:get("statuses")); add(wanted, t:get("asked")) end
  io.write(string.format('\\nRESULT {"requests": %%d, "seconds": %%f, "p50_ms": %%f, "p99_ms": %%f, ' ..
    '"max_ms": %%f, "statuses": %%s, "asked": %%s, "socket_errors": %%d}\\n', summary.requests,
    summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3,
    json(counts), json(wanted), e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass
class BenchConfig:
    model: str | None = None     # a model file (.onnx or .pt); None: the shipped one
    workers: int = 2             # server processes (python -m app --workers)
    connections: int = 16
    seconds: float = 20.0        # each load phase: at most this long ...
    requests: int = 100_000      # ... and at most this many (wrk then still reports the whole duration:
                                 # a run stopped by this count gives a rate too low, flagged)
    min_points: int = 30
    max_points: int = 100
    heavy_connections: int = 2   # noisy neighbours: connections sending only the costliest requests
    health_every_ms: int = 20    # /health asked this often, on its own connection, during the load phases
    compare: str | None = None   # a checkpoint (.pt): serve it each way (see 5.) instead of 1.-4.
    compare_seconds: float = 10.0  # each server of the comparison: this long under load, after 2 s of warm-up
    json: str | None = None      # the report (default: reports/bench_api.json, with --compare bench_api_compare.json); "" none


@dataclass
class Body:
    kind: str        # content type, or "GET"
    content: bytes
    expect: int = 200


def describe_model(path: Path) -> dict:
    """Which model answered: name, classes, the file and its recorded test scores."""
    backend = load_backend(path)
    return dict(file=str(path), backend=backend.kind, name=backend.name, classes=backend.classes,
                test_metrics=(backend.metadata.get("metrics") or {}).get("test"))


def load_bodies(config: BenchConfig) -> list[str]:
    """JSON bodies of real raw drawings (every category) with 30 to 100 points."""
    bodies = []
    for path in sorted((FULL / "raw").glob("*.ndjson")):
        for record in read_ndjson(path):
            if config.min_points <= sum(len(s[0]) for s in record["drawing"]) <= config.max_points:
                bodies.append(json.dumps({"strokes": record["drawing"]}, separators=(",", ":")))
    return bodies


def costliest_requests() -> dict[str, Body]:
    """name -> Body: for each limit, a request just inside it; and one just over a limit (413)."""
    zigzag = [[[0, 100] * 490, [round(i * 0.3, 1) for i in range(980)]]]  # ~250,000 units of ink in 6 KB
    per = MAX_POINTS // MAX_STROKES  # 1,000 strokes of 50 points, 50,000 points in all
    points = [[list(range(d, d + per)), [(i * d) % 7 for i in range(per)]] for d in range(MAX_STROKES)]
    over = [stroke[:] for stroke in points]
    over[-1] = [over[-1][0] + [0], over[-1][1] + [0]]  # one point more than the limit
    bitmaps = [{"bitmap": [255 if (i + d) % 3 else 0 for i in range(SIDE * SIDE)]} for d in range(MAX_DRAWINGS)]
    side = int(MAX_IMAGE_PIXELS ** 0.5)
    image = io.BytesIO()
    page = 255 - render([[[10, 245, 128, 10], [20, 20, 230, 20]], [[30, 220], [200, 60]]], side=side)
    Image.fromarray(page).save(image, "PNG")  # dark strokes on white, 4096x4096
    for strokes in (zigzag, points):
        assert ink_length(strokes) < MAX_INK_LENGTH
    as_json = {"zigzag": ({"strokes": zigzag}, 200), "points": ({"strokes": points}, 200),
               "bitmaps": ({"drawings": bitmaps, "top_k": 1}, 200), "points_over_limit": ({"strokes": over}, 413)}
    out = {name: Body("application/json", json.dumps(body, separators=(",", ":")).encode(), status)
           for name, (body, status) in as_json.items()}
    boundary = "costly-image-boundary"
    out["image"] = Body(f"multipart/form-data; boundary={boundary}",
                        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
                        f"Content-Type: image/png\r\n\r\n".encode() + image.getvalue() + f"\r\n--{boundary}--\r\n".encode())
    return out


def single_costs(url: str, heavy: dict[str, Body]) -> dict[str, dict]:
    """Each costly request alone: its status (checked against the one it is designed to get), size and time."""
    out = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, body in heavy.items():
            path = "/predict/image" if body.kind.startswith("multipart") else "/predict"
            t0 = time.perf_counter()
            status = client.post(path, content=body.content, headers={"content-type": body.kind}).status_code
            out[name] = dict(status=status, expected=body.expect, bytes=len(body.content),
                             seconds=time.perf_counter() - t0)
    return out


def wrk(url: str, path: str, bodies: list[Body], connections: int, seconds: float, limit: int,
        work: Path, name: str, pause_ms: int = 0) -> subprocess.Popen:
    """Start one wrk run; its result comes from wrk_result()."""
    listing = work / f"{name}.list"
    lines = []
    for i, body in enumerate(bodies):
        (work / f"{name}.{i}").write_bytes(body.content)
        lines.append(f"{body.kind}\t{body.expect}\t{work / f'{name}.{i}'}")
    listing.write_text("\n".join(lines) + "\n")
    script = work / f"{name}.lua"
    script.write_text(WRK_SCRIPT % {"list": listing, "limit": limit, "pause": pause_ms, "path": path})
    options = ["-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "10s"]
    proc = subprocess.Popen(["wrk", *options, "-s", str(script), url + path], stdout=subprocess.PIPE, text=True)
    proc.options, proc.limit = " ".join(options), limit
    return proc


def wrk_result(proc: subprocess.Popen, timeout: float) -> dict:
    """The run's figures: requests, seconds, latency percentiles, the statuses answered; refused: answers
    4xx by design (no more of a status than requests were sent designed to get it); errors: every other
    answer whose status no request sent was designed to get, and transport failures."""
    out, _ = proc.communicate(timeout=timeout)
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    r = {"tool": "wrk", "options": proc.options} | json.loads(line.removeprefix("RESULT "))
    expected = {status: min(n, r["asked"].get(status, 0)) for status, n in r["statuses"].items()}
    r["refused"] = sum(n for status, n in expected.items() if 400 <= int(status) < 500)
    r["errors"] = sum(r["statuses"].values()) - sum(expected.values()) + r["socket_errors"]
    r["answered_2xx"] = sum(n for status, n in r["statuses"].items() if 200 <= int(status) < 300)
    r["stopped_by_count"] = proc.limit <= sum(r["statuses"].values())  # the rate is then a lower bound
    return r


def rate(r: dict) -> float:
    """Answers per second that carry predictions."""
    return r["answered_2xx"] / r["seconds"]


def load_phase(url: str, bodies: list[Body], config: BenchConfig, work: Path, heavy: dict[str, Body] | None) -> dict:
    """The ordinary load for `seconds`, /health paced beside it, and the costly requests if given."""
    name, seconds = ("noisy" if heavy else "quiet"), config.seconds
    runs = {"ordinary": wrk(url, "/predict", bodies, config.connections, seconds, config.requests, work,
                            f"{name}-ordinary")}
    runs["health"] = wrk(url, "/health", [Body("GET", b"")], 1, seconds, 10**9, work, f"{name}-health",
                         pause_ms=config.health_every_ms)
    if heavy:
        image, json_bodies = [heavy["image"]], [v for k, v in heavy.items() if k != "image"]
        # one connection for the JSON bodies, one for the images: each its own route
        runs["heavy_json"] = wrk(url, "/predict", json_bodies, 1, seconds, 10**9, work, f"{name}-json")
        runs["heavy_image"] = wrk(url, "/predict/image", image, config.heavy_connections - 1, seconds, 10**9,
                                  work, f"{name}-image")
    return {k: wrk_result(p, seconds + 120) for k, p in runs.items()}


def compare_answers(before: dict, after: dict, tolerance: float = 1e-4) -> dict:
    """Two answers to the same drawing: the same top-1 label, the same labels listed, and each
    probability within `tolerance`; what differed, in words."""
    labels = [[p["label"] for p in a["predictions"]] for a in (before, after)]
    probs = [{p["label"]: p["probability"] for p in a["predictions"]} for a in (before, after)]
    shared = [label for label in labels[0] if label in probs[1]]
    largest = max((abs(probs[0][k] - probs[1][k]) for k in shared), default=float("inf"))
    same = labels[0][0] == labels[1][0] and set(labels[0]) == set(labels[1]) and largest <= tolerance
    differed = []
    if labels[0][0] != labels[1][0]:
        differed.append(f"top-1 {labels[0][0]!r} then {labels[1][0]!r}")
    if set(labels[0]) != set(labels[1]):
        differed.append(f"labels listed {labels[0]} then {labels[1]}")
    if largest > 0:
        differed.append(f"largest probability difference {largest:.2g}")
    if before.get("unsure") != after.get("unsure"):
        differed.append(f"unsure {before.get('unsure')} then {after.get('unsure')}")
    return dict(same=same, identical=before == after, top1=labels[0][0], largest_difference=largest,
                tolerance=tolerance, differed="; ".join(differed) or "nothing")


def show_run(r: dict) -> str:
    bound = " (at least: stopped by the request count)" if r["stopped_by_count"] else ""
    return (f"{r['requests']:,} requests, {rate(r):.0f} predictions/s{bound}, p50 {r['p50_ms']:.1f} ms, p99 "
            f"{r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms, statuses {r['statuses']}, errors {r['errors']}")


def isa_line(env: dict) -> str:
    """The instruction set oneDNN says it runs on, in a process with env added (what torch will use)."""
    code = "import torch; torch.nn.functional.conv2d(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 3, 3)); " \
           "print('ATen capability', torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=os.environ | env | {"ONEDNN_VERBOSE": "1"}).stdout
    isa = next((l.split("isa:", 1)[1].strip() for l in out.splitlines() if "isa:" in l), "oneDNN did not say")
    aten = next((l for l in out.splitlines() if l.startswith("ATen")), "")
    return f"oneDNN isa: {isa}; {aten}"


def export_both(checkpoint: Path, out_dir: Path) -> tuple[Path, Path]:
    """The checkpoint's float and int8 ONNX files (utils.export, checked on its test split)."""
    from utils.export import export, int8_path
    out = out_dir / (checkpoint.stem + ".onnx")
    t0 = time.perf_counter()
    report = export(checkpoint, out, data=FULL, int8=True)  # its split rebuilt from the mirror's files in place
    print(f"exported {checkpoint.name}: float top-1 {report['float']['top1']:.2%}, int8 {report['int8']['top1']:.2%} "
          f"on its test split [{time.perf_counter() - t0:.0f} s]")
    return out, int8_path(out)


def compare(config: BenchConfig, bodies: list[Body], work: Path) -> list[dict]:
    """The same load on the same network served each way: requests/s, p50, p99 (see 5. above)."""
    checkpoint = Path(config.compare)
    float_onnx, int8_onnx = export_both(checkpoint, work)
    servers = [("shipped int8 ONNX", DEFAULT_MODEL, {}), ("int8 ONNX", int8_onnx, {}),
               ("float ONNX", float_onnx, {}), ("torch", checkpoint, {}), ("torch, AVX2 cap", checkpoint, AVX2_CAP)]
    isa = {True: isa_line(AVX2_CAP), False: isa_line({})}  # what the capped and uncapped servers' torch runs on
    print(f"AVX2 cap check: {isa[True]}; without it: {isa[False]}")
    rows = []
    for label, model, env in servers:
        for workers in (1, 2):
            with running_server(model, "--workers", str(workers), "--log-level", "warning", env=env) as url:
                wrk_result(wrk(url, "/predict", bodies, config.connections, 2, config.requests, work, "warm"), 60)
                r = wrk_result(wrk(url, "/predict", bodies, config.connections, config.compare_seconds,
                                   config.requests, work, "compare"), config.compare_seconds + 120)
            row = dict(served=label, model=model.name, workers=workers, predictions_per_s=rate(r), p50_ms=r["p50_ms"],
                       p99_ms=r["p99_ms"], errors=r["errors"], env=env, isa=isa[bool(env)], run=r)
            print(f"{label:<18} {model.name:<24} workers {workers}: {rate(r):6.0f}/s  p50 {r['p50_ms']:6.1f} ms  "
                  f"p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}", flush=True)
            rows.append(row)
    print(markdown_table(["served", "model file", "workers", "predictions/s", "p50 ms", "p99 ms", "errors"],
                         [[r["served"], r["model"], r["workers"], f"{r['predictions_per_s']:.0f}", f"{r['p50_ms']:.1f}",
                           f"{r['p99_ms']:.1f}", r["errors"]] for r in rows]))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in vars(BenchConfig()).items():
        kind = {"model": str, "compare": str, "json": str}.get(name, type(value))
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    config = BenchConfig(**vars(p.parse_args(argv)))
    if config.json is None:  # a comparison does not overwrite the load test's report, nor it the comparison's
        config.json = str(ROOT / "reports" / ("bench_api_compare.json" if config.compare else "bench_api.json"))
    if not (FULL / "numpy_bitmap").is_dir():
        sys.exit(f"error: {SHARED_DIR} is absent: this benchmark needs ../shared/quickdraw")
    if not shutil.which("wrk"):
        sys.exit("error: wrk not found: `bash scripts/setup.sh --bench` installs it (apt-get install wrk)")
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}; load average before: {machine['load_average']}")
    model = Path(config.model) if config.model else DEFAULT_MODEL
    bodies = [Body("application/json", b.encode()) for b in load_bodies(config)]
    print(f"load: wrk, {config.connections} connections, {len(bodies):,} real raw drawings of "
          f"{config.min_points}-{config.max_points} points, one per request")
    report = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine,
                  machine_line=describe_machine(machine), settings=asdict(config), bodies=len(bodies))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if config.compare:
            report["compare"] = compare(config, bodies, work)
        else:
            report |= serve_and_load(config, model, bodies, work)
    report["load_average_after"] = list(os.getloadavg())
    if config.json:
        write_json(config.json, report, indent=1)
        print(f"written: {config.json}")
    return report


def serve_and_load(config: BenchConfig, model: Path, bodies: list[Body], work: Path) -> dict:
    """1. to 4. above, on one server."""
    described = describe_model(model)
    print(f"model: {model} ({described['backend']}, {described['name']}); python -m app --workers {config.workers}")
    with running_server(model, "--workers", str(config.workers), "--log-level", "warning") as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        names = client.get("/classes").json()["classes"]
        if sorted(names) != bitmap_categories(FULL):
            sys.exit(f"error: {model} does not know the 17 bitmap categories (it has {len(names)} classes)")
        t0 = time.perf_counter()
        agree, total = agreement(client, FULL, names)
        agreement_seconds = time.perf_counter() - t0
        print(f"raw strokes vs official bitmap, top-1 agreement: {agree}/{total} = {agree / total:.2%} "
              f"(target >= 98%) [{agreement_seconds:.1f} s]")
        heavy = costliest_requests()
        costs = single_costs(url, heavy)
        for name, cost in costs.items():
            print(f"costliest request '{name}': {cost['bytes']:,} bytes, status {cost['status']} (designed: "
                  f"{cost['expected']}), {cost['seconds'] * 1e3:.0f} ms alone")
        probe = {"strokes": json.loads(bodies[0].content)["strokes"], "top_k": 5}
        before = client.post("/predict", json=probe).json()
        print(f"phases: at most {config.requests:,} requests or {config.seconds:.0f} s each; "
              f"/health every {config.health_every_ms} ms")
        phases = {}
        for name, noisy in (("quiet", None), ("noisy", heavy)):
            phases[name] = load_phase(url, bodies, config, work, noisy)
            o, h = phases[name]["ordinary"], phases[name]["health"]
            print(f"[{name}] ordinary: {show_run(o)}; /health p99 {h['p99_ms']:.1f} ms "
                  f"(max {h['max_ms']:.1f}) of {h['requests']}")
            for k in ("heavy_json", "heavy_image"):
                if k in phases[name]:
                    r = phases[name][k]
                    print(f"[{name}] {k}: {r['requests']} requests, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                          f"statuses {r['statuses']}: {r['refused']} refused by design, errors {r['errors']}")
        health = client.get("/health").json()
        after = client.post("/predict", json=probe).json()
        same = compare_answers(before, after)
        print(f"afterwards: /health {health['status']!r}; the probe drawing answered as before the load: "
              f"{same['same']} (top-1 {same['top1']!r}; differed: {same['differed']}; tolerance {same['tolerance']:g})")
    quiet, noisy = phases["quiet"], phases["noisy"]
    errors = sum(r["errors"] for phase in phases.values() for r in phase.values())
    refused = sum(r["refused"] for phase in phases.values() for r in phase.values())
    figures = dict(agreement=agree / total, agree=agree, pairs=total, agreement_seconds=agreement_seconds,
                   predictions_per_s=rate(quiet["ordinary"]), p50_ms=quiet["ordinary"]["p50_ms"],
                   p99_ms=quiet["ordinary"]["p99_ms"], noisy_predictions_per_s=rate(noisy["ordinary"]),
                   noisy_p99_ms=noisy["ordinary"]["p99_ms"],
                   noisy_p99_ratio=noisy["ordinary"]["p99_ms"] / quiet["ordinary"]["p99_ms"],
                   health_p99_ms=max(quiet["health"]["p99_ms"], noisy["health"]["p99_ms"]),
                   heavy_answered=noisy["heavy_json"]["requests"] + noisy["heavy_image"]["requests"],
                   refused_by_design=refused, errors=errors,
                   healthy_after=health["status"] == "ok" and same["same"])
    targets = dict(throughput=figures["predictions_per_s"] >= 600, p99=figures["p99_ms"] < 100,
                   noisy_p99_ratio=figures["noisy_p99_ratio"] <= 2, health_p99=figures["health_p99_ms"] < 50,
                   no_errors=errors == 0, agreement=figures["agreement"] >= 0.98, same_answer=same["same"])
    print(f"quiet: {figures['predictions_per_s']:.0f} predictions/s (target >= 600), p99 {figures['p99_ms']:.1f} ms "
          f"(target < 100); noisy neighbours: ordinary p99 {figures['noisy_p99_ms']:.1f} ms = "
          f"{figures['noisy_p99_ratio']:.2f}x quiet (target <= 2); /health p99 {figures['health_p99_ms']:.1f} ms "
          f"(target < 50); {refused} refused by design; errors {errors} (target 0); targets met: {all(targets.values())}")
    print(json.dumps(figures))
    return dict(figures=figures, targets=targets, model=described, costliest=costs, phases=phases, probe=same)


if __name__ == "__main__":
    main()
