"""Run sweep jobs in processes of their own over a pool of devices, isolating failures; the sweep's state.

A job is a pickled spec (Hydra context, task function, the job's composed config) that _worker.main runs
in a new process whose CUDA_VISIBLE_DEVICES is one slot of the pool (`devices` x `jobs_per_device`). That
process is forked from the sweep's fork server (_zygote.py, ForkServer below), which imported torch & co.
once, or, with fork_server off or when the server is gone, a fresh interpreter
(`python -m hydra_plugins.steerexp_launchers._worker <spec>`): the same job, files and exit codes either
way, only the start is cheaper. A thread per slot keeps its device busy; a slot returns to the pool when
its job's process exits. The basic launcher (basic_launcher.py) runs its jobs in its own process instead
but keeps the same state on disk, so `steerexp-sweep status|rerun` treat both alike.

On disk (the sweep dir holds `.sweep/`, each job dir the markers):

    <sweep dir>/.sweep/manifest.json        launcher kind, cwd, devices, fork_server, preload,
                                            jobs: num -> overrides, job dir, spec
    <sweep dir>/.sweep/jobs/<num>.pkl       the job spec (what `steerexp-sweep rerun` relaunches)
    <sweep dir>/.sweep/LAUNCHER             JSON: pid, host of the launching process while it runs
    <sweep dir>/.sweep/fork_server.log      the fork server's own output (empty unless it failed)
    <job dir>/RUNNING                       JSON: pid, host, start time of the job's process while it runs
    <job dir>/COMPLETED                     JSON: device, seconds, finished-at
    <job dir>/FAILED                        the error in one line (+ device, exit code)
    <job dir>/traceback.txt                 the job's traceback (or the log tail if the process died)
    <job dir>/stdout.log                    the job process's stdout and stderr (not for in-process jobs)

A job is running while its RUNNING marker names a live process (checked: same host, pid alive and
started when the marker says, so a reused pid does not count), pending while it has no marker and
the sweep's LAUNCHER is alive, and otherwise completed (COMPLETED), failed (FAILED) or missing
(never ran, or was killed; a RUNNING marker whose process is gone).

A job process dies with its launcher: it inherits the read end of a pipe whose only write end the
launching process holds (through the fork server for a forked job); when that process dies (even by
SIGKILL) the kernel closes the write end, the job reads EOF and kills its own process group (the job and
everything it started). See _worker.py. The fork server itself ends when the launcher's end of its socket
closes.
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETED, FAILED, RUNNING, PENDING = "COMPLETED", "FAILED", "RUNNING", "PENDING"
TRACEBACK, LOG = "traceback.txt", "stdout.log"
STATE_DIR = ".sweep"
LAUNCHER = "LAUNCHER"
WORKER = "hydra_plugins.steerexp_launchers._worker"
ZYGOTE = "hydra_plugins.steerexp_launchers._zygote"
FORK_SERVER_LOG = "fork_server.log"
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
    path = state_dir(sweep_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: `steerexp-sweep` works on sweeps run with launcher=basic or launcher=gpus "
            f"(slurm and ray keep no job specs; older sweeps had none either); check the sweep directory {sweep_dir}")
    return json.loads(path.read_text())


def write_manifest(sweep_dir: Path, jobs: list[Job], devices, jobs_per_device: int, cwd: str,
                   launcher: str = "gpus", fork_server: bool = False, preload: Sequence[str] = ()) -> None:
    """Add `jobs` to the sweep's manifest (a sweeper may launch several batches into one sweep dir);
    fork_server and preload: how its jobs start (a rerun starts them the same way)."""
    path = state_dir(sweep_dir) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"jobs": {}}
    manifest.update(
        {
            "launcher": launcher,
            "cwd": cwd,
            "devices": None if devices is None else [str(d) for d in devices],
            "jobs_per_device": int(jobs_per_device),
            "fork_server": bool(fork_server),
            "preload": list(preload),
            "python": sys.executable,
        }
    )
    for job in jobs:
        manifest["jobs"][str(job.num)] = {
            "overrides": list(job.overrides),
            "job_dir": str(job.job_dir),
            "spec": str(job.spec),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)


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


def jobs_of(sweep_dir: Path) -> list[Job]:
    """Every job of a sweep with its status read from the markers in its job dir."""
    manifest = read_manifest(sweep_dir)
    launcher = live_launcher(sweep_dir)
    jobs = []
    for num, entry in sorted(manifest["jobs"].items(), key=lambda kv: int(kv[0])):
        job = Job(int(num), entry["overrides"], Path(entry["job_dir"]), Path(entry["spec"]))
        marker = _read_json(job.job_dir / RUNNING) if (job.job_dir / RUNNING).exists() else None
        job.running = marker
        if marker is not None and is_alive(marker) is not False:
            job.status = RUNNING
        elif (job.job_dir / COMPLETED).is_file():
            job.status = COMPLETED
        elif (job.job_dir / FAILED).is_file():
            job.status, job.error = FAILED, (job.job_dir / FAILED).read_text().splitlines()[0]
        elif launcher is not None and marker is None:
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


class ForkServerGone(RuntimeError):
    """The fork server is not running (any more): the job was not started, start it as a fresh process."""


class ForkServer:
    """The launcher's end of the fork server (_zygote.py): one per run_jobs, started before the first job.

    It imports `preload` once; each job then starts as a fork of it instead of a fresh interpreter (~5-6 s
    of CPU less per job). Requests and replies are JSON lines on a socket pair: {id, spec, device, log} ->
    {id, pid} when the job's process started, {id, exit} when the server reaped it. A reader thread hands
    each reply to the job's thread. The server also gets the read end of a pipe whose write end only this
    process holds, for every job's launcher-death watch (closed here once every job has ended).

    If the server dies, the jobs not started yet raise ForkServerGone (run_jobs starts them as fresh
    processes, after one warning); a job already running goes on, orphaned, and is watched by its pid
    until it ends (its exit code is lost: its status.json decides)."""

    def __init__(self, cwd: str, preload: Sequence[str], log_path: Path):
        self.sock, theirs = socket.socketpair()
        lifeline, self.lifeline = os.pipe()
        self.log_path = log_path
        try:
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", ZYGOTE, str(theirs.fileno()), str(lifeline), *preload],
                    cwd=cwd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # a Ctrl-C in the terminal reaches the launcher only, as with workers
                    pass_fds=(theirs.fileno(), lifeline),
                )
        except BaseException:
            self.sock.close()
            os.close(self.lifeline)
            raise
        finally:
            theirs.close()
            os.close(lifeline)
        self.lock = threading.Lock()
        self.replies: dict[int, queue.Queue] = {}
        self.next_id = 0
        self.gone = False
        self.warned = False
        threading.Thread(target=self._read, name="steerexp-fork-server", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.sock.makefile("rb"):
                if not line.endswith(b"\n"):
                    break  # cut off: the server died while writing
                reply = json.loads(line)
                with self.lock:
                    self.replies[reply["id"]].put(reply)
        except OSError:
            pass  # ECONNRESET: the server died with requests unread
        finally:  # the server exited (or this process closed the socket): no reply will come
            with self.lock:
                self.gone = True
                for replies in self.replies.values():
                    replies.put(None)

    def run(self, job: Job, device: str | None, running: _Running) -> int | None:
        """Run the job in a child of the server to its end: its exit code, or None if the server died while the
        job ran (the job ran on to its end). ForkServerGone: the job did not start."""
        replies: queue.Queue = queue.Queue()
        with self.lock:
            key, self.next_id = self.next_id, self.next_id + 1
            self.replies[key] = replies
            request = {"id": key, "spec": str(job.spec), "device": device, "log": str(job.job_dir / LOG)}
            try:
                if self.gone:
                    raise ForkServerGone
                self.sock.sendall(json.dumps(request).encode() + b"\n")
            except (OSError, ForkServerGone):
                del self.replies[key]
                raise ForkServerGone from None
        try:
            started = replies.get()
            if started is None:
                raise ForkServerGone
            pid = started["pid"]
            start = process_start(pid)
            running.add(pid)
            try:
                set_running_pid(job, pid)
                ended = replies.get()
                if ended is not None:
                    return ended["exit"]
                while pid_alive(pid, start):  # orphaned when the server died: wait for it by its pid
                    time.sleep(0.2)
                return None
            finally:
                running.discard(pid)
        finally:
            with self.lock:
                del self.replies[key]

    def fell_back(self) -> None:
        """Say once that the server is gone and jobs start as fresh processes from now on."""
        with self.lock:
            if self.warned:
                return
            self.warned = True
        try:
            code = self.proc.wait(timeout=10)  # it closed the socket: it has exited, or is about to
        except subprocess.TimeoutExpired:
            code = None
        log.warning(f"launcher=gpus: the fork server stopped (exit code {code}, see {self.log_path}); "
                    "starting each job in a fresh process instead")

    def close(self) -> None:
        """After the last job: the server sees EOF and exits (reaped here); the jobs' lifeline closes."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        os.close(self.lifeline)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _finish(job: Job, code: int | None) -> None:
    """Mark the job from its exit code (None: lost with the fork server) and its worker's verdict."""
    verdict = json.loads(job.result.read_text()) if job.result.is_file() else {}
    if code in (0, None) and verdict.get("status") == COMPLETED:
        mark_completed(job)
        return
    ended = "exited with code " + str(code) if code is not None else "ended without a verdict"
    error = verdict.get("error") or f"the job process {ended} (killed, out of memory, or crashed)"
    text = None
    if not (job.job_dir / TRACEBACK).is_file():
        tail = (job.job_dir / LOG).read_text(errors="replace")[-8000:] if (job.job_dir / LOG).is_file() else ""
        text = f"{error}\n--- last lines of {LOG} ---\n{tail}"
    mark_failed(job, error, code, text)


