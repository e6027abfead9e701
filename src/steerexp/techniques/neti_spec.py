"""The settings of NeTI (techniques/neti.py), declared once: XTI's, and the mapper's. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.xti_spec import XTISpec


@register("technique", "neti")
@dataclass
class NeTISpec(XTISpec):
    _target_: str = "steerexp.techniques.neti.NeTI"
    lr: float = 1.0e-3              # the paper's learning rate for the mapper
    hidden: int = 128               # the mapper's hidden width
    time_anchors: int = 10          # anchor timesteps of the encoding layer (x the number of layers -> its width)
    features: int = 1024            # random Fourier features of (t, l)
    sigma_t: float = 0.03           # their frequency scales for t (0..999) and l (the layer index)
    sigma_l: float = 2.0
    nested_dropout: float = 0.5     # probability of truncating the hidden vector at a random width in training

    def check(self, key: str) -> None:
        super().check(key)
        for name, example in (("hidden", 128), ("time_anchors", 10), ("features", 1024)):
            self.at_least(key, name, 1, example)
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{key}.{name}", f"must be a whole number, got {getattr(self, name)!r}",
                                  f"set e.g. {key}.{name}={example}")
        self.positive(key, "sigma_t", 0.03)
        self.positive(key, "sigma_l", 2.0)
        self.fraction(key, "nested_dropout", 0.5)
        max_norm = (self.budget or {}).get("max_norm") if isinstance(self.budget, dict) else None
        if max_norm is not None:
            raise ConfigError(f"{key}.budget.max_norm", "has no effect on NeTI: its mapper's output is rescaled to "
                              "the initializer word's norm at every (t, layer), which bounds it",
                              f"set {key}.budget.max_norm=null")
