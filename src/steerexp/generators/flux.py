"""The `flux` family: FLUX.1 (flow matching with distilled guidance).

Conditioning as diffusers' FluxPipeline builds it: the T5 hidden states are the rows the transformer
attends to; CLIP contributes only its pooled output, packed after them (so CLIP's tokens have no rows:
a word's conditioning rows are its T5 tokens). The transformer reads 2x2 patches of the latent; `denoise`
takes and returns latents [B, C, H, W] like every family and packs them itself.

Guidance is distilled (FLUX.1-dev): the guidance scale is a model input and there is one conditional
pass, no uncond branch. So what rests on the uncond branch does not apply here: null-text and
negative-prompt inversion, negative prompts. FLUX.1-schnell has no guidance input at all. Sampling is
Euler over the scheduler's sigmas with the resolution-dependent shift (mu), as in the pipeline.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from steerexp.generators import CAPABILITIES, sampling
from steerexp.generators.frozen import FrozenGenerator, TextEncoder, load_pipeline


class FluxGenerator(FrozenGenerator):
    family = "flux"
    pipeline_class = FluxPipeline
    capabilities = CAPABILITIES["flux"]
    distilled_guidance = True

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, transformer, vae, scheduler,
                 device="cpu", dtype=torch.float32, t5_length: int = 512, default_sample_size: int = 128):
        tokenizer_2.model_max_length = min(t5_length, tokenizer_2.model_max_length)
        encoders = [TextEncoder("clip_l", tokenizer, text_encoder, offset=None),
                    TextEncoder("t5", tokenizer_2, text_encoder_2, offset=0)]
        super().__init__(encoders, transformer, vae, FlowMatchEulerDiscreteScheduler.from_config(scheduler.config),
                         device, dtype, denoiser_name="transformer")
        self.pooled_dim = transformer.config.pooled_projection_dim
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self.default_sample_size = default_sample_size

    @classmethod
    def from_pipeline(cls, pipe, device, dtype) -> "FluxGenerator":
        side = pipe.vae.config.sample_size // pipe.vae_scale_factor if pipe.vae.config.sample_size else 128
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, pipe.transformer,
                   pipe.vae, pipe.scheduler, device, dtype, default_sample_size=side)

    @classmethod
    def load(cls, path, dtype: str):
        return load_pipeline(cls.pipeline_class, path, dtype)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.denoiser

    latent_patch = 2  # the transformer reads 2x2 patches of the latent

    def latent_shape(self, height=None, width=None):
        height, width = height or self.height, width or self.width  # default: the run's size (set_size)
        h = (height // self.vae_scale_factor) if height else self.default_sample_size
        w = (width // self.vae_scale_factor) if width else self.default_sample_size
        if h % 2 or w % 2:
            raise ValueError(f"FLUX reads 2x2 latent patches: the latent side must be even, got {h}x{w}; pick a "
                             f"resolution divisible by {2 * self.vae_scale_factor}")
        return (self.vae.config.latent_channels, h, w)

    def _encode(self, ids: list[torch.Tensor]) -> torch.Tensor:
        pooled = self.encoders[0].model(ids[0], output_hidden_states=False).pooler_output
        hidden = self.encoders[1].model(ids[1])[0]
        return self.pack(hidden, pooled.to(hidden.dtype))

    def denoise(self, x, t, cond, guidance_scale=None):
        hidden, pooled = self.unpack(cond)
        B, C, H, W = x.shape
        patches = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
        img_ids = torch.zeros(H // 2, W // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(H // 2, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.arange(W // 2, device=x.device, dtype=x.dtype)[None, :]
        txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype)
        t = torch.as_tensor(t, device=x.device).expand(B).to(x.dtype)
        scale = None
        if self.guidance_embeds:
            scale = torch.full((B,), 3.5 if guidance_scale is None else float(guidance_scale), device=x.device,
                               dtype=x.dtype)
        out = self.transformer(hidden_states=patches, timestep=t / 1000, guidance=scale,
                               pooled_projections=pooled.to(x.dtype), encoder_hidden_states=hidden.to(x.dtype),
                               txt_ids=txt_ids, img_ids=img_ids.reshape(-1, 3), return_dict=False)[0]
        return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

    def schedule(self, steps: int, height: int | None = None, width: int | None = None) -> sampling.Schedule:
        _, h, w = self.latent_shape(height, width)
        mu = sampling.flow_shift_mu(h * w // 4, self.scheduler.config)
        sigmas = None if getattr(self.scheduler.config, "use_flow_sigmas", False) else (  # as FluxPipeline does
            np.linspace(1.0, 1 / steps, steps).tolist())
        return sampling.Schedule.from_flow(self.scheduler, steps, mu, sigmas)
