"""Forecasting the transformer's whole output (``ForecastConfig(target="output")``).

On a step that recomputes nothing the transformer is not run: its output is the expansion of its last computed
outputs (or the last one itself at order 0). The expansion is :class:`~tokencache.core.forecast.TokenForecaster`'s
on each output tensor seen as one token per sample, so it shares the module-level forecast's arithmetic and
its scalar fast path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .forecast import ForecastConfig, TokenForecaster, forecast_flops
from .state import OutputState, SlotState


def split_output(output: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors of a transformer's output and how to rebuild an output of the same form from others: a
    tensor, a tuple or list of tensors (``return_dict=False``) or a diffusers ``BaseOutput`` of tensors."""
    if torch.is_tensor(output):
        return [output], lambda tensors: tensors[0]
    if isinstance(output, (tuple, list)):
        if all(torch.is_tensor(t) for t in output):
            kind = type(output)
            return list(output), lambda tensors: kind(tensors)
    elif hasattr(output, "keys"):  # BaseOutput: an ordered mapping of its set fields
        keys = list(output.keys())
        if keys and all(torch.is_tensor(output[k]) for k in keys):
            kind = type(output)
            return [output[k] for k in keys], lambda tensors: kind(**dict(zip(keys, tensors, strict=True)))
    raise TypeError(f"ForecastConfig(target='output') forecasts tensors, but the transformer returned "
                    f"{type(output).__name__} holding other values; use target='modules'")


class OutputForecaster:
    """Stores the outputs of computed steps and forecasts those of skipped ones, with the FLOPs of each."""

    def __init__(self, config: ForecastConfig, cache_dtype: torch.dtype | None = None) -> None:
        self.config = config
        self.cache_dtype = cache_dtype
        """Storage dtype of the outputs (``None``: the model's); the derivatives use ``config.dtype`` or it."""
        self.expansion = TokenForecaster(config) if config.order > 0 else None

    def flops(self, numel: int, full: bool) -> int:
        """Element-wise work on an output of ``numel`` elements (as the module forecast counts a whole cache)."""
        return forecast_flops(self.config, full, 0, 1, numel, 1, token_wise=False)

    def store(self, state: OutputState, output: Any, position: float) -> int:
        """Keep a computed output; returns the FLOPs of updating the expansion."""
        tensors, state.rebuild = split_output(output)
        if len(tensors) != len(state.tensors):
            state.tensors = [SlotState() for _ in tensors]
        state.shapes = [t.shape for t in tensors]
        work = 0
        for slot, tensor in zip(state.tensors, tensors, strict=True):
            # a copy: the pipeline owns the tensor it was handed and may change it in place
            flat = tensor.detach().reshape(tensor.shape[0], 1, -1).to(self.cache_dtype or tensor.dtype, copy=True)
            if self.expansion is not None:
                self.expansion.update_all(slot, flat, position)
            slot.output = flat
            slot.output_dtype = tensor.dtype
            work += self.flops(tensor.numel(), full=True)
        return work

    def forecast(self, state: OutputState, position: float) -> tuple[Any, int]:
        """The output at ``position`` and the FLOPs of computing it."""
        if state.rebuild is None:
            raise RuntimeError("ForecastConfig(target='output'): no computed output to forecast from; the first "
                               "step of a run must be full")
        tensors, work = [], 0
        for slot, shape in zip(state.tensors, state.shapes, strict=True):
            value = (self.expansion.predict(slot, position) if self.expansion is not None
                     else slot.output.to(slot.output_dtype))
            if value is slot.output:  # nothing to add yet: hand out a copy, never the cache itself
                value = value.clone()
            tensors.append(value.reshape(shape))
            work += self.flops(value.numel(), full=False)
        return state.rebuild(tensors), work
