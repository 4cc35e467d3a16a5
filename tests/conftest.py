"""Fixtures shared by every test file: the real-data prefix mirror beside the project, served over
HTTP, and the web API on a model of six simple shapes (in process, or on a real socket)."""
import math
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import uvicorn

from app.api import ServiceConfig, create_app
from app.server import uvicorn_config
from app.service import Classifier
from testkit.mirror import SHARED_DIR, serve
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.io import atomic_write
from utils.data import QuickDrawSet
from utils.models import build_model
from utils.strokes import render, simplify
from utils.train import TrainConfig, fit


@pytest.fixture(scope="session")
def shared_dir():
    """../shared/quickdraw (read-only); the test is skipped where it is absent."""
    if not (SHARED_DIR / "full").is_dir():
        pytest.skip(f"../shared/quickdraw not found: {SHARED_DIR} is absent (tests on real drawings need it)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def mirror_url(shared_dir):
    """http://127.0.0.1:PORT/ serving ../shared/quickdraw with Range support, for the whole session."""
    with serve(shared_dir) as server:
        yield server.url


# --- six shapes drawn as a pointer would, and a model that tells them apart ----------------------------

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
    if not path.exists():
        config = TrainConfig(model="v2", epochs=4, batch_size=32, seed=0, device="cpu", num_threads=1, progress=False)
        model = build_model("v2", len(SHAPES))
        history = fit(model, shapes_set(80, seed=0), shapes_set(10, seed=1), config)
        save_checkpoint(path, model, "v2", list(SHAPES), config, history)
    return path


@pytest.fixture(scope="session")
def shapes_onnx(shapes_checkpoint):
    """The shapes model exported to ONNX as utils.export writes it (metadata included)."""
    from utils.export import to_onnx, with_metadata
    path = shapes_checkpoint.with_suffix(".onnx")
    if not path.exists():
        model, ckpt = load_checkpoint(shapes_checkpoint)
        with atomic_write(path) as f:
            f.write(with_metadata(to_onnx(model), dict(classes=ckpt["classes"], model_name=ckpt["model_name"])))
    return path


@pytest.fixture(scope="session")
def shapes_classifier(shapes_checkpoint):
    return Classifier.from_file(shapes_checkpoint)


@pytest.fixture(scope="session")
def shapes_onnx_classifier(shapes_onnx):
    return Classifier.from_file(shapes_onnx)


@contextmanager
def serving(app, config: ServiceConfig, **options):
    """Yield the URL of app served by uvicorn (as python -m app serves it) in a thread, on 127.0.0.1.
    options: more of app.server.uvicorn_config's (http="h11", ...)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", sock.getsockname()[1], config, log_level="warning",
                                           **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def server(shapes_classifier):
    """The app on the shapes model, on a real socket."""
    config = ServiceConfig()
    with serving(create_app(shapes_classifier, config), config) as url:
        yield url
