"""Per-output noise optimisation: what reno (reno.py) and noise_search (noise_search.py) share.

Both change only the initial noise x_T of each output, for its own prompt and seed, at inference
time; the generator and the prompt stay as they are. This module holds

    Reward          a weighted sum of the run's scorers, read on the decoded images (below)
    NoiseRecord     one optimised output: its image and noise, the reward before and after, its cost
    NoiseOptimiser  the technique base: a record per (prompt, seed), made lazily in
                    generate(..., edited=True) (or up front in compute() for `prompts` x `seeds`),
                    the budget in generator calls, the run's deltas, diagnostics and export

Rewards. `rewards` maps scorer names of the run (conf/config.yaml: scorers) to weights,

    reward(x, prompt) = sum_k  weight_k * term_k(x, prompt)
    a classifier (scorers.classifier, a user's or a robust one)   term = log p(head = target | x)
    a CLIP (scorers.clip)                                         term = cos(E_img(x), E_txt(prompt))

e.g. {classifier: 1.0, clip: 0.5}; a weight of 0 leaves that scorer out (it is not even loaded).
Higher is better; it is differentiable in x when its scorers are (reno needs that, the zero-order
search does not). `optimised_against()` names the scorers with a positive weight, so an
evaluator can judge the output with another one.

Generator calls (the budget `max_calls` is per output): one call is one guided denoiser
evaluation of one image at one sampler step (the conditional and unconditional branches of
classifier-free guidance run as one batch and count as one call), so a plain sample costs
sampling.steps calls. A backward pass through a step counts as 2 calls, and a step recomputed by
gradient checkpointing as 1 more. VAE decodes and scorer passes are not counted; the seconds are.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from steerexp import scorers
from steerexp.generators import FrozenGenerator
from steerexp.scorers import HeadClassifier
from steerexp.techniques.base import TrainingFree


class Reward:
    """The weighted sum of scorer terms (module docstring), per image, read by the run's `run_scorers`."""

    def __init__(self, weights: Mapping, head: str, target: str, run_scorers: scorers.Scorers, device="cpu"):
        self.weights = dict(weights)
        self.head, self.target = head, target
        self.terms = {}
        for name in self.weights:
            if run_scorers.kind(name) == "noisy":
                raise ValueError(f"technique.rewards.{name}: scorer {name!r} reads noisy latents, not images; "
                                 "give a classifier of images (e.g. classifier or robust) or a CLIP")
            scorer = run_scorers.get(name, device)  # the run's scorer by name (conf/config.yaml: scorers)
            if isinstance(scorer, HeadClassifier):
                scorer.class_index(head, target)  # a bad head or target fails before any sampling
                self.terms[name] = ("classifier", scorer)
            elif hasattr(scorer, "encode_images") and hasattr(scorer, "encode_texts"):
                self.terms[name] = ("clip", scorer)
            else:
                raise ValueError(f"technique.rewards.{name}: scorer {name!r} is neither a classifier nor a CLIP; "
                                 "give a classifier (log p(target)) or a CLIP (similarity to the prompt)")

    def __call__(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """[N] reward of images[i] for texts[i]."""
        total = images.new_zeros(len(images))
        for name, (kind, scorer) in self.terms.items():
            if kind == "classifier":
                term = scorers.log_prob(scorer, images, self.head, self.target)
            else:
                with torch.no_grad():
                    text = scorer.encode_texts(texts)
                term = (scorer.encode_images(images) * text.to(images)).sum(-1)
            total = total + self.weights[name] * term.to(total)
        return total


@dataclass
class NoiseRecord:
    """One output, optimised: the edited image, its x_T and what it took."""
    image: torch.Tensor       # [3, H, W] in [0, 1], sampled from `noise` at sampling.steps
    noise: torch.Tensor       # the x_T it comes from
    offset: torch.Tensor      # noise minus the seed's own x_T
    reward_start: float       # the reward of the seed's own x_T (the plain sample), and
    reward_final: float       #   of `noise`, as the technique scores (reno: through opt_sampling_steps)
    forward_calls: int        # denoiser evaluations (incl. recomputation under checkpointing)
    backward_calls: int       # backward passes through the denoiser, 2 calls each
    seconds: float            # wall time, this output's share of its batch

    @property
    def calls(self) -> int:
        return self.forward_calls + self.backward_calls


class NoiseOptimiser(TrainingFree):
    """The base of reno and noise_search: subclasses implement `optimise(texts, seeds)` for one batch
    and `planned_calls()`, the calls per output their settings spend (checked against `max_calls`)."""

    def __init__(self, generator: FrozenGenerator, rewards: Mapping | None = None, head: str = "position",
                 target: str = "left", max_calls: int = 160, prompts: list[str] | None = None,
                 seeds: list[int] | None = None, batch: int = 16, slot_word: str = "object",
                 sampling: Mapping | None = None):
        super().__init__(generator, sampling)  # (the settings are checked by the subclass's spec: noise_spec.py)
        rewards = dict(rewards) if rewards is not None else {"classifier": 1.0}
        self.weights = {str(name): float(w) for name, w in rewards.items() if w > 0}  # {scorer name: weight > 0}
        self.head, self.target, self.max_calls, self.batch = head, target, max_calls, batch
        self.prompts, self.seeds = list(prompts or []), [int(s) for s in (seeds or [])]
        self.slot_word = slot_word
        self.records: dict[tuple[str, int], NoiseRecord] = {}
        self.plain_seconds: list[float] = []  # per image, of generate(..., edited=False)
        self._reward: Reward | None = None

    # ------------------------------------------------------------------ what subclasses provide
    def planned_calls(self) -> int:
        """Generator calls per output with these settings (<= max_calls)."""
        raise NotImplementedError

    def optimise(self, texts: list[str], seeds: list[int]) -> list[NoiseRecord]:
        """One batch of outputs: a record each."""
        raise NotImplementedError

    def check_budget(self, needs: int, what: str) -> None:
        if needs > self.max_calls:
            raise ValueError(f"technique.max_calls={self.max_calls} is too small: {what} needs {needs} generator "
                             f"calls per output; raise technique.max_calls to {needs} or more")

    def bind(self, scorers=None, image_policy=None) -> None:
        super().bind(scorers, image_policy)
        self._reward = None  # built again from the run's scorers

    def prepare(self) -> None:
        """Load the reward's scorers now: a bad scorer, head or target fails before any sampling."""
        self.reward

    # ------------------------------------------------------------------ the reward
    @property
    def reward(self) -> Reward:
        if self._reward is None:
            self._reward = Reward(self.weights, self.head, self.target, self.scorers, self.generator.device)
        return self._reward

    def optimised_against(self) -> set[str]:
        """The scorers (by name, conf/config.yaml: scorers) whose reward the edit maximises (OptimisesAgainst)."""
        return set(self.weights)

    def plain_latents(self, seeds: list[int]) -> torch.Tensor:
        """The seeds' own x_T, as float32 on the generator's device."""
        return self.generator.initial_latents(seeds).float()

    def sample(self, cond, z, uncond, steps: int, grad: bool = False, checkpoint: bool = False) -> torch.Tensor:
        """Decoded images of x_T = z through `steps` DDIM steps (differentiable when `grad`)."""
        gen = self.generator
        u = uncond.to(gen.dtype) if uncond is not None else None  # None: distilled guidance
        x = gen.sample(cond.to(gen.dtype), z.to(gen.dtype), u, steps, self.guidance, grad=grad, checkpoint=checkpoint)
        return gen.decode_latents(x).float()

    def conditioning(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.generator.encode_prompt(texts), self.generator.guidance_embeddings(self.guidance)[0]

    # ------------------------------------------------------------------ records
    def ensure(self, texts: list[str], seeds: list[int]) -> list[NoiseRecord]:
        """Records for every (text, seed), optimising the ones not seen yet (in batches of `batch`)."""
        todo = list(dict.fromkeys((t, int(s)) for t, s in zip(texts, seeds) if (t, int(s)) not in self.records))
        for i in range(0, len(todo), self.batch):
            chunk = todo[i : i + self.batch]
            start = time.perf_counter()
            records = self.optimise([t for t, _ in chunk], [s for _, s in chunk])
            seconds = (time.perf_counter() - start) / len(chunk)
            for key, rec in zip(chunk, records):
                rec.seconds = seconds
                self.records[key] = rec
        return [self.records[(t, int(s))] for t, s in zip(texts, seeds)]

    # ------------------------------------------------------------------ run flow
    def compute(self) -> None:
        """Optimise `prompts` x `seeds` up front when given (their noises are the run's deltas);
        any other output is optimised when first generated."""
        if self.prompts and self.seeds:
            self.ensure([self.fill(p) for p in self.prompts for _ in self.seeds],
                        [s for _ in self.prompts for s in self.seeds])

    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        texts = [self.fill(p) for p in prompts]
        if edited:
            return torch.stack([r.image for r in self.ensure(texts, list(seeds))])
        start = time.perf_counter()
        images = self.generator.generate(texts, list(seeds), steps=self.sampling_steps, guidance=self.guidance)
        self.plain_seconds += [(time.perf_counter() - start) / max(1, len(texts))] * len(texts)
        return images

    def deltas(self) -> dict[str, torch.Tensor]:
        """Per optimised output (rows in the order of <name>.json): its x_T offset, rewards and calls."""
        recs = list(self.records.values())
        if not recs:
            return {}
        return {
            "noise_offset": torch.stack([r.offset for r in recs]).contiguous(),
            "reward_start": torch.tensor([r.reward_start for r in recs]),
            "reward_final": torch.tensor([r.reward_final for r in recs]),
            "calls": torch.tensor([r.calls for r in recs]),
        }

    def load_deltas(self, deltas: dict[str, torch.Tensor], source: str = "deltas", structure: dict | None = None):
        raise NotImplementedError(f"{type(self).__name__} optimises each output's noise; re-run it instead")

    def delta_norms(self) -> dict[str, float]:
        if not self.records:
            return {}
        return {"noise_offset_max": float(max(r.offset.norm() for r in self.records.values()))}

    def diagnostics(self) -> dict[str, float]:
        """Means over the optimised outputs: calls and seconds per output, the reward before and after."""
        recs = list(self.records.values())
        if not recs:
            return {}
        mean = lambda xs: float(sum(xs) / len(xs))  # noqa: E731
        out = {
            "outputs": len(recs),
            "calls_per_image": mean([r.calls for r in recs]),
            "forward_calls_per_image": mean([r.forward_calls for r in recs]),
            "backward_calls_per_image": mean([r.backward_calls for r in recs]),
            "seconds_per_image": mean([r.seconds for r in recs]),
            "reward_start": mean([r.reward_start for r in recs]),
            "reward_final": mean([r.reward_final for r in recs]),
            "improved": mean([float(r.reward_final > r.reward_start) for r in recs]),
            "offset_norm": mean([float(r.offset.norm()) for r in recs]),      # ||x_T* - x_T(seed)||
            "noise_norm_ratio": mean([float(r.noise.norm()) / math.sqrt(r.noise.numel()) for r in recs]),  # 1: shell
            "plain_calls_per_image": float(self.sampling_steps),
        }
        if self.plain_seconds:
            out["plain_seconds_per_image"] = mean(self.plain_seconds)
        return out

    def export(self, run_dir) -> list[str]:
        name = f"{type(self).__module__.rsplit('.', 1)[-1]}.json"
        rows = [{"prompt": t, "seed": s, "reward_start": r.reward_start, "reward_final": r.reward_final,
                 "offset_norm": float(r.offset.norm()), "forward_calls": r.forward_calls,
                 "backward_calls": r.backward_calls, "seconds": r.seconds} for (t, s), r in self.records.items()]
        report = {"optimised_against": sorted(self.optimised_against()), "max_calls": self.max_calls,
                  "planned_calls": self.planned_calls(), "outputs": rows}
        (Path(run_dir) / name).write_text(json.dumps(report, indent=1))
        return [name]
