"""Initial-latent priming: pick an x_T that tends to produce the concept.

1. Sample N candidates (candidate seeds 10_000 + i) for the ranking prompts, score each
   with the concept classifier, keep the initial latents of the top k.
2. Combine them: `mean` (the average, renormalised to the Gaussian shell |z| = sqrt(d))
   or `slerp` (a running spherical interpolation, which stays on the shell).
3. At inference start from a noised version: z_T = m * primed + sqrt(1 - m^2) * noise(seed),
   with mixing weight m (0 = plain noise, i.e. the baseline; 1 = the primed latent itself).

Training-free; the primed latent is the run's delta, and `strength` is m.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from steerexp import scorers
from steerexp.generators import FrozenGenerator
from steerexp.techniques.base import TrainingFree
from steerexp.spec import check_settings
from steerexp.techniques.latent_priming_spec import LatentPrimingSpec

CANDIDATE_SEED_OFFSET = 10_000


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a_n, b_n = a.flatten() / a.norm(), b.flatten() / b.norm()
    omega = torch.arccos((a_n @ b_n).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def to_shell(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm() * math.sqrt(z.numel())


class LatentPriming(TrainingFree):
    def __init__(self, generator: FrozenGenerator, prompts: list[str] | None = None,
                 head: str = "size", target: str = "large", candidates: int = 64, top_k: int = 8,
                 combine: str = "mean", mix: float = 0.8, slot_word: str = "object", sampling: dict | None = None,
                 scorer: str = "classifier"):
        check_settings(LatentPrimingSpec, locals())
        super().__init__(generator, sampling)
        self.prompts = list(prompts or ["a red circle", "a blue square", "a green triangle", "a yellow ring"])
        self.head, self.target, self.candidates, self.top_k = head, target, candidates, top_k
        self.combine, self.slot_word = combine, slot_word
        self.scorer = scorer  # the classifier that ranks the candidates, a scorer of the run by name
        self.strength = float(mix)  # the mixing weight m
        self.primed = nn.Parameter(torch.zeros(generator.latent_shape()), requires_grad=False)
        self.candidate_scores: list[float] = []

    @torch.no_grad()
    def compute(self) -> None:
        gen, start = self.generator, time.perf_counter()
        clf = self.scorers.get(self.scorer)  # the run's scorer that ranks (scorers.classifier unless technique.scorer)
        clf.class_index(self.head, self.target)  # a bad head or target fails before any sampling
        seeds = [CANDIDATE_SEED_OFFSET + i for i in range(self.candidates)]
        # each candidate latent is scored on every ranking prompt; its score is the mean
        scores = torch.zeros(self.candidates)
        for p in self.prompts:
            images = gen.generate([self.fill(p)] * self.candidates, seeds,
                                  steps=self.sampling_steps, guidance=self.guidance)
            scores += scorers.prob(clf, images, self.head, self.target) / len(self.prompts)
        top = scores.topk(self.top_k).indices
        latents = gen.initial_latents([seeds[i] for i in top]).float().cpu()
        if self.combine == "mean":
            primed = to_shell(latents.mean(0))
        else:
            primed = latents[0]
            for j in range(1, len(latents)):
                primed = slerp(primed, latents[j], 1.0 / (j + 1))
        self.primed.copy_(primed)
        self.candidate_scores = scores.tolist()
        self.ranking_seconds = time.perf_counter() - start

    def diagnostics(self) -> dict[str, float]:
        """The ranking pass's cost (shared by every output the primed latent starts): generator calls (one call =
        one denoiser step of one image) and seconds."""
        if not self.candidate_scores:
            return {}
        return {"ranking_calls": self.candidates * len(self.prompts) * self.sampling_steps,
                "ranking_seconds": self.ranking_seconds}

    def start_latents(self, seeds: list[int]) -> torch.Tensor:
        noise = self.generator.initial_latents(seeds)
        m = self.strength
        return m * self.primed.to(noise) + math.sqrt(max(0.0, 1 - m * m)) * noise

    def budgeted(self) -> dict[str, torch.Tensor]:
        return {}

    def optimised_against(self) -> set[str]:
        """The candidates are ranked by `scorer`: an evaluator judging with it is not independent."""
        return {self.scorer}

    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        texts = [self.fill(p) for p in prompts]
        latents = self.start_latents(seeds) if edited and self.strength > 0 else None
        return self.generator.generate(texts, seeds, steps=self.sampling_steps, guidance=self.guidance, latents=latents)
