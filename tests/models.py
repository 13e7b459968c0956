"""Tiny randomly initialised diffusers models and pipelines for the tests."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)


def tiny_dit(num_layers: int = 3, sample_size: int = 8, dtype: torch.dtype = torch.float32) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000,
    )
    # Random init leaves adaLN-zero gates at zero in some versions; perturb so every module matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def tiny_pixart(num_layers: int = 3, sample_size: int = 8,
                dtype: torch.dtype = torch.float32) -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=sample_size, patch_size=2, cross_attention_dim=16, caption_channels=12,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                         sample_size=8).eval()


def tiny_dit_pipeline(num_layers: int = 3) -> DiTPipeline:
    return DiTPipeline(transformer=tiny_dit(num_layers), vae=tiny_vae(), scheduler=DDIMScheduler())


def tiny_pixart_pipeline(sigma: bool = False, num_layers: int = 3):
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return cls(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tiny_pixart(num_layers),
               scheduler=DPMSolverMultistepScheduler())


def prompt_embeds(batch: int = 1, tokens: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Text-encoder outputs for the PixArt pipelines (the tests need no tokenizer or T5)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[:, -2:] = 0  # padding, as a real tokenizer leaves it
    return dict(
        prompt_embeds=torch.randn(batch, tokens, 12, generator=g),
        prompt_attention_mask=mask,
        negative_prompt_embeds=torch.randn(batch, tokens, 12, generator=g),
        negative_prompt_attention_mask=mask.clone(),
    )
