"""Tensor helpers shared by the checks: relative error, conversion to the check's precision."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def _error(actual: Tensor, expected: Tensor) -> float:
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    if not expected.numel():
        return 0.0
    scale = max(1.0, expected.abs().max().item())
    return (actual - expected).abs().max().item() / scale


def _convert(value: Any, dtype, device) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_convert(v, dtype, device) for v in value)
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype=dtype, device=device)
    return value
