"""The `sdxl` family: Stable Diffusion XL.

Two CLIP text encoders read the same token positions; their penultimate hidden states sit side by side
(CLIP-L then CLIP-G, so D = 768 + 1280 on the real model) and the second one's projected pooled output
is packed after them as extra rows. The UNet also takes micro-conditioning time ids (original size,
crop, target size); here they say the image was made at the size it is sampled at, uncropped. DDIM over
the scheduler's alphas, as for SD 1.x. An empty negative prompt is all zeros when the pipeline says so
(force_zeros_for_empty_prompt), as in diffusers.
"""
from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from steerexp.generators import CAPABILITIES
from steerexp.generators.frozen import FrozenGenerator, TextEncoder, load_pipeline
from steerexp.generators.sd import SDGenerator, ddim_for


class SDXLGenerator(SDGenerator):
    family = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    capabilities = CAPABILITIES["sdxl"]

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, unet, vae, scheduler, device="cpu",
                 dtype=torch.float32, force_zeros_for_empty_prompt: bool = True):
        FrozenGenerator.__init__(
            self, [TextEncoder("clip_l", tokenizer, text_encoder), TextEncoder("clip_g", tokenizer_2, text_encoder_2)],
            unet, vae, ddim_for(scheduler), device, dtype)
        self.pooled_dim = text_encoder_2.config.projection_dim
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def from_pipeline(cls, pipe, device, dtype) -> "SDXLGenerator":
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, pipe.unet, pipe.vae,
                   pipe.scheduler, device, dtype, bool(pipe.config.get("force_zeros_for_empty_prompt", True)))

    @classmethod
    def load(cls, path, dtype: str):
        return load_pipeline(cls.pipeline_class, path, dtype)

    # learned_embeds.safetensors with clip_l and clip_g rows, the file diffusers' SDXL examples load with
    # load_textual_inversion(state_dict["clip_l"], token=..., text_encoder=pipe.text_encoder, tokenizer=...)
    embedding_file = FrozenGenerator.embedding_file

    def _encode(self, ids: list[torch.Tensor]) -> torch.Tensor:
        out_l = self.encoders[0].model(ids[0], output_hidden_states=True)
        out_g = self.encoders[1].model(ids[1], output_hidden_states=True)
        hidden = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        return self.pack(hidden, out_g.text_embeds)

    def time_ids(self, x: torch.Tensor) -> torch.Tensor:
        h, w = (s * self.vae_scale_factor for s in x.shape[-2:])
        return torch.tensor([h, w, 0, 0, h, w], device=x.device, dtype=x.dtype).expand(len(x), -1)

    def denoise(self, x, t, cond, guidance_scale=None):
        hidden, pooled = self.unpack(cond)
        added = {"text_embeds": pooled.to(x.dtype), "time_ids": self.time_ids(x)}
        return self.unet(x, t, hidden, added_cond_kwargs=added).sample

    def guidance_embeddings(self, guidance):
        uncond, negative = super().guidance_embeddings(guidance)
        if self.force_zeros_for_empty_prompt and guidance.negative_mode == "uncond" and not guidance.negative_prompt:
            uncond = torch.zeros_like(uncond)
        return uncond, negative
