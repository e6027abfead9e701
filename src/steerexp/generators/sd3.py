"""The `sd3` family: Stable Diffusion 3 (MMDiT, flow matching).

Conditioning as diffusers' StableDiffusion3Pipeline builds it: CLIP-L and CLIP-G penultimate hidden
states side by side, zero-padded to the T5 width, then the T5 hidden states as further rows (zeros when
the pipeline has no T5: `text_encoder_3` is optional); the pooled vector is CLIP-L's and CLIP-G's
projected outputs side by side, packed after the rows. The transformer predicts the flow velocity; the
sampler is Euler over the scheduler's shifted sigmas (sampling.py) and inversion is the flow-ODE one.
Classifier-free guidance as for SD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from steerexp.generators import CAPABILITIES, sampling
from steerexp.generators.frozen import FrozenGenerator, TextEncoder, load_pipeline


class SD3Generator(FrozenGenerator):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    capabilities = CAPABILITIES["sd3"]

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, transformer, vae, scheduler,
                 tokenizer_3=None, text_encoder_3=None, device="cpu", dtype=torch.float32, t5_length: int = 256):
        clip_length = tokenizer.model_max_length
        encoders = [TextEncoder("clip_l", tokenizer, text_encoder), TextEncoder("clip_g", tokenizer_2, text_encoder_2)]
        if text_encoder_3 is not None:
            tokenizer_3.model_max_length = min(t5_length, tokenizer_3.model_max_length)
            encoders.append(TextEncoder("t5", tokenizer_3, text_encoder_3, offset=clip_length))
        super().__init__(encoders, transformer, vae, FlowMatchEulerDiscreteScheduler.from_config(scheduler.config),
                         device, dtype, denoiser_name="transformer")
        self.t5_length = tokenizer_3.model_max_length if text_encoder_3 is not None else t5_length
        self.joint_dim = transformer.config.joint_attention_dim
        self.pooled_dim = transformer.config.pooled_projection_dim

    @classmethod
    def from_pipeline(cls, pipe, device, dtype) -> "SD3Generator":
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, pipe.transformer,
                   pipe.vae, pipe.scheduler, pipe.tokenizer_3, pipe.text_encoder_3, device, dtype)

    @classmethod
    def load(cls, path, dtype: str):
        """T5 is optional: a folder whose model_index.json has no (or a null) text_encoder_3 loads without it."""
        from steerexp.generators import pipeline_index

        entry = pipeline_index(path).get("text_encoder_3")
        no_t5 = {} if entry and entry[0] is not None else {"text_encoder_3": None, "tokenizer_3": None}
        return load_pipeline(cls.pipeline_class, path, dtype, **no_t5)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.denoiser

    @property
    def latent_patch(self) -> int:
        return int(self.transformer.config.patch_size)

    def max_side(self) -> int | None:
        """The position embedding covers pos_embed_max_size patches a side (None: it is computed for any size)."""
        pos = self.transformer.config.pos_embed_max_size
        return int(pos) * self.latent_patch * self.vae_scale_factor if pos else None

    def _encode(self, ids: list[torch.Tensor]) -> torch.Tensor:
        out_l = self.encoders[0].model(ids[0], output_hidden_states=True)
        out_g = self.encoders[1].model(ids[1], output_hidden_states=True)
        clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        if len(self.encoders) == 3:
            t5 = self.encoders[2].model(ids[2])[0]
        else:
            t5 = clip.new_zeros(len(clip), self.t5_length, self.joint_dim)
        pooled = torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)
        return self.pack(torch.cat([clip, t5.to(clip.dtype)], dim=-2), pooled)

    def denoise(self, x, t, cond, guidance_scale=None):
        hidden, pooled = self.unpack(cond)
        t = torch.as_tensor(t, device=x.device).expand(len(x)).to(x.dtype)
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=hidden.to(x.dtype),
                                pooled_projections=pooled.to(x.dtype)).sample

    def schedule(self, steps: int, height: int | None = None, width: int | None = None) -> sampling.Schedule:
        """Euler over the scheduler's sigmas; with use_dynamic_shifting, mu from the number of latent patches, as
        StableDiffusion3Pipeline computes it."""
        mu = None
        if getattr(self.scheduler.config, "use_dynamic_shifting", False):
            _, h, w = self.latent_shape(height, width)
            p = self.transformer.config.patch_size
            mu = sampling.flow_shift_mu((h // p) * (w // p), self.scheduler.config)
        return sampling.Schedule.from_flow(self.scheduler, steps, mu)
