"""TokenCache's Cache Predictor: per block and step, an importance weight in [0, 1] for every token.

Two variants:
- ``position``: the paper's ``g(l, t)``: the weights depend on block, step and token position only, so a
  whole run's weights can be computed once.
- ``features``: adds cheap features of each token's module input (its change since the token was last
  computed, and its size), so the ranking follows the sample's content.

Saved with :meth:`save_pretrained` as ``predictor.safetensors`` plus ``predictor.json`` (the architecture,
the model it was calibrated for, and the calibration: budget, schedule, block sensitivity).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

VARIANTS = ("position", "features")
NUM_FEATURES = 3
WEIGHTS_NAME = "predictor.safetensors"
CONFIG_NAME = "predictor.json"
FORMAT_VERSIONS = (1,)
"""``version`` values of ``predictor.json`` this code reads."""
MAX_BUDGET = 0.95
"""Largest pruning ratio of one block (and so the largest mean budget) :func:`allocate_block_ratios` gives."""


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
        from .config import TOKEN_SELECTIONS, TPRR

        c = self.calibration

        def fail(name: str, allowed: str, value: Any) -> ValueError:
            return ValueError(f"{where}: field 'calibration.{name}' must be {allowed}; got {value!r}")

        for name, needed in (("budget", budget), ("schedule", schedule), ("block_sensitivity", sensitivity)):
            if needed and name not in c:
                raise ValueError(f"{where}: the field 'calibration.{name}' is missing")
        if "budget" in c:
            value = c["budget"]
            if not _is_number(value) or not 0.0 <= value <= MAX_BUDGET:
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
                    or not all(_is_number(v) and v >= 0 for v in value)):
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


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


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
