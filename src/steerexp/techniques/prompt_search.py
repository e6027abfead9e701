"""Black-box prompt search: a beam search over prompts that maximises a frozen scorer.

Moves are word insertions and substitutions drawn from a vocabulary. A prompt's score is
the scorer's mean over `seeds` images: the concept classifier's P(target) (`scorer=concept`)
or CLIP similarity to `clip_text` (`scorer=clip`). One scored prompt is one scorer call;
the search stops when `max_calls` calls are spent. The edit maps the searched prompt to the
best prompt found (other prompts are left as they are); the report ranks the prompts found
against the user's prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from steerexp import scorers
from steerexp.generators import FrozenGenerator
from steerexp.techniques.base import TrainingFree
from steerexp.spec import check_settings
from steerexp.techniques.prompt_search_spec import PromptSearchSpec
from steerexp.worlds.shapes import world

DEFAULT_VOCAB = (list(world.COLOURS) + list(world.SIZES) + list(world.SEEN_SHAPES) + list(world.GENERIC_WORDS)
                 + ["photo", "picture", "on", "the", "left", "right", "top", "bottom", "center", "at", "in", "a"])


class PromptSearch(TrainingFree):
    def __init__(self, generator: FrozenGenerator, prompt: str = "a photo of a object",
                 vocabulary: list[str] | None = None, scorer: str = "concept", head: str = "shape",
                 target: str = "star", clip_text: str | None = None, beam_width: int = 4, proposals: int = 12,
                 max_calls: int = 120, seeds: list[int] = (100, 101, 102, 103), max_words: int = 12, seed: int = 0,
                 sampling: dict | None = None):
        check_settings(PromptSearchSpec, locals())
        super().__init__(generator, sampling)
        self.prompt, self.vocabulary = prompt, list(vocabulary or DEFAULT_VOCAB)
        self.scorer, self.head, self.target = scorer, head, target
        self.clip_text = clip_text or f"a photo of a {target}"
        self.beam_width, self.proposals, self.max_calls = beam_width, proposals, max_calls
        self.seeds, self.max_words, self.seed = list(seeds), max_words, seed
        self.best_prompt = prompt
        self.history: list[tuple[str, float]] = []
        self.calls = 0

    def optimised_against(self) -> set[str]:
        """The scorer the search maximises (an evaluator judging with it is not independent)."""
        return {"classifier" if self.scorer == "concept" else "clip"}

    def _score_fn(self):
        if self.scorer == "concept":  # the run's classifier (scorers.classifier)
            clf = self.scorers.get("classifier")
            clf.class_index(self.head, self.target)  # a bad head or target fails before any sampling
            return lambda images: scorers.prob(clf, images, self.head, self.target).mean().item()
        clip = self.scorers.get("clip")  # the run's CLIP (scorers.clip)
        text = clip.encode_texts([self.clip_text])
        return lambda images: (clip.encode_images(images) @ text.T).mean().item()

    def neighbours(self, prompt: str, rng: np.random.Generator) -> list[str]:
        words = prompt.split()
        out = set()
        for _ in range(self.proposals * 4):
            if len(out) >= self.proposals:
                break
            w = self.vocabulary[rng.integers(len(self.vocabulary))]
            if rng.random() < 0.5 and len(words) < self.max_words:
                i = rng.integers(len(words) + 1)
                cand = words[:i] + [w] + words[i:]
            else:
                i = rng.integers(len(words))
                cand = words[:i] + [w] + words[i + 1 :]
            text = " ".join(cand)
            if text != prompt:
                out.add(text)
        return sorted(out)

    @torch.no_grad()
    def compute(self) -> None:
        score_images = self._score_fn()
        scored: dict[str, float] = {}

        def score(p: str) -> float | None:
            if p in scored:
                return scored[p]
            if self.calls >= self.max_calls:
                return None
            self.calls += 1
            images = self.generator.generate(
                [p] * len(self.seeds), self.seeds, steps=self.sampling_steps, guidance=self.guidance
            )
            scored[p] = score_images(images)
            return scored[p]

        rng = np.random.default_rng(self.seed)
        beam = [self.prompt]
        score(self.prompt)
        while self.calls < self.max_calls:
            pool = {p for b in beam for p in self.neighbours(b, rng)} - set(scored)
            if not pool:
                break
            for p in sorted(pool):
                if score(p) is None:
                    break
            beam = sorted(scored, key=scored.get, reverse=True)[: self.beam_width]
        self.history = sorted(scored.items(), key=lambda kv: kv[1], reverse=True)
        self.best_prompt = self.history[0][0]

    def deltas(self) -> dict[str, torch.Tensor]:
        return {"best_prompt_ids": self.generator.tokenize([self.best_prompt])[0].cpu()}

    def export(self, run_dir) -> list[str]:
        report = {
            "prompt": self.prompt,
            "prompt_score": dict(self.history).get(self.prompt),
            "best_prompt": self.best_prompt,
            "best_score": self.history[0][1] if self.history else None,
            "scorer_calls": self.calls,
            "ranked": [{"prompt": p, "score": s} for p, s in self.history[:20]],
        }
        (Path(run_dir) / "prompt_search.json").write_text(json.dumps(report, indent=1))
        return ["prompt_search.json"]

    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        texts = [self.best_prompt if edited and p == self.prompt else p for p in prompts]
        return self.generator.generate(texts, seeds, steps=self.sampling_steps, guidance=self.guidance)
