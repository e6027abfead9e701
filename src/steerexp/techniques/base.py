"""The technique bases: a module that holds ONLY the deltas around a frozen generator.

The generator is a plain attribute (not an nn.Module child), so it is never in
`parameters()`, never in the optimizer and never in a checkpoint. Subclasses declare their
deltas as nn.Parameters (token embeddings, null-text embeddings, latent offsets...) and say
how to sample with and without the edit (`generate`, `fill`).

    Technique     an nn.Module: what the run flow and the evaluators use of every technique
                  (prepare, compute, generate, fill, deltas, load_deltas, identity, delta_norms,
                  parameter_counts, export, diagnostics; `trainable`, `job_type`)
    TrainingFree  computes its deltas in `compute()`; the run flow never starts a Trainer
    Trainable     (steerexp.techniques.trainable) a LightningModule as well: learns its deltas with
                  `lr`, `steps`, `batch_size` and an objective; the run flow trains it with Lightning's
                  Trainer (conf/trainer/). Lightning is imported only there.

Sampling settings (`sampling: {steps, guidance_scale}`, the run's `sampling` config) come in
once, to the base. Evaluators see techniques only through steerexp.techniques.protocols.
The run's scorers and image policy come in through `bind` (run.build): `self.scorers.get(name, device)`,
`self.image_policy` for every user image file read (the shipped defaults until bound).

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
from collections.abc import Mapping

import torch
from torch import nn

from steerexp.generators import FrozenGenerator, Guidance
from steerexp.images import ImagePolicy
from steerexp.scorers import Scorers

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
        sampling = dict(sampling or {})
        guider = sampling.pop("guider", None)  # a diffusers guider (the run's `guider` group; steerexp/guiders.py)
        unknown = sorted(set(sampling or {}) - set(SAMPLING))
        if unknown:
            raise ValueError(f"sampling has no setting {unknown[0]!r}; its settings are {sorted(SAMPLING)}")
        s = SAMPLING | dict(sampling or {})
        self.sampling_steps, self.guidance = s["steps"], Guidance(scale=s["guidance_scale"], guider=guider)
        self.last_good: dict[str, torch.Tensor] | None = None
        self.nan_step: int | None = None
        # the run's scorers and image policy: the shipped defaults until run.build binds the run's own (`bind`)
        self.scorers, self.image_policy = Scorers(), ImagePolicy()

    def bind(self, scorers: Scorers | None = None, image_policy: ImagePolicy | None = None) -> None:
        """Use the run's scorers (conf/config.yaml: scorers) and image policy (images:); None keeps the current one.
        run.build calls this once, before `prepare`. A technique that holds parts using them (its objective, a
        filter) passes them on (an override calls super().bind first)."""
        self.scorers = scorers if scorers is not None else self.scorers
        self.image_policy = image_policy if image_policy is not None else self.image_policy
        objective = getattr(self, "objective", None)
        if hasattr(objective, "bind"):
            objective.bind(self.scorers, self.image_policy)

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

    @staticmethod
    def check_loaded(deltas: Mapping[str, torch.Tensor], source: str) -> None:
        """Deltas read from a file (`ckpt_path`) are floating point, finite and of a sane size (every row's norm
        over the last dimension at most steerexp.validate.MAX_DELTA_NORM), or one ConfigError naming ckpt_path:
        integer, NaN or 1e30 deltas would otherwise sample noise, or fail deep inside the generator."""
        check_delta_values(deltas, source)

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


def __getattr__(name: str):
    """`Trainable` lives in steerexp.techniques.trainable (it is a LightningModule: importing it imports
    Lightning, which training-free techniques never do)."""
    if name == "Trainable":
        from steerexp.techniques.trainable import Trainable

        return Trainable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_delta_values(deltas: Mapping[str, torch.Tensor], source: str) -> None:
    """See Technique.check_loaded."""
    from steerexp.errors import ConfigError
    from steerexp.validate import MAX_DELTA_NORM

    fix = "use the deltas a steerexp run wrote (or retrain: technique.steps > 0, ckpt_path=null)"
    for name, value in deltas.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError("ckpt_path", f"{source} holds {name!r} as {type(value).__name__}, not a tensor", fix)
        if not value.is_floating_point():
            raise ConfigError("ckpt_path", f"{source} holds {name!r} as {str(value.dtype).replace('torch.', '')} "
                              "values; deltas are floating point (float32, float16 or bfloat16)", fix)
        if value.numel() == 0:
            continue
        v = value.detach().double()
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise ConfigError("ckpt_path", f"{source} holds {bad} non-finite values (NaN/inf) in {name!r} "
                              f"{list(value.shape)}", fix)
        norm = float(v.reshape(-1, v.shape[-1] if v.dim() and v.shape[-1] else v.numel()).norm(dim=-1).max())
        if norm > MAX_DELTA_NORM:
            raise ConfigError("ckpt_path", f"{source} holds {name!r} {list(value.shape)} with a row of norm "
                              f"{norm:.3g}, over the limit of {MAX_DELTA_NORM:g} for deltas (a diverged or corrupted "
                              "file)", fix)


def check_compatible(
    technique: Technique, shapes: dict[str, list[int]], source: str, structure: dict | None = None
) -> None:
    """Deltas of these shapes (from a checkpoint) fit this technique, or one clear error naming ckpt_path and the
    first tensor whose shape differs (expected vs found)."""
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
        else "use a checkpoint written by this technique with the same settings and generator"
    )
    name = type(technique).__name__
    missing, extra = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    wrong = [k for k in own if k in shapes and own[k] != shapes[k]]
    if wrong:
        what = f"holds {wrong[0]!r} of shape {shapes[wrong[0]]}, but {name} on this generator expects {own[wrong[0]]}"
    elif missing:
        what = f"has no {missing[0]!r} (expected {own[missing[0]]}); it holds {sorted(shapes)}"
    else:
        what = f"holds {extra[0]!r}, which {name} does not have (it expects {sorted(own)})"
    raise ConfigError("ckpt_path", f"{source} {what}" + (f" ({'; '.join(differs)})" if differs else ""), fix)
