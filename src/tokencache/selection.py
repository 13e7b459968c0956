"""ToCa's token selection: which tokens a module recomputes at a partial step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ToCaConfig
from .forecast import TokenForecaster, last_term_size, spread_over_clusters
from .predictor import TokenCachePredictor, token_features
from .scores import SCORES_FROM_ATTENTION, frequency_term, score_from_raw, spatial_bonus, topk_tokens
from .state import SharedSelection, SlotState, StepContext, StreamState


class ToCaSelector:
    """Scores tokens as configured and returns the top ``k`` per sample (shared across CFG halves when the
    stream is a CFG batch with ``cfg_shared_selection``)."""

    def __init__(self, config: ToCaConfig) -> None:
        self.config = config
        self.generator: torch.Generator | None = None
        self.forecaster = TokenForecaster(config.forecast) if config.forecast is not None else None

    @property
    def attention_statistic(self) -> tuple[str, str] | None:
        """(module kind, statistic) that attention processors must report on full steps, if any."""
        score = self.config.score
        if score not in SCORES_FROM_ATTENTION:
            return None
        statistic = {"attention": "received", "value_norm": "value_norm",
                     "cross_attention_entropy": "entropy"}[score]
        return SCORES_FROM_ATTENTION[score], statistic

    @property
    def keeps_inputs(self) -> bool:
        return self.config.score == "similarity"

    def reset(self, device: torch.device) -> None:
        self.generator = None
        self._device = device

    def _random(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.config.seed)
        return torch.rand(batch, num_tokens, generator=self.generator, device=device)

    def select(self, ctx: StepContext, block: int, slot: SlotState, tokens: torch.Tensor, k: int,
               token_set: str = "image") -> torch.Tensor:
        """Indices (B, k) of the tokens to recompute; ``tokens`` is the module input (B, n, D), ``token_set`` which
        of the block's token pools they are (a processor may report a statistic per pool)."""
        c = self.config
        stream: StreamState = ctx.stream
        batch, num_tokens = tokens.shape[0], tokens.shape[1]
        rows = batch // 2 if stream.cfg_shared else batch
        if c.score == "random":
            raw = self._random(rows, num_tokens, tokens.device)
        elif c.score in ("forecast_error", "forecast_term"):
            if c.score == "forecast_error":
                raw = slot.forecast_error
            else:
                raw = last_term_size(self.forecaster, slot, ctx.position)
            if stream.cfg_shared:
                raw = 0.5 * (raw[:rows] + raw[rows:])
        else:
            if c.score == "similarity":
                raw = F.cosine_similarity(tokens.float(), slot.last_input.float(), dim=-1)
            else:
                raw = stream.raw_scores.get(block)
                if isinstance(raw, dict):
                    raw = raw.get(token_set)
                if raw is None:
                    raise RuntimeError(f"no {c.score!r} statistic was recorded for the {token_set} tokens of block "
                                       f"{block} at the last full step")
            if stream.cfg_shared:
                raw = 0.5 * (raw[:rows] + raw[rows:])
        score = score_from_raw(c.score, raw)
        if c.frequency_weight > 0:
            score = score + frequency_term(slot.steps_since_fresh[:rows], c.full_step_interval, c.frequency_weight)
        if c.spatial_cell_size is not None:
            score = spatial_bonus(score, ctx.grid, c.spatial_cell_size, c.spatial_bonus)
        clusters = c.forecast.clusters if c.forecast is not None else 0
        if clusters and slot.clusters is not None:
            index = spread_over_clusters(score, slot.clusters[:rows], k, min(clusters, num_tokens))
        else:
            index = topk_tokens(score, k)
        if stream.cfg_shared:
            index = torch.cat([index, index], dim=0)
        return index


    def rank_shared(self, ctx: StepContext, shared: SharedSelection, tokens: torch.Tensor | None,
                    last_input: torch.Tensor | None, k: int) -> torch.Tensor:
        """The ``k`` best tokens of each sample (B, k), best first, chosen once per call for every block of a
        model with a shared selection: the score over the canonical tokens plus the staleness term of the
        shared counters, which then count this partial step (0 for the chosen tokens). ``tokens`` and
        ``last_input`` (B, N, D) are the choosing module's input now and when each token was last recomputed
        (the ``similarity`` score)."""
        c = self.config
        stream = ctx.stream
        rows = stream.batch // 2 if stream.cfg_shared else stream.batch
        counters = shared.steps_since_fresh
        if c.score == "random":
            raw = self._random(rows, stream.num_tokens, counters.device)
        elif c.score == "similarity":
            raw = F.cosine_similarity(tokens.float(), last_input.float(), dim=-1)
            if stream.cfg_shared:
                raw = 0.5 * (raw[:rows] + raw[rows:])
        else:
            raise ValueError(f"ToCaConfig.score {c.score!r} cannot choose tokens shared by every block; use "
                             "'random' or 'similarity'")
        score = score_from_raw(c.score, raw)
        if c.frequency_weight > 0:
            score = score + frequency_term(counters, c.full_step_interval, c.frequency_weight)
        index = torch.topk(score, k, dim=-1, sorted=True).indices
        counters += 1
        counters.scatter_(1, index, 0)
        if stream.cfg_shared:
            index = torch.cat([index, index], dim=0)
        return index


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
