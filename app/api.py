"""HTTP routes: the drawing page, /predict (strokes or bitmaps, one or many), /predict/image.

Every input goes through app.inputs off the event loop (app.service.Batcher, and app.service.Workers
for the costly ones); whatever is wrong with it answers 4xx with a one-line message naming the
problem, and the service keeps serving.
Slow clients are bounded too: a body must arrive within body_timeout (408), and the server closes
connections that stay idle or send their request head too slowly (app.server).
"""

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.inputs import (MAX_BODY_BYTES, SIDE, Drawing, InputError, PredictRequest, problems, read_drawings,
                        read_image)
from app.service import Batcher, Classifier, Workers

STATIC = Path(__file__).parent / "static"


@dataclass
class ServiceConfig:
    """How the service bounds its work and its clients (python -m app sets these from its flags)."""
    body_timeout: float = 10.0    # seconds for a request body to arrive in full (else 408)
    idle_timeout: float = 5.0     # seconds a connection may wait for, or send, a request head (app.server)
    processes: int = 1            # costly requests read and drawn at once in worker processes
    light_body_bytes: int = 16_384  # larger bodies go straight to a worker process
    light_points: int = 20_000    # points to resample (ink length + points) the batch thread draws; more: a process
    light_pixels: int = 262_144   # image pixels the batch thread decodes (512 x 512); more: a process
    pass_rows: int = 16           # drawings per forward pass: what a large batch can delay a small request by


# --- what the routes answer (for the OpenAPI document) ---------------------------------------------------

class Prediction(BaseModel):
    label: str
    probability: float


class Predictions(BaseModel):
    predictions: list[Prediction] = Field(description="most probable first")
    unsure: bool = Field(description="the top probability is below unsure_below: show the guess as a guess")


class Answer(BaseModel):
    model: str
    unsure_below: float = Field(description="the threshold of `unsure` (python -m app --unsure-below)")


class PredictAnswer(Predictions, Answer):
    pass


class BatchAnswer(Answer):
    results: list[Predictions] = Field(description="one per drawing, in the order sent")


class ImageAnswer(PredictAnswer):
    bitmap: list[int] = Field(min_length=SIDE * SIDE, max_length=SIDE * SIDE,
                              description="the 784 values (0..255, row by row) the image became")


class Health(BaseModel):
    status: str
    model: str
    classes: int
    checkpoint: str = Field(description="the model file's name")
    backend: str = Field(description="onnxruntime or torch")


class Classes(BaseModel):
    classes: list[str]


class Problem(BaseModel):
    loc: str = Field(description="where in the request, e.g. strokes[0][1][3]")
    message: str


class ErrorAnswer(BaseModel):
    detail: str = Field(description="one line naming the problem")
    errors: list[Problem] | None = Field(None, description="the problems by location (the first 50)")


def _errors(*statuses: int) -> dict:
    reasons = {400: "a malformed JSON or multipart body", 408: "the request body did not arrive in time",
               413: "over a limit (see the README's table)", 415: "a body that is not JSON, or not a PNG or JPEG",
               422: "a drawing or parameter that is wrong or empty"}
    return {s: {"model": ErrorAnswer, "description": reasons[s]} for s in statuses}


# --- middleware --------------------------------------------------------------------------------------------

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


