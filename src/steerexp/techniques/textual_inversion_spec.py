"""The settings of textual inversion (techniques/textual_inversion.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.base_spec import TrainableSpec

TEMPLATE_SETS = ("object", "style", "shapes")   # textual_inversion.TEMPLATES
ENCODE_TARGETS = ("auto", "eager", "lazy")
EAGER_MAX_SIDE = 64   # encode_targets=auto: eager up to this image side (px), lazy above


@register("technique", "textual_inversion")
@dataclass
class TextualInversionSpec(TrainableSpec):
    has_targets = True
    scalable = True                 # strength interpolates v_init -> v* (the magnitude evaluator)
    default_objective = ("denoising",)

    _target_: str = "steerexp.techniques.textual_inversion.TextualInversion"
    placeholder: str = "<v*>"
    num_vectors: int = 1
    initializer: str = "object"     # a one-token word to start from
    slot_word: str = "star"         # what fills '{}' in the baseline prompts (the class-name baseline)
    templates: Any = "shapes"       # object | style | shapes, or a list of prompts with '{}'
    # folder: a folder of PNG/JPG images; null: k images of `shape` from the shapes world
    targets: Any = field(default_factory=lambda: {"folder": None, "k": 6, "shape": "star", "seed": 0})
    flip: bool = False
    crop: bool = False
    captioned: bool = True          # world targets: training prompts also name colour, size, position
    # when the target images (and their crops / flips) go through the VAE: eager (all of them, in prepare, one
    # batch), lazy (each the first time a training step draws it, alone; the reference training scripts encode per
    # step), auto (eager up to EAGER_MAX_SIDE px: the embedded 32 px world, whose recorded figures it keeps; lazy
    # above, where encoding every target up front costs seconds before the first step: issue 32)
    encode_targets: str = "auto"
    lr: float = 5.0e-3
    steps: int = 400
    batch_size: int = 4
    # max_norm: clip ||v* - v_init|| per vector (null: no clip); an L2 penalty: objective=[denoising,delta_l2]
    budget: Any = field(default_factory=lambda: {"max_norm": None})

    def check(self, key: str) -> None:
        super().check(key)
        self.at_least(key, "num_vectors", 1, 1)
        p = self.placeholder
        if not isinstance(p, str) or not p or any(ch.isspace() for ch in p) or "{" in p or "}" in p:
            raise ConfigError(f"{key}.placeholder", f"must be one non-empty token without spaces or braces, got {p!r}",
                              f"set e.g. {key}.placeholder='<v*>'")
        self.one_of(key, "encode_targets", ENCODE_TARGETS)
        self.word(key, "slot_word", "star")
        self.word(key, "initializer", "object")
        if isinstance(self.templates, str) and self.templates not in TEMPLATE_SETS:
            raise ConfigError(f"{key}.templates", f"must be one of {', '.join(TEMPLATE_SETS)} or a list of prompts "
                              f"with '{{}}', got {self.templates!r}", f"set e.g. {key}.templates=shapes")
        max_norm = (self.budget or {}).get("max_norm") if isinstance(self.budget, dict) else None
        if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ConfigError(f"{key}.budget.max_norm", f"must be a positive number or null, got {max_norm!r}",
                              f"set e.g. {key}.budget.max_norm=1.0, or null for no clip")
