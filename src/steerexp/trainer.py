"""Training with Lightning (conf/trainer/, conf/callbacks/): what steerexp adds around `lightning.pytorch.Trainer`.

A trainable technique is a LightningModule (steerexp/techniques/trainable.py); `fit` builds Lightning's Trainer
from conf/trainer/ by its _target_ (accelerator, devices, strategy, precision, accumulate_grad_batches,
gradient_clip_val, log_every_n_steps, deterministic, ...) with what the rest of the run decides: max_steps (the
technique's steps), the logger (Lightning's WandbLogger on the run's own W&B run), the callbacks (conf/callbacks/:
Lightning's ModelCheckpoint writing <run dir>/checkpoints/last.ckpt every `trainer.checkpoint_every` steps,
its LearningRateMonitor) and the progress bar (`Bar`, in Lightning's progress-bar slot, drawn by
steerexp.progress: bars only on a terminal). The other callback of ours is `Stop`:

- SIGTERM and the pre-emption signal (steerexp.shutdown) set `shutdown.pending` while training; `Stop` ends
  training at the end of the current optimizer step, after writing last.ckpt at that step. Lightning installs
  a SIGTERM handler of its own during `fit` that calls the one installed before it (ours), so both run; the
  stop is ours (it comes before Lightning's own SIGTERMException, which would write no checkpoint);
- Ctrl-C: Lightning turns KeyboardInterrupt into sys.exit(1); `Stop` remembers the step it came at, and `fit`
  raises `TrainingInterrupted(step)`, after which the run prints how to resume.

Checkpoints are Lightning's (`state_dict`: only the deltas, `optimizer_states`, `lr_schedulers`, `loops`,
`global_step`, `epoch`, plus `steerexp`: the technique's identity), read with weights_only=True. Those of the
earlier plain-PyTorch loop (the same layout without Lightning's loop state) are converted on resume
(`legacy_checkpoint`).

This module imports Lightning: the run imports it only when a technique trains.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from steerexp import progress, shutdown
from steerexp.trainer_spec import STEEREXP_KEYS  # conf/trainer/ keys that are steerexp's, not Trainer arguments



class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or a stopping signal during training; args[0] is the number of optimizer steps done."""


class _SignalStop(Exception):
    """Raised by `Stop` to end `fit` after the step's checkpoint (not a KeyboardInterrupt: Lightning would turn
    that into sys.exit(1))."""


