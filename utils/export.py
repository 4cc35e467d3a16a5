"""ONNX export of a checkpoint, checked against torch on its own test split; int8 quantization, checked too.

    python -m utils.export models/v2-tuned.pt --out models/v2-tuned.onnx --int8 --data data

The model takes the official bitmaps as they are, uint8 (N, 28, 28), any N; the graph scales them as
training did (utils.data.to_float). Its metadata carries the class names, the model name, the input
convention, the training config and scores, and what the check below measured (app.backends reads it).

Before anything is written, the exported model runs on ONNX Runtime over the whole test split the
checkpoint was scored on (rebuilt from its classes and seed, and checked against the size recorded):
every top-1 must agree with torch and no logit may differ by more than 1e-4. `--int8` adds a static
int8 model (QDQ, calibrated on training drawings) beside it, scored on the same split; one that loses
more than 0.5 points of top-1 is refused. Any failure writes nothing and exits non-zero with the figures.
The command's last line on stdout is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from app.backends import INPUT_CONVENTION, INPUT_NAME, JSON_FIELDS, OUTPUT_NAME, SIDE, OnnxBackend
from utils.checkpoint import load_checkpoint
from utils.data import QuickDrawSet, load_bitmaps, split, to_float
from utils.download import BASE_URL_ENV, DEFAULT_BASE_URL, bitmap_path, download_bitmaps
from utils.io import atomic_write
from utils.metrics import map_at_k, predict_logits, topk_accuracy

MAX_LOGIT_DIFF = 1e-4
MAX_TOP1_DROP = 0.5  # points of top-1 an int8 model may lose against the float one
SPLITS = ("train", "val", "test")
RECORDED_TOP1_SLACK = 0.001  # torch on another device or thread count may flip a drawing or two
EVAL_BATCH = 1024


class ExportError(RuntimeError):
    """An export that fails its check (nothing was written), or a split that cannot be rebuilt."""


class BitmapModel(nn.Module):
    """A classifier that takes the official uint8 bitmaps (B,28,28) and scales them inside the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, bitmaps: torch.Tensor) -> torch.Tensor:
        return self.model(to_float(bitmaps))  # (B,28,28) uint8 -> (B,C)


# ------------------------------------------------------------------------------------------------ export

