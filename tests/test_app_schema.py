"""A bounded Schemathesis run against the app: positive and negative cases from its OpenAPI
document, every check (no 5xx; statuses, content types and bodies as documented; schema-valid
requests accepted, schema-invalid ones refused).

Its own module: the schema is loaded when the module is imported, and test_app's helpers are
imported by the service's worker processes, which should not start an app of their own.
"""
import json

import schemathesis
import torch

from app.api import create_app
from app.backends import TorchBackend
from app.inputs import MAX_BODY_BYTES
from app.service import Classifier
from tests.conftest import SHAPES
from tests.test_app import drawing, png
from utils.models import build_model
from utils.strokes import render, simplify


def untrained_app():
    """The app on an untrained V2 of the six shapes: what it answers, not how well it guesses."""
    torch.manual_seed(0)
    backend = TorchBackend.from_module(build_model("v2", len(SHAPES)).eval(), SHAPES, "v2", "untrained.pt")
    return create_app(Classifier(backend))


API_SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", untrained_app(), config=schemathesis.Config.from_dict({
    "seed": 1, "generation": {"mode": "all", "max-examples": 100},
    # 413: a request over a documented limit (e.g. 1,001 strokes) is refused as too large
    "checks": {"negative_data_rejection": {"expected-statuses": ["400", "413", "415", "422"]}}}))


@API_SCHEMA.hook
def filter_case(context, case):
    """Positive cases keep to what JSON Schema cannot state: a body of 1 MB at most, x, y and t of a
    stroke as long as each other."""
    if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return True
    if case.operation.path == "/predict" and len(json.dumps(case.body)) > MAX_BODY_BYTES:
        return False
    drawings = case.body.get("drawings") or [case.body]
    strokes = [s for d in drawings if isinstance(d, dict) for s in d.get("strokes") or []]
    return all(len({len(values) for values in stroke}) == 1 for stroke in strokes)


@API_SCHEMA.hook
def map_case(context, case):  # a generator cannot write a PNG: a schema-valid upload gets a real drawing
    if case.operation.path == "/predict/image" and case.meta is not None and case.meta.generation.mode.is_positive \
            and isinstance(case.body, dict) and "file" in case.body:
        case.body["file"] = png(render(simplify(drawing("circle")), side=64))
    return case


@API_SCHEMA.parametrize()
def test_schemathesis_finds_no_failure(case):
    """Positive and negative cases, every check: no 5xx, statuses and bodies as documented."""
    case.call_and_validate()