def _spawn(job: Job, device: str | None, running: _Running, cwd: str, server: ForkServer | None) -> int | None:
    """Run the job's process to its end, forked by the fork server if there is one, else a fresh worker
    process; the exit code (None: lost with the fork server, which died while the job ran)."""
    if server is not None:
        try:
            return server.run(job, device, running)
        except ForkServerGone:
            server.fell_back()
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
                    start_new_session=True,
                    pass_fds=(read_fd,),
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


def _run_one(job: Job, pool: "queue.Queue[str | None]", running: _Running, cwd: str,
             server: ForkServer | None) -> Job:
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
            if selected != COMPLETED and (job.job_dir / COMPLETED).is_file():
                job.status = COMPLETED  # completed since it was selected (by another rerun)
                return job
            clear_markers(job)
            job.device = device
            log.info(
                f"#{job.num}" + (f" on device {device}" if device is not None else "") + f": {' '.join(job.overrides)}"
            )
            job.started = time.time()
            code = _spawn(job, device, running, cwd, server)
            job.seconds = time.time() - job.started
            if running.stop.is_set() and code not in (0, None):
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
    fork_server: bool = False,
    preload: Sequence[str] = (),
) -> list[Job]:
    """Run `jobs` (specs already written) concurrently over the device pool; never raises for a
    failing job: each Job comes back with status COMPLETED, FAILED, RUNNING (another process runs it:
    not started here) or None if interrupted. inherit_devices: one job at a time, each seeing this
    process's CUDA_VISIBLE_DEVICES (reruns of launcher=basic sweeps). fork_server: each job is forked
    from a server that imported `preload` once (ForkServer), else started as a fresh interpreter."""
    pool_slots = [None] if inherit_devices else slots(devices, jobs_per_device)
    pool: "queue.Queue[str | None]" = queue.Queue()
    for s in pool_slots:
        pool.put(s)
    running = _Running()
    cwd = cwd or os.getcwd()
    server = _start_fork_server(jobs, cwd, preload) if fork_server and jobs and not inherit_devices else None
    executor = ThreadPoolExecutor(max_workers=min(len(pool_slots), max(len(jobs), 1)))
    previous = _on_sigterm_raise()
    try:
        futures = [executor.submit(_run_one, job, pool, running, cwd, server) for job in jobs]
        for future in futures:
            future.result()
    except BaseException:  # Ctrl-C, SIGTERM (scancel, kill): stop the job processes, leave them missing
        running.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if server is not None:
            server.close()  # every job has ended by now (an interrupted sweep waited for its stopped jobs)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    executor.shutdown(wait=True)
    return jobs


def _start_fork_server(jobs: list[Job], cwd: str, preload: Sequence[str]) -> ForkServer | None:
    log_path = jobs[0].spec.parents[1] / FORK_SERVER_LOG  # <sweep dir>/.sweep/ (the specs are in .sweep/jobs/)
    try:
        return ForkServer(cwd, preload, log_path)
    except OSError as err:
        log.warning(f"launcher=gpus: the fork server did not start ({err}); starting each job in a fresh process")
        return None


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
        elif job.status is None and job.running:
            lines.append(f"  #{job.num} was stopped ({what}): its process ({describe(job.running)}) is gone")
        elif job.status is None:
            lines.append(f"  #{job.num} did not run ({what})")
    if failed or missing:
        later = " (the running and pending ones are left alone)" if live else ""
        lines.append(f"relaunch only the failed and missing jobs with: steerexp-sweep rerun {sweep_dir}{later}")
    return "\n".join(lines)
