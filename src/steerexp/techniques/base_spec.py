"""The specs every technique's spec starts from (steerexp/spec.py): what a technique is, and the settings every
trainable technique has. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from steerexp.spec import Spec


@dataclass
class TechniqueSpec(Spec):
    """A technique: what it is, for evaluators and objectives to read (class attributes, not settings)."""

    trainable: ClassVar[bool] = False           # trains its deltas (Lightning / steerexp.trainer)
    has_targets: ClassVar[bool] = False         # has target images (memorisation against them, leakage...)
    invertible: ClassVar[bool] = False          # inverts source images and edits them (the Invertible protocol)
    scalable: ClassVar[bool] = False            # has a strength knob (StrengthScalable: the magnitude evaluator)
    filtered: ClassVar[bool] = False            # filters and nudges each output (Filtered: the nudging evaluator)
    # the objective a trainable technique uses when the run names none (objective=auto, the default): option
    # names of conf/objective/
    default_objective: ClassVar[tuple[str, ...]] = ()
    # objective terms that cannot drive it (e.g. the denoising loss for a technique that has no target images)
    refuses_objective: ClassVar[tuple[str, ...]] = ()


@dataclass
class TrainableSpec(TechniqueSpec):
    """The settings every trainable technique has."""

    trainable: ClassVar[bool] = True

    seed: Any = "${seed}"
    lr: float = 5.0e-3
    steps: int = 100
    batch_size: int = 4

    def check(self, key: str) -> None:
        self.positive(key, "lr", 0.005)
        self.at_least(key, "steps", 0, "100 (0 = no training)")
        self.at_least(key, "batch_size", 1, 4)
