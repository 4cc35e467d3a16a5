"""Inference backends: an exported ONNX model on ONNX Runtime (no torch), or a checkpoint on torch.

    backend = load_backend("models/v2-tuned.onnx", threads=1)  # .onnx: ONNX Runtime; .pt: torch
    backend.probabilities(bitmaps)  # uint8 (N,28,28) as the official bitmaps -> float32 (N,C)

Both read the same input, the official numpy bitmaps as they are (0 background .. 255 ink), and scale it
as training did. This module imports neither torch nor the training code: TorchBackend imports them
when it is built, so a service given an ONNX model runs without torch installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.formats import SIDE

INPUT_NAME = "bitmaps"  # uint8 (N,28,28)
OUTPUT_NAME = "logits"  # float32 (N,C)
INPUT_CONVENTION = (f"uint8 (N, {SIDE}, {SIDE}) as the official Quick, Draw! numpy bitmaps (row by row, "
                    "0 = background, 255 = ink); the graph scales them to [0, 1] (x / 255) as in training")
# Metadata fields stored as JSON text (ONNX metadata values are strings); the others are plain text.
JSON_FIELDS = ("classes", "metrics", "config", "check", "quantization")
SUFFIXES = {".onnx": "onnxruntime", ".pt": "torch", ".pth": "torch"}


class ModelFileError(ValueError):
    """A model file that cannot serve: unreadable, foreign, or of an unknown kind. One line naming the path."""


def check_bitmaps(bitmaps) -> np.ndarray:
    """The batch as a C-contiguous uint8 (N,28,28) array, or ValueError naming what is wrong."""
    if not isinstance(bitmaps, np.ndarray):
        raise TypeError(f"bitmaps must be a numpy array, got {type(bitmaps).__name__}")
    if bitmaps.dtype != np.uint8:
        raise ValueError(f"bitmaps must be uint8 (0..255 as the official bitmaps), got {bitmaps.dtype}")
    if bitmaps.ndim != 3 or bitmaps.shape[1:] != (SIDE, SIDE) or len(bitmaps) == 0:
        raise ValueError(f"bitmaps must be (N, {SIDE}, {SIDE}) with N >= 1, got {bitmaps.shape}")
    return np.ascontiguousarray(bitmaps)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (N,C) -> (N,C) float32, stable for large logits."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)


class Backend:
    """A loaded model: its class names, model name, metadata, and batched prediction on uint8 bitmaps."""
    kind: str           # "onnxruntime" or "torch"
    path: Path | None   # the file it was loaded from (None: from bytes)
    classes: list[str]
    name: str           # the model's name in utils.models (v1, v2, resnet)
    metadata: dict      # what the file records: classes, model_name, metrics, config, ...

    def logits(self, bitmaps: np.ndarray) -> np.ndarray:
        """uint8 (N,28,28) -> float32 logits (N,C), one forward pass."""
        raise NotImplementedError

    def probabilities(self, bitmaps: np.ndarray) -> np.ndarray:
        """uint8 (N,28,28) -> float32 class probabilities (N,C), one forward pass."""
        return softmax(self.logits(bitmaps))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self.classes)} classes, {self.path})"


class OnnxBackend(Backend):
    """A model written by utils.export, run by ONNX Runtime; imports no torch.

    `source` is a path or the model's bytes. threads: intra-op threads of this session (None: ONNX
    Runtime's choice, one per core). providers: ONNX Runtime execution providers, default CUDA where the
    installed build has it, else CPU.
    """
    kind = "onnxruntime"

    def __init__(self, source: str | Path | bytes, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort  # here, so that importing this module stays cheap

        self.path = None if isinstance(source, bytes) else Path(source)
        where = "model bytes" if self.path is None else str(self.path)
        if self.path is not None and not self.path.is_file():
            if self.path.is_dir():
                raise ModelFileError(f"{self.path} is a directory, not an ONNX model file")
            raise FileNotFoundError(f"model not found: {self.path}")
        options = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be positive or None, got {threads}")
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(source if self.path is None else str(self.path), options,
                                                providers=providers)
        except Exception as e:  # ONNX Runtime's own message runs to many lines of graph detail
            reason = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise ModelFileError(f"{where} is not an ONNX model ONNX Runtime can run ({reason})") from e
        raw = self.session.get_modelmeta().custom_metadata_map
        if "classes" not in raw or "model_name" not in raw:
            raise ModelFileError(f"{where} has no class names or model name in its metadata; "
                                 "export checkpoints with: python -m utils.export models/NAME.pt")
        try:
            self.metadata = {k: json.loads(v) if k in JSON_FIELDS else v for k, v in raw.items()}
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{where} has unreadable metadata ({e})") from e
        self.classes, self.name = list(self.metadata["classes"]), self.metadata["model_name"]
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or list(inputs[0].shape[1:]) != [SIDE, SIDE]:
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise ModelFileError(f"{where} takes {found}; expected one uint8 input (N, {SIDE}, {SIDE})")
        width = outputs[0].shape[-1]
        if isinstance(width, int) and width != len(self.classes):
            raise ModelFileError(f"{where} gives {width} scores per drawing but names {len(self.classes)} classes")
        self._input, self._output = inputs[0].name, outputs[0].name

    def logits(self, bitmaps: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input: check_bitmaps(bitmaps)})[0]


class TorchBackend(Backend):
    """A checkpoint written by utils.train, run by torch (imported here, not by the module).

    threads: torch's intra-op threads; the setting is process-wide (None: leave it as it is).
    """
    kind = "torch"

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "cpu"):
        import torch

        from utils.checkpoint import CheckpointError, load_checkpoint
        from utils.data import to_float

        self.path = Path(path)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be positive or None, got {threads}")
            torch.set_num_threads(threads)
        try:
            self.model, ckpt = load_checkpoint(self.path, device=device)
        except CheckpointError as e:
            raise ModelFileError(str(e)) from e
        self.classes, self.name = list(ckpt["classes"]), ckpt["model_name"]
        self.metadata = dict(classes=self.classes, model_name=self.name, input=INPUT_CONVENTION,
                             metrics=ckpt["metrics"], config=ckpt["config"])
        self._torch, self._to_float, self._device = torch, to_float, torch.device(device)

    @classmethod
    def from_module(cls, model, classes: list[str], name: str, path: str | Path | None = None) -> "TorchBackend":
        """A model already in memory (an nn.Module in eval mode, on the cpu): tests, notebooks."""
        import torch

        from utils.data import to_float

        self = cls.__new__(cls)
        self.model, self.classes, self.name, self.path = model, list(classes), name, path and Path(path)
        self.metadata = dict(classes=self.classes, model_name=name, input=INPUT_CONVENTION)
        self._torch, self._to_float, self._device = torch, to_float, torch.device("cpu")
        return self

    def logits(self, bitmaps: np.ndarray) -> np.ndarray:
        x = self._torch.from_numpy(check_bitmaps(bitmaps)).to(self._device)
        with self._torch.inference_mode():
            return self.model(self._to_float(x)).float().cpu().numpy()  # (N,C)


def load_backend(path: str | Path, threads: int | None = None) -> Backend:
    """The backend the file's suffix names: .onnx -> OnnxBackend, .pt/.pth -> TorchBackend.

    A missing file raises FileNotFoundError; any other file that cannot serve, ModelFileError.
    """
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ModelFileError(f"{path}: unknown model file type {path.suffix or '(no suffix)'!r}; "
                             "expected .onnx (ONNX Runtime) or .pt (a torch checkpoint)")
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    return OnnxBackend(path, threads) if kind == "onnxruntime" else TorchBackend(path, threads)
