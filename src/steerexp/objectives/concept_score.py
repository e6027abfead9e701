"""concept_score: a classifier's log-probability of a target attribute,

    loss = - mean_i log p(head = target | image_i)

maximised through the decoded images, and `attribute_keep`: the same classifier's reading of the
other heads (shape, colour, ...) kept where the zero-delta image of the same prompt and seed had it,

    loss = mean_i sum_h KL( p(h | start_i) || p(h | image_i) )

(0 when every kept head reads as before). With `reference: prompt` a kept head is held at the class
the prompt names instead (cross-entropy; a head the prompt names no class of, or several, keeps the
zero-delta image's reading): "a purple cross" keeps purple and cross even where the zero-delta image
drew the cross as a blob. The classifier is a scorer of the run by name (`scorer`:
the shipped `classifier` by default, or `robust`, a user's, any classifier in conf/config.yaml
`scorers:`), a different network from anything inside the generator. Optimising it is honest only
when an independent judge checks the result on held-out seeds: the run records the scorer
(`optimised_against()`), and an evaluator judging with it reports another judge next to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from steerexp import scorers
from steerexp.objectives.composite import ObjectiveInputs, Term
from steerexp.objectives.concept_score_spec import REFERENCES


class ConceptScore(Term):
    def __init__(self, head: str = "colour", target: str = "red", weight: float = 1.0, scorer: str = "classifier"):
        super().__init__(weight)
        self.head, self.target, self.scorer = head, target, scorer

    def bind(self, scorers=None, image_policy=None) -> None:
        """The run's scorer `self.scorer` (conf/config.yaml: scorers) reads `head` and `target`, with gradients."""
        super().bind(scorers, image_policy)
        scorer, head, target = self.scorer, self.head, self.target
        if self.scorers.kind(scorer) == "analytic":
            raise ValueError(f"objective concept_score.scorer={scorer}: the analytic judge has no gradients, it only "
                             "judges; name a classifier (e.g. classifier or robust)")
        clf = self.scorers.get(scorer)  # the run's scorer by name (conf/config.yaml: scorers)
        heads = {} if getattr(clf, "any_head", False) else clf.heads  # a user's one-head model answers any head
        if heads and head not in heads:
            raise ValueError(f"objective concept_score: unknown head {head!r}; choose one of {sorted(heads)}")
        if heads and target not in heads[head]:
            raise ValueError(f"objective concept_score: unknown {head} {target!r}; choose one of {heads[head]}")
        clf.class_index(head, target)

    def optimised_against(self) -> set[str]:
        return {self.scorer}

    def log_prob(self, images: torch.Tensor) -> torch.Tensor:
        """log p(target) per image [B] (differentiable in the images)."""
        return scorers.log_prob(self.scorers.get(self.scorer, images.device), images, self.head, self.target)

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        return -self.log_prob(inputs.images).mean()


class AttributeKeep(Term):
    """KL from the zero-delta images' class distribution to the edited images', summed over `heads`: the
    edit may change its target attribute, and this term holds the others where they were (`reference:
    start`), or at the class each prompt names (`reference: prompt`)."""
    needs = frozenset({"images", "start_images"})  # reference: prompt adds "prompts" (set per instance)

    def __init__(self, heads: list[str] | tuple[str, ...] = ("shape", "colour"), weight: float = 1.0,
                 scorer: str = "classifier", reference: str = "start"):
        super().__init__(weight)
        if reference not in REFERENCES:
            raise ValueError(f"objective attribute_keep.reference must be start or prompt, got {reference!r}")
        self.reference = reference
        self.needs = frozenset({"images", "start_images"} | ({"prompts"} if reference == "prompt" else set()))
        heads = list(heads)
        if not heads:
            raise ValueError("objective attribute_keep.heads is empty; name the heads to keep, e.g. [shape, colour]")
        self.heads, self.scorer = heads, scorer

    def bind(self, scorers=None, image_policy=None) -> None:
        """The run's scorer `self.scorer` has every kept head, and gradients."""
        super().bind(scorers, image_policy)
        scorer, heads = self.scorer, self.heads
        if self.scorers.kind(scorer) == "analytic":
            raise ValueError(f"objective attribute_keep.scorer={scorer}: the analytic judge has no gradients, it "
                             "only judges; name a classifier (e.g. classifier or robust)")
        clf = self.scorers.get(scorer)
        if getattr(clf, "any_head", False):
            raise ValueError(f"objective attribute_keep.scorer={scorer} is a one-head model, which answers any head "
                             "name with the same output; keeping heads needs a classifier with named heads")
        unknown = [h for h in heads if h not in clf.heads]
        if unknown:
            raise ValueError(f"objective attribute_keep.heads: unknown head(s) {unknown}; choose among "
                             f"{sorted(clf.heads)}")

    def optimised_against(self) -> set[str]:
        return {self.scorer}

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        total = inputs.images.new_zeros(())
        for kl in self.per_head(inputs.images, inputs.start_images, inputs.prompts):
            total = total + kl.mean()
        return total

    def per_head(self, images: torch.Tensor, start_images: torch.Tensor, prompts: list[str] | None = None
                 ) -> list[torch.Tensor]:
        """Per kept head, [B]: KL(reference || p(head | image)), unweighted (nudging's keep sums them per output)."""
        clf = self.scorers.get(self.scorer, images.device)
        with torch.no_grad():
            before = clf(start_images.to(images))
        after = clf(images)
        out = []
        for head in self.heads:
            ref = before[head].log_softmax(-1)
            if self.reference == "prompt":  # one-hot at the class the prompt names, where it names one
                if prompts is None or len(prompts) != len(ref):
                    raise ValueError(f"objective attribute_keep: {len(prompts or [])} prompts for {len(ref)} images")
                named = [scorers.named_class(prompt, clf.heads[head]) for prompt in prompts]
                ref = ref.float()
                for i, k in enumerate(named):
                    if k is not None:  # log of a one-hot, its zeros at log(1e-12) (float32: no -inf, no NaN)
                        one_hot = F.one_hot(torch.tensor(k, device=ref.device), len(clf.heads[head])).float()
                        ref[i] = one_hot.clamp_min(1e-12).log()
            p = ref.exp()
            out.append((p * (ref - after[head].float().log_softmax(-1))).sum(-1))
        return out
