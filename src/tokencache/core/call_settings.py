"""The guidance settings a diffusers pipeline call samples with: the value passed, else the call's default.

Samples, calibrated predictors and benchmark rows depend on them, so the places that make those record them."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

# Pipeline call arguments that change what is sampled at a given seed and step count (the Fashion model's
# pipeline adds ``guidance_interval``; diffusers' pipelines take ``guidance_scale``).
GUIDANCE_ARGUMENTS = ("guidance_scale", "guidance_interval")


def call_default(pipe: Any, name: str) -> Any:
    """The default of the pipeline call's argument ``name``; None if it has no such argument or no default."""
    param = inspect.signature(pipe.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def guidance_settings(pipe: Any, call_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``guidance_scale`` / ``guidance_interval`` of a call of ``pipe`` with ``call_kwargs`` (JSON-ready: floats
    and lists); arguments the pipeline does not take, or takes with no default and were not passed, are left out."""
    params = inspect.signature(pipe.__call__).parameters
    found: dict[str, Any] = {}
    for name in GUIDANCE_ARGUMENTS:
        value = call_kwargs[name] if name in call_kwargs else call_default(pipe, name) if name in params else None
        if value is None:
            continue
        found[name] = [float(v) for v in value] if isinstance(value, (tuple, list)) else float(value)
    return found
