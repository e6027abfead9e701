"""The technique bases: a module that holds ONLY the deltas around a frozen generator.

The generator is a plain attribute (not an nn.Module child), so it is never in
`parameters()`, never in the optimizer and never in a checkpoint. Subclasses declare their
deltas as nn.Parameters (token embeddings, null-text embeddings, latent offsets...) and say
how to sample with and without the edit (`generate`, `fill`).

    Technique     an nn.Module: what the run flow and the evaluators use of every technique
                  (prepare, compute, generate, fill, deltas, load_deltas, identity, delta_norms,
                  parameter_counts, export, diagnostics; `trainable`, `job_type`)
    TrainingFree  computes its deltas in `compute()`; the run flow never starts a Trainer
    Trainable     learns its deltas with `lr`, `steps`, `batch_size` and an objective; the run
                  flow trains it with steerexp.trainer.Trainer (a plain PyTorch loop: no Lightning)

Sampling settings (`sampling: {steps, guidance_scale}`, the run's `sampling` config) come in
once, to the base. Evaluators see techniques only through steerexp.techniques.protocols.

Budgets (steerexp.techniques.budgets) act on `budgeted()`, the tensors that measure the
edit's size: after every optimizer step each is projected onto the ball ||delta|| <= max_norm
(per row of the last dimension). An L2 penalty is an objective term (`delta_l2`), not a budget.

Exact resume: the batch of optimisation step k is `train_order()[k * batch_size:(k + 1) *
batch_size]`, chosen by the step and by nothing else (no data iterator whose position a
checkpoint would have to hold); randomness inside a step is seeded by the step too, and the
projection is part of the optimizer step, before a checkpoint can be written. So a run killed at step k and
resumed from its checkpoint ends with the same deltas, bit for bit, as one never interrupted.
Checkpoints describe themselves (`checkpoint["steerexp"]`: technique, delta shapes and the
`structure()` settings that fix them), so a checkpoint of another technique is a clear error.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch
from torch import nn

from steerexp.generators import FrozenGenerator, Guidance
from steerexp.techniques.budgets import Budget

# conf/config.yaml's `sampling`: what a technique built without the run's config samples with
SAMPLING = {"steps": 25, "guidance_scale": 5.0}


class NaNLossError(RuntimeError):
    pass


class Technique(nn.Module):
    """What every technique offers the run flow and the evaluators (see the module docstring)."""
    trainable: bool = False
    slot_word: str = "object"  # what fills '{}' in prompt templates (techniques that use it take it as a setting)

    def __init__(self, generator: FrozenGenerator, sampling: Mapping | None = None):
        super().__init__()
        self.__dict__["generator"] = generator  # not a submodule: never trained, never checkpointed
        unknown = sorted(set(sampling or {}) - set(SAMPLING))
        if unknown:
            raise ValueError(f"sampling has no setting {unknown[0]!r}; its settings are {sorted(SAMPLING)}")
        s = SAMPLING | dict(sampling or {})
        self.sampling_steps, self.guidance = s["steps"], Guidance(scale=s["guidance_scale"])
        self.last_good: dict[str, torch.Tensor] | None = None
        self.nan_step: int | None = None

    @classmethod
    def requirements(cls, cfg: Mapping) -> dict[str, str]:
        """What this technique, so configured, needs of the generator family: capability -> why (the
        capabilities: generators/__init__.py CAPABILITIES). Checked before the generator loads."""
        return {}

    # ----------------------------------------------------------------- what subclasses provide
    def prepare(self) -> None:
        """Load and validate inputs, cache what computing or training needs. Called before any heavy work."""

    def compute(self) -> None:
        """Training-free techniques compute their deltas here."""

    def budgeted(self) -> dict[str, torch.Tensor]:
        """name -> tensor whose norm is the edit's size (the budget acts on these)."""
        return {}

    def structure(self) -> dict:
        """The technique settings that fix the deltas' shapes (`num_vectors`...), stored in checkpoints
        so that loading one into a differently shaped technique names the setting."""
        return {}

    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        """Images for prompt templates ('{}' marks the concept slot) with or without the edit."""
        raise NotImplementedError

    def fill(self, template: str, edited: bool = False) -> str:
        """The prompt of a template: '{}' becomes `slot_word` (techniques whose edit is the slot override this)."""
        return template.replace("{}", self.slot_word)

    def diagnostics(self) -> dict[str, float]:
        """What the technique measured about itself while computing its deltas (name -> number)."""
        return {}

    def optimised_against(self) -> set[str]:
        """The run's scorers (by name) the deltas were optimised, ranked or guided against: by default those of
        the objective (`objective.optimised_against()`); techniques that use a scorer themselves say which."""
        objective = getattr(self, "objective", None)
        return set(objective.optimised_against()) if hasattr(objective, "optimised_against") else set()

    def export(self, run_dir) -> list[str]:
        """Extra files for use outside steerexp; returns their names."""
        return []

    # ----------------------------------------------------------------- deltas
    def deltas(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}

    def load_deltas(
        self, deltas: dict[str, torch.Tensor], source: str = "deltas", structure: dict | None = None
    ) -> None:
        """Load deltas (a state dict); a mismatch is one clear error naming what differs."""
        check_compatible(self, {k: list(v.shape) for k, v in deltas.items()}, source, structure)
        self.load_state_dict(deltas)

    def identity(self) -> dict:
        """What a checkpoint records about the technique that wrote it."""
        return {
            "technique": f"{type(self).__module__}.{type(self).__qualname__}",
            "deltas": {k: list(v.shape) for k, v in self.state_dict().items()},
            "structure": self.structure(),
        }

    def safetensors_metadata(self) -> dict[str, str]:
        ident = self.identity()
        return {"technique": ident["technique"], "structure": json.dumps(ident["structure"])}

    def delta_norms(self) -> dict[str, float]:
        return {k: float(v.detach().norm(dim=-1).max()) for k, v in self.budgeted().items()}

    @property
    def job_type(self) -> str:
        """W&B job type: "train" when the run learns deltas, "eval" when it only computes and evaluates."""
        return "eval"

    def parameter_counts(self) -> dict[str, int]:
        return {
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "frozen": self.generator.num_parameters(),
        }


