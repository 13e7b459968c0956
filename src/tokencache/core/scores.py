"""Token importance scores and the top-k selection of fresh tokens (ToCa §3.3).

Raw statistics come from the last full step (attention received, cross-attention entropy, value norm)
or from the current input (similarity, random); :func:`select_fresh_tokens` turns them into a score,
adds the cache-frequency term and the spatial bonus, and takes the top ``k`` per sample.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ScoreName = Literal["attention", "cross_attention_entropy", "value_norm", "similarity", "random", "forecast_error",
                    "forecast_term"]
SCORES: tuple[str, ...] = ("attention", "cross_attention_entropy", "value_norm", "similarity", "random",
                           "forecast_error", "forecast_term")
FORECAST_SCORES: tuple[str, ...] = ("forecast_error", "forecast_term")
"""The scores that rank tokens by their forecast (they need ``forecast`` on)."""

# Scores whose raw statistic is computed inside an attention module on full steps.
SCORES_FROM_ATTENTION = {"attention": "self_attn", "value_norm": "self_attn", "cross_attention_entropy": "cross_attn"}


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Normalise each row (sample) to unit L2 norm over tokens."""
    return F.normalize(x.float(), p=2, dim=-1)


def score_from_raw(score: str, raw: torch.Tensor) -> torch.Tensor:
    """Turn a raw per-token statistic (B, n) into an importance score (B, n); higher = recompute."""
    if score == "cross_attention_entropy":
        return l2_normalize(1.0 + raw)
    if score == "similarity":
        return l2_normalize(1.0 - raw)
    if score == "random":
        return raw.float()
    if score in ("forecast_error", "forecast_term"):
        return l2_normalize(raw)
    return l2_normalize(raw)


def frequency_term(steps_since_fresh: torch.Tensor, full_step_interval: int, weight: float) -> torch.Tensor:
    """s3: ``weight * c_j / N``, where ``c_j`` counts partial steps since token ``j`` was recomputed."""
    return weight * steps_since_fresh.float() / full_step_interval


def spatial_bonus(score: torch.Tensor, grid: tuple[int, int], cell: int, bonus: float) -> torch.Tensor:
    """s4: split the (h, w) token grid into ``cell`` x ``cell`` cells and multiply the best score of each
    cell by ``1 + bonus``, spreading the selection over the image. Edge cells may be smaller."""
    h, w = grid
    batch, n = score.shape
    if h * w != n:
        raise ValueError(f"token grid {h}x{w} does not match {n} tokens")
    if bonus == 0.0:
        return score
    ph, pw = -h % cell, -w % cell
    grid_scores = score.view(batch, 1, h, w)
    padded = F.pad(grid_scores, (0, pw, 0, ph), value=float("-inf"))
    # Max-pool with indices finds each cell's best token in one pass.
    _, flat_idx = F.max_pool2d(padded, cell, stride=cell, return_indices=True)
    flat_idx = flat_idx.view(batch, -1)
    rows, cols = flat_idx // (w + pw), flat_idx % (w + pw)
    token_idx = rows * w + cols
    multiplier = torch.ones_like(score)
    multiplier.scatter_(1, token_idx, 1.0 + bonus)
    return score * multiplier


def topk_tokens(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the ``k`` highest scores per sample."""
    return torch.topk(score, k, dim=-1, sorted=False).indices


def head_mean(probs: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Average attention probabilities (B*heads, q, kv) over heads, in float32: (B, q, kv)."""
    return probs.float().view(batch, heads, probs.shape[1], probs.shape[2]).mean(dim=1)


def attention_received(mean_probs: torch.Tensor) -> torch.Tensor:
    """Attention each key receives, summed over queries: (B, q, kv) -> (B, kv)."""
    return mean_probs.sum(dim=1)


def attention_entropy(mean_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each query's distribution over keys: (B, q, kv) -> (B, q)."""
    return -(mean_probs * torch.log(mean_probs.clamp_min(1e-20))).sum(dim=-1)
