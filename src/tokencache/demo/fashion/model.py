"""The Fashion-MNIST transformers (DiT or PixArt-style) and their flow-matching sampling pipeline.

Both architectures see 28x28x1 pixels at patch 2 (196 tokens). The DiT takes the class through adaLN-Zero (its
label embedding, null class = index 10); the PixArt-style model takes it through cross-attention to a few
"class tokens": token ``i`` of class ``c`` is ``onehot(c, 11) ++ onehot(i, CONTEXT_TOKENS)``, which the model's
own caption projection maps to its width, so the class embedding lives inside the transformer's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DiffusionPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
)
from diffusers.utils import BaseOutput

from ..pipeline import format_images
from .data import IMAGE_SIZE, NUM_CLASSES

__all__ = [
    "CONTEXT_TOKENS",
    "DEFAULT_GUIDANCE",
    "DEFAULT_GUIDANCE_INTERVAL",
    "DEFAULT_STEPS",
    "FashionPipeline",
    "FashionPipelineOutput",
    "build_transformer",
    "check_guidance_interval",
    "describe_guidance",
    "class_tokens",
    "make_scheduler",
    "predict_velocity",
]

Arch = Literal["dit", "pixart"]

#: Class tokens of the PixArt-style model (several, so that cross-attention has a distribution over keys).
CONTEXT_TOKENS = 4
#: Timestep scale: the model sees ``t * 1000`` for flow time ``t`` in [0, 1] (sigma, as FLUX/SD3 pipelines pass).
TIME_SCALE = 1000.0
#: Shipped sampler settings (see quality.json).
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 1.75
#: Flow times ``(low, high]`` at which guidance applies; (0, 1] = every step (plain classifier-free guidance).
DEFAULT_GUIDANCE_INTERVAL = (0.2, 0.85)


def check_guidance_interval(interval: object) -> tuple[float, float]:
    """``interval`` as ``(low, high)`` floats; ``ValueError`` unless it is two numbers with 0 <= low < high <= 1."""
    try:
        low, high = (float(v) for v in interval)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two numbers (low, high) with 0 <= low < high <= 1, "
                         f"got {interval!r}") from None
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= low < high <= 1, got ({low}, {high})")
    return low, high


def describe_guidance(guidance: float, interval: Sequence[float] | None = None) -> str:
    """``guidance`` as a table header says it: ``"2.0"``, or ``"1.75 at flow times (0.2, 0.85]"`` when guidance
    applies in part of the flow times only."""
    if interval is None or tuple(float(v) for v in interval) == (0.0, 1.0):
        return f"{guidance}"
    return f"{guidance} at flow times ({interval[0]}, {interval[1]}]"


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """diffusers' flow-matching Euler scheduler (sigma 1 = noise, 0 = data), no shift (28x28 is small)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def build_transformer(arch: Arch = "dit", num_layers: int = 8, width: int = 128, head_dim: int = 32,
                      patch_size: int = 2) -> DiTTransformer2DModel | PixArtTransformer2DModel:
    """A class-conditional transformer on 1x28x28 pixels: ``(28 / patch_size)**2`` tokens, ``num_layers`` blocks."""
    if width % head_dim:
        raise ValueError(f"width {width} must be a multiple of head_dim {head_dim}")
    common = dict(sample_size=IMAGE_SIZE, patch_size=patch_size, in_channels=1, out_channels=1,
                  num_layers=num_layers, num_attention_heads=width // head_dim, attention_head_dim=head_dim)
    if arch == "dit":
        return DiTTransformer2DModel(num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=32, **common)
    if arch == "pixart":
        return PixArtTransformer2DModel(cross_attention_dim=width, caption_channels=NUM_CLASSES + 1 + CONTEXT_TOKENS,
                                        use_additional_conditions=False, **common)
    raise ValueError(f"arch must be 'dit' or 'pixart', got {arch!r}")


def class_tokens(labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The PixArt-style model's "caption" for ``labels`` (null class = ``NUM_CLASSES``): ``(B, CONTEXT_TOKENS, C)``."""
    cls = F.one_hot(labels, NUM_CLASSES + 1).to(dtype)[:, None].expand(-1, CONTEXT_TOKENS, -1)
    slot = torch.eye(CONTEXT_TOKENS, dtype=dtype, device=labels.device)[None].expand(len(labels), -1, -1)
    return torch.cat([cls, slot], dim=-1)


def predict_velocity(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's velocity ``noise - x0`` at flow time ``t`` (``(B,)`` in [0, 1]) for class ``labels``."""
    timestep = (t * TIME_SCALE).to(x.dtype)
    if isinstance(model, PixArtTransformer2DModel):
        ctx = class_tokens(labels, x.dtype)
        out = model(x, encoder_hidden_states=ctx, timestep=timestep,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    else:
        out = model(x, timestep=timestep, class_labels=labels).sample
    return out[:, : x.shape[1]]


@dataclass
class FashionPipelineOutput(BaseOutput):
    """``images``: ``"pt"``: ``(B, 1, 28, 28)`` in [-1, 1]; ``"np"``: ``(B, 28, 28, 1)`` in [0, 1]; ``"pil"``."""

    images: torch.Tensor | np.ndarray | list


class FashionPipeline(DiffusionPipeline):
    """Class-conditional flow-matching sampling with classifier-free guidance (null class ``NUM_CLASSES``).

    With ``guidance_scale > 1`` the transformer runs once per step on ``cat([latents, latents])`` with labels
    ``cat([labels, null])``; the guided velocity goes to ``FlowMatchEulerDiscreteScheduler.step``.

    ``guidance_interval = (low, high)`` applies the guidance only at flow times ``t`` (= sigma, 1 is noise) in
    ``(low, high]`` and takes the conditional velocity elsewhere (Kynkäänniemi et al. 2024, "Applying guidance in
    a limited interval improves sample and distribution quality in diffusion models"). The interval is in noise
    level, not in a fraction of the steps (as diffusers' guiders' ``start``/``stop`` are), so it means the same at
    any step count; and the batch stays doubled at every step, so a cache sees one batch shape per call.
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel | PixArtTransformer2DModel,
                 scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        """The label index of the unconditional class."""
        return NUM_CLASSES

    @property
    def context_tokens(self) -> int:
        """Tokens the transformer's cross-attention reads per sample (the class tokens; 0 for the DiT), for FLOP
        counts: :func:`tokencache.plan` would otherwise assume PixArt's 120 caption tokens."""
        return CONTEXT_TOKENS if isinstance(self.transformer, PixArtTransformer2DModel) else 0

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FashionPipelineOutput | tuple:
        """Sample one image per entry of ``class_labels`` (each in ``0..9``); ``latents`` replaces the noise."""
        device = self._execution_device
        dtype = self.transformer.dtype
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        if int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
            raise ValueError(f"class labels must lie in [0, {NUM_CLASSES}), got {labels.tolist()}")
        low, high = check_guidance_interval(guidance_interval)
        cfg = self.transformer.config
        if latents is None:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn((len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size),
                                  generator=generator, device=gen_device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=dtype)
        do_cfg = guidance_scale > 1
        labels_in = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)]) if do_cfg else labels

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents, latents]) if do_cfg else latents
            flow_t = (t / TIME_SCALE).reshape(1).expand(model_in.shape[0]).to(device)
            v = predict_velocity(self.transformer, model_in, flow_t, labels_in)
            if do_cfg:
                cond, uncond = v.chunk(2)
                v = uncond + guidance_scale * (cond - uncond) if low < float(t) / TIME_SCALE <= high else cond
            latents = self.scheduler.step(v, t, latents).prev_sample

        out = format_images(latents, output_type)
        self.maybe_free_model_hooks()
        return FashionPipelineOutput(images=out) if return_dict else (out,)
