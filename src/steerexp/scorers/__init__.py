"""Scorers: the models that read images, none of them the generator's own text encoder.

- the concept classifier (`classifier.ConceptClassifier`, shipped in assets/classifier),
- a tiny open_clip model (`clip.CLIPScorer`, shipped in assets/clip),
- a user's classifier by path (`user.load_user_classifier`: 'module:factory' or TorchScript),
- the robust concept classifier (same class, shipped in assets/classifier_robust) and the
  timestep-aware one that reads noisy latents (`noisy.NoisyClassifier`, assets/classifier_noisy).

One factory builds them (`factory`: `build(cfg.scorers)` -> a run's `Scorers`, `.get(name, device)`; cached
`load_classifier` / `load_clip`), and one pair of functions reads "p(target) under a head"
(`log_prob`, differentiable, and `prob`), for objectives, techniques and evaluators alike.
"""
from steerexp.scorers.classifier import DEFAULT_PATH as DEFAULT_CLASSIFIER
from steerexp.scorers.classifier import ConceptClassifier, HeadClassifier, log_prob, named_class, prob
from steerexp.scorers.factory import Scorers, build, load_classifier, load_clip, load_noisy
from steerexp.scorers.user import load_user_classifier

__all__ = [
    "DEFAULT_CLASSIFIER", "ConceptClassifier", "HeadClassifier", "Scorers", "build",
    "load_classifier", "load_clip", "load_noisy", "load_user_classifier", "log_prob", "named_class", "prob",
]
