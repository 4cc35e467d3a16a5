"""utils.device: device choice, seeding and the machine description."""
import random

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
