"""concept_score: the concept classifier's log-probability of a target attribute,

    loss = - mean_i log p(head = target | image_i)

maximised through the decoded images. The classifier is the evaluators' external one (a
different network from anything inside the generator), so optimising it is honest only
when checked on held-out seeds and prompts, which the presets do.
"""
from __future__ import annotations

import torch

from steerexp import scorers
from steerexp.objectives.composite import ObjectiveInputs, Term


class ConceptScore(Term):
    def __init__(self, head: str = "colour", target: str = "red", weight: float = 1.0):
        super().__init__(weight)
        heads = scorers.get("classifier").heads  # the run's classifier (scorers.classifier)
        if head not in heads:
            raise ValueError(f"objective concept_score: unknown head {head!r}; choose one of {sorted(heads)}")
        if target not in heads[head]:
            raise ValueError(f"objective concept_score: unknown {head} {target!r}; choose one of {heads[head]}")
        self.head, self.target = head, target

    def log_prob(self, images: torch.Tensor) -> torch.Tensor:
        """log p(target) per image [B] (differentiable in the images)."""
        return scorers.log_prob(scorers.get("classifier", images.device), images, self.head, self.target)

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        return -self.log_prob(inputs.images).mean()
