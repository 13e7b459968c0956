"""An attention processor that also reports the per-token statistics the ToCa scores need.

On full steps of a block whose score needs them, it computes attention explicitly in chunks of queries
and reduces each chunk at once (attention received per key, entropy per query, value norm), so no N×N
map is ever kept. Otherwise it defers to the processor it wraps, which keeps fused SDPA on partial steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .scores import attention_entropy, attention_received, head_mean

# statistic name -> receives the (B, n) tensor
StatisticSink = Callable[[torch.Tensor], None]


def unsupported_reason(attn: Any) -> str | None:
    """Why the explicit path cannot reproduce this attention module, or None."""
    for name in ("spatial_norm", "group_norm", "norm_q", "norm_k"):
        if getattr(attn, name, None) is not None:
            return f"attention with {name} is not supported by the attention-based scores"
    if getattr(attn, "residual_connection", False):
        return "attention with residual_connection is not supported by the attention-based scores"
    return None


class ScoringAttnProcessor:
    """Wraps a diffusers attention processor; ``request()`` returns where to send statistics, or None."""

    def __init__(self, inner: Any, statistic: str, request: Callable[[], StatisticSink | None],
                 chunk_size: int) -> None:
        self.inner = inner
        self.statistic = statistic  # "received" | "entropy" | "value_norm"
        self.request = request
        self.chunk_size = chunk_size

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        # Traced (tc.compile's compiled attention), the request would guard on the step and the block: that
        # path only serves calls that report nothing (tc.compile runs the reporting ones eagerly).
        sink = None if torch.compiler.is_compiling() else self.request()
        if sink is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask, sink)

    def _explicit(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, sink: StatisticSink) -> torch.Tensor:
        batch, num_queries, _ = hidden_states.shape
        if context is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        num_keys = context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, num_keys, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))

        out = torch.empty_like(query)
        received = torch.zeros(batch, num_keys, dtype=torch.float32, device=query.device)
        entropy = torch.empty(batch, num_queries, dtype=torch.float32, device=query.device)
        for start in range(0, num_queries, self.chunk_size):
            stop = min(start + self.chunk_size, num_queries)
            mask = attention_mask
            if mask is not None and mask.shape[1] != 1:
                mask = mask[:, start:stop]
            probs = attn.get_attention_scores(query[:, start:stop], key, mask)
            out[:, start:stop] = torch.bmm(probs, value)
            if self.statistic == "received":
                received += attention_received(head_mean(probs, batch, attn.heads))
            elif self.statistic == "entropy":
                entropy[:, start:stop] = attention_entropy(head_mean(probs, batch, attn.heads))

        if self.statistic == "received":
            sink(received)
        elif self.statistic == "entropy":
            sink(entropy)
        else:
            heads = attn.heads
            norms = value.float().view(batch, heads, num_keys, -1).norm(dim=-1).mean(dim=1)
            sink(norms)

        hidden_states = attn.batch_to_head_dim(out)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states / attn.rescale_output_factor