def to_onnx(model: nn.Module) -> onnx.ModelProto:
    """The model in ONNX (dynamic batch, uint8 (N,28,28) in, logits (N,C) out), by torch's dynamo exporter."""
    wrapped = BitmapModel(model).eval().cpu()
    example = torch.zeros((2, SIDE, SIDE), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        program = torch.onnx.export(wrapped, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes={"bitmaps": {0: torch.export.Dim("batch")}},
                                    optimize=True, verbose=False)
        program.save(Path(tmp) / "model.onnx")
        return onnx.load(Path(tmp) / "model.onnx")


def with_metadata(proto: onnx.ModelProto, metadata: dict) -> bytes:
    """The model's bytes with its metadata_props replaced by `metadata` (JSON_FIELDS as JSON text, the
    rest as plain text)."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value) if key in JSON_FIELDS else str(value)
    return proto.SerializeToString()


def onnx_logits(backend: OnnxBackend, images: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Logits (N,C) for uint8 images (N,28,28), batch by batch."""
    return np.concatenate([backend.logits(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def scores(logits: np.ndarray, labels: torch.Tensor) -> dict:
    """top-1, top-3 and MAP@3 of numpy logits (N,C), by utils.metrics."""
    logits = torch.from_numpy(logits)
    return dict(top1=topk_accuracy(logits, labels, 1), top3=topk_accuracy(logits, labels, 3),
                map3=map_at_k(logits, labels, 3), n=len(labels))


def check_parity(model: nn.Module, onnx_model: bytes, part: QuickDrawSet, max_logit_diff: float = MAX_LOGIT_DIFF
                 ) -> tuple[dict, np.ndarray]:
    """Torch against ONNX Runtime (CPU) on every drawing of `part`: (figures, the ONNX logits).

    ExportError, with the figures, unless every top-1 agrees and no logit differs by more than max_logit_diff.
    """
    reference = predict_logits(model, part.images, batch_size=EVAL_BATCH).numpy()  # (N,C)
    ours = onnx_logits(OnnxBackend(onnx_model, providers=["CPUExecutionProvider"]), part.images.numpy())
    disagree = int((reference.argmax(1) != ours.argmax(1)).sum())
    figures = dict(n=len(part), top1_disagreements=disagree, top1_agreement=1 - disagree / len(part),
                   max_logit_diff=float(np.abs(reference - ours).max()), max_allowed=max_logit_diff)
    if disagree or not figures["max_logit_diff"] <= max_logit_diff:
        raise ExportError(f"ONNX Runtime and torch differ on the {len(part):,} drawings checked: {disagree} top-1 "
                          f"disagreements, max |logit difference| {figures['max_logit_diff']:.3g} "
                          f"(allowed {max_logit_diff:g}); nothing written")
    return figures, ours


# ------------------------------------------------------------------------------------------ quantization

@dataclass
class QuantSettings:
    """How the int8 model is made (ONNX Runtime's static quantization)."""
    calibration_size: int = 2048    # training drawings, a random sample across classes
    batch_size: int = 256           # calibration batches
    method: str = "MinMax"          # onnxruntime.quantization.CalibrationMethod: MinMax | Entropy | Percentile
    per_channel: bool = True        # one weight scale per output channel
    # 7-bit weights: on CPUs without VNNI (AVX2 only) ONNX Runtime's u8 x s8 products summed in pairs can
    # saturate int16 with 8-bit ones; the int8 model must be right on every CPU, not only this one.
    reduce_range: bool = True
    seed: int = 0


def calibration_sample(train: QuickDrawSet, size: int, seed: int = 0) -> np.ndarray:
    """`size` training drawings drawn at random (all classes in proportion), uint8 (size,28,28)."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:size]
    return train.images.index_select(0, order.sort().values).numpy()


def quantize_int8(onnx_model: bytes, calibration: np.ndarray, settings: QuantSettings) -> bytes:
    """Static int8 (QDQ: int8 weights, uint8 activations) of a float model, calibrated on uint8 bitmaps."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(calibration), settings.batch_size))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {INPUT_NAME: calibration[start:start + settings.batch_size]}

    if len(calibration) == 0:
        raise ValueError("no calibration drawings")
    with tempfile.TemporaryDirectory() as tmp:
        float_path, pre_path, int8_path = (Path(tmp) / f"{n}.onnx" for n in ("float", "pre", "int8"))
        float_path.write_bytes(onnx_model)
        quant_pre_process(float_path, pre_path)  # shape inference and graph fusions the quantizer expects
        quantize_static(pre_path, int8_path, Batches(), quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                        reduce_range=settings.reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod[settings.method])
        return int8_path.read_bytes()


def check_int8(int8_model: bytes, float_scores: dict, part: QuickDrawSet, max_top1_drop: float = MAX_TOP1_DROP
               ) -> dict:
    """The int8 model's scores on `part`; ExportError, with them beside float's, if top-1 drops too far."""
    int8_scores = scores(onnx_logits(OnnxBackend(int8_model, providers=["CPUExecutionProvider"]), part.images.numpy()),
                         part.labels)
    drop = 100 * (float_scores["top1"] - int8_scores["top1"])
    if drop > max_top1_drop:
        raise ExportError(f"int8 model refused: top-1 {int8_scores['top1']:.2%} against float's "
                          f"{float_scores['top1']:.2%} on {len(part):,} drawings, {drop:.2f} points lost "
                          f"(at most {max_top1_drop:g} allowed); top-3 {int8_scores['top3']:.2%} vs "
                          f"{float_scores['top3']:.2%}, MAP@3 {int8_scores['map3']:.4f} vs "
                          f"{float_scores['map3']:.4f}; nothing written")
    return dict(int8_scores, top1_drop_points=drop)


# ------------------------------------------------------------------------------------------------- split

def rebuild_split(ckpt: dict, data, which: str = "test", max_per_class: int | None = None,
                  split_seed: int | None = None, base_url: str | None = None, progress: bool = False
                  ) -> tuple[QuickDrawSet, QuickDrawSet]:
    """(training split, the split named) of the checkpoint's classes, made as utils.train made them.

    Bitmaps missing under `data` are fetched from base_url (or $QUICKDRAW_BASE_URL); with neither, and
    whenever the split cannot be the one the checkpoint was scored on (no seed recorded and none given,
    another size than recorded), ExportError says what to pass.
    """
    if which not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {which!r}")
    classes = list(ckpt["classes"])
    seed = ckpt.get("config", {}).get("seed") if split_seed is None else split_seed
    if seed is None:
        raise ExportError("the checkpoint records no split seed: pass --split-seed (the training run's "
                          "--split-seed, or its --seed)")
    missing = [name for name in classes if not bitmap_path(data, name).is_file()]
    if missing and not (base_url or os.environ.get(BASE_URL_ENV)):  # no surprise download of the whole set
        raise ExportError(f"{len(missing)} of the checkpoint's {len(classes)} categories have no bitmaps under "
                          f"{data} (first: {bitmap_path(data, missing[0])}): pass --data, the folder it was "
                          f"trained on, or --base-url to fetch them (e.g. {DEFAULT_BASE_URL})")
    if missing or base_url:
        download_bitmaps(classes, root=data, max_per_class=max_per_class, base_url=base_url, progress=progress)
    parts = dict(zip(SPLITS, split(load_bitmaps(classes, root=data, max_per_class=max_per_class), seed=seed)))
    recorded = ((ckpt.get("metrics") or {}).get(which) or {}).get("n")
    if recorded is not None and recorded != len(parts[which]):
        raise ExportError(
            f"the {which} split rebuilt from {data} ({len(parts[which]):,} drawings of {len(classes)} categories, "
            f"max_per_class={max_per_class}, seed {seed}) is not the one the checkpoint was scored on "
            f"({recorded:,} drawings): pass the --max-per-class and --split-seed it was trained with, "
            f"or the --data folder it was trained on")
    return parts["train"], parts[which]


def check_recorded_top1(ckpt: dict, which: str, onnx_top1: float) -> None:
    """A split of the right size but other drawings (another seed) shows in its top-1: refuse it."""
    recorded = ((ckpt.get("metrics") or {}).get(which) or {}).get("top1")
    if recorded is not None and abs(recorded - onnx_top1) > RECORDED_TOP1_SLACK:
        raise ExportError(f"top-1 on the rebuilt {which} split is {onnx_top1:.2%} but the checkpoint records "
                          f"{recorded:.2%}: not the drawings it was scored on (another --split-seed or data?)")


# -------------------------------------------------------------------------------------------------- run

def int8_path(out: Path) -> Path:
    """models/name.onnx -> models/name.int8.onnx"""
    return Path(out).with_suffix(".int8.onnx")


def export(checkpoint, out, data="data", which: str = "test", int8: bool = False, int8_out=None,
           max_per_class: int | None = None, split_seed: int | None = None, base_url: str | None = None,
           quant: QuantSettings | None = None, max_logit_diff: float = MAX_LOGIT_DIFF,
           max_top1_drop: float = MAX_TOP1_DROP, calibration: np.ndarray | None = None, progress: bool = False) -> dict:
    """Export, check, and (int8) quantize and check; write the file(s) only when every check passes.

    `calibration` (uint8 (N,28,28)) replaces the sample of training drawings. Returns the figures.
    """
    t0 = time.perf_counter()

    def say(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    out = Path(out)
    int8_out = Path(int8_out) if int8_out else int8_path(out)
    model, ckpt = load_checkpoint(checkpoint)
    train, part = rebuild_split(ckpt, data, which, max_per_class, split_seed, base_url, progress)
    metadata = dict(classes=list(ckpt["classes"]), model_name=ckpt["model_name"], input=INPUT_CONVENTION,
                    source=Path(checkpoint).name, metrics=ckpt["metrics"], config=ckpt["config"])
    proto = to_onnx(model)
    parity, float_logits = check_parity(model, with_metadata(proto, metadata), part, max_logit_diff)
    float_scores = scores(float_logits, part.labels)
    say(f"ONNX Runtime vs torch on the {len(part):,} drawings of the {which} split: every top-1 agrees, max |logit "
        f"difference| {parity['max_logit_diff']:.2g}; top-1 {float_scores['top1']:.2%}")
    check_recorded_top1(ckpt, which, float_scores["top1"])
    check = dict(split=which, **parity)
    float_model = with_metadata(proto, dict(metadata, check=check))
    report = dict(checkpoint=str(checkpoint), out=str(out), split=which, parity=parity,
                  float=dict(float_scores, bytes=len(float_model)))
    files = {out: float_model}
    if int8:
        quant = quant or QuantSettings()
        sample = calibration_sample(train, quant.calibration_size, quant.seed) if calibration is None else calibration
        int8_model = quantize_int8(float_model, sample, quant)
        int8_scores = check_int8(int8_model, float_scores, part, max_top1_drop)
        say(f"int8 calibrated on {len(sample):,} training drawings: top-1 {int8_scores['top1']:.2%}, top-3 "
            f"{int8_scores['top3']:.2%}, MAP@3 {int8_scores['map3']:.4f} (float: {float_scores['top1']:.2%}, "
            f"{float_scores['top3']:.2%}, {float_scores['map3']:.4f})")
        quantization = dict(asdict(quant), calibration_drawings=len(sample), format="QDQ", weights="int8",
                            activations="uint8", split=which, float=float_scores, int8=int8_scores)
        int8_model = with_metadata(onnx.load_from_string(int8_model), dict(metadata, check=check,
                                                                           quantization=quantization))
        files[int8_out] = int8_model
        report.update(int8_out=str(int8_out), int8=dict(int8_scores, bytes=len(int8_model)), quantization=quantization)
    for path, content in files.items():  # every check passed
        with atomic_write(path) as f:
            f.write(content)
        say(f"written: {path} ({len(content):,} bytes)")
    report["seconds"] = time.perf_counter() - t0
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    q = QuantSettings()
    p = argparse.ArgumentParser(prog="python -m utils.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="checkpoint written by utils.train (models/NAME.pt)")
    p.add_argument("--out", type=Path, help="ONNX file to write (default: the checkpoint's path with .onnx)")
    p.add_argument("--split", default="test", choices=SPLITS, help="split the check runs on (default: test)")
    p.add_argument("--data", default="data", help="folder of the bitmaps the checkpoint was trained on")
    p.add_argument("--base-url", help="bucket root or mirror to fetch missing bitmaps from (as utils.train)")
    p.add_argument("--max-per-class", type=int, help="as the training run was given (default: all drawings)")
    p.add_argument("--split-seed", type=int, help="as the training run was given (default: the checkpoint's seed)")
    p.add_argument("--max-logit-diff", type=float, default=MAX_LOGIT_DIFF)
    p.add_argument("--int8", action="store_true", help="also write a static int8 model (NAME.int8.onnx)")
    p.add_argument("--int8-out", type=Path, help="its path (default: --out with .int8.onnx)")
    p.add_argument("--max-top1-drop", type=float, default=MAX_TOP1_DROP,
                   help=f"points of test top-1 the int8 model may lose (default {MAX_TOP1_DROP})")
    p.add_argument("--calibration-size", type=int, default=q.calibration_size, help="training drawings to calibrate on")
    p.add_argument("--calibration-method", default=q.method, choices=("MinMax", "Entropy", "Percentile"))
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=q.per_channel)
    p.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=q.reduce_range,
                   help="7-bit weights: no saturation on CPUs without VNNI (default on)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quant = QuantSettings(calibration_size=args.calibration_size, method=args.calibration_method,
                          per_channel=args.per_channel, reduce_range=args.reduce_range)
    return export(args.checkpoint, args.out or args.checkpoint.with_suffix(".onnx"), args.data, args.split,
                  args.int8, args.int8_out, args.max_per_class, args.split_seed, args.base_url, quant,
                  args.max_logit_diff, args.max_top1_drop, progress=args.progress)


if __name__ == "__main__":
    try:
        result = main()
    except (ExportError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))
