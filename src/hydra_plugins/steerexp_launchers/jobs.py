"""A sweep's state on disk, and running sweep jobs in processes of their own over a pool of devices.

Two writers keep the same state, so `steerexp-sweep status|rerun` treat every sweep alike:

- launcher=gpus (gpus_launcher.py) runs each job in a fresh process (`python -m
  hydra_plugins.steerexp_launchers._worker <spec>`) whose CUDA_VISIBLE_DEVICES is one slot of the pool
  (`devices` x `jobs_per_device`); a thread per slot keeps its device busy, and a slot returns to the pool
  when its job's process exits. It writes every job's record and spec before the first job starts (so
  queued jobs show as pending) and the markers from the worker's verdict and exit code (run_jobs below).
- every other launcher (Hydra's basic launcher, submitit, Ray) gets it from the Hydra callback in
  sweep_callback.py: each job writes its record, spec and markers itself, in whatever process runs it.

A rerun (`steerexp-sweep rerun`, sweepstate.rerun) runs the failed and missing jobs through run_jobs, each
in a fresh worker process: over a device pool, or one after another on this process's devices.

On disk (the sweep dir holds `.sweep/`, each job dir the markers):

    <sweep dir>/.sweep/manifest.json        the launcher, cwd, devices, jobs_per_device (written once per launch)
    <sweep dir>/.sweep/jobs/<num>.json      the job's record: overrides, job dir, spec
    <sweep dir>/.sweep/jobs/<num>.pkl       the job's spec (what `steerexp-sweep rerun` relaunches)
    <sweep dir>/.sweep/LAUNCHER             JSON: pid, host of the launching process while it runs
    <job dir>/RUNNING                       JSON: pid, host, start time of the job's process while it runs
    <job dir>/COMPLETED                     JSON: device, seconds, finished-at
    <job dir>/FAILED                        the error in one line (+ device, exit code)
    <job dir>/traceback.txt                 the job's traceback (or the log tail if the process died)
    <job dir>/stdout.log                    a worker process's stdout and stderr (not for in-process jobs)

A job is running while its RUNNING marker names a live process (checked: same host, pid alive and
started when the marker says, so a reused pid does not count), pending while it has no marker and
the sweep's LAUNCHER is alive, and otherwise completed (COMPLETED), failed (FAILED) or missing
(never ran, or was killed: a RUNNING marker whose process is gone; or a COMPLETED marker that is
damaged). Damaged state files are read as such, never as a traceback: a job's damaged marker makes
it missing (with the reason), a damaged manifest or record is a ValueError naming the file.

A worker process dies with its launcher: it inherits the read end of a pipe whose only write end the
launching process holds; when that process dies (even by SIGKILL) the kernel closes the write end, the
worker reads EOF and kills its own process group (the job and everything it started). See _worker.py.
"""

import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETED, FAILED, RUNNING, PENDING = "COMPLETED", "FAILED", "RUNNING", "PENDING"
TRACEBACK, LOG = "traceback.txt", "stdout.log"
STATE_DIR = ".sweep"
LAUNCHER = "LAUNCHER"
WORKER = "hydra_plugins.steerexp_launchers._worker"
PARENT_FD_ENV = "STEEREXP_LAUNCHER_FD"  # the worker's end of the pipe to its launcher (see _worker.py)


@dataclass
class Job:
    num: int
    overrides: list[str]
    job_dir: Path
    spec: Path
    device: str | None = None
    status: str | None = None  # COMPLETED | FAILED | RUNNING | PENDING | None (missing: never ran or was stopped)
    error: str | None = None
    seconds: float = 0.0
    started: float = 0.0
    running: dict | None = None  # the RUNNING marker (live, or stale when status is None)
    damaged: str | None = None   # a marker that could not be read (the job then counts as missing)
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


# ---------------------------------------------------------------- processes

def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; None where there is no /proc entry."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text[text.rfind(")") + 2:].split()


