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


def unsupported_reason(attn: Any, statistic: str = "received") -> str | None:
    """Why no scoring processor can reproduce this attention module, or None."""
    if type(attn).__name__ == "FluxAttention":
        if statistic != "received":
            return f"FLUX's joint attention reports only the 'attention' score's statistic, not {statistic!r}"
        if getattr(attn, "fused_projections", False):
            return "fused QKV projections are not supported by the attention-based scores (unfuse them)"
        if type(attn.processor).__name__ != "FluxAttnProcessor":
            return f"attention processor {type(attn.processor).__name__} is not supported by the attention-based scores"
        return None
    inner = type(getattr(attn, "processor", None)).__name__
    if inner not in ("AttnProcessor2_0", "AttnProcessor"):
        return (f"attention processor {inner} (joint text-image attention, or another mechanism) is not supported "
                "by the attention-based scores: use score='random' or 'similarity'")
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


class FluxScoringAttnProcessor:
    """FLUX's joint attention with the attention each token *receives* (ToCa's score, as the official FLUX code
    computes it): softmax(QKᵀ) over all text and image queries, averaged over heads, summed over queries. On the
    calls that report it, the attention runs explicitly in chunks of queries (diffusers' ``FluxAttnProcessor``
    otherwise); the statistic goes out per token pool, text first as FLUX orders its sequence: ``text`` and
    ``image`` for a dual-stream block, ``joint`` for a single-stream one."""

    def __init__(self, inner: Any, request: Callable[[], StatisticSink | None], chunk_size: int) -> None:
        self.inner = inner
        self.request = request
        self.chunk_size = chunk_size

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        sink = None if torch.compiler.is_compiling() else self.request()
        if sink is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise RuntimeError("the 'attention' score on FLUX does not support an attention mask; use another score")
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        text = 0
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, L, d)
        batch, _, length, _ = query.shape
        scale = attn.head_dim ** -0.5
        out = torch.empty_like(query)
        received = torch.zeros(batch, length, dtype=torch.float32, device=query.device)
        for start in range(0, length, self.chunk_size):
            stop = min(start + self.chunk_size, length)
            probs = torch.softmax(query[:, :, start:stop].float() @ key.float().transpose(-1, -2) * scale, dim=-1)
            out[:, :, start:stop] = (probs @ value.float()).to(out.dtype)
            received += probs.mean(dim=1).sum(dim=1)
        sink({"text": received[:, :text], "image": received[:, text:]} if text else {"joint": received})
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states[:, :text], hidden_states[:, text:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def scoring_processor(attn: Any, statistic: str, request: Callable[[], StatisticSink | None],
                      chunk_size: int) -> Any:
    """The processor that makes ``attn`` report ``statistic`` (see :func:`unsupported_reason` first)."""
    if type(attn).__name__ == "FluxAttention":
        return FluxScoringAttnProcessor(attn.processor, request, chunk_size)
    return ScoringAttnProcessor(attn.processor, statistic, request, chunk_size)
