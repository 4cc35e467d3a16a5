"""The web API: in process through TestClient(create_app(...)) for what it answers, on a real socket
for slow clients, and once as `python -m app` in a subprocess."""
import asyncio
import importlib.util
import io
import json
import os
import re
import socket
import struct
import subprocess
import threading
import tracemalloc
import zlib
from functools import partial

import httpx
import jsonschema_rs
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import app.api
import app.inputs
from app.__main__ import parse_args
from testkit.agreement import agreement, batches, bitmap_categories, train_bitmap_model
from app.api import ServiceConfig, create_app
from app.inputs import (MAX_BODY_BYTES, MAX_DRAWINGS, MAX_INK_LENGTH, MAX_POINTS, MAX_STROKES, Costly, InputError,
                        draw_strokes, image_to_bitmap, ink_length, read_drawings)
from testkit.launch import app_command, free_port, running_server
from app.server import PROTOCOLS, uvicorn_config
from app.service import Batcher, Classifier, Workers
from tests.conftest import SHAPES, serving, shape_strokes
from utils.checkpoint import load_checkpoint
from utils.data import to_float
from utils.strokes import render, simplify


@pytest.fixture(scope="module")
def client(shapes_classifier):
    with TestClient(create_app(shapes_classifier)) as c:
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
    assert health == {"status": "ok", "model": "v2", "classes": len(SHAPES), "checkpoint": shapes_checkpoint.name,
                      "backend": "torch"}
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
    ("top_k fraction", {"strokes": GOOD, "top_k": 2.5}, 422, "top_k: input should be a valid integer"),
    ("top_k string", {"strokes": GOOD, "top_k": "3"}, 422, "top_k: input should be a valid integer"),
    ("empty batch", {"drawings": []}, 422, "drawings: list should have at least 1 item"),
    ("bad drawing in batch", {"drawings": [{"strokes": GOOD}, {"bitmap": [1] * 10}]}, 422,
     "drawings[1].bitmap: got 10 values"),
    ("top_k inside batch", {"drawings": [{"strokes": GOOD, "top_k": 1}]}, 422, "drawings[0].top_k: extra inputs"),
    ("null for a drawing kind", {"strokes": GOOD, "bitmap": None}, 422, "bitmap: input should be a valid array"),
    ("batch over 256", {"drawings": [{"bitmap": INK}] * 257}, 413, "too many drawings: 257 in the batch, at most 256"),
    ("field name with a newline", {"strokes": GOOD, "x\ny\r\u2028z": 1}, 422, "x\\ny\\r\\u2028z: extra inputs"),
    ("too many points", strokes_of(50_001), 413, "too many points: 50001 in the request, at most 50000"),
    ("too many points in batch", {"drawings": [strokes_of(25_001), strokes_of(25_000)]}, 413, "too many points: 50001"),
    ("too many strokes", {"strokes": [[[i], [i % 7]] for i in range(1_001)]}, 413,
     "too many strokes: 1,001 in the request, at most 1,000"),
    ("too many strokes in batch", {"drawings": [{"strokes": GOOD}] * 2 + [{"strokes": [[[i], [0]] for i in range(999)]}]},
     413, "too many strokes: 1,001 in the request"),
    ("over a count, before the values are read", {"drawings": [{"bitmap": "no"}] * 300}, 413, "too many drawings: 300"),
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
    "long.png": (lambda: encoded(Image.new("1", (8000, 1), 1), "PNG"), 413, "image too large: 8000x1"),
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
                   422, "top_k: input should be greater than or equal to 1")
    assert_problem(client.post("/predict/image", params={"top_k": 7}, files={"file": ("d.png", drawn)}),
                   422, "top_k: input should be less than or equal to 6")
    assert_problem(client.post("/predict/image", params={"top_k": "many"}, files={"file": ("d.png", drawn)}),
                   422, "top_k: input should be a valid integer")


def test_service_still_answers_after_bad_input(client, reference):
    for body in (b"{", b'{"strokes": [[[NaN], [1]]]}', b'{"bitmap": [' + b"9" * 2_000_000 + b"]}"):
        assert client.post("/predict", content=body, headers={"content-type": "application/json"}).status_code < 500
    assert client.get("/health").json()["status"] == "ok"
    strokes = drawing("zigzag", seed=11)
    answer = client.post("/predict", json={"strokes": strokes}).json()
    assert_matches(answer, reference(render(simplify(strokes))[None])[0])


