"""The public API of a sweep's saved state, for tools outside the launchers (`steerexp-sweep`).

Every sweep leaves its state on disk (`<sweep dir>/.sweep/`: the manifest, each job's record and spec; the
markers in each job dir; see jobs.py): launcher=gpus writes it itself, the sweep callback
(sweep_callback.py) for every other launcher (basic, submitit, Ray). This module reads it and reruns jobs
from it; everything else in this package is the launchers' own and may change.

    jobs = sweepstate.read(sweep_dir)               # [JobState]: num, overrides, state, detail, busy
    print(sweepstate.summary(sweep_dir, jobs))       # counts, each unfinished job and why, the rerun command
    sweepstate.rerun(sweep_dir, [j for j in jobs if j.rerunnable])

Nothing heavy is imported here (Hydra imports the package while it scans for plugins; it runs each module
outside sys.modules, so no `from __future__ import annotations`: dataclasses need real annotations then).
"""
from dataclasses import dataclass, field
from pathlib import Path

from hydra_plugins.steerexp_launchers import jobs as _jobs

COMPLETED, FAILED, RUNNING, PENDING, MISSING = "completed", "failed", "running", "pending", "missing"


@dataclass(frozen=True)
class JobState:
    """One job of a sweep as its markers say now."""
    num: int
    overrides: list[str]
    run_dir: Path
    state: str                 # completed | failed | running | pending | missing (never ran, or was stopped)
    detail: str = ""           # the error of a failed job, the process of a running one, a damaged marker, ...
    busy: str | None = None    # why it must not be started again now (running, or queued in the live sweep)
    _job: _jobs.Job | None = field(default=None, repr=False, compare=False)

    @property
    def rerunnable(self) -> bool:
        """Failed or missing: what `rerun` relaunches."""
        return self.state in (FAILED, MISSING)


def _detail(job: _jobs.Job) -> str:
    if job.status == _jobs.FAILED:
        return job.error or ""
    if job.status == _jobs.RUNNING:
        return _jobs.describe(job.running or {})
    if job.status == _jobs.PENDING:
        return "queued in the running sweep"
    if job.damaged:
        return job.damaged
    if job.status is None and job.running:
        return f"was running ({_jobs.describe(job.running)}); that process is gone"
    return ""


def read(sweep_dir: str | Path) -> list[JobState]:
    """Every job of the sweep that started (launcher=gpus: every job), in job-number order. FileNotFoundError:
    not a sweep dir; ValueError: its state is damaged (both with a message of one line)."""
    return [JobState(job.num, list(job.overrides), job.job_dir, (job.status or MISSING).lower(), _detail(job),
                     _jobs.busy_reason(job), job)
            for job in _jobs.jobs_of(Path(sweep_dir))]


def summary(sweep_dir: str | Path, jobs: list[JobState] | None = None) -> str:
    """One paragraph: counts, each job not completed and why, and the rerun command."""
    jobs = read(sweep_dir) if jobs is None else jobs
    return _jobs.summary([j._job for j in jobs], Path(sweep_dir))


def rerun(sweep_dir: str | Path, jobs: list[JobState], devices: list[str] | None = None,
          jobs_per_device: int | None = None, announce=None) -> None:
    """Run these jobs again from their saved specs (same config, job number and run dir), each in a fresh
    process: over `devices` (default: the sweep's own pool) for a gpus sweep; one after another on this
    process's devices for a sweep of any other launcher (basic, submitit, Ray: here, not on the cluster), or
    over `devices` if given. Checks everything first (FileNotFoundError: a spec or the sweep's working
    directory is gone), then calls `announce()` (if given) and runs them; a job another process has started
    meanwhile is not run twice."""
    sweep_dir = Path(sweep_dir)
    manifest = _jobs.read_manifest(sweep_dir)
    for job in jobs:
        if not job._job.spec.is_file():
            raise FileNotFoundError(f"job #{job.num}'s spec {job._job.spec} is missing (the sweep dir was moved or "
                                    "pruned, or the spec could not be saved): relaunch it with steerexp -m ... instead")
    cwd = Path(manifest["cwd"])
    if not cwd.is_dir():
        raise FileNotFoundError(f"the sweep was launched from {cwd}, which no longer exists; the jobs' relative "
                                "paths (the sweep dir among them) resolve against it: recreate it or rerun by hand")
    in_turn = manifest.get("launcher") != "gpus" and devices is None  # one after another, as a basic sweep ran
    devices = devices if devices is not None else manifest.get("devices")
    jobs_per_device = jobs_per_device or manifest.get("jobs_per_device", 1)
    if announce is not None:
        announce()
    _jobs.run_jobs([j._job for j in jobs], devices, jobs_per_device, cwd=str(cwd), inherit_devices=in_turn)
