"""TokenCache: a learned Cache Predictor picks, per block and step, the tokens whose cached output is reused,
on a Two-Phase Round-Robin (TPRR) step schedule, with per-block pruning ratios allocated by block sensitivity.
Its configuration, schedule, policy and token selection, and the predictor itself (trained by
:func:`tokencache.calibrate`, in ``token_cache_calibration.py``).

The Cache Predictor gives, per block and step, an importance weight in [0, 1] for every token. Two variants:
- ``position``: the paper's ``g(l, t)``: the weights depend on block, step and token position only, so a
  whole run's weights can be computed once.
- ``features``: adds cheap features of each token's module input (its change since the token was last
  computed, and its size), so the ranking follows the sample's content.

Saved with :meth:`TokenCachePredictor.save_pretrained` as ``predictor.safetensors`` plus ``predictor.json`` (the
architecture, the model it was calibrated for, and the calibration: budget, schedule, block sensitivity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.forecast import check_forecast
from ..core.layouts import MODULE_KINDS
from ..core.schedule import whole_steps
from ..core.scores import SCORES, topk_tokens
from ..core.state import SlotState, StepContext
from ..core.validation import check_cache_dtype, check_number, field_error, is_finite_number
from .toca import ToCaConfig, ToCaSelector

VARIANTS = ("position", "features")
NUM_FEATURES = 3
WEIGHTS_NAME = "predictor.safetensors"
CONFIG_NAME = "predictor.json"
FORMAT_VERSIONS = (1,)
"""``version`` values of ``predictor.json`` this code reads."""
MAX_BUDGET = 0.95
"""Largest pruning ratio of one block (and so the largest mean budget) :func:`allocate_block_ratios` gives."""


@dataclass(frozen=True)
class TPRR:
    """Two-Phase Round-Robin step schedule: a full step, then ``early_cached_steps`` cached steps, repeated
    while the progress ``i / T`` is below ``boundary``; after it, ``late_cached_steps`` cached steps per full
    step. Equal phases give a fixed interval. The defaults won the sweep on the shipped digits DiT at ToCa N=4's
    FLOPs (DDIM-50): 41.6 dB PSNR against 38.2 for (5, 2) and 38.9 for a fixed interval (2, 2); (3, 1) and
    (4, 1) cannot reach that speed-up (benchmarks/results/tokencache-ablation.md)."""

    early_cached_steps: int = 3
    """K1: cached steps after each full step in the early (high-noise) phase."""
    late_cached_steps: int = 2
    """K2: cached steps after each full step in the late phase."""
    boundary: float = 0.5
    """Progress at which the late phase starts, in [0, 1]."""

    def __post_init__(self) -> None:
        check_number(TPRR, "early_cached_steps", self.early_cached_steps, 0, integer=True)
        check_number(TPRR, "late_cached_steps", self.late_cached_steps, 0, integer=True)
        check_number(TPRR, "boundary", self.boundary, 0.0, 1.0)

    def full_steps(self, num_steps: int) -> tuple[bool, ...]:
        full: list[bool] = []
        next_full = 0
        for step in range(num_steps):
            is_full = step >= next_full
            if is_full:
                early = step / num_steps < self.boundary
                next_full = step + 1 + (self.early_cached_steps if early else self.late_cached_steps)
            full.append(is_full)
        return tuple(full)


TOKEN_SELECTIONS: tuple[str, ...] = ("predictor", *SCORES)
"""How TokenCache ranks tokens: its predictor, or a ToCa score."""


@dataclass(frozen=True)
class TokenCacheConfig:
    """TokenCache: a learned Cache Predictor picks, per block and step, the tokens whose cached output is
    reused; the others are recomputed. Calibrate a predictor with :func:`tokencache.calibrate`."""

    predictor: Any
    """A calibrated :class:`tokencache.TokenCachePredictor`."""
    budget: float | None = None
    """Mean fraction of tokens taken from the cache on cached steps, in [0, 0.95] (the per-block cap of the
    ratio allocation); ``None`` uses the budget the predictor was calibrated for."""
    schedule: TPRR | None = None
    """Full/cached step schedule; ``None`` uses the one the predictor was calibrated with."""
    adaptive_blocks: bool = True
    """Allocate per-block pruning ratios by measured block sensitivity (calibration); False: the same ratio
    in every block."""
    token_selection: str | None = None
    """``predictor``, or a ToCa score name that replaces the predictor's ranking; ``None`` uses the ranking the
    calibration recorded as the winner (``calibration["token_selection"]``, else ``predictor``)."""
    partial_modules: tuple[str, ...] = ("cross_attn", "mlp")
    """Module types recomputed on the kept tokens; the others (self-attention) are reused whole on cached
    steps."""
    cache_dtype: torch.dtype | None = None
    """Storage dtype of the caches; ``None`` keeps the model's dtype."""
    forecast: Any = None
    """A :class:`tokencache.ForecastConfig`: pruned tokens get the Taylor expansion of their own history
    instead of their cached output; ``None`` reuses it."""

    def __post_init__(self) -> None:
        cls = type(self)
        if not isinstance(self.predictor, TokenCachePredictor):
            raise field_error(cls, "predictor", "a TokenCachePredictor (see tokencache.calibrate)",
                              type(self.predictor))
        # what the run will read from the predictor's calibration, checked now rather than mid-run
        self.predictor.check_calibration(budget=self.budget is None, schedule=self.schedule is None,
                                         sensitivity=self.adaptive_blocks is True,
                                         token_selection=self.token_selection is None)
        if self.budget is not None:
            # the run allocates per-block ratios capped at MAX_BUDGET; accept exactly what it accepts
            check_number(cls, "budget", self.budget, 0.0, MAX_BUDGET)
        if self.schedule is not None and not isinstance(self.schedule, TPRR):
            raise field_error(cls, "schedule", "None or a TPRR", self.schedule)
        if not isinstance(self.adaptive_blocks, bool):
            raise field_error(cls, "adaptive_blocks", "True or False", self.adaptive_blocks)
        if self.token_selection is not None and self.token_selection not in TOKEN_SELECTIONS:
            raise field_error(cls, "token_selection", f"None or one of {TOKEN_SELECTIONS}", self.token_selection)
        if (not isinstance(self.partial_modules, tuple) or not self.partial_modules
                or any(k not in MODULE_KINDS for k in self.partial_modules)):
            raise field_error(cls, "partial_modules", f"a non-empty tuple of {MODULE_KINDS}", self.partial_modules)
        check_cache_dtype(cls, self.cache_dtype)
        check_forecast(cls, self.forecast)

    @property
    def effective_budget(self) -> float:
        return self.predictor.calibration["budget"] if self.budget is None else self.budget

    @property
    def effective_schedule(self) -> TPRR:
        return self.schedule if self.schedule is not None else TPRR(**self.predictor.calibration["schedule"])

    @property
    def effective_token_selection(self) -> str:
        if self.token_selection is not None:
            return self.token_selection
        return self.predictor.calibration.get("token_selection", "predictor")

    def block_ratios(self) -> list[float]:
        """Fraction of tokens reused from the cache in each block on cached steps."""
        num_blocks = self.predictor.num_blocks
        if not self.adaptive_blocks:
            return [self.effective_budget] * num_blocks
        return allocate_block_ratios(self.predictor.calibration["block_sensitivity"], self.effective_budget)

    def validate_model(self, transformer: torch.nn.Module, num_blocks: int, num_tokens: int | None) -> None:
        self.predictor.check_compatible(transformer, num_blocks, num_tokens)

    def build_policy(self, num_steps: int, num_blocks: int) -> TokenCachePolicy:
        return TokenCachePolicy(self, num_steps, num_blocks)

    def build_selector(self) -> PredictorSelector | ToCaSelector:
        selection = self.effective_token_selection
        if selection == "predictor":
            return PredictorSelector(self.predictor)
        return ToCaSelector(ToCaConfig(score=selection, frequency_weight=0.0))


