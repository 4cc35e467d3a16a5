"""Serving beyond torch: the ONNX backend, the model shipped with the repo, the class filter and the
unsure flag, and --workers."""
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.__main__ import DEFAULT_MODEL, parse_args
from app.api import create_app
from testkit.launch import PROJECT_ROOT, running_server
from app.service import Classifier
from tests.conftest import SHAPES, shape_strokes
from utils.strokes import render, simplify

NO_TORCH = "raise ImportError('torch imported by a service given an ONNX model')\n"


def drawing(name: str, seed: int = 7):
    return shape_strokes(name, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def clients(shapes_classifier, shapes_onnx_classifier):
    with TestClient(create_app(shapes_classifier)) as on_torch, TestClient(create_app(shapes_onnx_classifier)) as on_onnx:
        yield {"torch": on_torch, "onnxruntime": on_onnx}


def everything(client, strokes) -> dict[str, float]:
    """Every class's probability for one drawing, as the service answers with top_k = all."""
    answer = client.post("/predict", json={"strokes": strokes, "top_k": len(SHAPES)}).json()
    return {p["label"]: p["probability"] for p in answer["predictions"]}


def test_onnx_and_torch_backends_answer_alike(clients):
    assert clients["onnxruntime"].get("/health").json()["backend"] == "onnxruntime"
    for name in SHAPES:
        on_torch, on_onnx = (everything(clients[k], drawing(name)) for k in ("torch", "onnxruntime"))
        assert list(on_torch) == list(on_onnx)
        np.testing.assert_allclose(list(on_torch.values()), list(on_onnx.values()), atol=1e-5)


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
@pytest.mark.parametrize("allowed", [["circle", "line", "plus"], ["zigzag", "circle"], ["line"]])
def test_class_filter_renormalizes_over_the_classes_named(clients, kind, allowed):
    client, strokes = clients[kind], drawing("circle", seed=3)
    full = everything(client, strokes)
    total = sum(full[name] for name in allowed)
    expected = sorted(((full[name] / total, name) for name in allowed), reverse=True)
    answer = client.post("/predict", json={"strokes": strokes, "classes": allowed, "top_k": 5}).json()
    assert [p["label"] for p in answer["predictions"]] == [name for _, name in expected]  # top_k capped at 3
    np.testing.assert_allclose([p["probability"] for p in answer["predictions"]], [p for p, _ in expected], atol=1e-5)
    batch = client.post("/predict", json={"drawings": [{"strokes": strokes}] * 2, "classes": allowed, "top_k": 1}).json()
    assert [r["predictions"][0]["label"] for r in batch["results"]] == [expected[0][1]] * 2


@pytest.mark.parametrize("classes, words", [
    (["circle", "wolf", "cat"], "unknown class names 'wolf', 'cat'"),
    (["wolf"], "unknown class name 'wolf'"),
    ([], "no class named"),
    (["line", "line"], "more than once"),
])
def test_class_filter_refuses_what_it_cannot_answer(clients, classes, words):
    answer = clients["onnxruntime"].post("/predict", json={"strokes": drawing("line"), "classes": classes})
    assert answer.status_code == 422
    assert words in answer.json()["detail"] and answer.json()["detail"].startswith("classes:")


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_unsure_when_the_top_probability_is_below_the_threshold(shapes_classifier, shapes_onnx_classifier, clients,
                                                                kind):
    backend = {"torch": shapes_classifier, "onnxruntime": shapes_onnx_classifier}[kind].backend
    strokes = [drawing(name, seed=5) for name in SHAPES]
    tops = backend.probabilities(np.stack([render(simplify(s)) for s in strokes])).max(axis=1)  # computed here
    threshold = float(np.median(tops))
    with TestClient(create_app(Classifier(backend, unsure_below=threshold))) as client:
        answer = client.post("/predict", json={"drawings": [{"strokes": s} for s in strokes]}).json()
        assert answer["unsure_below"] == threshold
        assert [r["unsure"] for r in answer["results"]] == [bool(t < threshold) for t in tops]
        assert 0 < sum(r["unsure"] for r in answer["results"]) < len(SHAPES)
        one = client.post("/predict", json={"strokes": strokes[0]}).json()
        assert one["unsure"] == bool(tops[0] < threshold)


def test_unsure_below_flag_is_a_probability(capsys):
    assert parse_args(["--unsure-below", "0.3"]).unsure_below == 0.3
    with pytest.raises(SystemExit):
        parse_args(["--unsure-below", "1.5"])
    assert "between 0 and 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """A PYTHONPATH on which `import torch` fails: a server that imports it cannot answer."""
    folder = tmp_path_factory.mktemp("no_torch")
    (folder / "torch").mkdir()
    (folder / "torch" / "__init__.py").write_text(NO_TORCH)
    return {"PYTHONPATH": str(folder)}


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason=f"the shipped model {DEFAULT_MODEL} is missing")
@pytest.mark.parametrize("workers", [1, 2])
def test_python_m_app_without_model_serves_the_shipped_model_without_torch(no_torch, shared_dir, workers):
    meta = Classifier.from_file(DEFAULT_MODEL).backend.metadata
    with running_server(None, "--workers", str(workers), env=no_torch, timeout=120) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        health = c.get("/health").json()
        assert health["backend"] == "onnxruntime" and health["checkpoint"] == DEFAULT_MODEL.name
        assert c.get("/classes").json()["classes"] == meta["classes"]
        assert "<canvas" in c.get("/").text
        # a real drawing: the first raw drawing of each of three categories
        names = meta["classes"][:3]
        bodies = [json.loads((shared_dir / "full" / "raw" / f"{n}.ndjson").read_text().splitlines()[0]) for n in names]
        for _ in range(3):  # several, so that with two workers both are likely asked
            answer = c.post("/predict", json={"drawings": [{"strokes": b["drawing"]} for b in bodies]}).json()
            assert len(answer["results"]) == 3
            for result in answer["results"]:
                probabilities = [p["probability"] for p in result["predictions"]]
                assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-5
                assert {p["label"] for p in result["predictions"]} <= set(meta["classes"])


def test_factory_imports_no_torch_for_an_onnx_model(shapes_onnx):
    code = (f"import sys\nfrom fastapi.testclient import TestClient\nfrom app.__main__ import build_app, parse_args\n"
            f"app = build_app(parse_args(['--model', {str(shapes_onnx)!r}]))\n"
            "with TestClient(app) as c:\n"
            "    answer = c.post('/predict', json={'strokes': [[[0, 50, 100], [0, 50, 0]]]})\n"
            "assert answer.status_code == 200, answer.text\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
