"""Numeric precision: which autocast dtype an `--amp` setting means on a device (training and decoding)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

from seqgen.errors import SeqgenError

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def native_bf16(device: torch.device) -> bool:
    """True where bfloat16 matmuls run in hardware: a CUDA GPU with bf16 (Ampere on), or a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 is emulated, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":   # private probes (no public API yet): a torch without them answers False
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def autocast_dtype(amp: str, device: torch.device, *, bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of an `--amp` setting (TrainConfig.amp, GenerationConfig.amp) on `device`; None = no autocast (float32 throughout).

    auto: bfloat16 where the hardware has it (`native_bf16`), else off: there it trains and decodes about twice
    as fast as float32 with the same loss curves and BLEU (docs/performance.md, "bfloat16 on this CPU"). fp16
    needs loss scaling (the Trainer's GradScaler) and is for GPUs without bf16. bf16: whether `device` has native bfloat16 (for tests; default asks it).
    """
    if amp not in AMP_CHOICES:
        raise SeqgenError(f"--amp must be one of auto, off, bf16, fp16, got {amp!r}")
    bf16 = native_bf16(device) if bf16 is None else bf16
    if amp == "off" or (amp == "auto" and not bf16):
        return None
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda" and not bf16:
        raise SeqgenError(f"--amp bf16: {device} has no bfloat16; use --amp fp16 or off")
    return torch.bfloat16


def active_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast is casting to right now on `device_type` ("cpu", "cuda"), or None when it is off."""
    if hasattr(torch, "get_autocast_dtype"):   # torch >= 2.4
        on = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if on else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def autocast(amp: str, device: torch.device) -> ContextManager:
    """`torch.autocast` for `amp` on `device`, or a no-op context where it means float32."""
    dtype = autocast_dtype(amp, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


__all__ = ["AMP_CHOICES", "active_autocast_dtype", "autocast", "autocast_dtype", "native_bf16"]
