"""The device a run uses, seeding, and a description of the machine for benchmark reports."""
from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch

# CPU flags that give oneDNN native bfloat16 arithmetic; without them bf16 is emulated (slow).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# The environment that makes torch on any x86 CPU run as on an AVX2-only one (no native bf16), per process:
# oneDNN (convolutions), ATen's own kernels, and MKL (matrix products: linear layers) each have their own switch.
AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# ONEDNN_MAX_CPU_ISA values that keep oneDNN off its bf16 kernels even where the CPU has them.
ISA_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def pick_device(preference: str = "auto") -> torch.device:
    """"auto": cuda, then mps, then cpu; otherwise the device named, if available."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if preference == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    kind = torch.device(preference).type
    if not available.get(kind, False):
        raise RuntimeError(f"device {preference!r} is not available here")
    return torch.device(preference)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def native_bf16_cpu() -> bool:
    """Whether this process's oneDNN may use native bf16 kernels: the CPU has them and no
    ONEDNN_MAX_CPU_ISA cap below them is set."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return bool(cpu_flags() & set(BF16_FLAGS)) and cap not in ISA_WITHOUT_BF16


def machine_info() -> dict:
    """What a benchmark figure depends on: CPU model, cores, torch's CPU capability, native bf16, versions."""
    info = _cpuinfo()
    return dict(
        cpu=info.get("model name") or platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16=native_bf16_cpu(),
        onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA"),
        aten_cpu_capability=os.environ.get("ATEN_CPU_CAPABILITY"),
        mkl_enable_instructions=os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        torch=torch.__version__,
        python=platform.python_version(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )


def describe_machine(info: dict | None = None) -> str:
    """One line naming the machine, for benchmark printouts."""
    info = info or machine_info()
    bf16 = "native bf16" if info["native_bf16"] else "no native bf16"
    caps = f"torch CPU capability {info['torch_cpu_capability']}"
    if info["onednn_max_cpu_isa"]:
        caps += f", ONEDNN_MAX_CPU_ISA={info['onednn_max_cpu_isa']}"
    if info.get("mkl_enable_instructions"):  # reports from before it was recorded have no such key
        caps += f", MKL_ENABLE_INSTRUCTIONS={info['mkl_enable_instructions']}"
    gpu = f", GPU {info['cuda']}" if info["cuda"] else ""
    return f"{info['cpu']}, {info['cores']} cores ({caps}; {bf16}){gpu}, torch {info['torch']}"