class TokenCachePolicy:
    """TPRR full steps; on cached steps block ``l`` recomputes ``1 - ratio_l`` of the tokens in its partial
    modules and reuses the other modules whole."""

    def __init__(self, config: TokenCacheConfig, num_steps: int, num_blocks: int) -> None:
        predictor = config.predictor
        if num_steps != predictor.num_steps:
            raise ValueError(f"this TokenCachePredictor was calibrated for {predictor.num_steps} sampling steps; "
                             f"the run has {num_steps}. Calibrate one for {num_steps} steps")
        if num_blocks != predictor.num_blocks:
            raise ValueError(f"this TokenCachePredictor was calibrated for {predictor.num_blocks} blocks; "
                             f"the model has {num_blocks}")
        self.config = config
        self.num_steps = num_steps
        self.num_blocks = num_blocks
        self.full_steps = config.effective_schedule.full_steps(num_steps)
        self.full_blocks = whole_steps(self.full_steps, num_blocks)
        self.keep = [1.0 - r for r in config.block_ratios()]
        self.partial = set(config.partial_modules)

    def fresh_ratio(self, step: int, block: int, kind: str) -> float:
        return self.keep[block] if kind in self.partial else 0.0


class PredictorSelector:
    """TokenCache: keep the tokens with the highest predicted importance, per sample."""

    attention_statistic = None

    def __init__(self, predictor: TokenCachePredictor) -> None:
        self.predictor = predictor.eval()
        self.keeps_inputs = predictor.variant == "features"
        self._position: dict[tuple[int, int], torch.Tensor] = {}

    def reset(self, device: torch.device | None) -> None:
        self._position = {}

    def select(self, ctx: StepContext, block: int, slot: SlotState, tokens: torch.Tensor, k: int,
               token_set: str = "image") -> torch.Tensor:
        p = self.predictor
        if next(p.parameters()).device != tokens.device:
            p.to(tokens.device)
        batch = tokens.shape[0]
        with torch.no_grad():
            key = (block, ctx.step)
            if key not in self._position:  # the position part depends on (block, step) only
                index = torch.tensor([block], device=tokens.device)
                self._position[key] = p.position_logits(index, torch.tensor([ctx.step], device=tokens.device))
            logits = self._position[key].expand(batch, -1)
            if p.variant == "features":
                features = token_features(tokens, slot.last_input)
                logits = logits + (features * p.feature_weight[block]).sum(-1)
        return topk_tokens(logits, k)


