"""Request bodies to 28x28 uint8 bitmaps: the limits, the validation, strokes and images.

Nothing here imports torch: these functions also run in the service's worker process, which
takes the requests too costly to share the server's interpreter (see app.service.Workers).
Every problem with an input is an InputError carrying the HTTP status to answer and a one-line
message naming what is wrong.
"""
from __future__ import annotations

import io
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import numpy as np
from PIL import Image, ImageOps
from pydantic import (AfterValidator, AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, Strict,
                      ValidationError, ValidationInfo, WithJsonSchema, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from utils.formats import SIDE
from utils.strokes import render_raw, render_raw_batch

# Limits per request. Each bounds a cost in time or memory; going over one answers 413.
MAX_BODY_BYTES = 1_000_000
MAX_DRAWINGS = 256
MAX_POINTS = 50_000
# Strokes in all the drawings of a request: each costs ~0.1 ms to check, simplify and draw, whatever its
# length; the most in any drawing of the dataset is 55.
MAX_STROKES = 1_000
# Simplifying resamples every stroke at one point per unit of its length at the 0..255 scale, so
# its time grows with that length; the longest of the 9,570 raw drawings of the dataset runs
# ~36,000 units, a scribble can run millions.
MAX_INK_LENGTH = 250_000
MAX_STROKE_VALUE = 1e15  # keeps squared distances finite in float64
MAX_IMAGE_PIXELS = 16_777_216  # 4096 x 4096 decoded
MAX_IMAGE_SIDE = 8_192
MAX_IMAGE_ASPECT = 16  # longest side over shortest
DEFAULT_TOP_K = 5
# An uploaded image is framed at this resolution at most (longest side, after box averaging):
# the framing step then costs the same for every larger image, and 28x28 needs no more.
WORK_SIDE = 2_048
# The official rasterization (see utils.strokes.render): the simplified drawing spans 255 units,
# strokes 16 units wide, on a 256 + 2*16 + 16 = 304-unit frame, centred. An uploaded image is
# framed the same way: its ink box, strokes included, becomes 271/304 of the side, centred.
INK_SIDE = SIDE * (255 + 16) / (256 + 2 * 16 + 16)  # ~24.96 px


class InputError(ValueError):
    """An input the service refuses: status is the HTTP code, errors the problems by location."""

    def __init__(self, message: str, status: int = 422, errors: list[dict] | None = None):
        super().__init__(one_line(message))
        self.status, self.errors = status, errors

    def __reduce__(self):  # raised in the worker process, answered by the server
        return type(self), (str(self), self.status, self.errors)


class Costly(Exception):
    """The input costs more than the budget it was given: the caller hands it to the worker process."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str, limit: int = 2_000) -> str:
    """Control characters (newlines among them) escaped, and the text cut to a readable length."""
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def worker_started() -> None:
    """A worker process's start (app.service.Workers): a lower CPU priority, so that ordinary requests
    keep theirs, cairo loaded, and an end of its own when the server is gone."""
    os.nice(10)
    strokes_to_bitmap([[[0, 10, 20], [0, 20, 0]]])
    parent = os.getppid()

    def orphaned():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)
    threading.Thread(target=orphaned, daemon=True).start()


# --- strokes and bitmaps -----------------------------------------------------------------------------

def ink_length(strokes: list[list[list[float]]]) -> float:
    """Total stroke length at the 0..255 scale simplify brings a drawing to: the points it resamples."""
    xy = np.concatenate([np.asarray(stroke[:2], dtype=np.float64) for stroke in strokes], axis=1)  # (2,N)
    extent = np.ptp(xy, axis=1).max()
    if extent == 0:
        return 0.0
    d = np.diff(xy, axis=1)
    step = np.hypot(d[0], d[1])  # (N-1,)
    step[np.cumsum([len(stroke[0]) for stroke in strokes[:-1]], dtype=np.int64) - 1] = 0  # no ink between strokes
    return float(step.sum() * 255 / extent)


def strokes_to_bitmap(strokes: list[list[list[float]]]) -> np.ndarray:
    """Raw canvas strokes [[x...], [y...](, [t...])] -> uint8 (28,28), as the official data was made."""
    try:
        return render_raw(strokes, side=SIDE)
    except (ValueError, ArithmeticError) as e:
        raise InputError(f"strokes cannot be drawn: {e}") from e


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


def _array(items: dict, n: int | None = None, **more) -> dict:
    return {"type": "array", "items": items, **({"minItems": n, "maxItems": n} if n else {}), **more}


_PIXEL = {"type": "number", "minimum": 0, "maximum": 255}
_INKED = {"type": "number", "exclusiveMinimum": 0.5}  # rounds to 1 or more: np.rint(0.5) is 0
_STROKE_VALUES = {"type": "array", "minItems": 1, "items": {
    "type": "number", "minimum": -MAX_STROKE_VALUE, "maximum": MAX_STROKE_VALUE}}
Stroke = Annotated[list[list[StrokeValue]], Field(min_length=2, max_length=3), AfterValidator(_same_lengths),
                   WithJsonSchema(_array(_STROKE_VALUES, minItems=2, maxItems=3, description=(
                       "[[x...], [y...]] or [[x...], [y...], [t...]]: lists of the same length, at least 1 point")))]
Bitmap = Annotated[list[Pixel], BeforeValidator(_rows_to_values), AfterValidator(_bitmap_length), WithJsonSchema({
    "description": f"{SIDE * SIDE} values 0..255 row by row, or {SIDE} rows of {SIDE}; "
                   "at least one value must round to 1 or more (a blank bitmap is no drawing)",
    "oneOf": [_array(_PIXEL, SIDE * SIDE, contains=_INKED),
              _array(_array(_PIXEL, SIDE), SIDE, contains=_array(_PIXEL, SIDE, contains=_INKED))]})]


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

    # Defaults of None that JSON cannot give: an explicit null is refused, as the schema says.
    strokes: Annotated[list[Stroke], Field(min_length=1, json_schema_extra={"maxItems": MAX_STROKES}, description=(
        f"raw canvas strokes, any coordinate range, times optional; at most {MAX_STROKES} in the request"))] = None
    bitmap: Bitmap = None

    @model_validator(mode="before")
    @classmethod
    def _no_empty_strokes(cls, data):  # an empty list says "empty drawing", not "list too short"
        if isinstance(data, dict) and data.get("strokes") == []:
            raise PydanticCustomError("empty", "empty drawing: 'strokes' holds no stroke")
        return data

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in self.kinds if getattr(self, k) is not None]
        if len(given) != 1:
            names = " or ".join(repr(k) for k in self.kinds)
            raise ValueError(f"give exactly one of {names}" + (f", not {' and '.join(given)}" if given else ""))
        if self.bitmap is not None and not self.to_bitmap().any():  # as the model would see it
            raise ValueError("empty drawing: the bitmap has no ink (every value rounds to 0)")
        return self

    def points(self) -> int:
        return sum(len(stroke[0]) for stroke in self.strokes or ())

    def to_bitmap(self) -> np.ndarray:
        """uint8 (28,28)."""
        if self.strokes is not None:
            return strokes_to_bitmap(self.strokes)
        return np.rint(np.asarray(self.bitmap, dtype=np.float64)).astype(np.uint8).reshape(SIDE, SIDE)


class PredictRequest(Drawing):
    """Body of POST /predict: one drawing, or a batch of them under "drawings"."""
    kinds: ClassVar[tuple[str, ...]] = ("strokes", "bitmap", "drawings")
    _ink: float = PrivateAttr(0.0)  # ink_length(), as the validator found it

    drawings: Annotated[list[Drawing], Field(min_length=1, json_schema_extra={"maxItems": MAX_DRAWINGS},
                                             description=f"1 to {MAX_DRAWINGS} drawings, answered in order")] = None
    top_k: Annotated[int, Strict(), Field(ge=1, description="labels per drawing; default 5")] = None
    classes: Annotated[list[str], Field(min_length=1, json_schema_extra={"uniqueItems": True}, description=(
        "the only classes the answer may name (names as GET /classes gives them), e.g. [\"cat\"] for a game "
        "that asks \"is it a cat?\": probabilities are renormalized over them and top_k is at most their number"
    ))] = None

    @model_validator(mode="before")
    @classmethod
    def _counts(cls, data):
        """The limits on counts, checked on the parsed JSON before its values: going over one costs
        no more than reading the body."""
        if not isinstance(data, dict):
            return data
        drawings = data.get("drawings") if isinstance(data.get("drawings"), list) else [data]
        if len(drawings) > MAX_DRAWINGS:
            raise PydanticCustomError("too_large", f"too many drawings: {len(drawings):,} in the batch, "
                                      f"at most {MAX_DRAWINGS}")
        strokes = [s for d in drawings if isinstance(d, dict) and isinstance(d.get("strokes"), list)
                   for s in d["strokes"]]
        if len(strokes) > MAX_STROKES:
            raise PydanticCustomError("too_large", f"too many strokes: {len(strokes):,} in the request, "
                                      f"at most {MAX_STROKES:,}")
        points = sum(len(s[0]) for s in strokes if isinstance(s, list) and s and isinstance(s[0], list))
        if points > MAX_POINTS:
            raise PydanticCustomError("too_large", f"too many points: {points} in the request, at most {MAX_POINTS}")
        return data

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k(cls, top_k, info: ValidationInfo):
        if isinstance(top_k, float) and top_k.is_integer():  # 3.0 is an integer to JSON Schema
            top_k = int(top_k)
        if isinstance(top_k, int) and not isinstance(top_k, bool):
            check_top_k(top_k, info.context["n_classes"])
        return top_k

    @model_validator(mode="after")
    def _ink_limit(self):
        self._ink = length = self.ink_length()
        if length > MAX_INK_LENGTH:
            raise PydanticCustomError("too_large", f"strokes too long: they run {length:,.0f} units at the 0..255 "
                                      f"scale of a simplified drawing, at most {MAX_INK_LENGTH:,}")
        return self

    @field_validator("classes", mode="before")
    @classmethod
    def _some_classes(cls, names):
        if names == []:
            raise PydanticCustomError("empty", "no class named: name at least one, or leave 'classes' out for all")
        return names

    @field_validator("classes", mode="after")
    @classmethod
    def _known_classes(cls, names, info: ValidationInfo):
        known = info.context["classes"]
        unknown = [n for n in dict.fromkeys(names) if n not in known]
        if unknown:
            listed = ", ".join(repr(one_line(n, 40)) for n in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            raise PydanticCustomError("unknown_class", f"unknown class name{'s' if len(unknown) > 1 else ''} "
                                      f"{listed}: GET /classes lists the {len(known)} this model knows")
        if len(set(names)) < len(names):
            raise PydanticCustomError("duplicate_class", "a class is named more than once")
        return names

    def items(self) -> list[Drawing]:
        return self.drawings if self.drawings is not None else [self]

    def ink_length(self) -> float:
        return sum(ink_length(d.strokes) for d in self.items() if d.strokes)


@dataclass
class Drawings:
    """A validated /predict body: its drawings as uint8 bitmaps (N,28,28), and what the answer may name."""
    bitmaps: np.ndarray
    top_k: int
    batch: bool
    allowed: np.ndarray | None = None  # int (A,) class indices the request allows, in its order; None: all
    strokes: dict[int, list] = field(default_factory=dict)  # row -> raw strokes not drawn yet (draw_strokes)


def read_drawings(body: bytes, classes: list[str], budget: float | None = None, draw: bool = True) -> Drawings:
    """A /predict body -> its bitmaps; InputError when it is wrong, Costly when drawing it would
    resample more points than budget. classes: the model's class names. draw=False leaves its strokes
    for draw_strokes, which draws those of many requests at once."""
    n_classes = len(classes)
    try:
        request = PredictRequest.model_validate_json(body, context={"n_classes": n_classes, "classes": classes})
    except ValidationError as e:
        raise problems(e.errors(include_url=False, include_input=False)) from None
    items = request.items()
    if budget is not None and request._ink + sum(d.points() for d in items) > budget:
        raise Costly
    bitmaps = np.zeros((len(items), SIDE, SIDE), np.uint8)
    strokes = {}
    for row, d in enumerate(items):
        if d.strokes is None:
            bitmaps[row] = d.to_bitmap()
        else:
            strokes[row] = d.strokes
    top_k = check_top_k(request.top_k, n_classes)
    allowed = None if request.classes is None else np.array([classes.index(n) for n in request.classes])
    drawings = Drawings(bitmaps, top_k if allowed is None else min(top_k, len(allowed)), request.drawings is not None,
                        allowed, strokes)
    if draw and (error := draw_strokes([drawings])[0]):
        raise error
    return drawings


def draw_strokes(many: list[Drawings]) -> list[InputError | None]:
    """Draw the strokes left in many requests' Drawings, all in one simplification (utils.strokes.
    render_raw_batch); per request None, or the InputError naming its drawing that cannot be drawn."""
    rows = [(d, row, strokes) for d in many for row, strokes in d.strokes.items()]
    try:
        bitmaps = render_raw_batch([strokes for _, _, strokes in rows], side=SIDE)
    except (ValueError, ArithmeticError):  # some drawing cannot be drawn: draw each alone to say which
        return [_draw_each(d) for d in many]
    for (d, row, _), bitmap in zip(rows, bitmaps):
        d.bitmaps[row] = bitmap
    for d in many:
        d.strokes = {}
    return [None] * len(many)


def _draw_each(drawings: Drawings) -> InputError | None:
    for row, strokes in drawings.strokes.items():
        try:
            drawings.bitmaps[row] = render_raw(strokes, side=SIDE)
        except (ValueError, ArithmeticError) as e:
            return InputError(f"{f'drawings[{row}].' if drawings.batch else ''}strokes cannot be drawn: {e}")
    drawings.strokes = {}
    return None


def read_image(data: bytes, top_k: int, budget: float | None = None, draw: bool = True) -> Drawings:
    """A /predict/image upload -> its bitmap as Drawings of one; Costly when it has more pixels than budget.
    (draw: as read_drawings'; an image leaves nothing to draw.)"""
    return Drawings(image_to_bitmap(data, budget)[None], top_k, False)


def where(loc) -> str:
    """('strokes', 0, 1, 3) -> 'strokes[0][1][3]'; a field name of any text stays one short line."""
    out = ""
    for part in loc:
        part = part if isinstance(part, int) else one_line(str(part), 40)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "body"


def problems(errors: list[dict]) -> InputError:
    """Pydantic errors -> InputError: 400 (not JSON), 413 (over a cost limit) or 422, one line."""
    found = []
    for e in errors:
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("json_invalid", "json_type"):
            message = f"malformed JSON: {e.get('ctx', {}).get('error', message)}"
        elif e["type"] == "finite_number":  # the JSON parser reads NaN and Infinity; they are refused here
            message = "must be a finite number: NaN and Infinity are not allowed"
        found.append({"loc": where(e["loc"]), "message": one_line(message)})
    types = {e["type"] for e in errors}
    status = 400 if types & {"json_invalid", "json_type"} else 413 if "too_large" in types else 422
    if status == 413:  # the limit is the answer; the rest may only be the cost of reading past it
        found = [p for p, e in zip(found, errors) if e["type"] == "too_large"]
    return InputError("; ".join(f"{p['loc']}: {p['message']}" for p in found[:5]), status, found[:50])


# --- images ------------------------------------------------------------------------------------------

def image_to_bitmap(data: bytes, budget: float | None = None) -> np.ndarray:
    """A PNG or JPEG drawing, dark on light or light on dark, any size -> uint8 (28,28) framed
    like the official bitmaps: ink box scaled uniformly to INK_SIDE and centred. Costly when the
    image has more pixels than budget."""
    image = _open_image(data, budget)
    ink = _ink(image)  # float32 (H,W), 0 = background, 1 = full ink; H,W <= WORK_SIDE
    ys, xs = np.nonzero(ink > 0.5)  # half-ink edges locate the stroke borders, not JPEG noise
    if len(xs) == 0:
        raise InputError("image has no drawing: no ink found (blank image)")
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    half = SIDE / 2 * max(x1 - x0, y1 - y0) / INK_SIDE  # half the output side, in source pixels
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # The source window under the 28x28 output, zero (no ink) where it overhangs the image: at most
    # (WORK_SIDE * 28 / INK_SIDE)^2 floats, whatever the image's shape.
    wx0, wy0, wx1, wy1 = math.floor(cx - half), math.floor(cy - half), math.ceil(cx + half), math.ceil(cy + half)
    window = np.zeros((wy1 - wy0, wx1 - wx0), np.float32)
    sx0, sy0, sx1, sy1 = max(wx0, 0), max(wy0, 0), min(wx1, ink.shape[1]), min(wy1, ink.shape[0])
    window[sy0 - wy0:sy1 - wy0, sx0 - wx0:sx1 - wx0] = ink[sy0:sy1, sx0:sx1]
    box = (cx - half - wx0, cy - half - wy0, cx + half - wx0, cy + half - wy0)
    # BOX averages every source pixel under each output pixel: the antialiasing of a downscale.
    out = Image.fromarray(window * 255).resize((SIDE, SIDE), Image.Resampling.BOX, box=box)
    bitmap = np.clip(np.rint(np.asarray(out)), 0, 255).astype(np.uint8)
    if not bitmap.any():
        raise InputError(f"image has no drawing at {SIDE}x{SIDE}: its ink ({x1 - x0}x{y1 - y0} px at "
                         f"{ink.shape[1]}x{ink.shape[0]}) is too thin or faint to show once framed")
    return bitmap


def _open_image(data: bytes, budget: float | None) -> Image.Image:
    """Decoded, upright, within every image limit; 413 over one, 415 for anything Pillow cannot read."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG"):
            raise InputError(f"unsupported image format {image.format}: send a PNG or JPEG", 415)
        _check_size(image.width, image.height)
        if budget is not None and image.width * image.height > budget:
            raise Costly
        image.load()
        return ImageOps.exif_transpose(image)
    except (InputError, Costly):
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image too large: {e}", 413) from e
    except Exception as e:  # the image library's every complaint: not a file it can decode
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "cannot identify image file" in reason:  # the rest of it only repeats the file object's repr
            reason = "not a PNG or JPEG file"
        raise InputError(f"unreadable image: {reason}", 415) from e


def _check_size(width: int, height: int) -> None:
    long, short = max(width, height), min(width, height)
    if width * height > MAX_IMAGE_PIXELS or long > MAX_IMAGE_SIDE or long > MAX_IMAGE_ASPECT * short:
        raise InputError(f"image too large: {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} pixels, "
                         f"{MAX_IMAGE_SIDE:,} on a side, {MAX_IMAGE_ASPECT} times as long as wide", 413)


def _ink(image: Image.Image) -> np.ndarray:
    """Ink amount per pixel, float32 (H,W) in [0,1], whatever the polarity; at most WORK_SIDE a side."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = _reduced(image.convert("RGBA").getchannel("A"))
        if alpha.min() < 255:  # strokes on a transparent background: opacity is the ink
            return _normalize(alpha)
    gray = _reduced(image.convert("L"))
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = gray - background if background < 128 else background - gray  # light or dark ink
    return _normalize(ink)


def _reduced(channel: Image.Image) -> np.ndarray:
    """An 8-bit channel as float32, box-averaged by a whole factor to at most WORK_SIDE a side."""
    factor = math.ceil(max(channel.size) / WORK_SIDE)
    if factor > 1:
        channel = channel.reduce(factor)
    return np.asarray(channel, dtype=np.float32)


def _normalize(ink: np.ndarray) -> np.ndarray:
    """Background to 0, the strongest ink to 1 (pencil on paper becomes full strokes)."""
    ink = np.clip(ink, 0, None)
    top = float(ink.max())
    return ink / top if top > 0 else ink
