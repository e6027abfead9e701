"""W&B through Lightning's WandbLogger: offline by default under <run_dir>/wandb, online
only when `logger.mode=online`, nothing with `logger.mode=disabled`. Every run, including
each job of a multirun, starts and finishes its own W&B run.

In a sweep (`steerexp -m ...`): group = the sweep (its directory), name = the job's override
dirname, job_type = train (the technique learns) or eval (training-free), and the run id is a
hash of the sweep dir and the job number, so `steerexp-sweep rerun` of a failed job resumes its
W&B run instead of starting a duplicate (offline runs sync into the same id with `wandb sync`)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

MODES = ("offline", "online", "disabled")


def sweep_run_id(sweep_dir: str | Path, job_num: int) -> str:
    """Deterministic W&B run id of a sweep job: the same sweep dir and job number give the same id."""
    key = f"{Path(sweep_dir).absolute().as_posix()}#{int(job_num)}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def default_run_id() -> str | None:
    """The sweep job's deterministic id when running inside a Hydra multirun, else None (W&B picks one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    mode = hc.get("mode")
    if getattr(mode, "name", mode) != "MULTIRUN" or hc.job.get("num") is None:
        return None
    return sweep_run_id(hc.sweep.dir, hc.job.num)


class RunLogger:
    def __init__(self, mode: str, run_dir: Path, name: str, group: str, tags: list[str], config: dict,
                 project: str = "steerexp", entity: str | None = None, job_type: str = "train", run_id: str | None = None):
        if mode not in MODES:
            raise ValueError(f"logger.mode must be one of {MODES}, got {mode!r}")
        self.mode, self.run_dir = mode, Path(run_dir)
        self.lightning = None
        if mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        # a fresh run per job: never resume the previous job's run within one process
        if wandb.run is not None:
            wandb.finish()
        run_id = run_id or default_run_id()  # Lightning's WandbLogger passes resume="allow"
        self.lightning = WandbLogger(
            project=project, entity=entity, name=name, group=group, tags=tags, job_type=job_type,
            save_dir=str(self.run_dir), offline=(mode == "offline"), id=run_id, config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run = self.lightning.experiment

    def log_grid(self, key: str, grid: torch.Tensor) -> None:
        if self.lightning is not None:
            import wandb
            self.run.log({key: wandb.Image((grid.permute(1, 2, 0).numpy() * 255).astype(np.uint8))})

    def log_histograms(self, key: str, series: dict[str, list[float]]) -> None:
        if self.lightning is not None:
            import wandb
            self.run.log({f"{key}/{side}": wandb.Histogram(np.asarray(v)) for side, v in series.items()})

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.lightning is not None:
            import wandb
            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_plot(self, key: str, path: str) -> None:
        if self.lightning is not None:
            import wandb
            self.run.log({key: wandb.Image(str(path))})

    def log_lines(self, key: str, xs: list[float], series: dict[str, list[float]], xname: str) -> None:
        if self.lightning is not None:
            import wandb
            self.run.log({key: wandb.plot.line_series(xs=xs, ys=list(series.values()), keys=list(series), title=key, xname=xname)})

    def finish(self, metrics: dict) -> None:
        if self.lightning is not None:
            import wandb
            self.run.summary.update(metrics)
            wandb.finish()
