"""Run sweep jobs in fresh processes over a pool of devices, isolating failures.

A job is a pickled spec (Hydra context, task function, the job's composed config) that
`python -m hydra_plugins.steerexp_launchers._worker <spec>` runs in a new process whose
CUDA_VISIBLE_DEVICES is one slot of the pool (`devices` x `jobs_per_device`). A thread per slot
keeps its device busy; a slot returns to the pool when its job's process exits.

On disk (the sweep dir holds `.sweep/`, each job dir the markers):

    <sweep dir>/.sweep/manifest.json        cwd, devices, jobs: num -> overrides, job dir, spec
    <sweep dir>/.sweep/jobs/<num>.pkl       the job spec (what `steerexp-sweep rerun` relaunches)
    <job dir>/COMPLETED                     JSON: device, seconds, finished-at
    <job dir>/FAILED                        the error in one line (+ device, exit code)
    <job dir>/traceback.txt                 the job's traceback (or the log tail if the process died)
    <job dir>/stdout.log                    the job process's stdout and stderr

A job without COMPLETED is failed (FAILED present) or missing (never ran, or was killed).
"""

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETED, FAILED, TRACEBACK, LOG = "COMPLETED", "FAILED", "traceback.txt", "stdout.log"
STATE_DIR = ".sweep"
WORKER = "hydra_plugins.steerexp_launchers._worker"


@dataclass
class Job:
    num: int
    overrides: list[str]
    job_dir: Path
    spec: Path
    device: str | None = None
    status: str | None = None  # COMPLETED | FAILED | None (missing: never ran or was stopped)
    error: str | None = None
    seconds: float = 0.0
    started: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def result(self) -> Path:
        """The worker's JSON verdict (status, error)."""
        return self.spec.with_suffix(".status.json")

    @property
    def job_return(self) -> Path:
        """The pickled hydra JobReturn (the task's return value) for the sweeper."""
        return self.spec.with_suffix(".return.pkl")


# ---------------------------------------------------------------- devices

def detect_devices() -> list[str]:
    """GPU ids visible to this process: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return []


def slots(devices, jobs_per_device: int) -> list[str]:
    """The pool: each device (a CUDA_VISIBLE_DEVICES value such as 0 or "0,1") jobs_per_device times."""
    if devices is None:
        devices = detect_devices()
        if not devices:
            raise ValueError("launcher=gpus found no GPU (CUDA_VISIBLE_DEVICES unset and nvidia-smi lists none): "
                             "name them with hydra.launcher.devices=[0,1], or use launcher=basic on a CPU")
    devices = [str(d) for d in devices]
    if not devices:
        raise ValueError("hydra.launcher.devices is empty: give at least one device, e.g. hydra.launcher.devices=[0]")
    if len(set(devices)) != len(devices):
        raise ValueError(f"hydra.launcher.devices lists a device twice ({devices}); "
                         "use hydra.launcher.jobs_per_device=N to run N jobs per device")
    if int(jobs_per_device) < 1:
        raise ValueError(f"hydra.launcher.jobs_per_device must be >= 1, got {jobs_per_device}")
    return [d for _ in range(int(jobs_per_device)) for d in devices]  # spread over devices before sharing one


# ---------------------------------------------------------------- manifest

def state_dir(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / STATE_DIR


def read_manifest(sweep_dir: Path) -> dict:
    path = state_dir(sweep_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: `steerexp-sweep` works on sweeps run with launcher=gpus "
            f"(the other launchers keep no job specs); check the sweep directory {sweep_dir}")
    return json.loads(path.read_text())


def write_manifest(sweep_dir: Path, jobs: list[Job], devices, jobs_per_device: int, cwd: str) -> None:
    """Add `jobs` to the sweep's manifest (a sweeper may launch several batches into one sweep dir)."""
    path = state_dir(sweep_dir) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"jobs": {}}
    manifest.update({"cwd": cwd, "devices": None if devices is None else [str(d) for d in devices],
                     "jobs_per_device": int(jobs_per_device), "python": sys.executable})
    for job in jobs:
        manifest["jobs"][str(job.num)] = {"overrides": list(job.overrides), "job_dir": str(job.job_dir),
                                          "spec": str(job.spec)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)


def jobs_of(sweep_dir: Path) -> list[Job]:
    """Every job of a sweep with its status read from the markers in its job dir."""
    manifest = read_manifest(sweep_dir)
    jobs = []
    for num, entry in sorted(manifest["jobs"].items(), key=lambda kv: int(kv[0])):
        job = Job(int(num), entry["overrides"], Path(entry["job_dir"]), Path(entry["spec"]))
        if (job.job_dir / COMPLETED).is_file():
            job.status = COMPLETED
        elif (job.job_dir / FAILED).is_file():
            job.status, job.error = FAILED, (job.job_dir / FAILED).read_text().splitlines()[0]
        jobs.append(job)
    return jobs


