"""The settings of null-text inversion (techniques/null_text_inversion.py), declared once: DDIM inversion's
(ddim_inversion_spec.py) and the per-timestep null optimisation's. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.ddim_inversion_spec import DDIMInversionSpec


@register("technique", "null_text_inversion")
@dataclass
class NullTextInversionSpec(DDIMInversionSpec):
    """Null-text inversion (Mokady et al.): per-timestep null embeddings optimised to follow the w=1 pivot."""

    _target_: str = "steerexp.techniques.null_text_inversion.NullTextInversion"
    guidance_scale: Optional[float] = None   # the reconstruction / edit guidance: null = sampling.guidance_scale
    inner_steps: int = 10           # Adam steps per timestep (at most)
    lr: float = 5.0e-2              # lr at the first timestep; lr_i = lr * (1 - lr_decay * i / steps)
    lr_decay: float = 0.5
    early_stopping: bool = True     # an image stops once its step MSE < early_stop + i * early_stop_growth
    early_stop: float = 5.0e-4
    early_stop_growth: float = 2.0e-5
    # max_norm: clip ||null_t - null_empty|| per token row (null: no clip)
    budget: Any = field(default_factory=lambda: {"max_norm": None})

    def check(self, key: str) -> None:
        super().check(key)
        if not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ConfigError(f"{key}.inner_steps", f"must be >= 1, got {self.inner_steps!r}",
                              f"set e.g. {key}.inner_steps=10; for no optimisation use technique=negative_prompt_"
                              "inversion or technique=ddim_inversion")
        self.positive(key, "lr", 0.05)
        v = self.lr_decay
        if not (isinstance(v, (int, float)) and 0 <= v < 1):
            raise ConfigError(f"{key}.lr_decay", f"must be in [0, 1), got {v!r}", f"set e.g. {key}.lr_decay=0.5")
        self.at_least(key, "early_stop", 0, 5.0e-4)
        self.at_least(key, "early_stop_growth", 0, 2.0e-5)
        max_norm = self.budget.get("max_norm") if isinstance(self.budget, dict) else None
        if not isinstance(self.budget, dict) or set(self.budget) - {"max_norm"}:
            raise ConfigError(f"{key}.budget", f"must be {{max_norm: <number or null>}}, got {self.budget!r}",
                              f"set e.g. {key}.budget.max_norm=1.0, or null for no clip")
        if max_norm is not None and not (isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool)
                                         and max_norm > 0):
            raise ConfigError(f"{key}.budget.max_norm", f"must be a positive number or null, got {max_norm!r}",
                              f"set e.g. {key}.budget.max_norm=1.0, or null for no clip")
