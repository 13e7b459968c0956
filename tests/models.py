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


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _tiny_image_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16).eval()


def tiny_flux_pipeline(num_layers: int = 2, num_single_layers: int = 2):
    """A FluxPipeline (FLUX.1-dev layout: guidance embedding) with tiny components and no text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = _perturbed(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4)))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_image_vae(), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def tiny_sd3_pipeline(num_layers: int = 3):
    """An SD3.5-style pipeline: its first block has the second (dual) attention, its last a pre-only text stream."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = _perturbed(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
        out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"))
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_tiny_image_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def tiny_wan_pipeline(num_layers: int = 3):
    """A WanPipeline (two transformer calls per step for CFG) with tiny components and no text encoder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = _perturbed(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True, rope_max_seq_len=32))
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False]).eval()
    scheduler = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    return WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler)


def tiny_wan22_pipeline(num_layers: int = 3, layers_2: int | None = None, boundary_ratio: float | None = 0.875):
    """A Wan 2.2 A14B-style WanPipeline: ``transformer`` (high noise) and a second, differently initialised expert
    ``transformer_2`` (low noise; ``layers_2`` blocks, default as many) split at ``boundary_ratio``."""
    from diffusers import WanPipeline, WanTransformer3DModel

    base = tiny_wan_pipeline(num_layers)
    torch.manual_seed(1)
    config = {**base.transformer.config, "num_layers": layers_2 if layers_2 is not None else num_layers}
    second = _perturbed(WanTransformer3DModel.from_config(config))
    return WanPipeline(tokenizer=None, text_encoder=None, transformer=base.transformer, transformer_2=second,
                       vae=base.vae, scheduler=base.scheduler, boundary_ratio=boundary_ratio)


def tiny_wan22_i2v_pipeline(num_layers: int = 2, boundary_ratio: float = 0.9):
    """A Wan 2.2 A14B-style WanImageToVideoPipeline (no CLIP image encoder, as A14B): two experts that take the
    noisy latents, the first-frame mask and the encoded image (4 + 4 + 4 channels), and a tiny VAE with Wan's
    8x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    experts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        experts.append(_perturbed(WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12, out_channels=4,
            text_dim=12, freq_dim=16, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True, rope_max_seq_len=32)))
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    scheduler = UniPCMultistepScheduler(flow_shift=5.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), scheduler=scheduler,
                                   image_processor=None, image_encoder=None, transformer=experts[0],
                                   transformer_2=experts[1], boundary_ratio=boundary_ratio)


def text_embeds(family: str, batch: int = 1, tokens: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Encoder outputs each pipeline family takes instead of prompts."""
    g = torch.Generator().manual_seed(seed)
    embeds = dict(prompt_embeds=torch.randn(batch, tokens, 12, generator=g))
    if family in ("flux", "sd3"):
        embeds["pooled_prompt_embeds"] = torch.randn(batch, 10, generator=g)
    if family in ("sd3", "wan"):
        embeds["negative_prompt_embeds"] = torch.randn(batch, tokens, 12, generator=g)
    if family == "sd3":
        embeds["negative_pooled_prompt_embeds"] = torch.randn(batch, 10, generator=g)
    return embeds
