"""Keyword arguments for diffusers' ``from_pretrained`` at the places tokencache loads models."""

from __future__ import annotations

from typing import Any


def load_kwargs() -> dict[str, Any]:
    """``low_cpu_mem_usage=False`` when ``accelerate`` is not installed, else nothing.

    diffusers defaults to ``low_cpu_mem_usage=True``, which needs ``accelerate``; without it diffusers falls back
    to ``False`` itself and logs a warning on every load, which every tokencache command then printed. Asking for
    the fallback directly loads the same weights the same way, silently, and leaves the user's diffusers logging
    settings alone (with ``accelerate`` installed, diffusers' default stands)."""
    from diffusers.utils import is_accelerate_available

    return {} if is_accelerate_available() else {"low_cpu_mem_usage": False}