class TrainingFree(Technique):
    """Computes its deltas in `compute()` (nothing is trained; the run flow starts no Trainer)."""


class Trainable(Technique):
    """Learns its deltas: `steps` optimizer steps of AdamW at `lr` on batches of `batch_size`, through
    steerexp.trainer.Trainer, with the deltas projected onto `budget` after every step (exact resume:
    module docstring). While training, `global_step` is the number of optimizer steps done and `_trainer`
    the trainer (None otherwise); `log_dict` hands metrics of the step to the trainer's logger."""

    trainable = True

    def __init__(
        self,
        generator: FrozenGenerator,
        budget: Mapping | Budget | None = None,
        lr: float = 1e-3,
        steps: int = 100,
        batch_size: int = 4,
        sampling: Mapping | None = None,
    ):
        super().__init__(generator, sampling)
        if lr <= 0:
            raise ValueError(f"technique.lr must be positive, got {lr}")
        if steps < 0:
            raise ValueError(f"technique.steps must be >= 0, got {steps}")
        self.budget = Budget.from_config(budget)
        self.lr, self.steps, self.batch_size = lr, steps, batch_size

    @property
    def job_type(self) -> str:
        return "train" if self.steps > 0 else "eval"

    # ----------------------------------------------------------------- what subclasses provide
    def project(self, name: str, value: torch.Tensor) -> None:
        """Write a projected value back into the delta called `name`."""
        raise NotImplementedError

    def training_loss(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def train_order(self) -> torch.Tensor:
        """The training-sample index of every (step, slot), [steps * batch_size], a pure function of the
        config (seeded)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the training loop's hooks
    global_step: int = 0   # optimizer steps done (the trainer sets it before each step)
    _trainer = None        # the steerexp.trainer.Trainer while training

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["steerexp"] = self.identity()

    def apply_budget(self) -> None:
        """After every optimizer step: project each budgeted delta onto ||row|| <= max_norm.
        Techniques with other budgets (e.g. a norm over the whole tensor) override this."""
        if self.budget.max_norm is None:
            return
        for name, value in self.budgeted().items():
            self.project(name, self.budget.clip(value))

    def batch_at(self, step: int):
        """The batch of optimizer step `step` (see the module docstring: exact resume)."""
        if getattr(self, "_order", None) is None:
            self._order = self.train_order()
        return (self._order[step * self.batch_size : (step + 1) * self.batch_size],)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)

    def log_dict(self, metrics: dict) -> None:
        """Metrics of the current training step, to the run's logger (nothing outside training)."""
        if self._trainer is not None:
            self._trainer.record(metrics)

    def on_train_start(self) -> None:
        counts = self.parameter_counts()
        logger = self._trainer.logger if self._trainer is not None else None
        if logger is not None:
            logger.log_metrics({"params/trainable": counts["trainable"], "params/frozen": counts["frozen"]}, step=0)
        self.last_good = self.deltas()

    def training_step(self, step: int) -> torch.Tensor | None:
        """The loss of optimizer step `step`; None (and training stops) when it is NaN/inf."""
        loss = self.training_loss(self.batch_at(step))
        if not torch.isfinite(loss):
            self.nan_step = step
            if self._trainer is not None:
                self._trainer.should_stop = True
            return None  # no optimizer step: the last good deltas stay
        return loss

    def on_train_batch_end(self) -> dict[str, float]:
        """After the step and its projection: the delta norms; a NaN/inf one stops training, else the
        deltas become the last good ones."""
        norms = self.delta_norms()
        if any(not math.isfinite(v) for v in norms.values()):
            self.nan_step = int(self.global_step)
            if self._trainer is not None:
                self._trainer.should_stop = True
            return norms
        self.last_good = self.deltas()
        return norms


def check_compatible(
    technique: Technique, shapes: dict[str, list[int]], source: str, structure: dict | None = None
) -> None:
    """Deltas of these shapes (from a checkpoint) fit this technique, or one clear error."""
    from steerexp.errors import ConfigError

    own = {k: list(v.shape) for k, v in technique.state_dict().items()}
    if own == shapes:
        return
    differs = [
        f"technique.{k}={v} there, {technique.structure().get(k)} here"
        for k, v in (structure or {}).items()
        if technique.structure().get(k) != v
    ]
    fix = (
        "set " + " and ".join(d.split(" there")[0] for d in differs)
        if differs
        else "use a checkpoint written by this technique with the same settings"
    )
    raise ConfigError(
        "ckpt_path",
        f"{source} holds deltas {shapes}, but {type(technique).__name__} has {own}"
        + (f" ({'; '.join(differs)})" if differs else ""),
        fix,
    )
