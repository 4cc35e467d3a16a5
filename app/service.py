"""The classifier behind the API: a checkpoint loaded once, and every input turned into the
28x28 uint8 bitmap the official data uses before one batched forward pass."""
from __future__ import annotations

import asyncio
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.data import to_float
from utils.strokes import render, simplify
from utils.checkpoint import CheckpointError, load_checkpoint

SIDE = 28
# The official rasterization (see utils.strokes.render): the simplified drawing spans 255 units,
# strokes 16 units wide, on a 256 + 2*16 + 16 = 304-unit frame, centred. An uploaded image is
# framed the same way: its ink box, strokes included, becomes 271/304 of the side, centred.
INK_SIDE = SIDE * (255 + 16) / (256 + 2 * 16 + 16)  # ~24.96 px
MAX_IMAGE_PIXELS = 25_000_000  # decoding more would stall the service for seconds


class InputError(ValueError):
    """A request's drawing cannot be turned into a bitmap; status is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Classifier:
    """A trained model, its class names, and batched top-k prediction on uint8 bitmaps."""
    model: torch.nn.Module
    classes: list[str]
    name: str
    path: Path

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Classifier":
        """Load once at start; any failure is a CheckpointError of one line naming the path."""
        try:
            model, meta = load_checkpoint(path, device="cpu")
        except Exception as e:  # missing, foreign, truncated, or for another model: the service cannot start
            reason = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise CheckpointError(reason if str(path) in reason else f"cannot load checkpoint {path}: {reason}") from e
        return cls(model, list(meta["classes"]), meta["model_name"], Path(path))

    def warm_up(self, max_batch: int = 32) -> None:
        """Pay the first-call costs (cairo loading, kernels per batch size) before the first request."""
        strokes_to_bitmap([[[0, 10, 20], [0, 20, 0]]])
        for n in range(1, max_batch + 1):
            self.probabilities(np.zeros((n, SIDE, SIDE), np.uint8))

    @torch.inference_mode()
    def probabilities(self, bitmaps: np.ndarray) -> torch.Tensor:
        """uint8 (N,28,28) -> class probabilities (N,C), one forward pass."""
        return self.model(to_float(torch.from_numpy(bitmaps))).softmax(dim=1)

    def top(self, probabilities: torch.Tensor, top_k: int) -> list[list[dict]]:
        """(N,C) probabilities -> per row the top_k labels, most probable first."""
        values, index = probabilities.topk(top_k, dim=1)  # (N,k), (N,k)
        return [[{"label": self.classes[i], "probability": p} for i, p in zip(row_i, row_p)]
                for row_i, row_p in zip(index.tolist(), values.tolist())]


class Batcher:
    """Joins the drawings of all requests waiting at the same moment into one forward pass.

    A forward pass on 16 drawings costs little more than on one, and under load many requests
    wait together; the event loop runs the pass once every handler ready in this turn has queued.
    """

    def __init__(self, classifier: Classifier):
        self.classifier = classifier
        self.waiting: list[tuple[np.ndarray, int, asyncio.Future]] = []

    async def predict(self, bitmaps: np.ndarray, top_k: int) -> list[list[dict]]:
        """uint8 (N,28,28) -> top_k labels per drawing."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self.waiting:
            loop.call_soon(self._run)
        self.waiting.append((bitmaps, top_k, future))
        return await future

    def _run(self) -> None:
        waiting, self.waiting = self.waiting, []
        try:
            probabilities = self.classifier.probabilities(np.concatenate([b for b, _, _ in waiting]))
        except Exception as e:  # every waiting request learns of it; the service keeps going
            for _, _, future in waiting:
                if not future.done():  # cancelled: its client went away
                    future.set_exception(e)
            return
        start = 0
        for bitmaps, top_k, future in waiting:
            if not future.done():
                future.set_result(self.classifier.top(probabilities[start:start + len(bitmaps)], top_k))
            start += len(bitmaps)


