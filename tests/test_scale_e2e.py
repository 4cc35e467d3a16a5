"""All 345 categories end to end on the mirror's strokes: render, pack, train one short epoch, serve.

A check of the plumbing at full width (345 classes), not of accuracy: the mirror has 25 simplified drawings
of 344 categories and 11-114 raw ones of all 345 (zigzag has no simplified file).
"""
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api import create_app
from app.service import Classifier
from utils.download import bitmap_path
from utils.pack import PackedSet, pack
from utils.strokes import iter_ndjson, render_file
from utils.train import history_path, main as train_main

pytest.importorskip("cairocffi", reason="rendering strokes needs cairocffi and the cairo library")


def render_all(shared, root) -> tuple[list[str], dict[str, str]]:
    """<root>/numpy_bitmap/<name>.npy for every category: simplified strokes where the mirror has them, else
    raw ones simplified. Returns (names, the kind used per name)."""
    names = (shared / "categories.txt").read_text().splitlines()
    kinds = {}
    for name in names:
        simplified = shared / "full" / "simplified" / f"{name}.ndjson"
        kinds[name] = "simplified" if simplified.is_file() else "raw"
        path = bitmap_path(root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, render_file(shared / "full" / kinds[name] / f"{name}.ndjson", kinds[name]))
    return names, kinds


def test_345_categories_render_pack_train_and_serve(shared_dir, tmp_path):
    names, kinds = render_all(shared_dir, tmp_path / "data")
    assert len(names) == 345 and [n for n, k in kinds.items() if k == "raw"] == ["zigzag"]

    out = pack(names, tmp_path / "data", tmp_path / "packed" / "all", progress=False)
    ps = PackedSet.open(out, verify=True)
    assert ps.classes == names and (ps.train.counts() > 0).all()

    ckpt = tmp_path / "models" / "all.pt"
    result = train_main(["--model", "v1", "--packed", str(out), "--epochs", "1", "--batch-size", "64",
                         "--out", str(ckpt), "--no-progress", "--num-threads", "1", "--device", "cpu", "--no-bf16",
                         "--no-channels-last"])
    assert result["epochs"] == 1 and result["test"]["n"] == len(ps.test) and result["val"]["n"] == len(ps.val)
    history = json.loads(history_path(ckpt).read_text())
    assert history["data"]["packed"] == str(out.resolve()) and history["train_images"] == len(ps.train)

    with TestClient(create_app(Classifier.from_checkpoint(ckpt))) as client:
        classes = client.get("/classes")
        assert classes.status_code == 200 and classes.json()["classes"] == names
        raw = next(iter_ndjson(shared_dir / "full" / "raw" / "zigzag.ndjson"))["drawing"]
        answer = client.post("/predict", json={"strokes": raw, "top_k": 5})
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert len(predictions) == 5 and {p["label"] for p in predictions} <= set(names)
        assert client.post("/predict", json={"strokes": "not strokes"}).status_code == 422
        assert client.get("/health").status_code == 200  # still serving after a bad request
