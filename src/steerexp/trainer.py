"""The training loop of trainable techniques (conf/trainer/, conf/callbacks/): plain PyTorch, one file.

A technique's deltas are one small parameter group, so a step is: zero the gradients, the
technique's loss for the step, backward, (clip), AdamW step, the budget's projection. That is
all `Trainer.fit` does, plus what a run needs around it:

- checkpoints (`Checkpoint` callback, conf/callbacks/default.yaml): `<run dir>/checkpoints/last.ckpt`
  every `trainer.checkpoint_every` steps, written atomically (a run killed mid-write keeps the previous
  one) and read with torch.load(weights_only=True). The layout is Lightning's (`state_dict`,
  `optimizer_states`, `global_step`, `epoch`) plus `steerexp` (the technique's identity), so checkpoints
  written by earlier, Lightning-trained versions resume too;
- exact resume: the state is the deltas, the optimizer's state and the step; the batch and the
  randomness of step k are functions of k (techniques/base.py), so a run resumed from the
  checkpoint of step k ends with the same deltas, bit for bit, as one never interrupted;
- a NaN/inf loss or delta norm stops training (the technique keeps its last good deltas);
- metrics to the run's logger every `log_every_n_steps` steps (train/loss, delta_norm/*, and what
  the objective reports), and a progress bar with loss and delta norm on a terminal
  (steerexp.progress);
- Ctrl-C: `TrainingInterrupted(step)`, after which the run prints how to resume.

Lightning is not imported: it cost about 3.6 s of imports per run (it imports all of torchmetrics),
more than the whole fixed cost of a run on the embedded generator today, for a loop this size.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from steerexp import progress


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; args[0] is the number of optimizer steps done."""


class Callback:
    """Hooks of the training loop (conf/callbacks/ instantiates them by _target_)."""

    def on_train_start(self, trainer: "Trainer", technique) -> None:
        pass

    def on_step_end(self, trainer: "Trainer", technique) -> None:
        """After optimizer step `trainer.global_step` (counted from 1) and the budget's projection."""

    def on_train_end(self, trainer: "Trainer", technique) -> None:
        pass


class Checkpoint(Callback):
    """`<dirpath>/last.ckpt` every `every_n_steps` optimizer steps (the run sets dirpath to
    <run dir>/checkpoints): the deltas, the optimizer's state and the step, enough to resume exactly."""

    def __init__(self, every_n_steps: int = 100, dirpath: str | Path | None = None):
        if int(every_n_steps) < 1:
            raise ValueError(f"callbacks.model_checkpoint.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.dirpath = int(every_n_steps), dirpath

    def on_step_end(self, trainer: "Trainer", technique) -> None:
        if self.dirpath is not None and trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(Path(self.dirpath) / "last.ckpt")


class Trainer:
    """Trains a `Trainable` technique for `max_steps` optimizer steps (see the module docstring).

    log_every_n_steps   metrics to the logger every this many steps (and at the last step)
    gradient_clip_val   clip the deltas' gradient norm to this (null: no clipping)
    checkpoint_every    steps between checkpoints; read by callbacks.model_checkpoint, not here
    """

    def __init__(self, max_steps: int = 0, log_every_n_steps: int = 10, gradient_clip_val: float | None = None,
                 checkpoint_every: int | None = None, device: str | torch.device = "cpu", logger=None,
                 callbacks: list[Callback] | None = None):
        if int(log_every_n_steps) < 1:
            raise ValueError(f"trainer.log_every_n_steps must be >= 1, got {log_every_n_steps}")
        if gradient_clip_val is not None and not float(gradient_clip_val) > 0:
            raise ValueError(f"trainer.gradient_clip_val must be positive or null, got {gradient_clip_val}")
        self.max_steps, self.log_every_n_steps = int(max_steps), int(log_every_n_steps)
        self.gradient_clip_val = None if gradient_clip_val is None else float(gradient_clip_val)
        self.device, self.logger, self.callbacks = torch.device(device), logger, list(callbacks or [])
        self.global_step = 0
        self.should_stop = False
        self.optimizer: torch.optim.Optimizer | None = None
        self._technique = None  # the one `fit` trains
        self.logged: dict[str, float] = {}  # what the technique logged during the current step

    # ------------------------------------------------------------------ what the technique calls
    def record(self, metrics: dict) -> None:
        """The technique's `log_dict`: metrics of the current step (tensors or numbers)."""
        self.logged.update({k: _number(v) for k, v in metrics.items()})

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, technique) -> dict:
        ckpt = {
            "epoch": 0,
            "global_step": self.global_step,
            "state_dict": {k: v.detach().cpu().clone() for k, v in technique.state_dict().items()},
            "optimizer_states": [self.optimizer.state_dict()] if self.optimizer is not None else [],
        }
        technique.on_save_checkpoint(ckpt)
        return ckpt

    def save_checkpoint(self, path: str | Path, technique=None) -> None:
        """Write the checkpoint atomically: a reader (or a kill) never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.checkpoint(technique if technique is not None else self._technique), tmp)
        os.replace(tmp, path)

    def _resume(self, technique, ckpt_path) -> None:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        technique.load_state_dict(ckpt["state_dict"])
        if ckpt.get("optimizer_states"):
            self.optimizer.load_state_dict(ckpt["optimizer_states"][0])
        self.global_step = int(ckpt.get("global_step", 0))

    # ------------------------------------------------------------------ the loop
    def fit(self, technique, ckpt_path: str | Path | None = None) -> None:
        self._technique = technique
        technique.to(self.device)
        technique._trainer = self
        self.optimizer = technique.configure_optimizers()
        if ckpt_path:
            self._resume(technique, ckpt_path)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        technique.train()
        technique.on_train_start()
        for cb in self.callbacks:
            cb.on_train_start(self, technique)
        bar = progress.bar(self.max_steps, "training", unit="steps")
        if bar is not None:
            bar.update(self.global_step)
        try:
            while self.global_step < self.max_steps and not self.should_stop:
                technique.global_step = self.global_step
                self.logged = {}
                self.optimizer.zero_grad(set_to_none=True)
                loss = technique.training_step(self.global_step)
                if loss is None or self.should_stop:  # NaN/inf: no step; the technique keeps its last good deltas
                    break
                loss.backward()
                if self.gradient_clip_val is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val)
                self.optimizer.step()
                with torch.no_grad():
                    technique.apply_budget()  # part of the step: a checkpoint written after it holds projected deltas
                self.global_step += 1
                technique.global_step = self.global_step
                norms = technique.on_train_batch_end()
                if self.should_stop:  # a delta norm went NaN/inf
                    break
                for cb in self.callbacks:
                    cb.on_step_end(self, technique)
                self._report(_number(loss), norms, bar)
        except KeyboardInterrupt:
            raise TrainingInterrupted(self.global_step) from None
        finally:
            if bar is not None:
                bar.close()
            technique.eval()
            technique._trainer = None
            technique.to("cpu")
        for cb in self.callbacks:
            cb.on_train_end(self, technique)

    def _report(self, loss: float, norms: dict[str, float], bar) -> None:
        step = self.global_step
        if bar is not None:
            shown = {"loss": f"{loss:.4g}"}
            if norms:
                shown["|delta|"] = f"{max(norms.values()):.3g}"
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
        if self.logger is not None and (step % self.log_every_n_steps == 0 or step == self.max_steps):
            metrics = {"train/loss": loss, **{f"delta_norm/{k}": v for k, v in norms.items()}, **self.logged}
            self.logger.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)


def _number(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
