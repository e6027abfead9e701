"""Energy (classifier / CLIP) guidance: at each DDIM step, the gradient of a frozen scorer
pushes the noise prediction,

    eps' = eps - scale(t) * sqrt(1 - alpha_t) * d log p(target | x_t) / d x_t

with a schedule over the steps (constant, or only within [start, end) of them). `scorer`
names a scorer of the run (conf/config.yaml: scorers) and its kind decides what it reads:

- an image classifier (`classifier`, the old name `concept`; `robust`; a user's model): its
  log-probability on the VAE-decoded x0-estimate D(x0_hat(x_t)), mapped back to x_t;
- a timestep-aware classifier (`noisy`): log p(target | x_t, t) read directly from the noisy
  latent, classifier guidance as in Dhariwal & Nichol (no decode in the loop);
- a CLIP model (`clip`): 100 x cosine similarity of the decoded x0-estimate to a text.

Training-free; `strength` is the scale. Nothing is learned, so the run's delta is just the scale.
"""
from __future__ import annotations

import torch

from steerexp import scorers
from steerexp.generators import FrozenGenerator
from steerexp.generators import sampling
from steerexp.techniques.base import TrainingFree
from steerexp.spec import check_settings
from steerexp.techniques.energy_guidance_spec import GUIDING_KINDS, NAMES, EnergyGuidanceSpec  # torch-free


class EnergyGuidance(TrainingFree):
    @classmethod
    def requirements(cls, cfg):
        if cfg.get("scorer") == "noisy":
            return {"vp": "the noisy scorer reads latents noised by the shapes generator's DDPM schedule; use "
                          "technique.scorer=classifier (or robust, clip), which reads the decoded x0 estimate"}
        return {}

    def __init__(self, generator: FrozenGenerator, scorer: str = "classifier", head: str = "size",
                 target: str = "large", clip_text: str | None = None, scale: float = 5.0, start: float = 0.0,
                 end: float = 0.8, slot_word: str = "object", sampling: dict | None = None):
        check_settings(EnergyGuidanceSpec, locals())
        super().__init__(generator, sampling)
        self.scorer, self.head, self.target = scorer, head, target
        self.clip_text = clip_text or f"a photo of a {target}"
        self.start, self.end, self.slot_word = start, end, slot_word
        self.strength = float(scale)  # the energy guidance scale
        self._log_p = None

    def scorer_kind(self) -> str:
        """The kind of the run's scorer `self.scorer` ('concept' is the old name of 'classifier')."""
        return self.scorers.kind(NAMES.get(self.scorer, self.scorer))

    def optimised_against(self) -> set[str]:
        """The scorer whose gradient guides the sampling (an evaluator judging with it is not independent)."""
        return {NAMES.get(self.scorer, self.scorer)} if self.strength > 0 else set()

    def log_p(self):
        """log p(target) as a function of decoded images, or of (x_t, t) for a noisy scorer."""
        if self._log_p is None:
            device, name = self.generator.device, NAMES.get(self.scorer, self.scorer)
            kind = self.scorers.kind(name)
            if kind not in GUIDING_KINDS:
                raise ValueError(f"technique.scorer={self.scorer}: a scorer of kind {kind!r} gives no gradient to "
                                 f"guide with; name one of kind {sorted(GUIDING_KINDS)} (e.g. classifier, robust, "
                                 "noisy, clip)")
            model = self.scorers.get(name, device)
            if kind != "clip":
                model.class_index(self.head, self.target)  # a bad head or target fails here, not mid-sampling
            if kind == "clip":
                text = model.encode_texts([self.clip_text])
                self._log_p = lambda img: 100.0 * (model.encode_images(img) @ text.T)[:, 0]
            elif kind == "noisy":
                model.check_latents(self.generator.initial_latents([0]), key=f"technique.scorer={self.scorer}")
                self._log_p = lambda z, t: model.log_prob(z, t, self.head, self.target)
            else:
                self._log_p = lambda img: scorers.log_prob(model, img, self.head, self.target)
        return self._log_p

    def bind(self, scorers=None, image_policy=None) -> None:
        super().bind(scorers, image_policy)
        self._log_p = None  # built again from the run's scorers

    def prepare(self) -> None:
        self.log_p()  # an unknown scorer, head or target, or a noisy scorer of another generator, fails here

    def deltas(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(self.strength)}

    def grad_log_p(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor, schedule: sampling.Schedule,
                   i: int) -> torch.Tensor:
        """d log p(target) / d x_t at one step: read from x_t itself by a noisy scorer, else through
        the decoded x0-estimate (the model output held fixed)."""
        gen, log_p = self.generator, self.log_p()
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            if self.scorer_kind() == "noisy":
                lp = log_p(x_in, t.to(gen.device))
            else:
                _, x0 = schedule.split(out, x_in, i)
                lp = log_p(gen.decode_latents(x0))
            (grad,) = torch.autograd.grad(lp.sum(), x_in)
        return grad

    def guided_sample(self, cond, uncond, latents, steps):
        gen = self.generator
        schedule = gen.schedule(steps)

        def fn(x, t, i):
            with torch.no_grad():
                out = gen.model_output(x, t.to(gen.device), cond, uncond, self.guidance, i, steps)
            frac = (i + 0.5) / steps
            # at pure noise (flow matching's first step, sigma = 1) no x0 fixes eps: nothing to guide there
            if self.strength == 0 or not self.start <= frac < self.end or float(schedule.signal[i]) == 0:
                return out
            grad = self.grad_log_p(x, t, out, schedule, i)
            eps, _ = schedule.split(out, x, i)
            eps_new = eps - self.strength * schedule.coefficients(i, x)[1] * grad  # eps - b_t * grad log p
            return schedule.output(eps_new, x, i)  # back to the model's own prediction type

        return sampling.sample(fn, latents, schedule)

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
            u = uncond.expand(len(cond), -1, -1) if uncond is not None else None  # None: distilled guidance
            z = self.guided_sample(cond, u, gen.initial_latents(seeds[i : i + 32]), self.sampling_steps)
            with torch.no_grad():
                out.append(gen.decode_latents(z).float().cpu())
        return torch.cat(out)
