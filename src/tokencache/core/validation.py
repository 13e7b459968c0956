"""Checks shared by every config: a bad value raises ``ValueError`` naming the class, the field and what is
allowed, when the config is built and before any model work starts."""

from __future__ import annotations

import math
from typing import Any

import torch

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def field_error(cls: type, name: str, allowed: str, value: Any) -> ValueError:
    """The error for field ``name`` of ``cls`` holding ``value`` where ``allowed`` is expected."""
    return ValueError(f"{cls.__name__}.{name} must be {allowed}; got {value!r}")


def _short(value: Any) -> Any:
    """``value`` for an error message: a huge integer as its magnitude, not hundreds of digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return _Magnitude(value)
    return value


class _Magnitude:
    def __init__(self, value: int) -> None:
        self.text = f"{'-' if value < 0 else ''}an integer of {len(str(abs(value)))} digits"

    def __repr__(self) -> str:
        return self.text


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) that is finite; an int too large for a float is not:
    no field means such a value, and maths on it overflows."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_number(cls: type, name: str, value: Any, lo: float | None = None, hi: float | None = None,
                 integer: bool = False, lo_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite (integer) number in the given range."""
    kinds = (int,) if integer else (int, float)
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        bounds.append(f"<= {hi}")
    allowed = ("an integer" if integer else "a finite number") + (" " + " and ".join(bounds) if bounds else "")
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise field_error(cls, name, allowed, value)
    if not is_finite_number(value):
        raise field_error(cls, name, allowed + " (within float range)", _short(value))
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise field_error(cls, name, allowed, value)
    if hi is not None and value > hi:
        raise field_error(cls, name, allowed, value)


def check_cache_dtype(cls: type, value: Any) -> None:
    if value is not None and value not in CACHE_DTYPES:
        raise field_error(cls, "cache_dtype", "None (the model's dtype) or one of torch.float32, torch.float16, "
                          "torch.bfloat16", value)
