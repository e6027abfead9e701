"""clip_similarity: cosine similarity of the images' CLIP embedding to a target text or image,

    loss = - mean_i cos(E_img(image_i), E(target))

with the evaluators' CLIP (the shipped tiny open_clip model unless another is named). The
target is either `text` or `image` (a PNG/JPG file), exactly one of them.
"""
from __future__ import annotations

import torch

from steerexp.images import load_image
from steerexp.objectives.clip_similarity_spec import ClipSimilaritySpec
from steerexp.objectives.composite import ObjectiveInputs, Term
from steerexp.spec import check_settings


class ClipSimilarity(Term):
    def __init__(self, text: str | None = None, image: str | None = None, weight: float = 1.0,
                 model: str | None = None, pretrained: str | None = None):
        check_settings(ClipSimilaritySpec, locals(), "objective.terms.clip_similarity")
        super().__init__(weight)
        self.text, self.image_path = text, image
        self.image: torch.Tensor | None = None  # the target image, read per the run's image policy (bind)
        self.model, self.pretrained = model, pretrained
        self._clip = None
        self._target: torch.Tensor | None = None

    def bind(self, scorers=None, image_policy=None) -> None:
        """The target image is read per the run's image policy (a bad file fails here, before any step)."""
        super().bind(scorers, image_policy)
        self.image, self._clip, self._target = None, None, None
        self.target_image()

    def target_image(self) -> torch.Tensor | None:
        if self.image is None and self.image_path is not None:
            self.image = load_image(self.image_path, "objective clip_similarity.image", pol=self.image_policy)
        return self.image

    def target_embedding(self, device) -> torch.Tensor:
        if self._clip is None:
            from steerexp import scorers

            # its own model when named, else the run's CLIP (scorers.clip)
            self._clip = (scorers.load_clip(self.model, self.pretrained, device) if self.model or self.pretrained
                          else self.scorers.get("clip", device))
            with torch.no_grad():
                self._target = (self._clip.encode_texts([self.text]) if self.text is not None
                                else self._clip.encode_images(self.target_image()))
        return self._target

    def optimised_against(self) -> set[str]:
        return {"clip"}  # the run's CLIP, or another CLIP model: a CLIP judge would not be independent either

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        target = self.target_embedding(inputs.images.device)
        return -(self._clip.encode_images(inputs.images) @ target.T)[:, 0].mean()
