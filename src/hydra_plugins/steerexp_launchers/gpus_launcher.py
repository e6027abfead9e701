"""`hydra/launcher=gpus`: one job per device, each in a process of its own, failures isolated.

Hydra's basic launcher runs jobs one after another in one process; joblib's reused workers keep the
first job's CUDA_VISIBLE_DEVICES; submitit's local executor puts every job on the same GPU. Here:

- every job runs in a fresh process (`python -m hydra_plugins.steerexp_launchers._worker <spec>`) whose
  CUDA_VISIBLE_DEVICES is a slot from the pool `devices` x `jobs_per_device`; jobs run concurrently across
  the pool (each pays its own imports: torch & co., a few seconds of CPU);
- a failing job (an exception, or a process that dies) is recorded in its run dir (FAILED marker +
  traceback.txt) and the others go on; the launcher logs each job's end, and the sweep ends with the
  summary and exit code 1 if any job failed (SweepJobFailed, sweep_callback.py);
- the sweep's job specs stay in `<sweep dir>/.sweep/`, so `steerexp-sweep rerun <sweep dir>`
  relaunches only the failed or missing jobs (same configs, same job numbers and run dirs), and
  `steerexp-sweep status <sweep dir>` shows each job completed / failed / running / pending / missing;
- a job's process dies with the launcher (killed, crashed): no job outlives its sweep (jobs.py, _worker.py).

    steerexp -m launcher=gpus hydra.launcher.devices=[0,1,2,3] technique.alpha=0.25,0.5,1,2
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.steerexp_launchers import jobs as J
from hydra_plugins.steerexp_launchers.sweep_callback import SweepJobFailed

log = logging.getLogger(__name__)


@dataclass
class GPUsLauncherConf:
    _target_: str = "hydra_plugins.steerexp_launchers.gpus_launcher.GPUsLauncher"
    # CUDA_VISIBLE_DEVICES values, one per device (a value may name several GPUs: "0,1").
    # null: the GPUs this process sees (CUDA_VISIBLE_DEVICES, else nvidia-smi)
    devices: Optional[List[str]] = None
    jobs_per_device: int = 1  # jobs sharing one device at a time


ConfigStore.instance().store(group="hydra/launcher", name="gpus", node=GPUsLauncherConf, provider="steerexp")


def job_output_dir(config: DictConfig) -> Path:
    """The job's run dir, resolved as Hydra's run_job resolves it (sweep dir / subdir)."""
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    try:
        hydra_config.set_config(config)
        path = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / str(
            OmegaConf.select(config, "hydra.sweep.subdir")
        )
    finally:
        hydra_config.cfg = previous
    return path.absolute()


def prepare_jobs(
    hydra_context: HydraContext,
    task_function: TaskFunction,
    master: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    sweep_dir: Path,
) -> List[J.Job]:
    """Compose every job's config and save its spec and record under `<sweep dir>/.sweep/jobs/`."""
    import cloudpickle

    specs = J.state_dir(sweep_dir).absolute() / "jobs"
    specs.mkdir(parents=True, exist_ok=True)
    singleton_state = Singleton.get_state()
    jobs = []
    for i, overrides in enumerate(job_overrides):
        num = initial_job_idx + i
        config = hydra_context.config_loader.load_sweep_config(master, list(overrides))
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        job = J.Job(num, list(filter_overrides(overrides)), job_output_dir(config), specs / f"{num}.pkl")
        job.spec.write_bytes(cloudpickle.dumps({
            "hydra_context": hydra_context,
            "task_function": task_function,
            "config": config,
            "singleton_state": singleton_state,
            "job_dir": str(job.job_dir),
        }))
        J.write_record(job)
        jobs.append(job)
    return jobs


def returns_for_sweeper(jobs: List[J.Job], returns: List[Optional[JobReturn]], sweep_dir: Path) -> List[JobReturn]:
    """Each job's JobReturn with the status from its markers; a failed or unfinished job's return
    value raises SweepJobFailed (the sweep's summary) when the sweeper reads it."""
    out = []
    for job, ret in zip(jobs, returns):
        if ret is None:
            ret = JobReturn(overrides=list(job.overrides), working_dir=str(job.job_dir))
        if job.status == J.COMPLETED:
            ret.status = JobStatus.COMPLETED
        else:
            ret.status = JobStatus.FAILED
            what = job.error or "did not run (the sweep was interrupted)"
            ret._return_value = SweepJobFailed(str(sweep_dir), job.num, job.overrides, what)
        out.append(ret)
    return out


class GPUsLauncher(Launcher):
    def __init__(self, devices: Optional[List[Any]] = None, jobs_per_device: int = 1) -> None:
        self.devices = None if devices is None else [str(d) for d in devices]
        self.jobs_per_device = int(jobs_per_device)
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import cloudpickle

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        J.slots(self.devices, self.jobs_per_device)  # bad devices fail here, before any job is written
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        J.write_manifest(sweep_dir, "gpus", os.getcwd(), self.devices, self.jobs_per_device)
        jobs = prepare_jobs(self.hydra_context, self.task_function, self.config, job_overrides, initial_job_idx,
                            sweep_dir)
        pool = ", ".join(J.slots(self.devices, 1))
        log.info(f"launcher=gpus: {len(jobs)} jobs on devices [{pool}] x {self.jobs_per_device}, sweep dir {sweep_dir}")

        J.launcher_started(sweep_dir)
        try:
            J.run_jobs(jobs, self.devices, self.jobs_per_device, cwd=os.getcwd())
        finally:
            J.launcher_finished(sweep_dir)
        if all(j.status == J.COMPLETED for j in jobs):
            log.info(J.summary(jobs, sweep_dir))  # else the sweeper raises SweepJobFailed: the summary, on stderr
        returns = [cloudpickle.loads(j.job_return.read_bytes()) if j.job_return.is_file() else None for j in jobs]
        return returns_for_sweeper(jobs, returns, sweep_dir)
