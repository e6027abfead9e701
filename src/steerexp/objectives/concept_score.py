"""concept_score: the concept classifier's log-probability of a target attribute,

    loss = - mean_i log p(head = target | image_i)

maximised through the decoded images. The classifier is the evaluators' external one (a
different network from anything inside the generator), so optimising it is honest only
when checked on held-out seeds and prompts, which the presets do.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from steerexp.eyes.classifier import DEFAULT_PATH, ConceptClassifier
from steerexp.objectives.composite import ObjectiveInputs, Term


class ConceptScore(Term):
    def __init__(self, head: str = "colour", target: str = "red", weight: float = 1.0, classifier: str | None = None):
        super().__init__(weight)
        folder = Path(classifier) if classifier else DEFAULT_PATH
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"objective concept_score: no concept classifier at {folder} (config.json missing); "
                                    "set classifier=null for the shipped one")
        heads = json.loads((folder / "config.json").read_text())["heads"]
        if head not in heads:
            raise ValueError(f"objective concept_score: unknown head {head!r}; choose one of {sorted(heads)}")
        if target not in heads[head]:
            raise ValueError(f"objective concept_score: unknown {head} {target!r}; choose one of {heads[head]}")
        self.head, self.target, self.folder = head, target, folder
        self._clf: ConceptClassifier | None = None

    def log_prob(self, images: torch.Tensor) -> torch.Tensor:
        """log p(target) per image [B] (differentiable in the images)."""
        if self._clf is None:
            self._clf = ConceptClassifier.from_pretrained(self.folder)
        clf = self._clf.to(images.device)
        return clf(images)[self.head].log_softmax(-1)[:, clf.class_index(self.head, self.target)]

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        return -self.log_prob(inputs.images).mean()
