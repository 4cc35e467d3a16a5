"""HTTP routes: the drawing page, /predict (strokes or bitmaps, one or many), /predict/image.

Every request body goes through one validation path (PredictRequest); whatever is wrong with it
answers 4xx with a message naming the problem, and the service keeps serving.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import (AfterValidator, AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, Strict,
                      ValidationError, ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.service import SIDE, Batcher, Classifier, InputError, image_to_bitmap, ink_length, strokes_to_bitmap

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1_000_000
# Bodies up to this size (nearly every single drawing) are read on the event loop, in at most ~25 ms:
# a hop to a thread would cost more than reading them, and halves throughput under load (fewer
# requests wait together to share a forward pass). A larger body can take a second to read.
INLINE_BODY_BYTES = 8_192
MAX_POINTS = 50_000
MAX_STROKES = 1_000  # per drawing; the most in any drawing of the dataset is 55, and each costs time to draw
# Simplifying costs time in proportion to the strokes' length at the 0..255 scale; the longest of
# the 9,570 raw drawings of the dataset runs ~36,000 units, a scribble can run millions.
MAX_INK_LENGTH = 250_000
MAX_DRAWINGS = 256
MAX_STROKE_VALUE = 1e15  # keeps squared distances finite in float64
DEFAULT_TOP_K = 5

Number = Annotated[float, Strict(), AllowInfNan(False)]  # strict: no bools, no numeric strings
StrokeValue = Annotated[Number, Field(ge=-MAX_STROKE_VALUE, le=MAX_STROKE_VALUE)]
Pixel = Annotated[Number, Field(ge=0, le=255)]


def _same_lengths(stroke: list[list[float]]) -> list[list[float]]:
    lengths = [len(values) for values in stroke]
    if len(set(lengths)) > 1:
        names = "x, y and t" if len(stroke) == 3 else "x and y"
        raise ValueError(f"{names} lists differ in length ({', '.join(map(str, lengths))})")
    if lengths[0] == 0:
        raise ValueError("stroke has no points")
    return stroke


def _rows_to_values(value):
    """28 rows of 28 -> 784 values row by row; anything else is left for the flat checks."""
    rows = [isinstance(row, list) for row in value] if isinstance(value, list) else []
    if any(rows) and not all(rows):  # else the flat checks would report each row as a bad number
        raise ValueError(f"mixes rows and numbers: give {SIDE * SIDE} numbers, or {SIDE} rows of {SIDE} numbers")
    if any(rows):
        if len(value) != SIDE or any(len(row) != SIDE for row in value):
            shape = f"{len(value)} rows of lengths {sorted({len(row) for row in value})}"
            raise ValueError(f"a nested bitmap must be {SIDE} rows of {SIDE} values, got {shape}")
        return [v for row in value for v in row]
    return value


def _bitmap_length(values: list[float]) -> list[float]:
    if len(values) != SIDE * SIDE:
        raise ValueError(f"got {len(values)} values; expected {SIDE * SIDE} ({SIDE}x{SIDE})")
    return values


Stroke = Annotated[list[list[StrokeValue]], Field(min_length=2, max_length=3), AfterValidator(_same_lengths)]
Bitmap = Annotated[list[Pixel], BeforeValidator(_rows_to_values), AfterValidator(_bitmap_length),
                   Field(description=f"{SIDE * SIDE} values 0..255 row by row, or {SIDE} rows of {SIDE}")]


def check_top_k(top_k: int | None, n_classes: int) -> int:
    """The number of labels to answer: default 5 (or every class if fewer), at most every class."""
    if top_k is None:
        return min(DEFAULT_TOP_K, n_classes)
    if not 1 <= top_k <= n_classes:
        raise PydanticCustomError("top_k_range", "top_k must be between 1 and {n} (the number of classes), got {k}",
                                  {"n": n_classes, "k": top_k})
    return top_k


class Drawing(BaseModel):
    """One drawing: raw canvas strokes, or a 28x28 bitmap (white ink on black, as the official data)."""
    model_config = ConfigDict(extra="forbid")
    kinds: ClassVar[tuple[str, ...]] = ("strokes", "bitmap")

    strokes: list[Stroke] | None = Field(None, description="per stroke [[x...], [y...]] or [[x...], [y...], [t...]]")
    bitmap: Bitmap | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in self.kinds if getattr(self, k) is not None]
        if len(given) != 1:
            names = " or ".join(repr(k) for k in self.kinds)
            raise ValueError(f"give exactly one of {names}" + (f", not {' and '.join(given)}" if given else ""))
        if self.strokes == []:
            raise ValueError("empty drawing: 'strokes' holds no stroke")
        if self.bitmap is not None and not self.to_bitmap().any():  # as the model would see it
            raise ValueError("empty drawing: the bitmap has no ink (every value rounds to 0)")
        return self

    def points(self) -> int:
        return sum(len(stroke[0]) for stroke in self.strokes or ())

    def to_bitmap(self) -> np.ndarray:
        """uint8 (28,28)."""
        if self.strokes is not None:
            return strokes_to_bitmap(self.strokes)
        return np.rint(np.asarray(self.bitmap, dtype=np.float32)).astype(np.uint8).reshape(SIDE, SIDE)


class PredictRequest(Drawing):
    """Body of POST /predict: one drawing, or a batch of them under "drawings"."""
    kinds: ClassVar[tuple[str, ...]] = ("strokes", "bitmap", "drawings")

    drawings: Annotated[list[Drawing], Field(min_length=1, max_length=MAX_DRAWINGS)] | None = None
    top_k: Annotated[int, Strict()] | None = Field(None, description="labels per drawing; default 5")

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, top_k, info: ValidationInfo):
        return check_top_k(top_k, info.context["n_classes"]) if top_k is not None else top_k

    @model_validator(mode="after")
    def _size_limits(self):
        for i, drawing in enumerate(self.items()):
            if len(drawing.strokes or ()) > MAX_STROKES:
                which = "the drawing" if self.drawings is None else f"drawings[{i}]"
                raise PydanticCustomError("too_large", f"too many strokes: {which} has {len(drawing.strokes):,}, "
                                          f"at most {MAX_STROKES:,} per drawing")
        points = sum(d.points() for d in self.items())
        if points > MAX_POINTS:
            raise PydanticCustomError("too_large", f"too many points: {points} in the request, at most {MAX_POINTS}")
        length = sum(ink_length(d.strokes) for d in self.items() if d.strokes)
        if length > MAX_INK_LENGTH:
            raise PydanticCustomError("too_large", f"strokes too long: they run {length:,.0f} units at the 0..255 "
                                      f"scale of a simplified drawing, at most {MAX_INK_LENGTH:,}")
        return self

    def items(self) -> list[Drawing]:
        return self.drawings if self.drawings is not None else [self]


def read_drawings(body: bytes, n_classes: int) -> tuple[PredictRequest, np.ndarray]:
    """A /predict body -> the request and its drawings as uint8 bitmaps (N,28,28)."""
    request = PredictRequest.model_validate_json(body, context={"n_classes": n_classes})
    return request, np.stack([d.to_bitmap() for d in request.items()])


class BodyLimit:
    """Answer 413 to a body over max_bytes, told by its Content-Length or by the bytes that arrive.

    (FastAPI's own max_body_size answers a bare "Content Too Large" in plain text; clients of this
    API always get JSON with the limit named.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(self.max_bytes)(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # chunked, or more than announced: stop reading here
                raise HTTPException(413)
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"request body too large: at most {limit:,} bytes (1 MB)")


def _error(status: int, detail: str, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


def _where(loc) -> str:
    """('strokes', 0, 1, 3) -> 'strokes[0][1][3]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _validation_answer(errors: list[dict]) -> JSONResponse:
    """Pydantic errors -> 400 (not JSON), 413 (too many points or too long) or 422, one readable message."""
    problems = []
    for e in errors:
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("json_invalid", "json_type"):
            message = f"malformed JSON: {e.get('ctx', {}).get('error', message)}"
        elif e["type"] == "finite_number":  # the JSON parser reads NaN and Infinity; they are refused here
            message = "must be a finite number: NaN and Infinity are not allowed"
        problems.append({"loc": _where(e["loc"]), "message": message})
    types = {e["type"] for e in errors}
    status = 400 if types & {"json_invalid", "json_type"} else 413 if "too_large" in types else 422
    return _error(status, "; ".join(f"{p['loc']}: {p['message']}" for p in problems[:5]), errors=problems[:50])


def create_app(classifier: Classifier) -> FastAPI:
    """The FastAPI application serving one loaded classifier."""
    # /docs with Swagger UI's files served here, not from a CDN: it works offline. No /redoc: ReDoc
    # fetches its logo from its vendor's site.
    app = FastAPIOffline(title="Quick, Draw! doodle classifier", static_url="/docs-static", redoc_url=None,
                         description="Draw on / or POST strokes, bitmaps or images to get the most likely labels.")
    app.add_middleware(BodyLimit)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    n_classes = len(classifier.classes)
    batcher = Batcher(classifier)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return _error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if exc.status_code == 413:  # raised by BodyLimit while the body streams in
            return _too_large(MAX_BODY_BYTES)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _request_error(request: Request, exc: RequestValidationError):
        return _validation_answer(exc.errors())

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": classifier.name, "classes": n_classes, "checkpoint": classifier.path.name}

    @app.get("/classes")
    async def classes():
        return {"classes": classifier.classes}

    @app.post("/predict", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/PredictRequest"}}}}})
    async def predict(request: Request):
        """One drawing -> {"predictions": [...]}; {"drawings": [...]} -> {"results": [...]}, one forward pass."""
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            return _error(415, f"Content-Type must be application/json, got {content_type!r}")
        raw = await request.body()
        try:
            if len(raw) <= INLINE_BODY_BYTES:
                body, bitmaps = read_drawings(raw, n_classes)
            else:  # not on the event loop: every other request would wait
                body, bitmaps = await run_in_threadpool(read_drawings, raw, n_classes)
        except ValidationError as e:
            return _validation_answer(e.errors(include_input=False))
        top_k = check_top_k(body.top_k, n_classes)
        results = await batcher.predict(bitmaps, top_k)
        if body.drawings is None:  # plain JSON types already: skip FastAPI's encoder, it costs per request
            return JSONResponse({"predictions": results[0], "model": classifier.name})
        return JSONResponse({"results": [{"predictions": r} for r in results], "model": classifier.name})

    @app.post("/predict/image")
    async def predict_image(file: Annotated[UploadFile, File(description="a PNG or JPEG drawing")],
                            top_k: Annotated[int | None, Query(description="labels to answer; default 5")] = None):
        """An image of a drawing, any polarity and size -> predictions and the 28x28 bitmap it became."""
        try:
            k = check_top_k(top_k, n_classes)
        except PydanticCustomError as e:
            return _error(422, f"top_k: {e.message()}")
        bitmap = await run_in_threadpool(image_to_bitmap, await file.read())  # decoding may take a while
        predictions = (await batcher.predict(bitmap[None], k))[0]
        return {"predictions": predictions, "model": classifier.name, "bitmap": bitmap.ravel().tolist()}

    default_openapi = app.openapi

    def openapi():  # the /predict body is validated by hand (with the class count), so add its schema
        if app.openapi_schema is None:
            schema = default_openapi()
            models = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(models.pop("$defs", {}))
            components["PredictRequest"] = models
        return app.openapi_schema

    app.openapi = openapi
    return app
