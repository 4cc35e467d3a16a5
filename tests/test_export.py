"""ONNX export and int8 quantization of a small model trained here, and the inference backends.

The model is V2 trained for a few seconds by `utils.train.main` on simple shapes drawn here (official
category names, served from a local folder as a mirror), so the export rebuilds the split exactly as a
real run's checkpoint asks.
"""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from app.backends import (INPUT_CONVENTION, ModelFileError, OnnxBackend, TorchBackend, check_bitmaps,
                          load_backend)
from testkit.launch import PROJECT_ROOT
from utils import export as export_module
from utils import train as train_module
from utils.checkpoint import load_checkpoint, read_checkpoint, save_state
from utils.data import load_bitmaps, split, to_float
from utils.export import ExportError, export, int8_path, rebuild_split, to_onnx, with_metadata
from utils.models import MODELS, build_model
from utils.strokes import render_batch, simplify

SHAPES = {  # official category names; each stroke a list of corners, as complex points in a unit box
    "square": [[-1 - 1j, 1 - 1j, 1 + 1j, -1 + 1j, -1 - 1j]],
    "triangle": [[-1j, 1 + 0.9j, -1 + 0.9j, -1j]],
    "line": [[-1 + 0.1j, 1 - 0.1j]],
    "zigzag": [[-1 + 0.6j, -0.5 - 0.6j, 0.6j, 0.5 - 0.6j, 1 + 0.6j]],
    "circle": [list(np.exp(2j * np.pi * np.arange(25) / 24))],
}
PER_CLASS = 160
EPOCHS = 4


