"""Energy (classifier / CLIP) guidance: at each DDIM step, the gradient of a frozen scorer
on the decoded x0-estimate is mapped back to x_t and pushes the noise prediction,

    eps' = eps - scale(t) * sqrt(1 - alpha_t) * d log p(target | D(x0_hat(x_t))) / d x_t

with a schedule over the steps (constant, or only within [start, end) of them). The
scorer is the concept classifier's log-probability (`scorer=concept`) or CLIP similarity
to a text (`scorer=clip`). Training-free; `strength` is the scale. Nothing is learned, so
the run's delta is just the scale.
"""
from __future__ import annotations

import torch

from steerexp import scorers
from steerexp.generators import FrozenGenerator
from steerexp.generators.sampling import ddim_sample, split_prediction
from steerexp.techniques.base import TrainingFree


class EnergyGuidance(TrainingFree):
    def __init__(self, generator: FrozenGenerator, scorer: str = "concept", head: str = "size",
                 target: str = "large", clip_text: str | None = None, scale: float = 5.0, start: float = 0.0,
                 end: float = 0.8, slot_word: str = "object", sampling: dict | None = None):
        super().__init__(generator, sampling)
        if scorer not in ("concept", "clip"):
            raise ValueError(f"technique.scorer must be 'concept' or 'clip', got {scorer!r}")
        if scale < 0:
            raise ValueError(f"technique.scale must be >= 0, got {scale}")
        if not 0 <= start < end <= 1:
            raise ValueError(f"technique needs 0 <= start < end <= 1, got {start}, {end}")
        self.scorer, self.head, self.target = scorer, head, target
        self.clip_text = clip_text or f"a photo of a {target}"
        self.start, self.end, self.slot_word = start, end, slot_word
        self.strength = float(scale)  # the energy guidance scale
        self._log_p = None

    def log_p(self):
        if self._log_p is None:
            device = self.generator.device
            if self.scorer == "concept":  # the run's classifier (scorers.classifier)
                clf = scorers.get("classifier", device)
                clf.class_index(self.head, self.target)  # a bad head or target fails here, not mid-sampling
                self._log_p = lambda img: scorers.log_prob(clf, img, self.head, self.target)
            else:  # the run's CLIP (scorers.clip)
                clip = scorers.get("clip", device)
                text = clip.encode_texts([self.clip_text])
                self._log_p = lambda img: 100.0 * (clip.encode_images(img) @ text.T)[:, 0]
        return self._log_p

    def deltas(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(self.strength)}

    def guided_sample(self, cond, uncond, latents, steps):
        gen, log_p = self.generator, self.log_p()
        schedule = gen.schedule(steps)

        def fn(x, t, i):
            with torch.no_grad():
                out = gen.unet_output(x, t.to(gen.device), cond, uncond, self.guidance, i, steps)
            frac = (i + 0.5) / steps
            if self.strength == 0 or not self.start <= frac < self.end:
                return out
            alpha = schedule.alphas[i].to(x)
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                eps, _ = split_prediction(out, x_in, alpha, gen.prediction_type)
                x0 = (x_in - (1 - alpha).sqrt() * eps) / alpha.sqrt()
                (grad,) = torch.autograd.grad(log_p(gen.decode_latents(x0)).sum(), x_in)
            eps_new = eps.detach() - self.strength * (1 - alpha).sqrt() * grad
            if gen.prediction_type == "epsilon":
                return eps_new
            x0_new = (x - (1 - alpha).sqrt() * eps_new) / alpha.sqrt()
            return alpha.sqrt() * eps_new - (1 - alpha).sqrt() * x0_new  # back to v

        return ddim_sample(fn, latents, schedule, gen.prediction_type)

    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        texts = [self.fill(p) for p in prompts]
        gen = self.generator
        if not edited or self.strength == 0:
            return gen.generate(texts, seeds, steps=self.sampling_steps, guidance=self.guidance)
        out = []
        with torch.no_grad():
            uncond, _ = gen.guidance_embeddings(self.guidance)
        for i in range(0, len(texts), 32):
            with torch.no_grad():
                cond = gen.encode_prompt(texts[i : i + 32])
            z = self.guided_sample(
                cond, uncond.expand(len(cond), -1, -1), gen.initial_latents(seeds[i : i + 32]), self.sampling_steps
            )
            with torch.no_grad():
                out.append(gen.decode_latents(z).float().cpu())
        return torch.cat(out)
