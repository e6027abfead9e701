"""The sweep state of every launcher, kept by a Hydra callback (conf/config.yaml: `hydra.callbacks.sweep_state`).

Hydra's own launchers (basic, submitit's local and SLURM, Ray) know nothing of `steerexp-sweep`; this
callback gives their sweeps the state launcher=gpus keeps itself (jobs.py), in whatever process runs the job:

- on_multirun_start (the process that starts the sweep): `<sweep dir>/.sweep/manifest.json` (the launcher,
  the working directory) and `.sweep/LAUNCHER` (this process, while the sweep runs);
- on_job_start (the job's process): the job's RUNNING marker (its pid), its record and its spec
  (`.sweep/jobs/<num>.json` and `.pkl`: the composed config and the task function, what a rerun runs);
- on_job_end: COMPLETED, or FAILED + traceback.txt, and RUNNING removed.

A failed job's exception is replaced in its JobReturn by SweepJobFailed, after its traceback is saved: a
CompactHydraException, so when the sweeper raises it at the end of the batch (Hydra's basic sweeper does,
after every job of the batch has run: a failing job does not stop the others) Hydra prints one short
paragraph, the sweep's summary, instead of the job's traceback, and exits with code 1. (It also lets go of
the job's frames, which would keep its models alive until the sweep ends.)

A sweep records only the jobs that started: a job the sweep never reached (interrupted) is not listed, and
relaunching the sweep redoes it. Jobs of launcher=gpus, and the jobs of a rerun, run in worker processes whose
launcher keeps their state (the worker leaves this callback out). Single runs are left alone.
"""
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.steerexp_launchers import jobs as J

log = logging.getLogger(__name__)

class SweepJobFailed(CompactHydraException):
    """A job of the sweep failed. Its message is the sweep's summary as it stands when the message is read
    (Hydra prints it when the sweeper raises it, after the batch): counts, each failure in one line with its
    traceback file, the rerun command. Pickles (submitit and Ray send JobReturns between processes)."""

    def __init__(self, sweep_dir: str, num: int, overrides: list, error: str) -> None:
        super().__init__(sweep_dir, num, overrides, error)
        self.sweep_dir, self.num, self.overrides, self.error = sweep_dir, num, list(overrides), error

    def __str__(self) -> str:
        try:
            return J.summary(J.jobs_of(Path(self.sweep_dir)), Path(self.sweep_dir))
        except (OSError, ValueError):  # the state is gone or damaged: this job alone
            return f"job #{self.num} ({' '.join(self.overrides)}) failed: {self.error}"


def _multirun(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN")


def _sweep_dir(config: DictConfig) -> Path:
    """The sweep dir, absolute (a job may run with hydra.job.chdir=true, in its own dir)."""
    return Path(str(config.hydra.runtime.cwd)) / str(config.hydra.sweep.dir)


def _launcher_name(config: DictConfig) -> str:
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    return {
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher": "basic",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher": "submitit_local",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": "slurm",
        "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher": "ray",
        "hydra_plugins.steerexp_launchers.gpus_launcher.GPUsLauncher": "gpus",
    }.get(target, target or "unknown")


def _job(config: DictConfig) -> J.Job:
    num = int(config.hydra.job.num)
    specs = J.state_dir(_sweep_dir(config)) / "jobs"
    return J.Job(num, list(filter_overrides(list(config.hydra.overrides.task))), Path(config.hydra.runtime.output_dir),
                 specs / f"{num}.pkl")


class SweepStateCallback(Callback):
    def __init__(self) -> None:
        self.job: Optional[J.Job] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _multirun(config):
            return
        sweep_dir = _sweep_dir(config)
        J.write_manifest(sweep_dir, _launcher_name(config), str(config.hydra.runtime.cwd))
        J.launcher_started(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _multirun(config):
            J.launcher_finished(_sweep_dir(config))

    def on_job_start(self, config: DictConfig, *, task_function: Any = None, **kwargs: Any) -> None:
        if not _multirun(config):
            return
        self.job = job = _job(config)
        job.started = time.time()
        busy = J.claim_running(job)
        if busy is not None:  # a job requeued by SLURM (its marker names a process on another host), or a rerun
            log.warning(f"job #{job.num}: its {J.RUNNING} marker names another process ({J.describe(busy)}): "
                        "a requeued job, or a rerun started meanwhile; this process takes it over")
            J.set_running_pid(job, os.getpid())
        J.clear_markers(job)
        J.write_record(job)
        self._save_spec(job, config, task_function)

    @staticmethod
    def _save_spec(job: J.Job, config: DictConfig, task_function: Any) -> None:
        """What a rerun's worker runs: the job's composed config, the task function, Hydra's global state."""
        import cloudpickle
        from hydra.core.singleton import Singleton

        try:
            payload = cloudpickle.dumps({"task_function": task_function, "config": config,
                                         "singleton_state": Singleton.get_state(), "job_dir": str(job.job_dir)})
        except Exception as err:
            job.spec.unlink(missing_ok=True)
            log.warning(f"job #{job.num}: its spec could not be saved ({type(err).__name__}: {err}); "
                        "`steerexp-sweep rerun` cannot redo it")
            return
        tmp = job.spec.with_name(f".{job.spec.name}.{os.getpid()}.tmp")
        tmp.write_bytes(payload)
        tmp.replace(job.spec)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _multirun(config):
            return
        job = self.job if self.job is not None and self.job.num == int(config.hydra.job.num) else _job(config)
        self.job = None
        job.seconds = time.time() - job.started if job.started else 0.0
        try:
            if job_return.status == JobStatus.COMPLETED:
                J.mark_completed(job)
                return
            err = job_return._return_value
            if isinstance(err, BaseException):
                error, text = J.failure_text(err)
            else:
                error, text = f"the job failed ({err!r})", f"the job failed ({err!r})\n"
            J.mark_failed(job, error, traceback_text=text)
            job_return._return_value = SweepJobFailed(str(_sweep_dir(config)), job.num, job.overrides, error)
        finally:
            J.release_running(job)
