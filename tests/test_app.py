"""The web API, started for real (`python -m app` in a subprocess on 127.0.0.1) and called over HTTP."""
import asyncio
import io
import json
import math
import re
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.__main__ import parse_args
from app.agreement import agreement, batches, bitmap_categories, train_bitmap_model
from app.api import MAX_BODY_BYTES, MAX_DRAWINGS, MAX_INK_LENGTH, MAX_POINTS
from app.launch import app_command, free_port, running_server
from app.service import Batcher, ink_length
from utils.data import QuickDrawSet, to_float
from utils.models import build_model
from utils.strokes import render, simplify
from utils.train import TrainConfig, fit, load_checkpoint, save_checkpoint

SHAPES = ("circle", "square", "triangle", "line", "zigzag", "plus")
TEMPLATES = {  # strokes in a unit box, as someone would draw them
    "square": [[(-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1)]],
    "triangle": [[(0, -1), (1, 0.8), (-1, 0.8), (0, -1)]],
    "line": [[(-1, 0), (1, 0)]],
    "zigzag": [[(-1, -0.5), (-0.5, 0.5), (0, -0.5), (0.5, 0.5), (1, -0.5)]],
    "plus": [[(-1, 0), (1, 0)], [(0, -1), (0, 1)]],
}


def shape_strokes(name: str, rng: np.random.Generator) -> list[list[list[float]]]:
    """A hand-drawn-like raw drawing: [[x...], [y...], [t...]] per stroke in canvas pixels and ms."""
    if name == "circle":
        a = np.linspace(0, 2 * math.pi, 40) + rng.uniform(0, 2 * math.pi)
        strokes = [np.stack([np.cos(a), np.sin(a)], 1)]
    else:  # every corner-to-corner segment sampled like a pointer: many points
        strokes = [np.concatenate([np.linspace(p, q, 12, endpoint=False) for p, q in zip(s[:-1], s[1:])] + [s[-1:]])
                   for s in map(np.array, TEMPLATES[name])]
    angle = rng.uniform(-0.3, 0.3)
    rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    scale = rng.uniform(40, 200) * np.array([1, rng.uniform(0.8, 1.2)])
    offset = rng.uniform(0, 300, 2)
    drawing, t = [], 0
    for points in strokes:
        points = (points @ rotate.T) * scale + offset + rng.normal(0, 0.01, points.shape) * scale
        times = t + np.arange(len(points)) * 16
        t = int(times[-1]) + 300
        drawing.append([points[:, 0].round(2).tolist(), points[:, 1].round(2).tolist(), times.tolist()])
    return drawing


def shapes_set(per_class: int, seed: int) -> QuickDrawSet:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(SHAPES)), per_class)
    images = np.stack([render(simplify(shape_strokes(SHAPES[y], rng))) for y in labels])
    return QuickDrawSet(torch.from_numpy(images), torch.from_numpy(labels), list(SHAPES))


@pytest.fixture(scope="session")
def shapes_checkpoint(tmp_path_factory):
    """V2 trained in seconds to tell six simple shapes apart, saved as utils.train saves."""
    path = tmp_path_factory.getbasetemp() / "shapes.pt"
    if not path.exists():  # made once per session, for the browser test too
        config = TrainConfig(model="v2", epochs=4, batch_size=32, seed=0, device="cpu", num_threads=1, progress=False)
        model = build_model("v2", len(SHAPES))
        history = fit(model, shapes_set(80, seed=0), shapes_set(10, seed=1), config)
        save_checkpoint(path, model, "v2", list(SHAPES), config, history)
    return path