# ---- the Cache Predictor ----------------------------------------------------------------------------------------


def token_features(current: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Per-token features (B, n, 3) of a module input against the input when the token was last computed:
    relative change, cosine distance, and log size (scale-free, so one predictor serves every block)."""
    current, last = current.float(), last.float()
    last_norm = last.norm(dim=-1).clamp_min(1e-6)
    change = (current - last).norm(dim=-1) / last_norm
    cosine = 1.0 - F.cosine_similarity(current, last, dim=-1)
    size = torch.log(current.norm(dim=-1).clamp_min(1e-6) / last_norm.mean(dim=-1, keepdim=True))
    return torch.stack([change, cosine, size], dim=-1)


def allocate_block_ratios(sensitivity: list[float], budget: float, max_ratio: float = MAX_BUDGET) -> list[float]:
    """Per-block pruning ratios with mean ``budget`` that minimise ``sum_l s_l * p_l**2``: ``p_l`` is
    proportional to ``1 / s_l`` (less sensitive blocks prune more), capped at ``max_ratio`` with the excess
    spread over the other blocks (water-filling)."""
    if not 0.0 <= budget <= max_ratio:
        raise ValueError(f"budget must be in [0, {max_ratio}]; got {budget}")
    inverse = [1.0 / max(s, 1e-12) for s in sensitivity]
    total = budget * len(inverse)
    ratios = [0.0] * len(inverse)
    free = set(range(len(inverse)))
    while free:
        scale = total / sum(inverse[i] for i in free)
        capped = {i for i in free if scale * inverse[i] > max_ratio}
        if not capped:
            for i in free:
                ratios[i] = scale * inverse[i]
            break
        for i in capped:
            ratios[i] = max_ratio
            total -= max_ratio
        free -= capped
    return ratios


class TokenCachePredictor(nn.Module):
    """``g(l, t)`` as block and step embeddings through a small MLP to one logit per token; the
    ``features`` variant adds a per-block linear read-out of :func:`token_features`."""

    def __init__(self, num_blocks: int, num_tokens: int, num_steps: int, variant: str = "features",
                 hidden: int = 64, model: dict[str, Any] | None = None,
                 calibration: dict[str, Any] | None = None) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"TokenCachePredictor.variant must be one of {VARIANTS}; got {variant!r}")
        for name, value in (("num_blocks", num_blocks), ("num_tokens", num_tokens), ("num_steps", num_steps),
                            ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenCachePredictor.{name} must be an integer >= 1; got {value!r}")
        self.num_blocks, self.num_tokens, self.num_steps = num_blocks, num_tokens, num_steps
        self.variant, self.hidden = variant, hidden
        self.model = dict(model or {})
        """What it was calibrated for: ``class_name``, ``num_blocks``, ``num_tokens``, ``num_steps``."""
        self.calibration = dict(calibration or {})
        """``budget``, ``schedule`` (TPRR fields), ``block_sensitivity`` and training figures."""
        self.block_embedding = nn.Embedding(num_blocks, hidden)
        self.step_embedding = nn.Embedding(num_steps, hidden)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, num_tokens))
        if variant == "features":
            self.feature_weight = nn.Parameter(torch.zeros(num_blocks, NUM_FEATURES))
        with torch.no_grad():
            self.mlp[-1].weight.mul_(0.1)

    def position_logits(self, block: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Logits (B, n) for block and step indices of shape (B,)."""
        h = torch.cat([self.block_embedding(block), self.step_embedding(step)], dim=-1)
        return self.mlp(h)

    def logits(self, block: torch.Tensor, step: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.position_logits(block, step)
        if self.variant == "features":
            if features is None:
                raise ValueError("the features variant needs token features")
            logits = logits + (features * self.feature_weight[block][:, None, :]).sum(-1)
        return logits

    def forward(self, block: torch.Tensor, step: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Importance weights in [0, 1], (B, n): high = recompute, low = take from the cache."""
        return torch.sigmoid(self.logits(block, step, features))

    def flops_per_call(self, batch: int) -> int:
        """FLOPs of one block's weights at inference (the position part is one MLP row per sample)."""
        mlp = 2 * (2 * self.hidden * self.hidden + self.hidden * self.num_tokens)
        features = 12 * self.num_tokens * NUM_FEATURES if self.variant == "features" else 0
        return batch * (mlp + features)

    # ---- compatibility and persistence ------------------------------------------------------------
    def check_compatible(self, transformer: nn.Module, num_blocks: int, num_tokens: int | None) -> None:
        """Raise ``ValueError`` unless the transformer is the model this predictor fits: the recorded model
        (``self.model``, when there is one) and the predictor's own shape (``num_blocks``, ``num_tokens``: its
        MLP has one output per token, so a hand-built predictor with another count cannot rank this model's
        tokens)."""
        found: dict[str, Any] = {"class_name": type(transformer).__name__, "num_blocks": num_blocks}
        if num_tokens is not None:
            found["num_tokens"] = num_tokens
        want = {k: v for k, v in self.model.items() if k in found and v is not None}
        wrong = {k: (want[k], v) for k, v in found.items() if k in want and want[k] != v}
        if wrong:
            details = ", ".join(f"{k}: calibrated for {a!r}, the model has {b!r}" for k, (a, b) in wrong.items())
            raise ValueError(f"this TokenCachePredictor was calibrated for another model ({details})")
        own = {"num_blocks": (self.num_blocks, num_blocks), "num_tokens": (self.num_tokens, num_tokens)}
        wrong = {k: pair for k, pair in own.items() if pair[1] is not None and pair[0] != pair[1]}
        if wrong:
            details = ", ".join(f"TokenCachePredictor.{k} is {a}, the model has {b} {k.removeprefix('num_')}"
                                for k, (a, b) in wrong.items())
            raise ValueError(f"this TokenCachePredictor does not fit the model ({details}); build or calibrate one "
                             "for this model")

    def check_calibration(self, where: str = "TokenCachePredictor.calibration", budget: bool = True,
                          schedule: bool = True, sensitivity: bool = False, token_selection: bool = True) -> None:
        """Raise ``ValueError`` naming ``where`` and the field unless ``self.calibration`` holds what a run reads.

        A flag set to True requires that field (``budget`` in [0, MAX_BUDGET], ``schedule`` as TPRR fields,
        ``block_sensitivity`` as one finite number >= 0 per block); every field present is checked, and
        ``token_selection`` when present (it defaults to ``predictor``)."""
        c = self.calibration

        def fail(name: str, allowed: str, value: Any) -> ValueError:
            return ValueError(f"{where}: field 'calibration.{name}' must be {allowed}; got {value!r}")

        for name, needed in (("budget", budget), ("schedule", schedule), ("block_sensitivity", sensitivity)):
            if needed and name not in c:
                raise ValueError(f"{where}: the field 'calibration.{name}' is missing")
        if "budget" in c:
            value = c["budget"]
            if not is_finite_number(value) or not 0.0 <= value <= MAX_BUDGET:
                raise fail("budget", f"a number in [0, {MAX_BUDGET}]", value)
        if "schedule" in c:
            value = c["schedule"]
            names = ("early_cached_steps", "late_cached_steps", "boundary")
            if not isinstance(value, dict) or set(value) != set(names):
                raise fail("schedule", f"a mapping with the keys {names}", value)
            try:
                TPRR(**value)
            except ValueError as error:
                raise fail("schedule", f"valid TPRR fields ({error})", value) from error
        if "block_sensitivity" in c:
            value = c["block_sensitivity"]
            if (not isinstance(value, (list, tuple)) or len(value) != self.num_blocks
                    or not all(is_finite_number(v) and v >= 0 for v in value)):
                raise fail("block_sensitivity", f"a list of {self.num_blocks} finite numbers >= 0 (one per block)",
                           value)
        selection = c.get("token_selection")
        if token_selection and selection is not None and selection not in TOKEN_SELECTIONS:
            raise fail("token_selection", f"one of {TOKEN_SELECTIONS}", selection)
        adaptive = c.get("adaptive_blocks", True)
        if not isinstance(adaptive, bool):
            raise fail("adaptive_blocks", "true or false", adaptive)

    def config_dict(self) -> dict[str, Any]:
        return dict(format="tokencache-predictor", version=1, num_blocks=self.num_blocks,
                    num_tokens=self.num_tokens, num_steps=self.num_steps, variant=self.variant, hidden=self.hidden,
                    model=self.model, calibration=self.calibration)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TokenCachePredictor:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"no {path.name} in {directory}: not a saved TokenCachePredictor")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_path} is not valid JSON (truncated or corrupt): {error}") from error
        if not isinstance(config, dict) or config.get("format") != "tokencache-predictor":
            found = config.get("format") if isinstance(config, dict) else config
            raise ValueError(f"{config_path} is not a tokencache predictor config (its field 'format' must be "
                             f"'tokencache-predictor'; got {found!r})")
        predictor = cls(*_read_architecture(config, config_path))
        predictor.check_calibration(str(config_path), sensitivity=True)
        try:
            state = load_file(weights_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{weights_path} cannot be read (truncated or corrupt): {error}") from error
        expected = predictor.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise ValueError(f"{weights_path} does not match {config_path}: parameters or shapes differ")
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{weights_path}: the weight {name!r} holds NaN or infinite values (a diverged "
                                 "calibration or a corrupt file); calibrate again")
        predictor.load_state_dict(state)
        return predictor.eval()


def _read_architecture(config: dict[str, Any], path: Path) -> tuple:
    """The constructor arguments recorded in ``predictor.json``, each checked; errors name ``path`` and the field."""
    def fail(name: str, allowed: str, value: Any) -> ValueError:
        return ValueError(f"{path}: field {name!r} must be {allowed}; got {value!r}")

    required = ("version", "num_blocks", "num_tokens", "num_steps", "variant", "hidden", "calibration")
    missing = [name for name in required if name not in config]
    if missing:
        raise ValueError(f"{path}: the field(s) {missing} are missing (a saved TokenCachePredictor has {required})")
    if isinstance(config["version"], bool) or config["version"] not in FORMAT_VERSIONS:
        raise fail("version", f"one of {FORMAT_VERSIONS} (files written by a newer tokencache need a newer "
                   "tokencache)", config["version"])
    for name in ("num_blocks", "num_tokens", "num_steps", "hidden"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(name, "an integer >= 1", value)
    if config["variant"] not in VARIANTS:
        raise fail("variant", f"one of {VARIANTS}", config["variant"])
    model = config.get("model")
    if model is not None and not isinstance(model, dict):
        raise fail("model", "a mapping (class_name, num_blocks, num_tokens, num_steps) or null", model)
    if not isinstance(config["calibration"], dict):
        raise fail("calibration", "a mapping (budget, schedule, block_sensitivity, ...)", config["calibration"])
    return (config["num_blocks"], config["num_tokens"], config["num_steps"], config["variant"], config["hidden"],
            model, config["calibration"])
