"""clip: CLIP-T (image-text similarity to the prompt with the placeholder stripped, as in
Gal et al.) and CLIP-I (image-image similarity to the technique's target images), baseline
and edited, with any open_clip model (the shipped tiny one by default)."""
from __future__ import annotations

import re

import torch

from steerexp import scorers
from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.techniques.protocols import HasTargets


def strip_placeholder(template: str) -> str:
    return re.sub(r"\s+", " ", template.replace("{}", "")).strip()


class Clip:
    name = "clip"

    def __init__(self, model: str | None = None, pretrained: str | None = None):
        self.model, self.pretrained = model, pretrained

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        paired = ctx.paired()
        clip = scorers.load_clip(self.model, self.pretrained) if self.model else ctx.clip  # its own, or scorers.clip
        m = {}
        with torch.no_grad():
            text = clip.encode_texts([strip_placeholder(p) for p in paired.prompts])
            targets = ctx.technique.target_images if isinstance(ctx.technique, HasTargets) else None
            target_emb = clip.encode_images(targets) if targets is not None else None
            for side, images in (("baseline", paired.baseline), ("edited", paired.edited)):
                emb = clip.encode_images(images)
                m[f"clip/text_similarity/{side}"] = float((emb * text).sum(-1).mean())
                if target_emb is not None:
                    m[f"clip/image_similarity/{side}"] = float((emb @ target_emb.T).mean())
        return EvalResult(metrics=m)