def ink_length(strokes: list[list[list[float]]]) -> float:
    """Total stroke length at the 0..255 scale simplify brings a drawing to: the points it resamples."""
    xy = [np.asarray(stroke[:2], dtype=np.float64) for stroke in strokes]  # (2,n) per stroke
    extent = np.ptp(np.concatenate(xy, axis=1), axis=1).max()
    if extent == 0:
        return 0.0
    return float(sum(np.hypot(*np.diff(p, axis=1)).sum() for p in xy) * 255 / extent)


def strokes_to_bitmap(strokes: list[list[list[float]]]) -> np.ndarray:
    """Raw canvas strokes [[x...], [y...](, [t...])] -> uint8 (28,28), as the official data was made."""
    try:
        return render(simplify(strokes), side=SIDE)
    except (ValueError, ArithmeticError) as e:
        raise InputError(f"strokes cannot be drawn: {e}") from e


def image_to_bitmap(data: bytes) -> np.ndarray:
    """A PNG or JPEG drawing, dark on light or light on dark, any size -> uint8 (28,28) framed
    like the official bitmaps: ink box scaled uniformly to INK_SIDE and centred."""
    ink = _ink(_open_image(data))  # float32 (H,W), 0 = background, 1 = full ink
    ys, xs = np.nonzero(ink > 0.5)  # half-ink edges locate the stroke borders, not JPEG noise
    if len(xs) == 0:
        raise InputError("image has no drawing: no ink found (blank image)")
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    half = SIDE / 2 * max(x1 - x0, y1 - y0) / INK_SIDE  # half the output side, in source pixels
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # The source window under the 28x28 output, zero (no ink) where it overhangs the image.
    wx0, wy0, wx1, wy1 = math.floor(cx - half), math.floor(cy - half), math.ceil(cx + half), math.ceil(cy + half)
    window = np.zeros((wy1 - wy0, wx1 - wx0), np.float32)
    sx0, sy0, sx1, sy1 = max(wx0, 0), max(wy0, 0), min(wx1, ink.shape[1]), min(wy1, ink.shape[0])
    window[sy0 - wy0:sy1 - wy0, sx0 - wx0:sx1 - wx0] = ink[sy0:sy1, sx0:sx1]
    box = (cx - half - wx0, cy - half - wy0, cx + half - wx0, cy + half - wy0)
    # BOX averages every source pixel under each output pixel: the antialiasing of a downscale.
    out = Image.fromarray(window * 255).resize((SIDE, SIDE), Image.Resampling.BOX, box=box)
    return np.clip(np.rint(np.asarray(out)), 0, 255).astype(np.uint8)


def _open_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InputError(f"image too large: {e}", 413) from e
    except UnidentifiedImageError as e:  # its message only repeats the file object's repr
        raise InputError("unreadable image: not a PNG or JPEG file", 415) from e
    except (OSError, ValueError) as e:
        raise InputError(f"unreadable image: not a PNG or JPEG file ({e})", 415) from e
    if image.format not in ("PNG", "JPEG"):
        raise InputError(f"unsupported image format {image.format}: send a PNG or JPEG", 415)
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise InputError(f"image too large: {image.width}x{image.height} pixels, "
                         f"at most {MAX_IMAGE_PIXELS:,} allowed", 413)
    try:
        image.load()
    except Exception as e:  # truncated or corrupt data surfaces only when decoding
        raise InputError(f"unreadable image: corrupt {image.format} data ({e})", 415) from e
    return image


def _ink(image: Image.Image) -> np.ndarray:
    """Ink amount per pixel, float32 (H,W) in [0,1], whatever the polarity."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"), dtype=np.float32)[..., 3]
        if alpha.min() < 255:  # strokes on a transparent background: opacity is the ink
            return _normalize(alpha)
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = gray - background if background < 128 else background - gray  # light or dark ink
    return _normalize(ink)


def _normalize(ink: np.ndarray) -> np.ndarray:
    """Background to 0, the strongest ink to 1 (pencil on paper becomes full strokes)."""
    ink = np.clip(ink, 0, None)
    top = float(ink.max())
    return ink / top if top > 0 else ink
