"""What this machine's CPU can do for bf16: the instruction sets seen (AMX, AVX512-BF16), detected, never assumed."""

from __future__ import annotations

import functools
import platform

# the flags that make a bf16 matmul faster than fp32 on a CPU (oneDNN uses them), best first
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
REPORTED_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512f", "avx2", "fma")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (text given for tests); empty when the
    file is absent (not Linux) or has no flags line (some ARM kernels call it Features: read that too)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def bf16_unit(flags: frozenset[str] | None = None) -> str | None:
    """The CPU's bf16 matmul unit: "amx_bf16", "avx512_bf16", or None (bf16 would be emulated: slower than fp32).
    ``flags`` None reads this machine's and also asks torch's oneDNN whether it runs bf16 natively."""
    if flags is None:
        flags = cpu_flags()
        if not _onednn_bf16():
            return None
    return next((f for f in BF16_FLAGS if f in flags), None)


@functools.lru_cache(maxsize=1)
def _onednn_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def describe() -> dict:
    """Machine summary for benchmark reports: CPU model, the reported flags present, the bf16 unit."""
    flags = cpu_flags()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "flags": [f for f in REPORTED_FLAGS if f in flags],
            "bf16_unit": bf16_unit()}


def resolve_precision(precision: str, device_type: str, unit: str | None = None, cuda_bf16: bool = False,
                      ) -> tuple[str, str | None]:
    """``run.precision`` as trained on this device: (precision, a one-line notice or None).

    "auto": bf16 where the hardware computes it natively (a CPU with a bf16 unit, ``bf16_unit()``; a CUDA device
    with bf16 support), else fp32. "bf16" stays bf16, with a notice when the CPU has no bf16 unit (then emulated,
    slower than fp32). ``unit`` and ``cuda_bf16`` describe the device (tests pass them; see ``precision_for``)."""
    native = cuda_bf16 if device_type == "cuda" else unit is not None
    if precision == "auto":
        chosen = "bf16" if native else "fp32"
        why = f"the CPU's {unit}" if device_type != "cuda" and native else (
            "CUDA bf16" if native else "no bf16 unit seen (amx_bf16, avx512_bf16)" if device_type != "cuda"
            else "this GPU has no bf16")
        return chosen, f"run.precision auto -> {chosen} ({why})"
    if precision == "bf16" and device_type != "cuda" and not native:
        return "bf16", ("run.precision bf16 on a CPU without a bf16 unit (amx_bf16, avx512_bf16 not seen): bf16 is "
                        "emulated there, slower than fp32; run.precision: auto picks fp32 on such CPUs")
    return precision, None


def precision_for(precision: str) -> tuple[str, str | None]:
    """``resolve_precision`` for this process's device (CUDA when present, else this CPU)."""
    import torch

    if torch.cuda.is_available():
        return resolve_precision(precision, "cuda", cuda_bf16=torch.cuda.is_bf16_supported())
    return resolve_precision(precision, "cpu", unit=bf16_unit())
