"""tokencache: token-wise feature caching for diffusion transformers.

    import tokencache as tc
    handle = tc.apply(pipe, tc.ToCaConfig.preset("dit-ddim50"))
    image = pipe(class_labels=[207], num_inference_steps=50).images[0]
    print(handle.stats())
    handle.remove()
"""

from . import models as _models  # noqa: F401  (registers the model families' layouts, shapes and presets)
from .core.compile import compile
from .core.forecast import ForecastConfig
from .core.handle import CacheHandle, CacheStats, ExpertsHandle, apply
from .core.layouts import BlockLayout, ModuleSlot, register_layout, supported_block_classes
from .core.plan import Plan, plan
from .core.presets import preset, presets
from .core.small_linear import SmallBatchLinearConfig, SmallBatchLinearHandle, apply_small_batch_linear
from .methods.fora import FORAConfig
from .methods.toca import BlockFactors, DepthRamp, StepRamp, ToCaConfig
from .methods.token_cache import TPRR, TokenCacheConfig, TokenCachePredictor
from .methods.token_cache_calibration import CalibrationConfig, calibrate, class_calls

__version__ = "0.1.0"

__all__ = [
    "BlockFactors",
    "BlockLayout",
    "CacheHandle",
    "CalibrationConfig",
    "CacheStats",
    "DepthRamp",
    "ExpertsHandle",
    "FORAConfig",
    "ForecastConfig",
    "ModuleSlot",
    "Plan",
    "SmallBatchLinearConfig",
    "SmallBatchLinearHandle",
    "StepRamp",
    "TPRR",
    "ToCaConfig",
    "TokenCacheConfig",
    "TokenCachePredictor",
    "apply",
    "apply_small_batch_linear",
    "calibrate",
    "class_calls",
    "compile",
    "plan",
    "preset",
    "presets",
    "register_layout",
    "supported_block_classes",
]


def __getattr__(name: str):
    # tc.metrics and tc.demo need the demo extra (torchmetrics, scikit-learn): imported on first use.
    if name in ("metrics", "demo"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tokencache' has no attribute {name!r}")
