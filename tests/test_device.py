"""utils.device: device choice, seeding and the machine description."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from utils import device
from utils.device import pick_device, set_seed


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"),
    (True, False, "cuda"),
    (False, True, "mps"),
    (False, False, "cpu"),
])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pick_device("auto") == torch.device(expected)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_an_unavailable_device_is_named_in_the_error(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=f"device '{name}' is not available"):
        pick_device(name)


def test_an_available_device_is_returned_as_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_set_seed_repeats_python_numpy_and_torch():
    def draw():
        return random.random(), np.random.rand(3), torch.rand(3)

    set_seed(3)
    a = draw()
    set_seed(3)
    b = draw()
    set_seed(4)
    c = draw()
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])
    # another seed changes every generator, so each one is really seeded by set_seed
    assert a[0] != c[0] and not np.array_equal(a[1], c[1]) and not torch.equal(a[2], c[2])


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


# A convolution (oneDNN), a matrix product (MKL) and ATen's dispatch, in a child under the cap.
UNDER_CAP = """
import torch
print(torch.backends.cpu.get_cpu_capability())
x = torch.randn(64, 32, 14, 14)
torch.nn.functional.conv2d(x, torch.randn(32, 32, 3, 3))
torch.randn(256, 256) @ torch.randn(256, 256)
"""


@pytest.mark.skipif("avx512f" not in device.cpu_flags() or not torch.backends.mkldnn.is_available()
                    or not torch.backends.mkl.is_available(),
                    reason="needs an x86 CPU with AVX-512 (something to cap) and torch built with oneDNN and MKL")
def test_the_avx2_cap_reaches_onednn_mkl_and_aten():
    """Each library has its own switch: a cap that misses one (MKL's matrix products) leaves part of the
    work at AVX-512 speed, and the AVX2 figures too fast."""
    env = {k: v for k, v in os.environ.items() if k not in device.AVX2_CAP} | device.AVX2_CAP
    env |= dict(ONEDNN_VERBOSE="1", MKL_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", UNDER_CAP], capture_output=True, text=True, timeout=120, env=env,
                         check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "AVX2"
    assert any(line.startswith("onednn_verbose") and "isa:Intel AVX2" in line for line in lines), out
    mkl = [line for line in lines if line.startswith("MKL_VERBOSE oneMKL")]
    assert mkl and "(Intel(R) AVX2)" in mkl[0] and "AVX-512" not in mkl[0], out
