"""Do raw strokes and the official bitmaps get the same label from the running service?

In ../shared/quickdraw, line i of full/raw/<name>.ndjson is row i of full/numpy_bitmap/<name>.npy:
the same drawing before and after the official rasterization. The service, given the raw strokes,
should answer as it does for the bitmap. Shared by the tests and benchmarks/bench_api.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np

from app.inputs import MAX_BODY_BYTES, MAX_DRAWINGS, MAX_INK_LENGTH, MAX_POINTS, MAX_STROKES, ink_length
from utils.data import load_bitmaps, split
from utils.strokes import read_ndjson
from utils.train import TrainConfig, train_run


def bitmap_categories(full: Path) -> list[str]:
    """The categories with an official bitmap file under full/ (17 in ../shared/quickdraw)."""
    return sorted(p.stem for p in (Path(full) / "numpy_bitmap").glob("*.npy"))


def train_bitmap_model(full: Path, out: Path, epochs: int, max_per_class: int | None, threads: int = 1) -> dict:
    """V2 trained on the first max_per_class bitmaps of every category under full/ (split seed 0), scored and
    saved to out by utils.train.train_run; its history."""
    train, val, test = split(load_bitmaps(bitmap_categories(full), root=full, max_per_class=max_per_class))
    config = TrainConfig(model="v2", epochs=epochs, seed=0, device="cpu", num_threads=threads, progress=False)
    return train_run(config, train, val, test, out).history


def batches(drawings: list[dict]) -> Iterator[list[dict]]:
    """The drawings in order, grouped into /predict batches within every limit of a request."""
    limits = np.array([MAX_STROKES, MAX_POINTS, MAX_INK_LENGTH, MAX_BODY_BYTES - 100])  # 100 bytes: the rest of the body
    batch, used = [], np.zeros(4)
    for drawing in drawings:
        cost = np.array(_cost(drawing))
        if batch and (len(batch) == MAX_DRAWINGS or np.any(used + cost > limits)):
            yield batch
            batch, used = [], np.zeros(4)
        batch.append(drawing)
        used += cost
    if batch:
        yield batch


def _cost(drawing: dict) -> tuple[int, int, float, int]:
    """What a drawing counts against a request's limits: strokes, points, ink length, JSON bytes."""
    strokes = drawing.get("strokes")
    return (len(strokes or ()), sum(len(s[0]) for s in strokes or ()), ink_length(strokes) if strokes else 0.0,
            len(json.dumps(drawing, separators=(",", ":"))) + 1)


def top_labels(client: httpx.Client, drawings: list[dict]) -> list[str]:
    """The service's top-1 label for every drawing, asked in as few requests as the limits allow."""
    labels = []
    for batch in batches(drawings):
        body = json.dumps({"drawings": batch, "top_k": 1}, separators=(",", ":"))
        answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
        answer.raise_for_status()
        labels += [result["predictions"][0]["label"] for result in answer.json()["results"]]
    return labels


def agreement(client: httpx.Client, full: Path, names: list[str]) -> tuple[int, int]:
    """(pairs with the same top-1 label, pairs) over every raw/bitmap pair of the categories."""
    raw, official = [], []
    for name in names:
        bitmaps = np.load(Path(full) / "numpy_bitmap" / f"{name}.npy", mmap_mode="r")
        for row, record in zip(bitmaps, read_ndjson(Path(full) / "raw" / f"{name}.ndjson")):
            raw.append({"strokes": record["drawing"]})
            official.append({"bitmap": row.tolist()})
    labels = top_labels(client, raw + official)
    return sum(a == b for a, b in zip(labels[:len(raw)], labels[len(raw):])), len(raw)
