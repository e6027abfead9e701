"""The fork server ("zygote") of launcher=gpus: the heavy imports once per sweep, then one fork per job.

    python -m hydra_plugins.steerexp_launchers._zygote <socket fd> <launcher fd> [module ...]

A job started as a fresh process (`python -m ..._worker spec.pkl`) first pays the imports of torch,
diffusers, transformers and steerexp: ~5-6 s of CPU per job here. This server imports the modules named
(hydra.launcher.preload) once, then, for each request of the launcher (a JSON line on the socket: id,
spec, device, log), forks a child that runs the job exactly as _worker.py does. The child is still a
process of its own, as a worker would be:

- its own session and process group (what the launcher's SIGTERM and the launcher-death watch kill);
- its own CUDA_VISIBLE_DEVICES: the server never initialises CUDA (checked before every fork), so the
  variable set in the child takes effect when the job starts CUDA;
- stdout and stderr in the job's stdout.log, no fd of the server's but the launcher's pipe;
- the launcher-death watch restarted (threads do not survive fork) on that pipe, whose write end only
  the launcher holds: the job still dies with its launcher (_worker.watch_launcher);
- fresh global state: it starts from the server's, which only imported modules (`become_new_process`:
  numpy's global random generator reseeded, the server's exit-time cleanups left to the server); a crash
  or os._exit in it ends that process only.

The server answers each request with the child's pid, reaps its children (a pidfd each) and sends
each exit code as subprocess reports one (-N: killed by signal N). It starts no thread and holds no
lock while it forks. It ends when the launcher closes the socket (the sweep is over, or the launcher
died) without waiting for children: by then they have ended, or die with the launcher.
"""
from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import select
import socket
import sys
import tempfile
import traceback
import weakref

from hydra_plugins.steerexp_launchers import _worker


def preload(modules: list[str]) -> None:
    """Import what every job would import; a module that fails to import is left to the job (whose own
    import then fails with the error in its stdout.log)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:
            print(f"steerexp fork server: could not preload {name}: {type(err).__name__}: {err}", flush=True)
    gc.freeze()  # the children's garbage collector leaves the imported objects alone: their pages stay shared


def become_new_process() -> None:
    """In a child just forked from a server that imported modules (this one, or steerexp.warmstart's): the
    process-wide state a new interpreter would have, not the server's.
    - numpy's global generator from fresh entropy (Python's `random` reseeds itself at fork);
    - the server's temporary folders stay the server's: its weakref finalizers are detached here, and the exit
      handlers of its TemporaryDirectory objects unregistered (its other exit handlers still run in each child, as
      they did). W&B makes a temporary folder for media when imported and deletes it at exit: run at each child's
      exit, that deleted the folder the server's later children wrote their images into (the server deletes it
      when it exits)."""
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    for finalizer in list(weakref.finalize._registry):  # noqa: SLF001 (no public way to list them)
        owner = finalizer.peek()
        finalizer.detach()
        if owner is not None and isinstance(owner[0], tempfile.TemporaryDirectory):
            atexit.unregister(owner[0].cleanup)


def send(sock, **message) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def fork_job(request: dict, sock, lifeline: int, pidfds) -> int:
    """Fork the job's process; the pid (in the server). The child runs the job and never returns."""
    torch = sys.modules.get("torch")  # CUDA_VISIBLE_DEVICES is read once, when CUDA starts: it must start in the job
    assert torch is None or not torch.cuda.is_initialized(), \
        "CUDA started in the fork server: no job would get its own device"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: set up as `subprocess.Popen(..., start_new_session=True, pass_fds=(lifeline,))` would
        sock.close()
        for fd in pidfds:
            os.close(fd)
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        if request["device"] is not None:
            os.environ.update(CUDA_VISIBLE_DEVICES=request["device"], STEEREXP_SWEEP_DEVICE=request["device"])
        os.environ[_worker.PARENT_FD_ENV] = str(lifeline)
        become_new_process()
        sys.argv = [_worker.__file__, request["spec"]]
        code = _worker.main([request["spec"]])
    except BaseException:
        traceback.print_exc()
    finally:
        _worker.exit_now(code)


def serve(sock, lifeline: int) -> None:
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (request id, pid)
    pending = b""
    while True:
        ready, _, _ = select.select([sock, *children], [], [])
        for fd in ready:
            if fd is sock:
                data = sock.recv(1 << 16)
                if not data:
                    return  # the launcher closed its end: the sweep is over, or the launcher died
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    request = json.loads(line)
                    pid = fork_job(request, sock, lifeline, children)
                    send(sock, id=request["id"], pid=pid)  # first: whatever happens next, the launcher knows it
                    children[os.pidfd_open(pid)] = (request["id"], pid)
            else:
                request_id, pid = children.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                send(sock, id=request_id, exit=os.waitstatus_to_exitcode(status))


def main(argv: list[str]) -> None:
    sock = socket.socket(fileno=int(argv[0]))
    code = 0
    try:
        os.close(os.pidfd_open(os.getpid()))  # Linux >= 5.3 (else the launcher falls back before any job forks)
        preload(argv[2:])
        serve(sock, int(argv[1]))
    except ConnectionError:
        pass  # the launcher is gone
    except BaseException:
        traceback.print_exc()  # into the sweep's .sweep/fork_server.log; the launcher falls back to fresh processes
        code = 1
    if code:  # jobs may still run: leave what they use (W&B's temporary media folder) in place
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # no interpreter teardown of torch & co. (~1.7 s of CPU); the exit handlers run: the imports' own clean-up (W&B's
    # temporary media folder, which the jobs no longer use: they have ended by now, or die with the launcher)
    _worker.exit_now(code)


if __name__ == "__main__":
    main(sys.argv[1:])