def shape(name: str, rng: np.random.Generator) -> list:
    """A raw drawing of the shape, turned, stretched and shaky: [[x...], [y...]] per stroke.

    Size and place need no drawing: simplify() scales every drawing to 0..255 at the top left.
    """
    turn, stretch = np.exp(1j * rng.uniform(-0.4, 0.4)), rng.uniform(0.7, 1.3)
    out = []
    for corners in SHAPES[name]:
        z = np.interp(np.linspace(0, len(corners) - 1, 8 * len(corners)), np.arange(len(corners)), corners) * turn
        z += rng.normal(0, 0.02, (len(z), 2)) @ [1, 1j]
        out.append([(100 * z.real + 300).tolist(), (100 * stretch * z.imag + 300).tolist()])
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(checkpoint, data folder): V2 trained on the shapes by `python -m utils.train`, scored and saved."""
    root = tmp_path_factory.mktemp("export")
    mirror = root / "mirror"
    (mirror / "full" / "numpy_bitmap").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in SHAPES:
        bitmaps = render_batch([simplify(shape(name, rng)) for _ in range(PER_CLASS)])  # (N,784) uint8
        np.save(mirror / "full" / "numpy_bitmap" / f"{name}.npy", bitmaps)
    checkpoint, data = root / "shapes.pt", root / "data"
    train_module.main(["--model", "v2", "--categories", *SHAPES, "--data", str(data), "--base-url", str(mirror),
                       "--out", str(checkpoint), "--epochs", str(EPOCHS), "--batch-size", "32", "--patience", "0",
                       "--device", "cpu", "--num-threads", "1", "--no-progress"])
    return checkpoint, data


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """The export's figures and its files: float and int8 (allowed to lose up to 5 points of top-1 here,
    where one drawing of the small test split is 1.25 points)."""
    checkpoint, data = trained
    out = tmp_path_factory.mktemp("onnx") / "shapes.onnx"
    report = export(checkpoint, out, data=data, int8=True, max_top1_drop=5.0)
    return report, out


def test_onnx_agrees_with_torch_on_the_whole_test_split(trained, exported):
    checkpoint, data = trained
    report, out = exported
    model, ckpt = load_checkpoint(checkpoint)
    _, _, test = split(load_bitmaps(list(SHAPES), root=data), seed=ckpt["config"]["seed"])
    assert report["parity"]["n"] == len(test) == ckpt["metrics"]["test"]["n"] == len(SHAPES) * PER_CLASS // 10
    assert report["parity"]["top1_disagreements"] == 0 and report["parity"]["max_logit_diff"] <= 1e-4
    # Checked again here, independently: torch logits against the written file, batch sizes 1, 7 and all.
    with torch.no_grad():
        reference = model(to_float(test.images)).numpy()  # (N,C)
    backend = OnnxBackend(out)
    for size in (1, 7, len(test)):
        ours = np.concatenate([backend.logits(test.images[i:i + size].numpy()) for i in range(0, len(test), size)])
        assert (ours.argmax(1) == reference.argmax(1)).all()
        assert np.abs(ours - reference).max() <= 1e-4
    # The model learnt the shapes, so agreeing is not agreeing on noise; and its score is the recorded one.
    assert report["float"]["top1"] == pytest.approx(ckpt["metrics"]["test"]["top1"], abs=1e-6)
    assert report["float"]["top1"] > 0.8


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_exports_with_a_dynamic_batch(name):
    """Each registered network (untrained; batch norm statistics set) gives torch's logits at any batch size."""
    torch.manual_seed(0)
    model = build_model(name, 7).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # folded into the convolutions by the exporter
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2)
    backend = OnnxBackend(with_metadata(to_onnx(model), dict(classes=list("abcdefg"), model_name=name)))
    images = torch.randint(0, 256, (33, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(to_float(images)).numpy()  # (33,7)
    for size in (1, 33):
        ours = np.concatenate([backend.logits(images[i:i + size].numpy()) for i in range(0, len(images), size)])
        assert np.abs(ours - reference).max() <= 1e-4 and (ours.argmax(1) == reference.argmax(1)).all()


def test_metadata_round_trips(trained, exported):
    checkpoint, _ = trained
    report, out = exported
    _, ckpt = load_checkpoint(checkpoint)
    for path in (out, int8_path(out)):
        backend = load_backend(path)
        assert backend.kind == "onnxruntime"
        assert backend.classes == ckpt["classes"] == list(SHAPES)
        assert backend.name == ckpt["model_name"] == "v2"
        assert backend.metadata["metrics"] == ckpt["metrics"]
        assert backend.metadata["config"] == ckpt["config"]
        assert backend.metadata["input"] == INPUT_CONVENTION
        assert backend.metadata["check"] == dict(split="test", **report["parity"])
        # readable by any ONNX tool: the classes are JSON text in metadata_props
        props = {p.key: p.value for p in onnx.load(path).metadata_props}
        assert json.loads(props["classes"]) == list(SHAPES) and props["model_name"] == "v2"
        inputs = backend.session.get_inputs()
        assert [(i.type, i.shape[1:]) for i in inputs] == [("tensor(uint8)", [28, 28])]
        assert isinstance(inputs[0].shape[0], str)  # the batch dimension is dynamic
    quantization = load_backend(int8_path(out)).metadata["quantization"]
    assert quantization["float"] == {k: report["float"][k] for k in ("top1", "top3", "map3", "n")}
    assert quantization["int8"]["top1"] == report["int8"]["top1"]
    assert "quantization" not in load_backend(out).metadata


def test_int8_model_is_scored_on_the_test_split_and_smaller(trained, exported):
    checkpoint, data = trained
    report, out = exported
    _, ckpt = load_checkpoint(checkpoint)
    _, test = rebuild_split(ckpt, data)
    logits = OnnxBackend(int8_path(out)).logits(test.images.numpy())
    assert report["int8"]["top1"] == pytest.approx((logits.argmax(1) == test.labels.numpy()).mean(), abs=1e-6)
    assert report["float"]["top1"] - report["int8"]["top1"] <= 0.05
    ops = {node.op_type for node in onnx.load(int8_path(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8_path(out).stat().st_size < 0.4 * out.stat().st_size  # int8 weights: a quarter of float32's


def test_int8_that_loses_too_much_is_refused_and_nothing_is_written(trained, tmp_path):
    """Calibrated on blank drawings, every activation range is wrong: the check must catch it."""
    checkpoint, data = trained
    out = tmp_path / "bad.onnx"
    int8_path(out).write_bytes(b"an older file")
    with pytest.raises(ExportError, match=r"int8 model refused: top-1 .* points lost \(at most 5 allowed\)"):
        export(checkpoint, out, data=data, int8=True, max_top1_drop=5.0, calibration=np.zeros((64, 28, 28), np.uint8))
    assert not out.exists()  # not even the float model, which passed its own check
    assert int8_path(out).read_bytes() == b"an older file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.int8.onnx"]  # no temporary left behind


def test_export_that_disagrees_with_torch_is_refused(trained, tmp_path, monkeypatch):
    """A graph that computes something else than the checkpoint (one class's bias moved) is caught."""
    checkpoint, data = trained
    to_onnx = export_module.to_onnx

    def shifted(model):
        proto = to_onnx(model)
        gemm = [node for node in proto.graph.node if node.op_type == "Gemm"][-1]
        bias = next(t for t in proto.graph.initializer if t.name == gemm.input[2])
        values = onnx.numpy_helper.to_array(bias).copy()
        values[0] += 1e-3
        bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
        return proto

    monkeypatch.setattr(export_module, "to_onnx", shifted)
    out = tmp_path / "wrong.onnx"
    with pytest.raises(ExportError, match=r"max \|logit difference\| 0\.001 \(allowed 0\.0001\); nothing written"):
        export(checkpoint, out, data=data)
    assert list(tmp_path.iterdir()) == []


def test_a_split_other_than_the_checkpoints_is_refused(trained, tmp_path):
    checkpoint, data = trained
    with pytest.raises(ExportError, match=r"not the one the checkpoint was scored on \(80 drawings\).*--max-per-class"):
        export(checkpoint, tmp_path / "m.onnx", data=data, max_per_class=100)
    ckpt = read_checkpoint(checkpoint)
    ckpt["metrics"]["test"]["top1"] = 0.5  # as if scored on other drawings of the same number
    save_state(ckpt, tmp_path / "other.pt")
    with pytest.raises(ExportError, match=r"test split is (9\d\.\d\d|100\.00)% but the checkpoint records 50\.00%"):
        export(tmp_path / "other.pt", tmp_path / "m.onnx", data=data)
    with pytest.raises(ExportError, match=r"5 of the checkpoint's 5 categories have no bitmaps under .*--data"):
        export(checkpoint, tmp_path / "m.onnx", data=tmp_path / "elsewhere")
    del ckpt["config"]["seed"]
    save_state(ckpt, tmp_path / "unseeded.pt")
    with pytest.raises(ExportError, match="records no split seed: pass --split-seed"):
        export(tmp_path / "unseeded.pt", tmp_path / "m.onnx", data=data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt", "unseeded.pt"]


def test_command_line(trained, tmp_path):
    checkpoint, data = trained
    out = tmp_path / "cli.onnx"
    done = subprocess.run([sys.executable, "-m", "utils.export", str(checkpoint), "--out", str(out), "--data", str(data),
                           "--no-progress"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["parity"]["top1_disagreements"] == 0 and out.is_file() and not int8_path(out).exists()
    # bitmaps fetched as training fetched them: from the mirror into an empty folder
    report = export(checkpoint, tmp_path / "fetched.onnx", data=tmp_path / "data", base_url=data.parent / "mirror")
    assert report["parity"]["n"] == len(SHAPES) * PER_CLASS // 10 and (tmp_path / "data" / "numpy_bitmap").is_dir()
    done = subprocess.run([sys.executable, "-m", "utils.export", str(tmp_path / "none.pt"), "--data", str(data)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith("error: checkpoint not found")


# --- backends ------------------------------------------------------------------------------------------

NO_TORCH = """
import importlib.abc, json, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from app.backends import load_backend
backend = load_backend(sys.argv[1], threads=1)
p = backend.probabilities(np.zeros((3, 28, 28), np.uint8))
print(json.dumps(dict(torch=[m for m in sys.modules if m.split(".")[0] == "torch"], shape=p.shape,
                      sums=p.sum(1).tolist(), threads=backend.session.get_session_options().intra_op_num_threads)))
"""


def test_onnx_backend_imports_no_torch(exported):
    """Importing app.backends and predicting with an ONNX model never imports torch (here it cannot)."""
    _, out = exported
    for path in (out, int8_path(out)):
        done = subprocess.run([sys.executable, "-c", NO_TORCH, str(path)], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["torch"] == [] and result["shape"] == [3, len(SHAPES)] and result["threads"] == 1
        assert np.allclose(result["sums"], 1, atol=1e-5)


def test_backends_agree(trained, exported):
    checkpoint, data = trained
    _, out = exported
    threads = torch.get_num_threads()
    try:
        on_torch = load_backend(checkpoint, threads=1)
    finally:
        torch.set_num_threads(threads)
    on_onnx = load_backend(out, threads=2)
    assert isinstance(on_torch, TorchBackend) and isinstance(on_onnx, OnnxBackend)
    assert (on_torch.kind, on_onnx.kind) == ("torch", "onnxruntime")
    assert on_torch.classes == on_onnx.classes and on_torch.name == on_onnx.name
    assert on_torch.metadata["metrics"] == on_onnx.metadata["metrics"]
    images = load_bitmaps(list(SHAPES), root=data).images[::7].numpy()
    p, q = on_torch.probabilities(images), on_onnx.probabilities(images)
    assert p.dtype == q.dtype == np.float32 and p.shape == (len(images), len(SHAPES))
    np.testing.assert_allclose(p, q, atol=1e-5)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)


def test_backend_errors(trained, exported, tmp_path):
    checkpoint, _ = trained
    _, out = exported
    with pytest.raises(ModelFileError, match=r"unknown model file type '\.h5'.*expected \.onnx"):
        load_backend(tmp_path / "model.h5")
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_backend(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match=r"junk\.onnx is not an ONNX model"):
        load_backend(tmp_path / "junk.onnx")
    foreign = onnx.load(out)
    del foreign.metadata_props[:]
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(ModelFileError, match=r"foreign\.onnx has no class names .* python -m utils\.export"):
        load_backend(tmp_path / "foreign.onnx")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match=r"junk\.pt is not a checkpoint"):
        load_backend(tmp_path / "junk.pt")
    backend = load_backend(out)
    for bad, message in ((np.zeros((2, 28, 28), np.float32), "must be uint8"), (np.zeros((28, 28), np.uint8), r"\(N, 28, 28\)"),
                         (np.zeros((0, 28, 28), np.uint8), "N >= 1"), (np.zeros((1, 1, 28, 28), np.uint8), r"got \(1, 1, 28, 28\)")):
        with pytest.raises(ValueError, match=message):
            backend.probabilities(bad)
    assert check_bitmaps(np.zeros((4, 28, 28), np.uint8)[::2]).flags.c_contiguous
