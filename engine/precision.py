"""Numeric precision: the --precision names and the autocast context they select."""
from contextlib import nullcontext

import torch

from utils.errors import InputError

# The one table of precision names (flags, benchmarks, the inference API).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto",) + tuple(PRECISIONS)


class PrecisionError(InputError, ValueError):
    """A precision name that is not one of PRECISION_CHOICES."""


def resolve_precision(precision, device):
    """A precision name (or "auto") -> autocast dtype. auto: bf16 on GPUs that have it, else fp32."""
    if not isinstance(precision, str) or precision not in PRECISION_CHOICES:
        raise PrecisionError(f"precision={precision!r}: expected one of {', '.join(PRECISION_CHOICES)}")
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return PRECISIONS[precision]


def autocast(device, dtype):
    """torch.autocast to `dtype` on `device`, or nothing for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