@pytest.fixture(scope="module")
def server(shapes_checkpoint):
    with running_server(shapes_checkpoint) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def reference(shapes_checkpoint):
    """Probabilities (N,C) for uint8 bitmaps (N,28,28), computed here without the app."""
    model, _ = load_checkpoint(shapes_checkpoint)
    model.eval()

    def probabilities(bitmaps: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(to_float(torch.from_numpy(bitmaps))).softmax(1).numpy()
    return probabilities


def drawing(name: str, seed: int = 7):
    return shape_strokes(name, np.random.default_rng(seed))


def labels_and_probs(answer: dict) -> tuple[list[str], np.ndarray]:
    return [p["label"] for p in answer["predictions"]], np.array([p["probability"] for p in answer["predictions"]])


def assert_matches(answer: dict, probabilities: np.ndarray, top_k: int = 5):
    """The answer is the top_k of the reference probabilities, most probable first."""
    labels, probs = labels_and_probs(answer)
    order = np.argsort(-probabilities)[:top_k]
    assert labels == [SHAPES[i] for i in order]
    np.testing.assert_allclose(probs, probabilities[order], atol=1e-5)


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


# --- the service ---------------------------------------------------------------------------------------

def test_health_and_classes(client, shapes_checkpoint):
    health = client.get("/health").json()
    assert health == {"status": "ok", "model": "v2", "classes": len(SHAPES), "checkpoint": shapes_checkpoint.name}
    assert client.get("/classes").json() == {"classes": list(SHAPES)}


def test_page_serves_its_assets_and_nothing_external(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="canvas"', 'id="undo"', 'id="clear"', 'id="predictions"'):
        assert element in page.text
    bodies = [page.text]
    for asset, kind in (("/static/draw.js", "javascript"), ("/static/style.css", "text/css")):
        assert f'"{asset}"' in page.text
        answer = client.get(asset)
        assert answer.status_code == 200 and kind in answer.headers["content-type"]
        bodies.append(answer.text)
    for body in bodies:  # works offline: no CDN, no font service, no absolute URL at all
        assert "http://" not in body and "https://" not in body and 'src="//' not in body


def test_docs_page_uses_only_the_apps_own_files(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # works offline: no CDN, no favicon host
    assets = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert len(assets) == 3 and all(a.startswith("/") and not a.startswith("//") for a in assets)
    kinds = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200 and kinds[asset[asset.rindex("."):]] in answer.headers["content-type"]


def test_openapi(client):
    assert client.get("/redoc").status_code == 404  # ReDoc would fetch its logo from another host
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/predict/image", "/health", "/classes"} <= set(spec["paths"])
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/PredictRequest"}
    fields = spec["components"]["schemas"]["PredictRequest"]["properties"]
    assert {"strokes", "bitmap", "drawings", "top_k"} <= set(fields)


def test_predict_strokes_as_the_official_data(client, reference):
    strokes = drawing("circle")
    answer = client.post("/predict", json={"strokes": strokes})
    assert answer.status_code == 200
    assert answer.json()["model"] == "v2"
    assert_matches(answer.json(), reference(render(simplify(strokes))[None])[0])
    assert answer.json()["predictions"][0]["label"] == "circle"


def test_strokes_in_any_coordinate_range_and_without_times(client):
    strokes = drawing("triangle")
    moved = [[[x * 0.01 - 5 for x in xs], [y * 0.01 - 5 for y in ys]] for xs, ys, _ in strokes]
    first = client.post("/predict", json={"strokes": strokes}).json()
    second = client.post("/predict", json={"strokes": moved}).json()
    assert first["predictions"][0]["label"] == "triangle"
    assert [p["label"] for p in first["predictions"]] == [p["label"] for p in second["predictions"]]


def test_predict_bitmap_flat_and_nested(client, reference):
    bitmap = render(simplify(drawing("square")))  # (28,28) uint8
    flat = client.post("/predict", json={"bitmap": bitmap.ravel().tolist()})
    nested = client.post("/predict", json={"bitmap": bitmap.tolist(), "top_k": 3})
    assert flat.status_code == nested.status_code == 200
    assert_matches(flat.json(), reference(bitmap[None])[0])
    assert_matches(nested.json(), reference(bitmap[None])[0], top_k=3)
    assert flat.json()["predictions"][0]["label"] == "square"


def test_batch_answers_each_drawing_in_order(client, reference):
    shapes = ["plus", "circle", "zigzag", "line"]
    drawings = [{"strokes": drawing(s)} for s in shapes[:2]] + \
               [{"bitmap": render(simplify(drawing(s))).ravel().tolist()} for s in shapes[2:]]
    answer = client.post("/predict", json={"drawings": drawings, "top_k": 2})
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert len(results) == 4
    expected = reference(np.stack([render(simplify(drawing(s))) for s in shapes]))
    for result, probabilities, shape in zip(results, expected, shapes):
        assert_matches(result, probabilities, top_k=2)
        assert result["predictions"][0]["label"] == shape
    single = client.post("/predict", json={"strokes": drawing("plus"), "top_k": 2}).json()
    np.testing.assert_allclose(labels_and_probs(single)[1], labels_and_probs(results[0])[1], atol=1e-6)


@pytest.mark.parametrize("top_k, count", [(None, 5), (1, 1), (len(SHAPES), len(SHAPES))])
def test_top_k(client, top_k, count):
    body = {"strokes": drawing("zigzag")} | ({} if top_k is None else {"top_k": top_k})
    labels, probs = labels_and_probs(client.post("/predict", json=body).json())
    assert len(labels) == count == len(set(labels))
    assert np.all(np.diff(probs) <= 0)
    if count == len(SHAPES):
        assert probs.sum() == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_predict_image_either_polarity_is_the_bitmap(client, fmt):
    simplified = simplify(drawing("plus"))
    expected = render(simplified).astype(int)
    light_on_dark = render(simplified, side=280)
    canvas = np.full((500, 420), 255, np.uint8)  # dark on light, off-centre on a larger page
    canvas[150:430, 30:310] = 255 - light_on_dark
    answers = [client.post("/predict/image", files={"file": (f"d.{fmt.lower()}", png(image, fmt))}).json()
               for image in (light_on_dark, canvas)]
    bitmaps = [np.array(a["bitmap"]).reshape(28, 28) for a in answers]
    for bitmap in bitmaps:
        assert np.abs(bitmap - expected).mean() < 3  # same drawing, same framing, up to resampling
    if fmt == "PNG":  # lossless: polarity and page size change nothing
        np.testing.assert_array_equal(bitmaps[0], bitmaps[1])
    same = client.post("/predict", json={"bitmap": expected.ravel().tolist()}).json()
    assert {a["predictions"][0]["label"] for a in answers} == {same["predictions"][0]["label"]} == {"plus"}


def test_predict_image_with_transparent_background(client):
    ink = render(simplify(drawing("circle")), side=140)
    rgba = np.zeros((140, 140, 4), np.uint8)
    rgba[..., 3] = ink  # black strokes on a transparent canvas, as a browser exports it
    answer = client.post("/predict/image", params={"top_k": 2}, files={"file": ("c.png", png(rgba))}).json()
    assert [p["label"] for p in answer["predictions"]][0] == "circle" and len(answer["predictions"]) == 2


@pytest.mark.parametrize("strokes", [
    [[[5], [5]]],                                  # a single dot
    [[[3, 3, 3], [4, 4, 4], [0, 10, 20]]],         # a pen held still
    [[[-1e15, 1e15], [0, 1]]],                     # the widest coordinates allowed
    [[[0, 1e-9, 2e-9], [0, 1e-9, 0]]],             # the tiniest
    [[[i], [i % 3]] for i in range(100)],          # many dots
])
def test_unusual_drawings_are_answered(client, strokes):
    answer = client.post("/predict", json={"strokes": strokes})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 5


# --- bad input: 4xx naming the problem, and the service goes on --------------------------------------

def strokes_of(points: int) -> dict:
    return {"strokes": [[list(range(points)), [p % 7 for p in range(points)]]]}


BLANK = [0] * 784
INK = [0] * 783 + [255]
GOOD = [[[0, 10, 20], [0, 10, 0]]]
BAD_JSON = [  # (id, body, status, words the message must hold)
    ("malformed", b'{"strokes": [[[1, 2], [3, 4]]', 400, "malformed json"),
    ("empty body", b"", 400, "malformed json"),
    ("not an object", b"[1, 2]", 422, "object"),
    ("nan", b'{"strokes": [[[NaN, 1], [1, 2]]]}', 422, "strokes[0][0][0]: must be a finite number: nan and infinity"),
    ("infinity", b'{"strokes": [[[1, 2], [Infinity, 2]]]}', 422, "finite number"),
    ("minus infinity", b'{"bitmap": [-Infinity' + b", 0" * 783 + b"]}", 422, "finite number"),
    ("overflow", b'{"strokes": [[[1e999, 1], [1, 2]]]}', 422, "finite number"),
]
BAD_BODIES = [
    ("strokes wrong type", {"strokes": "a cat"}, 422, "strokes: input should be a valid array"),
    ("string coordinate", {"strokes": [[[1, "2"], [3, 4]]]}, 422, "strokes[0][0][1]: input should be a valid number"),
    ("bool coordinate", {"strokes": [[[True, 2], [3, 4]]]}, 422, "strokes[0][0][0]: input should be a valid number"),
    ("stroke of one list", {"strokes": [[[1, 2]]]}, 422, "strokes[0]: list should have at least 2 items"),
    ("stroke of four lists", {"strokes": [[[1], [2], [3], [4]]]}, 422, "strokes[0]: list should have at most 3 items"),
    ("x and y differ", {"strokes": [[[1, 2, 3], [1, 2]]]}, 422, "strokes[0]: x and y lists differ in length (3, 2)"),
    ("t differs", {"strokes": [[[1, 2], [1, 2], [0]]]}, 422, "x, y and t lists differ in length"),
    ("coordinate too large", {"strokes": [[[1e20, 2], [1, 2]]]}, 422,
     "strokes[0][0][0]: input should be less than or equal to"),
    ("empty strokes", {"strokes": []}, 422, "empty drawing"),
    ("stroke without points", {"strokes": [[[], []]]}, 422, "stroke has no points"),
    ("no drawing", {}, 422, "give exactly one of 'strokes' or 'bitmap' or 'drawings'"),
    ("two kinds", {"strokes": GOOD, "bitmap": INK}, 422, "not strokes and bitmap"),
    ("unknown field", {"strokes": GOOD, "colour": "red"}, 422, "colour: extra inputs are not permitted"),
    ("bitmap too short", {"bitmap": INK[:-1]}, 422, "bitmap: got 783 values; expected 784"),
    ("bitmap 28x27", {"bitmap": [[1] * 27] * 28}, 422, "28 rows of 28 values"),
    ("bitmap over 255", {"bitmap": [0] * 783 + [256]}, 422, "bitmap[783]: input should be less than or equal to 255"),
    ("bitmap negative", {"bitmap": [-1] + [0] * 783}, 422, "bitmap[0]: input should be greater than or equal to 0"),
    ("blank bitmap", {"bitmap": BLANK}, 422, "empty drawing: the bitmap has no ink"),
    ("faint bitmap, blank once rounded", {"bitmap": [0.3] * 784}, 422, "empty drawing: the bitmap has no ink"),
    ("bitmap of rows and numbers", {"bitmap": [[0] * 28] * 27 + [5]}, 422, "bitmap: mixes rows and numbers"),
    ("top_k zero", {"strokes": GOOD, "top_k": 0}, 422, "top_k must be between 1 and 6"),
    ("top_k over classes", {"strokes": GOOD, "top_k": 7}, 422, "top_k must be between 1 and 6"),
    ("top_k float", {"strokes": GOOD, "top_k": 2.0}, 422, "top_k: input should be a valid integer"),
    ("top_k string", {"strokes": GOOD, "top_k": "3"}, 422, "top_k: input should be a valid integer"),
    ("empty batch", {"drawings": []}, 422, "drawings: list should have at least 1 item"),
    ("bad drawing in batch", {"drawings": [{"strokes": GOOD}, {"bitmap": [1] * 10}]}, 422,
     "drawings[1].bitmap: got 10 values"),
    ("top_k inside batch", {"drawings": [{"strokes": GOOD, "top_k": 1}]}, 422, "drawings[0].top_k: extra inputs"),
    ("too many points", strokes_of(50_001), 413, "too many points: 50001 in the request, at most 50000"),
    ("too many points in batch", {"drawings": [strokes_of(25_001), strokes_of(25_000)]}, 413, "too many points: 50001"),
    ("too many strokes", {"strokes": [[[i], [i % 7]] for i in range(1_001)]}, 413,
     "too many strokes: the drawing has 1,001, at most 1,000 per drawing"),
    ("too many strokes in batch", {"drawings": [{"strokes": GOOD}, {"strokes": [[[i], [0]] for i in range(1_200)]}]},
     413, "too many strokes: drawings[1] has 1,200"),
    ("scribble too long to simplify", {"strokes": [[[0, 100] * 2500, [0] * 5000]]}, 413,
     "strokes too long: they run 1,274,745 units"),
]


def assert_problem(answer: httpx.Response, status: int, words: str):
    """The status, and one problem named in words a client can read."""
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert words.lower() in detail.lower()
    assert "\n" not in detail and " object at 0x" not in detail and len(answer.json().get("errors", [])) <= 1


@pytest.mark.parametrize("body, status, words", [c[1:] for c in BAD_JSON], ids=[c[0] for c in BAD_JSON])
def test_bad_json_is_refused(client, body, status, words):
    assert_problem(client.post("/predict", content=body, headers={"content-type": "application/json"}), status, words)


@pytest.mark.parametrize("body, status, words", [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_bad_drawing_is_refused(client, body, status, words):
    assert_problem(client.post("/predict", json=body), status, words)


def test_wrong_content_type_is_refused(client):
    assert_problem(client.post("/predict", content=b'{"strokes": []}', headers={"content-type": "text/plain"}),
                   415, "content-type must be application/json")


def test_body_over_1mb_is_refused_by_length_and_by_stream(client):
    big = b'{"bitmap": [' + b"1, " * 400_000 + b"1]}"  # 1.2 MB
    assert_problem(client.post("/predict", content=big, headers={"content-type": "application/json"}),
                   413, "request body too large")

    def chunks():  # no Content-Length: only the bytes that arrive can tell
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    assert_problem(client.post("/predict", content=chunks(), headers={"content-type": "application/json"}),
                   413, "request body too large")
    assert_problem(client.post("/predict/image", files={"file": ("big.png", big)}), 413, "request body too large")


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


BAD_IMAGES = {  # file name -> (bytes, status, words the message must hold)
    "noise.png": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, 415, "unreadable image"),
    "text.jpg": (lambda: b"this is not an image", 415, "unreadable image"),
    "truncated.png": (lambda: png(255 - render(simplify(drawing("line")), side=100))[:200], 415, "unreadable image"),
    "d.gif": (lambda: encoded(Image.new("L", (8, 8)), "GIF"), 415, "unsupported image format gif"),
    "blank.png": (lambda: png(np.full((50, 60), 255, np.uint8)), 422, "no ink"),
    "large.png": (lambda: encoded(Image.new("1", (6000, 6000), 1), "PNG"), 413, "image too large: 6000x6000"),
    "bomb.png": (lambda: encoded(Image.new("1", (14000, 14000), 1), "PNG"), 413, "image too large"),
}


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_image_is_refused(client, name):
    make, status, words = BAD_IMAGES[name]
    assert_problem(client.post("/predict/image", files={"file": (name, make())}), status, words)


def test_bad_image_request_is_refused(client):
    assert_problem(client.post("/predict/image", data={"x": "1"}), 422, "file")
    drawn = png(render(simplify(drawing("line")), side=60))
    assert_problem(client.post("/predict/image", params={"top_k": 0}, files={"file": ("d.png", drawn)}),
                   422, "top_k must be between 1 and 6")
    assert_problem(client.post("/predict/image", params={"top_k": "many"}, files={"file": ("d.png", drawn)}),
                   422, "top_k: input should be a valid integer")


def test_service_answers_while_drawing_a_large_request(server):
    """49 drawings of 1,000 one-point strokes: within every limit, and a second or more to draw."""
    heavy = {"drawings": [{"strokes": [[[i], [(i * d) % 97]] for i in range(1_000)]} for d in range(49)]}
    done = {}

    def send():
        with httpx.Client(base_url=server, timeout=60) as c:
            done["status"] = c.post("/predict", json=heavy).status_code
    sender = threading.Thread(target=send)
    with httpx.Client(base_url=server, timeout=60) as c:
        t0 = time.perf_counter()
        sender.start()
        waits = []
        while sender.is_alive():
            t = time.perf_counter()
            assert c.get("/health").status_code == 200
            waits.append(time.perf_counter() - t)
        heavy_seconds = time.perf_counter() - t0
    sender.join()
    assert done["status"] == 200
    assert heavy_seconds > 0.3 and len(waits) >= 3, (heavy_seconds, len(waits))
    assert max(waits) < heavy_seconds / 3, f"/health waited {max(waits):.2f} s of {heavy_seconds:.2f} s"


def test_service_still_answers_after_bad_input(client, reference):
    for body in (b"{", b'{"strokes": [[[NaN], [1]]]}', b'{"bitmap": [' + b"9" * 2_000_000 + b"]}"):
        assert client.post("/predict", content=body, headers={"content-type": "application/json"}).status_code < 500
    assert client.get("/health").json()["status"] == "ok"
    strokes = drawing("zigzag", seed=11)
    answer = client.post("/predict", json={"strokes": strokes}).json()
    assert_matches(answer, reference(render(simplify(strokes))[None])[0])


# --- start-up --------------------------------------------------------------------------------------------

CHECKPOINTS = {  # a --model that is not a checkpoint -> words its one-line error must hold
    "missing": (None, "checkpoint"),
    "text": (lambda path: path.write_bytes(b"not a checkpoint"), "checkpoint"),
    "truncated zip": (lambda path: path.write_bytes(b"PK\x03\x04 truncated zip"), "checkpoint"),
    "a pickled module": (lambda path: torch.save(torch.nn.Linear(2, 2), path), "checkpoint"),
    "directory": (lambda path: path.mkdir(), "directory"),
}


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_unusable_checkpoint_stops_the_start(tmp_path, case):
    make, words = CHECKPOINTS[case]
    path = tmp_path / "model.pt"
    if make:
        make(path)
    done = subprocess.run(app_command(path, port=free_port()), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert words in done.stderr and str(path) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no traceback, no advice from torch
    assert "weights_only" not in done.stderr


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_bad_port_is_an_error_line(port, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--model", "m.pt", "--port", port])
    assert stop.value.code == 2
    assert "argument --port:" in capsys.readouterr().err.splitlines()[-1]
    assert parse_args(["--model", "m.pt", "--port", "65535"]).port == 65535


def test_model_failure_reaches_every_request_still_waiting():
    class Failing:
        def probabilities(self, bitmaps):
            raise RuntimeError("model failed")

    async def scenario():
        batcher = Batcher(Failing())
        left = asyncio.ensure_future(batcher.predict(np.zeros((1, 28, 28), np.uint8), 1))
        stays = asyncio.ensure_future(batcher.predict(np.zeros((2, 28, 28), np.uint8), 1))
        await asyncio.sleep(0)  # both wait for the same forward pass
        left.cancel()  # its client went away
        with pytest.raises(RuntimeError, match="model failed"):
            await asyncio.wait_for(stays, 5)
    asyncio.run(scenario())


# --- raw strokes agree with the official bitmaps --------------------------------------------------------

@pytest.fixture(scope="module")
def mirror_checkpoint(shared_dir, tmp_path_factory):
    """V2 trained for 2 short epochs on the mirror's 17 bitmap categories."""
    path = tmp_path_factory.mktemp("mirror") / "mirror17.pt"
    train_bitmap_model(shared_dir / "full", path, epochs=2, max_per_class=1000)
    return path, bitmap_categories(shared_dir / "full")


def test_batches_keep_order_and_fill_up_to_every_limit():
    def fits(group):
        strokes = [d["strokes"] for d in group if "strokes" in d]
        return (len(group) <= MAX_DRAWINGS and sum(len(s[0][0]) for s in strokes) <= MAX_POINTS
                and sum(ink_length(s) for s in strokes) <= MAX_INK_LENGTH
                and len(json.dumps({"drawings": group, "top_k": 1}, separators=(",", ":"))) <= MAX_BODY_BYTES)
    zigzag = {"strokes": [[list(range(0, 300, 3)), [(i * 7) % 50 for i in range(100)]]]}  # ~2,500 ink units
    drawings = [zigzag] * 300 + [{"strokes": [[list(range(200)), [0] * 200]]}] * 600 + [{"bitmap": [255] * 784}] * 600
    groups = list(batches(drawings))
    assert [d for g in groups for d in g] == drawings
    assert all(fits(g) for g in groups)
    assert not any(fits(g + after[:1]) for g, after in zip(groups, groups[1:]))  # each as full as it can be


def test_raw_strokes_and_official_bitmaps_agree(shared_dir, mirror_checkpoint):
    path, names = mirror_checkpoint
    with running_server(path) as url, httpx.Client(base_url=url, timeout=120) as c:
        agree, total = agreement(c, shared_dir / "full", names)
    assert total == 519
    assert agree / total >= 0.98, f"top-1 agrees on {agree}/{total}"
