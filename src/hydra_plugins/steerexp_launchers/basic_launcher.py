"""`hydra/launcher=steerexp_basic` (steerexp: `launcher=basic`, the default): Hydra's basic launcher
with the sweep state of launcher=gpus.

Jobs run as with Hydra's own basic launcher: one after another, in this process (imports paid once).
In addition, as launcher=gpus does (jobs.py):

- the manifest and each job's spec are saved in `<sweep dir>/.sweep/`, so `steerexp-sweep status`
  and `steerexp-sweep rerun` work on basic sweeps too (a rerun runs the jobs one after another, each
  in a fresh process through the same worker as launcher=gpus, on this process's devices);
- each job dir gets RUNNING while its job runs, then COMPLETED, or FAILED + traceback.txt;
- a failing job does not stop the ones after it: the sweep ends with the summary (`3 jobs,
  2 completed, 1 failed`) and exits non-zero if any failed. Ctrl-C stops the sweep (the job it
  interrupts and the ones after it are missing).
"""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.steerexp_launchers import jobs as J
from hydra_plugins.steerexp_launchers.gpus_launcher import prepare_jobs, returns_for_sweeper

log = logging.getLogger(__name__)


@dataclass
class BasicLauncherConf:
    _target_: str = "hydra_plugins.steerexp_launchers.basic_launcher.BasicLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="steerexp_basic", node=BasicLauncherConf, provider="steerexp")


class BasicLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _run(self, job: J.Job, config: DictConfig) -> Optional[JobReturn]:
        """Run one job here, with its markers; None if another process already runs it."""
        busy = J.claim_running(job)
        if busy is not None:
            job.status, job.running = J.RUNNING, busy
            job.error = J.busy_reason(job)
            log.error(f"#{job.num} not started: {job.error}")
            return None
        try:
            J.clear_markers(job)
            log.info(f"\t#{job.num} : {' '.join(job.overrides)}")
            job.started = time.time()
            ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            job.seconds = time.time() - job.started
            if ret.status == JobStatus.COMPLETED:
                J.mark_completed(job)
            else:
                error, text = J.failure_text(ret._return_value)
                J.mark_failed(job, error, traceback_text=text)
                log.error(
                    f"#{job.num} failed in {job.seconds:.1f}s: {error} (traceback: {job.job_dir / J.TRACEBACK})\n{text}"
                )
            return ret
        finally:
            J.release_running(job)
            # run_job configured logging for the job; back to Hydra's own for the next one
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs, configs = prepare_jobs(
            self.hydra_context, self.task_function, self.config, job_overrides, initial_job_idx, sweep_dir, strict=False
        )
        J.write_manifest(sweep_dir, jobs, None, 1, os.getcwd(), launcher="basic")
        log.info(f"Launching {len(jobs)} jobs locally, one after another (sweep dir {sweep_dir})")
        returns: List[Optional[JobReturn]] = []
        J.launcher_started(sweep_dir)
        try:
            for job, config in zip(jobs, configs):
                returns.append(self._run(job, config))
        finally:
            J.launcher_finished(sweep_dir)
        text = J.summary(jobs, sweep_dir)
        (log.error if any(j.status != J.COMPLETED for j in jobs) else log.info)(text)
        return returns_for_sweeper(jobs, returns, text)
