"""The official settings of the papers' reference implementations, as named presets.

Figures from ALGORITHMS.md §1 (ToCa) and §3 (FORA); step and depth formulas are in this project's
convention: step ``i = 0`` is the first (noisiest) step, block ``l = 0`` the first block.
"""

from __future__ import annotations

from typing import Any

from .config import DepthRamp, FORAConfig, StepRamp, ToCaConfig
from .forecast import ForecastConfig

# DiT-XL/2: attention work moved to the MLP, M(attn) = 1 - (1 - 0.6) * 2.5 = 0 and M(mlp) = 1 + 0.6 * 2.5.
_DIT_COMMON: dict[str, Any] = dict(
    fresh_ratio=0.07,
    module_ratio={"self_attn": 0.0, "mlp": 2.5},
    interval_ramp=StepRamp(0.6, 0.8, offset=1),
    sensitive_window=(0.6, 0.8),
    sensitive_interval=2,
    score="attention",
    frequency_weight=0.25,
    spatial_cell_size=2,
    spatial_bonus=0.6,
    cfg_shared_selection=False,
    # Full steps where the official DiT-ToCa code puts them (count-down index, mixed steps); "relative" gives
    # 10.30 and 43.93 TFLOPs. With tc.plan(..., counting="toca"), which counts as the official code's FLOP
    # counter does, the plan gives the published 23.74 -> 10.23 (2.320x) and 118.68 -> 43.42 (2.733x) to the
    # last digit; the engine's own count of the same schedule is 23.744 -> 10.252 and 118.72 -> 43.52.
    full_step_placement="official",
)

ToCaConfig._PRESETS.update(
    {
        "dit-ddim50": (
            "DiT-XL/2 256, DDIM 50 steps, N=3, R0=0.07 (2.32x FLOPs)",
            dict(_DIT_COMMON, full_step_interval=3, step_ratio=StepRamp(-1.0, 4.0, offset=1),
                 depth_ratio=DepthRamp(0.8, 0.4)),
        ),
        "dit-ddpm250": (
            "DiT-XL/2 256, DDPM 250 steps, N=4, R0=0.07 (2.73x FLOPs)",
            dict(_DIT_COMMON, full_step_interval=4, step_ratio=StepRamp(0.6, 0.8, offset=1),
                 depth_ratio=DepthRamp(1.8, -1.6)),
        ),
        "pixart-dpm20": (
            "PixArt-alpha 256, DPM-Solver 20 steps, N=3, R0=0.30, cross-attention entropy score",
            dict(
                fresh_ratio=0.30,
                step_ratio=StepRamp(1.9, -1.8),
                depth_ratio=DepthRamp(1.6, -1.2),
                module_ratio={"self_attn": 0.0, "cross_attn": 0.6, "mlp": 1.6},
                full_step_interval=3,
                interval_ramp=StepRamp(0.8, 0.4),
                score="cross_attention_entropy",
                frequency_weight=0.25,
                spatial_cell_size=4,
                spatial_bonus=0.4,
                cfg_shared_selection=True,
            ),
        ),
    }
)

FORAConfig._PRESETS.update(
    {
        "fora": ("FORA, full step every 3 steps (the ToCa paper's comparison setting)", dict(interval=3)),
        "fora-n2": ("FORA, full step every 2 steps", dict(interval=2)),
        "fora-n4": ("FORA, full step every 4 steps", dict(interval=4)),
        "fora-n6": ("FORA, full step every 6 steps", dict(interval=6)),
    }
)

# Forecasting between full steps (a module-level TaylorSeer with Newton's form) and the last step full: the
# settings that won on the shipped digits DiT (DDIM-50; benchmarks/results/frontier.md). Newton order 3 gave
# 48.2 dB PSNR at N=5 against 43.5 for TaylorSeer's form and 41.8 for order 1; at N=7 order 2 did best.
FORAConfig._PRESETS.update(
    {
        f"forecast-n{n}": (
            f"FORA schedule, full step every {n} steps and the last one; Newton forecast of order {order} in between",
            dict(interval=n, last_full_steps=1, forecast=ForecastConfig(order=order, expansion="newton")),
        )
        for n, order in ((3, 3), (4, 3), (5, 3), (6, 2), (7, 2))
    }
)

_CONFIG_CLASSES = (ToCaConfig, FORAConfig)


def presets() -> dict[str, str]:
    """Every preset name, with the config class that takes it and a one-line description."""
    listing: dict[str, str] = {}
    for cls in _CONFIG_CLASSES:
        for name, (description, _) in cls._PRESETS.items():
            listing[name] = f"{cls.__name__}: {description}"
    return listing


def preset(name: str):
    """Build the config registered under ``name``, whichever config class owns it."""
    for cls in _CONFIG_CLASSES:
        if name in cls._PRESETS:
            return cls.preset(name)
    raise ValueError(f"preset name must be one of {sorted(presets())} (ToCaConfig: {sorted(ToCaConfig._PRESETS)}; "
                     f"FORAConfig: {sorted(FORAConfig._PRESETS)}); got {name!r}")