# --- start-up --------------------------------------------------------------------------------------------

CHECKPOINTS = {  # a --model that is not a checkpoint -> words its one-line error must hold
    "missing": (None, "not found"),
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
        left = asyncio.ensure_future(batcher.predict_bitmaps(np.zeros((1, 28, 28), np.uint8), 1))
        stays = asyncio.ensure_future(batcher.predict_bitmaps(np.zeros((2, 28, 28), np.uint8), 1))
        await asyncio.sleep(0)  # both wait for the same forward pass
        left.cancel()  # its client went away
        with pytest.raises(RuntimeError, match="model failed"):
            await asyncio.wait_for(stays, 5)
    asyncio.run(scenario())




def test_requests_in_flight_together_share_passes_and_each_gets_its_own_answer(shapes_onnx_classifier):
    """Micro-batching: 20 requests sent at once (single drawings, batches, a class filter, a costly one
    and a wrong one) take a few forward passes, and each answer is what its drawings get alone."""
    classifier, passes = shapes_onnx_classifier, []

    class Counting:
        classes = classifier.classes
        top = classifier.top

        def probabilities(self, bitmaps):
            passes.append(len(bitmaps))
            return classifier.probabilities(bitmaps)

    names = list(SHAPES) * 3
    requests = [({"strokes": drawing(name, seed)}, [drawing(name, seed)]) for seed, name in enumerate(names[:14])]
    requests += [({"drawings": [{"strokes": drawing(n, 40 + i)} for i, n in enumerate(SHAPES[:3])], "top_k": 2},
                  [drawing(n, 40 + i) for i, n in enumerate(SHAPES[:3])]),
                 ({"strokes": drawing("plus", 50), "classes": ["circle", "line"]}, [drawing("plus", 50)]),
                 ({"drawings": [{"bitmap": render(simplify(drawing("square", 51))).ravel().tolist()}]},
                  [drawing("square", 51)]),
                 (ZIGZAG, [ZIGZAG["strokes"]]),  # over the light budget: drawn in a worker process
                 ({"strokes": [[[0, 1], [0]]]}, None)]  # wrong: its own 422, nobody else's

    async def scenario():
        workers = Workers(processes=1)
        batcher = Batcher(Counting(), workers, max_rows=64)
        try:
            return await asyncio.gather(*(batcher.predict(partial(read_drawings, json.dumps(body).encode(),
                                                                  classifier.classes), ServiceConfig().light_points)
                                          for body, _ in requests), return_exceptions=True)
        finally:
            workers.close()
    answers = asyncio.run(scenario())
    assert isinstance(answers[-1], InputError) and answers[-1].status == 422
    for (body, strokes), answer in zip(requests[:-1], answers[:-1]):
        drawings, results = answer
        allowed = None if "classes" not in body else np.array([classifier.classes.index(c) for c in body["classes"]])
        alone = [classifier.top(classifier.probabilities(render(simplify(s))[None]), drawings.top_k, allowed)[0]
                 for s in strokes]
        assert [r["predictions"][0]["label"] for r in results] == [r["predictions"][0]["label"] for r in alone]
        for got, want in zip(results, alone):
            assert {p["label"] for p in got["predictions"]} == {p["label"] for p in want["predictions"]}
            want_p = {p["label"]: p["probability"] for p in want["predictions"]}
            assert all(abs(p["probability"] - want_p[p["label"]]) < 1e-5 for p in got["predictions"])
    drawn = sum(len(strokes) for _, strokes in requests[:-1])
    assert sum(passes) == drawn and len(passes) <= 4  # the first request's pass, then the rest together


def test_a_drawing_that_cannot_be_drawn_fails_only_its_request(monkeypatch):
    failing = {"strokes": [[[0, 5e14], [0, 1]]]}
    real = app.inputs.render_raw

    def fussy(strokes, side):
        if strokes == failing["strokes"]:
            raise ValueError("out of range")
        return real(strokes, side=side)
    monkeypatch.setattr(app.inputs, "render_raw", fussy)
    monkeypatch.setattr(app.inputs, "render_raw_batch", lambda many, side: [fussy(s, side) for s in many])
    good = read_drawings(json.dumps({"strokes": drawing("line")}).encode(), list(SHAPES), draw=False)
    bad = read_drawings(json.dumps({"drawings": [{"strokes": drawing("line")}, failing]}).encode(), list(SHAPES),
                        draw=False)
    errors = draw_strokes([good, bad])
    assert errors[0] is None and good.bitmaps.any() and not good.strokes
    assert "drawings[1].strokes cannot be drawn: out of range" in str(errors[1])


def test_an_unforeseen_drawing_fault_in_a_shared_pass_stays_with_its_request(shapes_onnx_classifier, monkeypatch):
    """A drawing that fails in a way no input check foresaw (here cairo's RuntimeError) while it shares a pass:
    its request fails, the other request of the pass gets its answer."""
    classifier = shapes_onnx_classifier
    cursed, calls = drawing("plus", 7), []
    real = app.inputs.render_raw_batch

    def fragile(many, side):
        calls.append(len(many))
        if cursed in many:
            raise RuntimeError("cairo fell over")
        return real(many, side=side)
    monkeypatch.setattr(app.inputs, "render_raw_batch", fragile)
    monkeypatch.setattr(app.inputs, "render_raw", lambda strokes, side: fragile([strokes], side)[0])
    # the first request takes the first pass alone; the two behind it share the next one
    bodies = [{"strokes": drawing("line", 2)}, {"strokes": drawing("circle", 3)}, {"strokes": cursed}]

    async def scenario():
        batcher = Batcher(classifier, max_rows=64)
        return await asyncio.gather(*(batcher.predict(partial(read_drawings, json.dumps(b).encode(),
                                                              classifier.classes), ServiceConfig().light_points)
                                      for b in bodies), return_exceptions=True)
    _, good, bad = asyncio.run(scenario())
    assert calls[:2] == [1, 2]  # the fault came up in the shared pass, then each was drawn alone
    assert isinstance(bad, RuntimeError) and "cairo fell over" in str(bad)
    _, results = good
    assert results[0]["predictions"][0]["label"] == "circle"


# --- costs bounded, and off the event loop ---------------------------------------------------------------

ZIGZAG = {"strokes": [[[0, 100] * 490, [i * 0.3 for i in range(980)]]]}  # 6 KB, ~250,000 units of ink


def test_a_costly_drawing_is_drawn_in_a_worker_process(client):
    body = json.dumps(ZIGZAG).encode()
    assert len(body) < ServiceConfig().light_body_bytes and ink_length(ZIGZAG["strokes"]) < MAX_INK_LENGTH
    with pytest.raises(Costly):  # the thread only checks it, and hands it on
        read_drawings(body, list(SHAPES), budget=ServiceConfig().light_points)
    answer = client.post("/predict", json=ZIGZAG)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 5


def _pid(budget=None):
    if budget is not None:
        raise Costly
    return os.getpid()


def test_workers_run_costly_work_in_another_process():
    async def scenario():
        workers = Workers(processes=1)
        try:
            return await workers.run(_pid)
        finally:
            workers.close()
    assert asyncio.run(scenario()) != os.getpid()


def test_health_answers_while_a_request_is_being_read(shapes_classifier, monkeypatch):
    """Not a timing: the request's work is held inside the worker until /health has answered."""
    started, release = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        started.set()
        assert release.wait(60), "never released"
        return read_drawings(*args, **kwargs)
    monkeypatch.setattr(app.api, "read_drawings", held)
    with TestClient(create_app(shapes_classifier)) as c:
        done = {}
        sender = threading.Thread(target=lambda: done.update(answer=c.post("/predict", json={"strokes": drawing("plus")})))
        sender.start()
        try:
            assert started.wait(60)
            assert c.get("/health").json()["status"] == "ok"
            assert "answer" not in done  # still held: /health was answered during it
        finally:
            release.set()
            sender.join(60)
    assert done["answer"].status_code == 200


def test_forward_passes_run_beside_the_event_loop_and_split_large_batches():
    entered, release, passes = threading.Event(), threading.Event(), []

    class Held:
        classes = list(SHAPES)

        def probabilities(self, bitmaps):
            passes.append(len(bitmaps))
            entered.set()
            assert release.wait(30)
            return np.full((len(bitmaps), len(SHAPES)), 1 / len(SHAPES), np.float32)

        def top(self, probabilities, top_k, allowed=None):
            return [[len(probabilities)]] * len(probabilities)

    async def scenario():
        batcher = Batcher(Held(), max_rows=64)
        large = asyncio.ensure_future(batcher.predict_bitmaps(np.zeros((200, 28, 28), np.uint8), 1))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)  # the loop runs meanwhile
        small = asyncio.ensure_future(batcher.predict_bitmaps(np.zeros((1, 28, 28), np.uint8), 1))
        release.set()
        assert await asyncio.wait_for(small, 30) == [[1]]
        assert not large.done()  # the small request did not wait for the whole batch
        assert await asyncio.wait_for(large, 30) == [[200]] * 200
    asyncio.run(scenario())
    assert passes == [64, 1 + 63, 64, 9]


