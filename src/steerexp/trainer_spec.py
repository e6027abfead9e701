"""The trainer's settings (conf/trainer/: Lightning's Trainer, steerexp/trainer.py), declared once: Lightning's
Trainer arguments a run may set, with Lightning's own defaults, and steerexp's three keys. Torch-free.

The rules that read other parts of the config (the precision against the generator's device, the batch against
accumulation x devices) are cross-part: validate.py checks them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from steerexp.errors import ConfigError
from steerexp.spec import Spec, register

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64", "16", "bf16")
LR_SCHEDULERS = ("constant", "warmup", "cosine")      # techniques/trainable.py
STEEREXP_KEYS = ("checkpoint_every", "lr_scheduler", "warmup_steps")   # not Trainer arguments (trainer.py pops them)


@register("trainer", "default")
@dataclass
class TrainerSpec(Spec):
    # Trainer arguments the run sets itself, and the setting to use instead (a clearer error than "unknown")
    elsewhere: ClassVar[dict] = {
        "max_steps": "technique.steps", "min_steps": "technique.steps", "max_epochs": "technique.steps",
        "min_epochs": "technique.steps", "enable_progress_bar": "progress=true|false|auto",
        "logger": "logger=wandb|none", "callbacks": "callbacks=default|none (or +callbacks.<name>=...)",
        "enable_checkpointing": "callbacks=none", "default_root_dir": "hydra.run.dir",
        "enable_model_summary": "nothing (the parameter counts go to the logger as params/*)",
    }

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Any = "32-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Optional[str] = None
    log_every_n_steps: int = 10
    deterministic: Any = False
    benchmark: Optional[bool] = None
    detect_anomaly: bool = False
    max_time: Any = None
    sync_batchnorm: bool = False
    inference_mode: bool = True
    # steerexp's own keys
    checkpoint_every: int = 100
    lr_scheduler: str = "constant"
    warmup_steps: int = 0

    def check(self, key: str) -> None:
        if self._target_ == "steerexp.trainer.Trainer":
            raise ConfigError(f"{key}._target_", "steerexp.trainer.Trainer is gone: training runs on Lightning's "
                              "Trainer", f"set {key}=default (_target_: lightning.pytorch.Trainer)")
        for name in ("checkpoint_every", "log_every_n_steps", "accumulate_grad_batches", "num_nodes"):
            self.at_least(key, name, 1, 100 if name == "checkpoint_every" else 1)
        self.at_least(key, "warmup_steps", 0, "10 (optimizer steps)")
        if self.gradient_clip_val is not None:
            self.positive(key, "gradient_clip_val", "1.0, or null for no clipping")
        if str(self.accelerator).lower() not in ACCELERATORS:
            options = ", ".join(ACCELERATORS)
            raise ConfigError(f"{key}.accelerator", f"must be one of {options}, got {self.accelerator!r}",
                              f"set {key}.accelerator=auto (the generator's device), cpu or gpu")
        d = self.devices
        if not (d == "auto" or (_int(d) and (d >= 1 or d == -1)) or (isinstance(d, list) and d and all(map(_int, d)))):
            raise ConfigError(f"{key}.devices", f"must be a positive integer, -1, auto or a list of device indices, "
                              f"got {d!r}", f"set e.g. {key}.devices=2 (with {key}.strategy=ddp)")
        if str(self.precision) not in PRECISIONS:
            raise ConfigError(f"{key}.precision", f"must be one of {', '.join(PRECISIONS[:5])}, got "
                              f"{self.precision!r}", f"set e.g. {key}.precision=bf16-mixed")
        if not (isinstance(self.deterministic, bool) or self.deterministic == "warn"):
            raise ConfigError(f"{key}.deterministic", f"must be true, false or warn, got {self.deterministic!r}",
                              f"set {key}.deterministic=true or false")
        self.one_of(key, "lr_scheduler", LR_SCHEDULERS)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
