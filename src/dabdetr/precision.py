"""Mixed precision: which autocast modes a device can run, and how fast.

`dabdetr train --amp` and `dabdetr predict/evaluate --optimize bf16` use torch.autocast: the
convolutions and matrix products run in the reduced precision (their outputs stay in it until an
operation with a float32 operand promotes them), while the model keeps its anchors, boxes and
outputs in float32, so the matcher and the loss work in float32. bfloat16 runs on CUDA and on
CPUs. On a CPU it is fast only with native bfloat16 instructions (AVX512-BF16, or AMX tiles on
Intel Xeon 4th generation and later). Elsewhere the CPU emulates it, slower than float32, and a
warning says so. float16 is CUDA only.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: the names `--amp` accepts, with their dtypes ("none" is float32)
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX-BF16)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:  # a torch without the capability report: assume not
        return False
    caps = get()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def check_amp(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of `amp` ("none", "bf16" or "fp16") on `device`, or None for
    float32. Raises ValueError where the device cannot run it; warns where it runs emulated."""
    if amp == "none":
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp mode {amp!r}; choose none, bf16 or fp16")
    device = torch.device(device)
    if device.type == "cuda":
        return AMP_DTYPES[amp]
    if amp == "fp16" or device.type != "cpu":
        where = "CUDA or the CPU" if amp == "bf16" else "CUDA"
        raise ValueError(f"amp={amp!r} runs on {where} only; this run is on {device}")
    if not cpu_has_native_bf16():
        logger.warning("bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX): torch "
                       "emulates it, which is slower than float32")
    return AMP_DTYPES[amp]
