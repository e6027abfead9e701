"""The `sd` family: Stable Diffusion 1.x/2.x (and the embedded shapes generator, built the same way).

One CLIP text encoder whose last hidden states are the conditioning, a UNet2DConditionModel with
cross-attention, and DDIM over the scheduler's alphas (epsilon or v prediction).
"""
from __future__ import annotations

import inspect

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from steerexp.generators import CAPABILITIES, sampling
from steerexp.generators.frozen import FrozenGenerator, TextEncoder, load_pipeline


def ddim_for(scheduler) -> DDIMScheduler:
    """The DDIM the sd and sdxl families sample with, from the pipeline's scheduler: DDIMScheduler.from_config of its
    config (as swapping the scheduler in diffusers does: timestep_spacing, steps_offset, set_alpha_to_one,
    rescale_betas_zero_snr, prediction_type carry over), except that clip_sample and thresholding are on only where
    the scheduler's own class has them on. A class without the setting never clips (SD 1.5's PNDMScheduler, SDXL's
    EulerDiscreteScheduler), and DDIMScheduler's own default, clip_sample=True, would clip its latents."""
    own = set(inspect.signature(type(scheduler).__init__).parameters)
    off = {k: False for k in ("clip_sample", "thresholding") if k not in own}
    return DDIMScheduler.from_config(scheduler.config, **off)


class SDGenerator(FrozenGenerator):
    family = "sd"
    pipeline_class = StableDiffusionPipeline
    capabilities = CAPABILITIES["sd"]
    attention_blocks = "mid_block.attentions.0.transformer_blocks"  # PAG's layers: diffusers' PAG pipelines' "mid"

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, device="cpu", dtype=torch.float32):
        super().__init__([TextEncoder("clip_l", tokenizer, text_encoder)], unet, vae,
                         ddim_for(scheduler), device, dtype)

    @classmethod
    def from_pipeline(cls, pipe, device, dtype) -> "SDGenerator":
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler, device, dtype)

    @classmethod
    def load(cls, path, dtype: str):
        return load_pipeline(cls.pipeline_class, path, dtype, safety_checker=None, feature_extractor=None,
                             requires_safety_checker=False)

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser

    @property
    def base_vocab_size(self) -> int:
        return self.encoders[0].vocab_size

    def _encode(self, ids: list[torch.Tensor]) -> torch.Tensor:
        return self.text_encoder(ids[0])[0]

    def denoise(self, x, t, cond, guidance_scale=None):
        return self.unet(x, t, cond).sample

    def schedule(self, steps: int, height: int | None = None, width: int | None = None) -> sampling.Schedule:
        # (DDIM's timesteps do not depend on the image size: height and width are ignored)
        return sampling.Schedule.from_ddim(self.scheduler, steps)

    def latent_shape(self, height=None, width=None):
        c, h, w = super().latent_shape(height, width)
        return (self.unet.config.in_channels, h, w)

    def embedding_file(self, placeholder, vectors):
        """learned_embeds.safetensors as StableDiffusionPipeline.load_textual_inversion reads it."""
        return {placeholder: (vectors[0] if len(vectors) == 1 else vectors).contiguous()}
