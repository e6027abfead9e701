"""`Trainable`: a technique that learns its deltas, as a `lightning.pytorch.LightningModule`.

It holds only the deltas (nn.Parameters of the subclass) and the frozen generator as a plain attribute
(techniques/base.py): the generator is never a submodule, so it is never in `state_dict()`, the optimizer or a
checkpoint, and Lightning never moves or wraps it. Lightning's Trainer (conf/trainer/, built by steerexp.run)
runs the steps; this module says what one step is:

- `training_step`: the loss of the step's batch (`batch_at`), or None on a NaN/inf loss (no optimizer step;
  training stops and the technique keeps its last good deltas);
- `configure_optimizers`: AdamW at `lr` over the deltas, with the run's learning-rate schedule
  (`trainer.lr_scheduler`: constant, warmup or cosine; `trainer.warmup_steps`);
- `optimizer_step`: Lightning's step, then the budget's projection, inside the step: no checkpoint (they are
  written after the step's hooks) ever holds unprojected deltas;
- `on_train_batch_end`: the delta norms (logged; a NaN/inf one stops training), the last good deltas.

Exact resume: the batch of optimizer step k is `train_order()[k * batch_size:(k + 1) * batch_size]`, chosen by
k (Lightning's `global_step`) and nothing else: the dataloader's items are placeholders, so no iterator position
has to be restored, and randomness inside a step is seeded by k. `technique.batch_size` is the batch of one
optimizer step (the global batch): with `trainer.accumulate_grad_batches=A` on W data-parallel processes, each
of the A * W micro-batches of a step is one contiguous slice of it, and random draws are made for the whole
step's batch and sliced (`ObjectiveInputs.rows`), so a split step computes the same gradient as the whole one
(to float rounding).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as L
import torch

from steerexp.generators import FrozenGenerator
from steerexp.techniques.base import Technique
from steerexp.techniques.budgets import Budget
from steerexp.trainer_spec import LR_SCHEDULERS



class Trainable(Technique, L.LightningModule):
    """Learns its deltas: `steps` optimizer steps of AdamW at `lr` on batches of `batch_size`, through
    Lightning's Trainer, with the deltas projected onto `budget` after every step (module docstring)."""

    trainable = True
    lr_scheduler = "constant"  # the run sets these from trainer.lr_scheduler / trainer.warmup_steps
    warmup_steps = 0

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
        """The loss of `batch` = (training-sample indices, rows); rows is None for a whole step's batch, or
        (start, stop, full) for a slice of it (module docstring): draw random numbers for `full` and slice."""
        raise NotImplementedError

    def train_order(self) -> torch.Tensor:
        """The training-sample index of every (step, slot), [steps * batch_size], a pure function of the
        config (seeded)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- batches
    def _split(self) -> tuple[int, int]:
        """(accumulate_grad_batches, world size) of the attached trainer; (1, 1) outside training."""
        trainer = self._trainer
        if trainer is None:
            return 1, 1
        return int(trainer.accumulate_grad_batches), int(trainer.world_size)

    def batch_at(self, step: int, micro: int = 0):
        """The batch of optimizer step `step`: the whole of it, or on a split step (accumulation, data
        parallel) the slice of micro-batch `micro` on this process, with its rows (module docstring)."""
        if getattr(self, "_order", None) is None:
            self._order = self.train_order()
        whole = self._order[step * self.batch_size : (step + 1) * self.batch_size]
        accumulate, world = self._split()
        parts = accumulate * world
        if parts == 1:
            return (whole,)
        size = len(whole) // parts
        rank = int(self._trainer.global_rank)
        start = (micro * world + rank) * size
        return whole[start : start + size], (start, start + size, len(whole))

    def train_dataloader(self):
        """Placeholders, one per micro-batch: `training_step` takes the batch of `global_step` from
        `train_order()` (exact resume: module docstring). A plain iterable, not a DataLoader: there is nothing
        to load, so no worker processes and no sampler."""
        accumulate, _ = self._split()
        return range(max(1, self.steps) * accumulate)

    # ----------------------------------------------------------------- Lightning
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        if self.lr_scheduler == "constant":
            return optimizer
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"trainer.lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        warm, total, cosine = int(self.warmup_steps), max(1, int(self.steps)), self.lr_scheduler == "cosine"

        def factor(step: int) -> float:  # of lr, at optimizer step `step`
            if step < warm:
                return (step + 1) / warm
            if not cosine:
                return 1.0
            done = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * done))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["steerexp"] = self.identity()

    def apply_budget(self) -> None:
        """After every optimizer step: project each budgeted delta onto ||row|| <= max_norm.
        Techniques with other budgets (e.g. a norm over the whole tensor) override this."""
        if self.budget.max_norm is None:
            return
        for name, value in self.budgeted().items():
            self.project(name, self.budget.clip(value))

    def on_train_start(self) -> None:
        counts = self.parameter_counts()
        if self.logger is not None:
            self.logger.log_metrics({"params/trainable": counts["trainable"], "params/frozen": counts["frozen"]},
                                    step=0)
        self.last_good = self.deltas()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.nan_step is None:
            with torch.no_grad():
                self.apply_budget()  # part of the step: a checkpoint written after it holds projected deltas

    def training_step(self, _placeholder, batch_idx: int):
        accumulate, _ = self._split()
        step = int(self.global_step)
        loss = self.training_loss(self.batch_at(step, batch_idx % accumulate))
        if not torch.isfinite(loss):
            self.nan_step = step
            self.trainer.should_stop = True
            return None  # Lightning takes no optimizer step on it: the last good deltas stay
        self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        accumulate, _ = self._split()
        if self.nan_step is not None or (batch_idx + 1) % accumulate:
            return  # a NaN stopped training, or a micro-batch inside an accumulated step
        norms = self.delta_norms()
        if any(not math.isfinite(v) for v in norms.values()):
            self.nan_step = int(self.global_step)
            self.trainer.should_stop = True
            return
        if norms:
            self.log_dict({f"delta_norm/{k}": v for k, v in norms.items()}, prog_bar=len(norms) == 1)
        self.last_good = self.deltas()