def thin_png(width: int, height: int, rows: slice, columns: slice) -> bytes:
    """A 1-bit image, white, with a black bar."""
    image = np.full((height, width), 255, np.uint8)
    image[rows, columns] = 0
    out = io.BytesIO()
    Image.fromarray(image).convert("1").save(out, "PNG")
    return out.getvalue()


def test_thin_image_never_costs_a_square_of_its_long_side():
    data = thin_png(8192, 512, slice(250, 262), slice(100, 8000))  # a few KB, at every image limit
    tracemalloc.start()
    try:
        bitmap = image_to_bitmap(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64e6, f"{peak / 1e6:.0f} MB"  # a float32 square of 8192 would be 268 MB
    rows = np.nonzero(bitmap.any(axis=1))[0]
    columns = np.nonzero(bitmap.any(axis=0))[0]
    assert columns.min() <= 2 and columns.max() >= 25  # framed as the official data: ink spans ~25 of 28
    assert set(rows) <= {13, 14}  # a thin bar, centred


def test_thin_image_with_ink_is_framed_or_refused_never_blank(client):
    answer = client.post("/predict/image", files={"file": ("bar.png", thin_png(4000, 250, slice(100, 130),
                                                                              slice(0, 4000)))})
    assert answer.status_code == 200
    assert np.array(answer.json()["bitmap"]).reshape(28, 28)[13:15, 2:26].max(axis=0).min() > 0  # a bar across
    dots = thin_png(8000, 500, slice(250, 251), slice(0, 8000, 7999))  # two pixels 8,000 apart: nothing at 28x28
    assert_problem(client.post("/predict/image", files={"file": ("dots.png", dots)}), 422, "too thin or faint to show")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_exif(exif: bytes) -> bytes:
    data = png(np.full((20, 20), 255, np.uint8))
    return data[:33] + png_chunk(b"eXIf", exif) + data[33:]  # after the signature and IHDR


@pytest.mark.parametrize("size, words", [
    ((25_000_000, 1), "image too large: 25000000x1"), ((10_000, 10), "image too large"),
    ((8_193, 1_000), "8,192 on a side"), ((5_000, 5_000), "at most 16,777,216 pixels")])
def test_image_limits_answer_413_before_decoding(size, words):
    header = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", *size, 1, 0, 0, 0, 0)) + png_chunk(b"IEND", b"")
    with pytest.raises(InputError) as refused:  # the header alone tells: no pixel data follows
        image_to_bitmap(header)
    assert refused.value.status == 413 and words in str(refused.value)


def test_malformed_exif_is_415(client):
    assert_problem(client.post("/predict/image", files={"file": ("e.png", png_with_exif(b"XX\x00\x2a\x00\x00\x00\x08"))}),
                   415, "unreadable image")


# --- the OpenAPI document is what the service does ---------------------------------------------------------

def test_openapi_states_every_answer_and_the_request_rule(client):
    assert client.get("/redoc").status_code == 404  # ReDoc would fetch its logo from another host
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/predict/image", "/health", "/classes"} <= set(spec["paths"])
    for path in ("/predict", "/predict/image"):
        answers = spec["paths"][path]["post"]["responses"]
        assert set(answers) == {"200", "400", "408", "413", "415", "422"}
        for status in ("400", "408", "413", "415", "422"):
            assert answers[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorAnswer"}
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]

    def valid(document) -> bool:
        return jsonschema_rs.validator_for(body | {"components": spec["components"]}).is_valid(document)
    assert [valid(b) for b in ({}, {"strokes": GOOD, "bitmap": INK}, {"top_k": 2}, {"bitmap": BLANK},
                               {"drawings": [{"bitmap": INK}] * 257})] == [False] * 5
    assert [valid(b) for b in ({"strokes": GOOD}, {"bitmap": INK, "top_k": 6}, {"drawings": [{"bitmap": INK}]})] == [True] * 3
    error = client.post("/predict/image", params={"top_k": "many"}, files={"file": ("d.png", b"x")})
    assert error.status_code == 422
    assert jsonschema_rs.validator_for({"$ref": "#/components/schemas/ErrorAnswer"} | {"components": spec["components"]}
                                       ).is_valid(error.json())


# --- slow clients --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(PROTOCOLS))
def impatient_server(request, shapes_classifier):
    """The app with 1 s timeouts, on each HTTP parser installed (h11, and httptools where it is)."""
    config = ServiceConfig(body_timeout=1.0, idle_timeout=1.0)
    with serving(create_app(shapes_classifier, config), config, http=request.param) as url:
        yield url


def test_the_fastest_parser_and_loop_installed_serve_by_default():
    config = uvicorn_config("app.api:create_app", "127.0.0.1", 8000, ServiceConfig())
    fastest = "httptools" if importlib.util.find_spec("httptools") else "h11"
    assert config.http.func is PROTOCOLS[fastest] and config.loop == "auto"  # auto: uvloop where installed
    with pytest.raises(ValueError, match="not installed"):
        uvicorn_config("app.api:create_app", "127.0.0.1", 8000, ServiceConfig(), http="picohttp")


def raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_idle_connection_is_closed(impatient_server):
    with raw_connection(impatient_server) as sock:
        assert read_all(sock) == b""  # closed by the server (a hang would be the 30 s socket timeout)


def test_slow_request_head_gets_408(impatient_server):
    with raw_connection(impatient_server) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request head not received in time" in answer


def test_abandoned_body_gets_408_and_the_connection_closes(impatient_server):
    with raw_connection(impatient_server) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"strokes": [[[1, 2')
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    assert json.loads(body) == {"detail": "request body not received within 1 s"}
    assert httpx.get(f"{impatient_server}/health").status_code == 200


def test_keep_alive_connection_is_closed_once_idle(impatient_server):
    with raw_connection(impatient_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1


# --- python -m app ----------------------------------------------------------------------------------------------

def test_python_m_app_serves_over_http(shapes_checkpoint, reference):
    strokes = drawing("circle")
    with running_server(shapes_checkpoint, "--idle-timeout", "2") as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").json()["checkpoint"] == shapes_checkpoint.name
        assert_matches(c.post("/predict", json={"strokes": strokes}).json(), reference(render(simplify(strokes))[None])[0])
        assert c.post("/predict", json=ZIGZAG).status_code == 200  # through the worker process
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
        return (len(group) <= MAX_DRAWINGS and sum(len(s) for s in strokes) <= MAX_STROKES
                and sum(len(stroke[0]) for s in strokes for stroke in s) <= MAX_POINTS
                and sum(ink_length(s) for s in strokes) <= MAX_INK_LENGTH
                and len(json.dumps({"drawings": group, "top_k": 1}, separators=(",", ":"))) <= MAX_BODY_BYTES)
    zigzag = {"strokes": [[list(range(0, 300, 3)), [(i * 7) % 50 for i in range(100)]]]}  # ~2,500 ink units
    dots = {"strokes": [[[i], [i % 5]] for i in range(40)]}
    drawings = [zigzag] * 300 + [{"strokes": [[list(range(200)), [0] * 200]]}] * 600 + [dots] * 60 + \
        [{"bitmap": [255] * 784}] * 600
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