class BodyTimeout:
    """Answer 408 (and close the connection) when a request body has not arrived in full within
    `seconds` of the first read: a client that stops half-way holds nothing for long."""

    def __init__(self, app: ASGIApp, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline, complete = None, False

        async def timed() -> Message:
            nonlocal deadline, complete
            if complete:  # after the body: a wait for the client to go away, not a read
                return await receive()
            deadline = deadline or asyncio.get_running_loop().time() + self.seconds
            try:
                async with asyncio.timeout_at(deadline):  # no task per read, as wait_for would make
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


def _too_large(limit: int) -> JSONResponse:
    # the rest of the body is not read: the connection cannot carry another request
    return _error(413, f"request body too large: at most {limit:,} bytes (1 MB)", connection="close")


def _error(status: int, detail: str, errors: list[dict] | None = None, **headers) -> JSONResponse:
    body = {"detail": detail} | ({"errors": errors} if errors is not None else {})
    return JSONResponse(body, status_code=status, headers=headers or None)


# --- the application ---------------------------------------------------------------------------------

def create_app(classifier: Classifier, config: ServiceConfig | None = None) -> FastAPI:
    """The FastAPI application serving one loaded classifier."""
    config = config or ServiceConfig()
    n_classes = len(classifier.classes)
    workers = Workers(config.processes)
    batcher = Batcher(classifier, workers, config.pass_rows)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await workers.start()
        try:
            yield
        finally:
            workers.close()

    # /docs with Swagger UI's files served here, not from a CDN: it works offline. No /redoc: ReDoc
    # fetches its logo from its vendor's site.
    app = FastAPIOffline(title="Quick, Draw! doodle classifier", static_url="/docs-static", redoc_url=None,
                         lifespan=lifespan,
                         description="Draw on / or POST strokes, bitmaps or images to get the most likely labels.")
    app.add_middleware(BodyTimeout, seconds=config.body_timeout)
    app.add_middleware(BodyLimit)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return _error(exc.status, str(exc), exc.errors)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if exc.status_code == 413:  # raised by BodyLimit while the body streams in
            return _too_large(MAX_BODY_BYTES)
        if exc.status_code == 408:  # raised by BodyTimeout; the rest of the body will not be read
            return _error(408, f"request body not received within {config.body_timeout:g} s", connection="close")
        return _error(exc.status_code, str(exc.detail), **(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _request_error(request: Request, exc: RequestValidationError):
        error = problems(exc.errors())
        return _error(error.status, str(error), error.errors)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health", response_model=Health)
    async def health():
        return {"status": "ok", "model": classifier.name, "classes": n_classes, "checkpoint": classifier.path.name,
                "backend": classifier.backend.kind}

    @app.get("/classes", response_model=Classes)
    async def classes():
        return {"classes": classifier.classes}

    @app.post("/predict", response_model=PredictAnswer | BatchAnswer, responses=_errors(400, 408, 413, 415, 422),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/PredictRequest"}}}}})
    async def predict(request: Request):
        """One drawing -> {"predictions": [...]}; {"drawings": [...]} -> {"results": [...]}, one forward pass."""
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            raise InputError(f"Content-Type must be application/json, got {content_type!r}", 415)
        raw = await request.body()
        light = config.light_points if len(raw) <= config.light_body_bytes else None
        drawings, results = await batcher.predict(partial(read_drawings, raw, classifier.classes), light)
        answer = {"model": classifier.name, "unsure_below": classifier.unsure_below}
        # plain JSON types already: skip FastAPI's encoder, it costs per request
        return JSONResponse(answer | ({"results": results} if drawings.batch else results[0]))

    @app.post("/predict/image", response_model=ImageAnswer, responses=_errors(400, 408, 413, 415, 422))
    async def predict_image(file: Annotated[UploadFile, File(description="a PNG or JPEG drawing")],
                            top_k: Annotated[int, Query(ge=1, le=n_classes, description="labels to answer; default 5")] = None):
        """An image of a drawing, any polarity and size -> predictions and the 28x28 bitmap it became."""
        k = min(5, n_classes) if top_k is None else top_k
        drawings, results = await batcher.predict(partial(read_image, await file.read(), k), config.light_pixels)
        return JSONResponse(results[0] | {"model": classifier.name, "unsure_below": classifier.unsure_below,
                                          "bitmap": drawings.bitmaps[0].ravel().tolist()})

    default_openapi = app.openapi

    def openapi():  # the /predict body is validated by hand (with the class count), so add its schema
        if app.openapi_schema is None:
            schema = default_openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            models = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(models.pop("$defs", {}))
            models["properties"]["top_k"]["maximum"] = n_classes
            models["properties"]["classes"]["items"] = {"type": "string", "enum": classifier.classes}
            components["Drawing"] = exactly_one_of(components["Drawing"], Drawing.kinds)
            components["PredictRequest"] = exactly_one_of(models, PredictRequest.kinds)
            upload = schema["paths"]["/predict/image"]["post"]["requestBody"]["content"]["multipart/form-data"]
            upload["encoding"] = {"file": {"contentType": "image/png, image/jpeg"}}
        return app.openapi_schema

    app.openapi = openapi
    return app


def exactly_one_of(schema: dict, kinds: tuple[str, ...]) -> dict:
    """An object schema with optional fields `kinds` -> oneOf objects holding exactly one of them
    (and every other field), no other property: the rule the service applies."""
    shared = {k: v for k, v in schema["properties"].items() if k not in kinds}
    for value in schema["properties"].values():
        value.pop("default", None)  # a null default JSON cannot send
    return {"title": schema["title"], "description": schema.get("description", ""), "oneOf": [
        {"title": f"{schema['title']} with {kind}", "type": "object", "required": [kind],
         "properties": {kind: schema["properties"][kind], **shared}, "additionalProperties": False}
        for kind in kinds]}