def process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot, Linux), to tell a reused pid from the original."""
    stat = _proc_stat(pid)
    return stat[19] if stat and len(stat) > 19 else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """The process exists, is not a zombie, and (if `start` is known) is the one that started then."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except (OSError, ValueError, TypeError):
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return not Path("/proc/self/stat").exists()  # no /proc at all (macOS): kill(0) is all we know
    if stat[0] in ("Z", "X"):
        return False
    return start is None or process_start(pid) == str(start)


def host() -> str:
    return socket.gethostname()


def process_record(pid: int | None = None) -> dict:
    pid = os.getpid() if pid is None else int(pid)
    return {"pid": pid, "host": host(), "proc_start": process_start(pid), "started": time.time()}


def is_alive(record: dict | None) -> bool | None:
    """Whether the process a record names still runs; None if it runs on another host (cannot tell)."""
    if not record or "pid" not in record:
        return False
    if record.get("host") not in (None, host()):
        return None
    return pid_alive(record["pid"], record.get("proc_start"))


def describe(record: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"pid {record.get('pid')} on {record.get('host')}, since {when}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


# ---------------------------------------------------------------- markers

def claim_running(job: Job, device: str | None = None) -> dict | None:
    """Write the job's RUNNING marker (this process's pid until set_running_pid names the worker).
    Returns None when claimed, else the marker of the process that runs the job (alive, or on another
    host). Check and write happen under an exclusive lock on the job dir, so of two launchers (a
    sweep and a rerun, two reruns) only one starts the job; a stale marker (its process gone) is replaced."""
    import fcntl

    job.job_dir.mkdir(parents=True, exist_ok=True)
    path = job.job_dir / RUNNING
    fd = os.open(job.job_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        existing = _read_json(path) if path.exists() else None
        if existing is not None and is_alive(existing) is not False:
            return existing
        record = dict(process_record(), device=device, launcher_pid=os.getpid())
        _write_json(path, record)
        job.running = record
        return None
    finally:
        os.close(fd)  # releases the lock


def set_running_pid(job: Job, pid: int) -> None:
    """The job's process is `pid` now (the worker, started by this launcher)."""
    record = dict(job.running or process_record(), pid=int(pid), proc_start=process_start(pid))
    job.running = record
    _write_json(job.job_dir / RUNNING, record)


def release_running(job: Job) -> None:
    (job.job_dir / RUNNING).unlink(missing_ok=True)
    job.running = None


def failure_text(err: BaseException) -> tuple[str, str]:
    """(the error in one line, the full traceback) of an exception."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return (f"{type(err).__name__}: {err}".splitlines() or [type(err).__name__])[0], text


def mark_completed(job: Job) -> None:
    job.status, job.error = COMPLETED, None
    _write_json(job.job_dir / COMPLETED, {"device": job.device, "seconds": round(job.seconds, 3),
                                          "finished": time.time()})


def mark_failed(job: Job, error: str, code: int | None = None, traceback_text: str | None = None) -> None:
    job.status, job.error = FAILED, error
    if traceback_text is not None:
        (job.job_dir / TRACEBACK).write_text(traceback_text)
    exit_code = "" if code is None else f"exit code: {code}\n"
    (job.job_dir / FAILED).write_text(f"{error}\ndevice: {job.device}\n{exit_code}")


def clear_markers(job: Job) -> None:
    for name in (COMPLETED, FAILED, TRACEBACK):
        (job.job_dir / name).unlink(missing_ok=True)
    job.result.unlink(missing_ok=True)
    job.job_return.unlink(missing_ok=True)
    job.status = job.error = None


# ---------------------------------------------------------------- manifest

def state_dir(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / STATE_DIR


def read_manifest(sweep_dir: Path) -> dict:
    """The sweep's manifest; FileNotFoundError (not a sweep dir, with a hint) or ValueError (damaged)."""
    sweep_dir = Path(sweep_dir)
    path = state_dir(sweep_dir) / "manifest.json"
    if not path.is_file():
        hint = ""
        for parent in sweep_dir.absolute().parents:
            if (state_dir(parent) / "manifest.json").is_file():
                hint = f" (it lies inside the sweep {parent}: give that directory)"
                break
        else:
            if (sweep_dir / "multirun.yaml").is_file():
                hint = " (a Hydra sweep that kept no steerexp sweep state: it ran before steerexp kept one)"
        raise FileNotFoundError(f"{sweep_dir} is not a steerexp sweep directory: it has no .sweep/manifest.json{hint}; "
                                "give the sweep's dir, e.g. outputs/multirun/<date>/<time>")
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cwd"), str):
        raise ValueError(f"{path} is damaged (not the JSON a launcher writes): the sweep's state cannot be read")
    return manifest


def write_manifest(sweep_dir: Path, launcher: str, cwd: str, devices=None, jobs_per_device: int = 1) -> None:
    """Record how the sweep launches its jobs (a rerun runs them the same way); a sweeper may launch several
    batches into one sweep dir: the last launch's settings are kept, the jobs' records are their own files."""
    path = state_dir(sweep_dir) / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = (_read_json(path) if path.is_file() else None) or {}
    manifest.update(
        {
            "launcher": launcher,
            "cwd": str(cwd),
            "devices": None if devices is None else [str(d) for d in devices],
            "jobs_per_device": int(jobs_per_device),
            "python": sys.executable,
        }
    )
    _write_json(path, manifest)


def record_path(job: Job) -> Path:
    return job.spec.with_suffix(".json")


def write_record(job: Job) -> None:
    """The job's record (`.sweep/jobs/<num>.json`, beside its spec): what status and rerun list."""
    job.spec.parent.mkdir(parents=True, exist_ok=True)
    _write_json(record_path(job), {"num": job.num, "overrides": list(job.overrides), "job_dir": str(job.job_dir),
                                   "spec": str(job.spec)})


def launcher_started(sweep_dir: Path) -> None:
    """Record this process as the sweep's live launcher (its queued jobs show as pending meanwhile)."""
    path = state_dir(sweep_dir) / LAUNCHER
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, process_record())


def launcher_finished(sweep_dir: Path) -> None:
    path = state_dir(sweep_dir) / LAUNCHER
    if (_read_json(path) or {}).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def live_launcher(sweep_dir: Path) -> dict | None:
    """The record of the process launching this sweep now, if it is alive (or on another host)."""
    record = _read_json(state_dir(sweep_dir) / LAUNCHER)
    return record if record is not None and is_alive(record) is not False else None


def _records(sweep_dir: Path, manifest: dict) -> dict[int, dict]:
    """Each job's record by number: `.sweep/jobs/<num>.json` (and the `jobs` of an older manifest)."""
    records = {int(num): entry for num, entry in (manifest.get("jobs") or {}).items()}
    for path in (state_dir(sweep_dir) / "jobs").glob("*.json"):
        if path.name.endswith(".status.json"):
            continue  # a worker's verdict, not a record
        entry = _read_json(path)
        if not isinstance(entry, dict) or not {"num", "overrides", "job_dir", "spec"} <= set(entry):
            raise ValueError(f"{path} is damaged (not the JSON a launcher writes): delete it (its job is then not "
                             "listed) or relaunch the sweep")
        records[int(entry["num"])] = entry
    return records


def _failed_reason(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return lines[0].strip() if lines and lines[0].strip() else f"(no error recorded: {path} is empty)"


def jobs_of(sweep_dir: Path) -> list[Job]:
    """Every job of a sweep with its status read from the markers in its job dir."""
    sweep_dir = Path(sweep_dir)
    manifest = read_manifest(sweep_dir)
    launcher = live_launcher(sweep_dir)
    jobs = []
    for num, entry in sorted(_records(sweep_dir, manifest).items()):
        job = Job(num, list(entry["overrides"]), Path(entry["job_dir"]), Path(entry["spec"]))
        marker = _read_json(job.job_dir / RUNNING) if (job.job_dir / RUNNING).exists() else None
        job.running = marker
        if marker is not None and is_alive(marker) is not False:
            job.status = RUNNING
        elif (job.job_dir / COMPLETED).is_file():
            if isinstance(_read_json(job.job_dir / COMPLETED), dict):
                job.status = COMPLETED
            else:  # not what a launcher writes: do not count the job as done
                job.damaged = f"its {COMPLETED} marker is damaged ({job.job_dir / COMPLETED}): not counted as completed"
        elif (job.job_dir / FAILED).is_file():
            job.status, job.error = FAILED, _failed_reason(job.job_dir / FAILED)
        elif launcher is not None and marker is None and not (job.job_dir / RUNNING).exists():
            job.status, job.extra["launcher"] = PENDING, launcher
        jobs.append(job)
    return jobs


def busy_reason(job: Job) -> str | None:
    """Why a job must not be started again now (it runs, or the live sweep will run it), or None."""
    if job.status == RUNNING and job.running:
        where = (
            ""
            if is_alive(job.running)
            else (f" (on another host: cannot check from {host()}; delete {job.job_dir / RUNNING} if it is gone)")
        )
        return f"job #{job.num} is still running ({describe(job.running)}){where}"
    if job.status == PENDING:
        return f"job #{job.num} is queued in the sweep that is still running ({describe(job.extra['launcher'])})"
    return None


# ---------------------------------------------------------------- running


class _Running:
    """The job processes alive now, so that an interrupted sweep stops them all."""

    def __init__(self):
        self.pids: set[int] = set()  # each leads its own process group
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def add(self, pid: int) -> None:
        """A job process started; one that started while the sweep was being stopped is stopped too."""
        with self.lock:
            self.pids.add(pid)
            if self.stop.is_set():
                _kill_group(pid)

    def discard(self, pid: int) -> None:
        with self.lock:
            self.pids.discard(pid)

    def terminate(self) -> None:
        with self.lock:
            self.stop.set()
            for pid in list(self.pids):
                _kill_group(pid)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _finish(job: Job, code: int) -> None:
    """Mark the job from its worker's exit code and verdict."""
    verdict = _read_json(job.result) or {}
    if code == 0 and verdict.get("status") == COMPLETED:
        mark_completed(job)
        return
    error = verdict.get("error") or f"the job process exited with code {code} (killed, out of memory, or crashed)"
    text = None
    if not (job.job_dir / TRACEBACK).is_file():
        tail = (job.job_dir / LOG).read_text(errors="replace")[-8000:] if (job.job_dir / LOG).is_file() else ""
        text = f"{error}\n--- last lines of {LOG} ---\n{tail}"
    mark_failed(job, error, code, text)


def _spawn(job: Job, device: str | None, running: _Running, cwd: str) -> int:
    """Run the job in a fresh worker process to its end; its exit code."""
    env = dict(os.environ)
    if device is not None:
        env.update(CUDA_VISIBLE_DEVICES=device, STEEREXP_SWEEP_DEVICE=device)
    read_fd, write_fd = os.pipe()  # the worker's lifeline: EOF on read_fd = this process is gone
    env[PARENT_FD_ENV] = str(read_fd)
    try:
        with open(job.job_dir / LOG, "ab") as out:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", WORKER, str(job.spec)],
                    cwd=cwd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group (what the lifeline and SIGTERM stop); a Ctrl-C
                    pass_fds=(read_fd,),     # in the terminal reaches the launcher only
                )
            finally:
                os.close(read_fd)
            running.add(proc.pid)
            try:
                set_running_pid(job, proc.pid)
                return proc.wait()
            finally:
                running.discard(proc.pid)
    finally:
        os.close(write_fd)


def _run_one(job: Job, pool: "queue.Queue[str | None]", running: _Running, cwd: str) -> Job:
    device = pool.get()
    try:
        if running.stop.is_set():
            return job  # the sweep was interrupted before this job started: it stays missing
        selected = job.status
        busy = claim_running(job, device)
        if busy is not None:  # another launcher runs it (e.g. the sweep itself while a rerun was asked)
            job.status, job.running = RUNNING, busy
            job.error = busy_reason(job)
            log.error(f"#{job.num} not started: {job.error}")
            return job
        try:
            if selected != COMPLETED and isinstance(_read_json(job.job_dir / COMPLETED), dict):
                job.status = COMPLETED  # completed since it was selected (by another rerun)
                return job
            clear_markers(job)
            job.device = device
            log.info(
                f"#{job.num}" + (f" on device {device}" if device is not None else "") + f": {' '.join(job.overrides)}"
            )
            job.started = time.time()
            code = _spawn(job, device, running, cwd)
            job.seconds = time.time() - job.started
            if running.stop.is_set() and code != 0:
                job.status, job.error = None, "stopped"  # interrupted: missing, not failed
                return job
            _finish(job, code)
        finally:
            release_running(job)
        level = logging.INFO if job.status == COMPLETED else logging.ERROR
        log.log(
            level,
            f"#{job.num} {job.status.lower()}"
            + (f" on device {device}" if device is not None else "")
            + f" in {job.seconds:.1f}s"
            + (f": {job.error}" if job.error else ""),
        )
        return job
    finally:
        pool.put(device)


def run_jobs(
    jobs: list[Job],
    devices,
    jobs_per_device: int = 1,
    cwd: str | None = None,
    inherit_devices: bool = False,
) -> list[Job]:
    """Run `jobs` (specs already written) concurrently over the device pool, each in a fresh worker process;
    never raises for a failing job: each Job comes back with status COMPLETED, FAILED, RUNNING (another
    process runs it: not started here) or None if interrupted. inherit_devices: one job at a time, each
    seeing this process's CUDA_VISIBLE_DEVICES (reruns of sweeps of the other launchers)."""
    pool_slots = [None] if inherit_devices else slots(devices, jobs_per_device)
    pool: "queue.Queue[str | None]" = queue.Queue()
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
    """One paragraph: counts, each job not completed and why, and the rerun command."""
    done = sum(j.status == COMPLETED for j in jobs)
    failed = [j for j in jobs if j.status == FAILED]
    missing = [j for j in jobs if j.status is None]
    live = [j for j in jobs if j.status in (RUNNING, PENDING)]
    head = f"sweep {sweep_dir}: {len(jobs)} jobs, {done} completed, {len(failed)} failed, {len(missing)} missing"
    for state in (RUNNING, PENDING):
        n = sum(j.status == state for j in jobs)
        head += f", {n} {state.lower()}" if n else ""
    lines = [head]
    for job in jobs:
        what = " ".join(job.overrides) or "no overrides"
        if job.status == FAILED:
            lines.append(f"  #{job.num} failed ({what}): {job.error}\n      traceback: {job.job_dir / TRACEBACK}")
        elif job.status == RUNNING:
            lines.append(f"  #{job.num} running ({what}): {describe(job.running or {})}")
        elif job.status == PENDING:
            lines.append(f"  #{job.num} pending ({what}): queued in the running sweep")
        elif job.damaged:
            lines.append(f"  #{job.num} missing ({what}): {job.damaged}")
        elif job.status is None and job.running:
            lines.append(f"  #{job.num} was stopped ({what}): its process ({describe(job.running)}) is gone")
        elif job.status is None:
            lines.append(f"  #{job.num} did not run ({what})")
    if failed or missing:
        later = " (the running and pending ones are left alone)" if live else ""
        lines.append(f"relaunch only the failed and missing jobs with: steerexp-sweep rerun {sweep_dir}{later}")
    return "\n".join(lines)