class Stop(L.Callback):
    """SIGTERM / pre-emption: stop at the end of the current optimizer step with last.ckpt written at it;
    Ctrl-C: remember the step (see the module docstring)."""

    def __init__(self, dirpath: str | Path | None):
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.step: int | None = None

    def _check(self, trainer) -> None:
        if shutdown.pending is not None:
            if self.dirpath is not None:
                trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)
            raise _SignalStop(int(trainer.global_step))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # between two optimizer steps
            self._check(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # the step and its projection are done
            self._check(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.step = int(trainer.global_step)


class Sidecar(TorchCheckpointIO):
    """Lightning's checkpoint writer, plus `<checkpoint>.json` beside each checkpoint: what the technique records
    about itself (its class, the settings that shape its deltas, their shapes) and the step. Validation reads a
    checkpoint's identity from this JSON before anything loads (steerexp/validate.py), so a steerexp checkpoint is
    never unpickled to be checked; the checkpoint itself loads with torch.load(weights_only=True)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        import json

        super().save_checkpoint(checkpoint, path, storage_options)
        record = {"steerexp": checkpoint.get("steerexp"), "global_step": checkpoint.get("global_step")}
        side = Path(f"{path}.json")
        tmp = side.with_name(f".{side.name}.tmp")
        tmp.write_text(json.dumps(record, default=str))
        os.replace(tmp, side)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        Path(f"{path}.json").unlink(missing_ok=True)


class Bar(ProgressBar):
    """Lightning's progress bar slot, drawn by steerexp.progress: a bar only on a terminal (and never in a sweep's
    jobs), on stderr, counting optimizer steps, with the loss and the largest delta norm."""

    def __init__(self):
        super().__init__()
        self._bar = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        if self._enabled:
            self._bar = progress.bar(trainer.max_steps, "training", unit="steps")
            if self._bar is not None and trainer.global_step:
                self._bar.update(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        shown = {}
        loss = trainer.progress_bar_metrics.get("train/loss")
        if loss is not None:
            shown["loss"] = f"{float(loss):.4g}"
        norms = pl_module.delta_norms()
        if norms:
            shown["|delta|"] = f"{max(norms.values()):.3g}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(int(trainer.global_step) - self._bar.n)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()


class _Quiet(logging.Filter):
    """Lightning's INFO lines that say nothing a steerexp user acts on: the device inventory (steerexp runs on
    the generator's device), the end of fit at max_steps (the run goes on to evaluate), its Ctrl-C line (the run
    prints the resume command instead) and its unconditional advertisements for its cloud services ("Tip")."""

    DROP = ("GPU available:", "TPU available:", "HPU available:", "`Trainer.fit` stopped: `max_steps=",
            "Detected KeyboardInterrupt", "Restoring states from the checkpoint path",
            "Restored all states from the checkpoint", "\N{ELECTRIC LIGHT BULB} Tip:",
            "Lightning automatically upgraded your loaded checkpoint")  # (a pre-Lightning one: legacy_checkpoint)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(self.DROP)


def _quiet_lightning() -> None:
    # Lightning 2.6's CombinedLoader builds a torch LeafSpec for every dataloader (ours is one placeholder
    # iterable), which torch >= 2.10 reports as deprecated on each fit: Lightning's to fix, nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.migration.utils"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet())


class _RankObserver(_ChildProcessObserver):
    """Lightning's observer of the ranks its launcher started (every 5 s: when one has exited non-zero, SIGKILL
    the others and this process), which `ranks_of_this_run` stops when the fit and its collectives are over."""

    every_s = 5  # (Lightning's)

    def __init__(self, main_pid: int, child_processes: list) -> None:
        super().__init__(main_pid=main_pid, child_processes=child_processes, sleep_period=self.every_s)
        self.children = child_processes
        self._lock = threading.Lock()
        self._stopped = False

    def _run(self) -> bool:
        with self._lock:  # (a check under way ends before `stop` returns)
            return self._stopped or super()._run()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


# what Lightning's subprocess launcher sets in this process's environment when it starts the other ranks
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


@contextlib.contextmanager
def ranks_of_this_run(settings: dict | None = None):
    """Around `fit` and the collectives that follow it (the final checkpoint) in a steerexp run: data-parallel
    ranks are started as this Hydra job's own run, and leave this process as they found it.

    - Lightning's ddp strategy starts ranks 1.. by running the script again, with a command it builds from
      sys.argv (lightning.fabric.strategies.launchers.subprocess_script._hydra_subprocess_cmd, a module-level
      function its launchers call, the Trainer's by the name it imported): right for a single `steerexp` run,
      wrong for a sweep's job, where sys.argv is the whole sweep (`-m`, Hydra's basic launcher: the jobs run in
      this process) or the job's worker (launcher=gpus: `python -m ..._worker <spec>`). Meanwhile that function
      is steerexp.ranks.relaunch_command in both modules (the job's own single run in the job's directory;
      `settings`: key -> value it adds), falling back to Lightning's own for an app not composed from
      steerexp's configs.
    - After: the ranks it started are no longer watched by Lightning's observer thread, which SIGKILLs this
      process when one of them exits non-zero (a sweep's later jobs with it); if the run failed they are killed
      (SIGKILL, as Lightning does: they may be waiting in a collective). The process group the fit created is
      destroyed (Lightning leaves it to exit) and the variables its launcher set in os.environ are restored (a
      LOCAL_RANK left behind would make the next fit believe a cluster started its processes, and start none):
      the next job of a basic sweep, in this process, starts clean."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    from steerexp import ranks

    launchers = (fabric_launcher, trainer_launcher)
    originals = [(m, m._hydra_subprocess_cmd, m._launch_process_observer) for m in launchers]
    lightnings = trainer_launcher._hydra_subprocess_cmd
    observers: list[_RankObserver] = []

    def command(local_rank: int):
        return ranks.relaunch_command(local_rank, settings) or lightnings(local_rank=local_rank)

    def observe(child_processes) -> None:
        observers.append(_RankObserver(main_pid=os.getpid(), child_processes=child_processes))
        observers[-1].start()

    environment = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    for module, _, _ in originals:
        module._hydra_subprocess_cmd = command
        module._launch_process_observer = observe
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for module, original, lightnings_observer in originals:
            module._hydra_subprocess_cmd = original
            module._launch_process_observer = lightnings_observer
        for watcher in observers:
            watcher.stop()
            for child in watcher.children if failed else ():
                child.kill()
                child.wait()
        if not grouped and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def legacy_checkpoint(path: str | Path, into: Path) -> Path:
    """A checkpoint of the earlier plain-PyTorch loop (no `pytorch-lightning_version`, no loop state) as one
    Lightning resumes from: the same deltas, optimizer state and step, with the version that makes Lightning's
    own migration rebuild its loop state from `global_step`. Written to `into`; other checkpoints pass as is."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "pytorch-lightning_version" in ckpt:
        return Path(path)
    ckpt["pytorch-lightning_version"] = "1.5.0"  # before loop state: Lightning migrates global_step into it
    ckpt.setdefault("callbacks", {})
    ckpt.setdefault("lr_schedulers", [])
    into.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, into)
    return into


def fit(trainer_cfg: dict, technique, callbacks: list, logger, ckpt_path: str | Path | None,
        checkpoint_dir: Path | None) -> L.Trainer:
    """Train `technique` with Lightning's Trainer built from `trainer_cfg` (conf/trainer/, resolved); returns the
    trainer. Raises TrainingInterrupted(step) on Ctrl-C or a stopping signal."""
    from hydra.utils import instantiate

    _quiet_lightning()
    args = dict(trainer_cfg)
    technique.lr_scheduler = args.pop("lr_scheduler", "constant")
    technique.warmup_steps = int(args.pop("warmup_steps", 0) or 0)
    for key in STEEREXP_KEYS:
        args.pop(key, None)
    if args.get("accelerator", "auto") == "auto":
        args["accelerator"] = technique.generator.device.type  # where the frozen generator is
    if args["accelerator"] == "cpu" and str(args.get("precision")) in ("16-mixed", "16"):
        from steerexp.errors import ConfigError  # (validate refuses it when the config names the CPU)

        raise ConfigError("trainer.precision", "16-mixed needs CUDA (its GradScaler); this run trains on the CPU",
                          "set trainer.precision=bf16-mixed on the CPU (or train on a GPU)")
    steps = int(technique.steps)
    # log every n steps, but not more rarely than once per run (Lightning warns when n exceeds the batches)
    accumulate = int(args.get("accumulate_grad_batches", 1) or 1)
    args["log_every_n_steps"] = max(1, min(int(args.get("log_every_n_steps", 50)), steps * accumulate))
    stop = Stop(checkpoint_dir)
    bars = progress.enabled()
    from lightning.pytorch.callbacks import ModelCheckpoint

    # no ModelCheckpoint configured (callbacks=none): none of Lightning's default either (it would write into the
    # working directory); the run writes the final state to checkpoints/last.ckpt itself
    args["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = instantiate(
        args,
        max_steps=steps,
        logger=logger if logger is not None else False,
        callbacks=[*callbacks, stop, *([Bar()] if bars else [])],
        enable_progress_bar=bars,
        enable_model_summary=False,  # the parameter counts go to the logger (params/*), not a table on the console
        plugins=[Sidecar()],  # <checkpoint>.json: the checkpoint's identity, read by validation without unpickling
        default_root_dir=str(checkpoint_dir.parent) if checkpoint_dir is not None else None,
        _convert_="all",
    )
    legacy = Path(checkpoint_dir or tempfile.gettempdir()) / f".resume-from-legacy-{os.getpid()}.ckpt"
    if ckpt_path:
        ckpt_path = legacy_checkpoint(ckpt_path, legacy)
    shutdown.training = True
    try:
        trainer.fit(technique, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except _SignalStop as err:
        raise TrainingInterrupted(err.args[0]) from None
    except SIGTERMException:
        # Lightning's own stop for a SIGTERM that came after our check: the step is whole, write it
        if checkpoint_dir is not None:
            trainer.save_checkpoint(checkpoint_dir / "last.ckpt", weights_only=False)
        raise TrainingInterrupted(int(trainer.global_step)) from None
    except SystemExit:
        if stop.step is not None:  # Lightning's exit after Ctrl-C
            raise TrainingInterrupted(stop.step) from None
        raise
    finally:
        shutdown.training = False
        technique.eval()
        technique.trainer = None  # detached: the technique's later calls (diagnostics) log nothing
        technique.to("cpu")
        if legacy.is_file():
            os.remove(legacy)
    return trainer