# ---------------------------------------------------------------- running

class _Running:
    """The job processes alive now, so that an interrupted sweep stops them all."""

    def __init__(self):
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def terminate(self) -> None:
        self.stop.set()
        with self.lock:
            for proc in list(self.procs):
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass


def _clear(job: Job) -> None:
    for name in (COMPLETED, FAILED, TRACEBACK):
        (job.job_dir / name).unlink(missing_ok=True)
    job.result.unlink(missing_ok=True)
    job.job_return.unlink(missing_ok=True)
    job.status = job.error = None


def _finish(job: Job, code: int) -> None:
    verdict = json.loads(job.result.read_text()) if job.result.is_file() else {}
    if code == 0 and verdict.get("status") == COMPLETED:
        job.status = COMPLETED
        (job.job_dir / COMPLETED).write_text(json.dumps(
            {"device": job.device, "seconds": round(job.seconds, 3), "finished": time.time()}))
        return
    job.status = FAILED
    job.error = verdict.get("error") or f"the job process exited with code {code} (killed, out of memory, or crashed)"
    (job.job_dir / FAILED).write_text(f"{job.error}\ndevice: {job.device}\nexit code: {code}\n")
    if not (job.job_dir / TRACEBACK).is_file():
        tail = (job.job_dir / LOG).read_text(errors="replace")[-8000:] if (job.job_dir / LOG).is_file() else ""
        (job.job_dir / TRACEBACK).write_text(f"{job.error}\n--- last lines of {LOG} ---\n{tail}")


def _run_one(job: Job, pool: "queue.Queue[str]", running: _Running, cwd: str) -> Job:
    device = pool.get()
    try:
        if running.stop.is_set():
            return job  # the sweep was interrupted before this job started: it stays missing
        _clear(job)
        job.device = device
        job.job_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=device, STEEREXP_SWEEP_DEVICE=device)
        log.info(f"#{job.num} on device {device}: {' '.join(job.overrides)}")
        job.started = time.time()
        with open(job.job_dir / LOG, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", WORKER, str(job.spec)], cwd=cwd, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            with running.lock:
                running.procs.add(proc)
            try:
                code = proc.wait()
            finally:
                with running.lock:
                    running.procs.discard(proc)
        job.seconds = time.time() - job.started
        if running.stop.is_set() and code != 0:
            job.status, job.error = None, "stopped"  # interrupted: missing, not failed
            return job
        _finish(job, code)
        level = logging.INFO if job.status == COMPLETED else logging.ERROR
        log.log(level, f"#{job.num} {job.status.lower()} on device {device} in {job.seconds:.1f}s"
                       + (f": {job.error}" if job.error else ""))
        return job
    finally:
        pool.put(device)


def run_jobs(jobs: list[Job], devices, jobs_per_device: int = 1, cwd: str | None = None) -> list[Job]:
    """Run `jobs` (specs already written) concurrently over the device pool; never raises for a
    failing job: each Job comes back with status COMPLETED, FAILED, or None if interrupted."""
    pool_slots = slots(devices, jobs_per_device)
    pool: "queue.Queue[str]" = queue.Queue()
    for s in pool_slots:
        pool.put(s)
    running = _Running()
    cwd = cwd or os.getcwd()
    executor = ThreadPoolExecutor(max_workers=min(len(pool_slots), max(len(jobs), 1)))
    previous = _on_sigterm_raise()
    try:
        futures = [executor.submit(_run_one, job, pool, running, cwd) for job in jobs]
        for future in futures:
            future.result()
    except BaseException:  # Ctrl-C, SIGTERM (scancel, kill): stop the job processes, leave them missing
        running.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    executor.shutdown(wait=True)
    return jobs


def _on_sigterm_raise():
    """While jobs run, SIGTERM raises SystemExit in the main thread (so the job processes, each in
    its own session, are stopped too, not orphaned); returns the previous handler to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def summary(jobs: list[Job], sweep_dir: Path) -> str:
    """One paragraph: counts, each failure with where its traceback is, and the rerun command."""
    done = sum(j.status == COMPLETED for j in jobs)
    failed = [j for j in jobs if j.status == FAILED]
    missing = [j for j in jobs if j.status is None]
    lines = [f"sweep {sweep_dir}: {len(jobs)} jobs, {done} completed, {len(failed)} failed, {len(missing)} missing"]
    for job in failed:
        lines.append(f"  #{job.num} failed ({' '.join(job.overrides) or 'no overrides'}): {job.error}\n"
                     f"      traceback: {job.job_dir / TRACEBACK}")
    for job in missing:
        lines.append(f"  #{job.num} did not run ({' '.join(job.overrides) or 'no overrides'})")
    if failed or missing:
        lines.append(f"relaunch only the failed and missing jobs with: steerexp-sweep rerun {sweep_dir}")
    return "\n".join(lines)
