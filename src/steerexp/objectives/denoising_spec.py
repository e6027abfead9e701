"""The settings of the denoising loss (objectives/denoising.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from steerexp.errors import ConfigError
from steerexp.objectives.base_spec import TermSpec
from steerexp.spec import Facts, register


@register("objective", "denoising")
@dataclass
class DenoisingSpec(TermSpec):
    _target_: str = "steerexp.objectives.denoising.Denoising"
    weight: float = 1.0
    min_timestep: int = 0       # timesteps drawn uniformly from [min_timestep, max_timestep) (capped at the
    max_timestep: int = 1000    # scheduler's num_train_timesteps)

    def check(self, key: str) -> None:
        super().check(key)
        self.at_least(key, "min_timestep", 0, 0)
        if not self.min_timestep < self.max_timestep:
            raise ConfigError(f"{key}.max_timestep", f"must be above {key}.min_timestep ({self.min_timestep}), got "
                              f"{self.max_timestep}", f"set e.g. {key}.min_timestep=0 {key}.max_timestep=1000")

    def check_generator(self, key: str, facts: Facts) -> None:
        top = facts.num_train_timesteps
        if top is not None and self.min_timestep >= top:
            raise ConfigError(f"{key}.min_timestep", f"is {self.min_timestep}, but the scheduler has {top} timesteps",
                              f"set {key}.min_timestep below {top} (e.g. 0)")
