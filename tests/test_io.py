"""utils.io.atomic_write and utils.device.machine_info."""
import json

import pytest

from utils import device
from utils.io import atomic_write, write_json


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "f.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temporary left


def test_atomic_write_keeps_old_contents_on_error(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("flags, isa, expected", [
    ("avx2 avx512f amx_bf16", None, True),
    ("avx2 avx512f avx512_bf16", "AVX512_CORE_AMX", True),
    ("avx2 avx512f amx_bf16", "AVX2", False),      # oneDNN capped below its bf16 kernels
    ("avx2 fma", None, False),                      # AVX2-only CPU (e.g. AMD Zen 2)
])
def test_native_bf16_reads_flags_and_isa_cap(monkeypatch, flags, isa, expected):
    monkeypatch.setattr(device, "_cpuinfo", lambda: {"model name": "Test CPU", "flags": flags})
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert device.native_bf16_cpu() is expected
    info = device.machine_info()
    assert info["cpu"] == "Test CPU" and info["native_bf16"] is expected
    assert ("no native bf16" in device.describe_machine(info)) is not expected
