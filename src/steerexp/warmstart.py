"""The `steerexp` console script, with a warm-start server: the imports once, then one fork per run.

A fresh `steerexp` process spends ~6 s importing torch, diffusers, transformers and Hydra before its
first step (benchmarks/startup.py). A warm-start server imports them once and keeps them; each
`steerexp` command then connects to it over a Unix socket, and the server forks a child that runs the
command as the fresh process would have:

- the client's argv, working directory and environment (replaced whole in the child);
- the client's stdin, stdout and stderr themselves (passed over the socket), so a terminal stays a
  terminal (progress bars, Ctrl-C) and `> file` or `| tee` still go where the shell sent them;
- its own session: signals the client receives (Ctrl-C, SIGTERM, SIGHUP, ...) are sent on to the
  child's process group; if the client dies, the child gets SIGHUP, as a terminal's hangup would;
- its exit status returned as the client's own (a run killed by SIGINT kills the client with SIGINT);
- state from a process that only imported modules and read the default run's files (numpy's global
  generator reseeded from fresh entropy, Python's `random` reseeds itself at fork, the server's exit-time
  cleanups left to the server; CUDA never starts in the server).

Which server: one per *key*, the hash of what imported code and the server's process depend on: the
installation, the modification times and sizes of steerexp's and hydra_plugins' .py files, what the
sys.path folders hold (the names of installed packages and their versions; top-level modules and .pth
files with their times), the environment variables that libraries read at import (PYTHON*, HF_*,
TORCH*, CUDA*, OMP_*, TQDM_*, LANG, LC_*, HOME, ...), and what a fork could not undo (niceness,
resource limits, CPUs, scheduler, cgroup). Edit a source file or install a package and the next command
starts fresh and starts a new server; the old one retires (finishes its runs, then exits).

When (STEEREXP_SERVER):
    auto (default)  use a matching server when one is up, outside CI and SLURM/PBS/LSF jobs (a served
                    run would escape the job's limits) and sweep workers; start one (after this
                    command's fresh run, detached) only from an interactive terminal (stdin and stderr
                    are TTYs)
    1 / on          use and start one from scripts too
    0 / off         never: every command is a fresh process
A server exits after STEEREXP_SERVER_IDLE seconds (default 600) with no run; its sockets, pid files
and log live in $STEEREXP_SERVER_DIR (default $XDG_RUNTIME_DIR/steerexp, else /tmp/steerexp-<uid>).

    python -m steerexp.warmstart start [--wait] [--preload MODULE ...]   # a server for this environment
    python -m steerexp.warmstart status                                  # the servers up, and which matches
    python -m steerexp.warmstart stop                                    # retire every server

The client side (this module's top level) imports the standard library only: a served command costs
the interpreter's start (~30 ms) before the fork.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path

ENV = "STEEREXP_SERVER"
IDLE_ENV = "STEEREXP_SERVER_IDLE"
DIR_ENV = "STEEREXP_SERVER_DIR"
IDLE_DEFAULT = 600.0
# environment variables read at import by the libraries a server preloads (a server serves only clients whose
# values match: see key()): timm's TIMM_* and the few WANDB_* that W&B reads when imported. Not: what only a run
# reads (HYDRA_FULL_ERROR, STEEREXP_*, WANDB_NAME, WANDB_MODE, ...), from its own environment, nor per-login
# variables (XDG_SESSION_ID, SSH_*, a terminal's LC_TERMINAL).
# CUDA_VISIBLE_DEVICES is in: read when CUDA starts, which is in the run, but a device count cached at import
# would be the server's
IMPORT_ENV_PREFIXES = ("PYTHON", "HF_", "HUGGINGFACE", "TRANSFORMERS", "DIFFUSERS", "TORCH", "PYTORCH", "CUDA",
                       "NVIDIA", "OMP_", "KMP_", "MKL", "OPENBLAS", "GOTO", "LD_", "TOKENIZERS", "TQDM_", "USE_",
                       "LANG", "LC_", "TZ", "TIMM_")
IMPORT_ENV_NAMES = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "WANDB_DEBUG",
                    "WANDB_INSECURE_DISABLE_SSL", "WANDB_HTTP_TIMEOUT", "WANDB_FILE_PUSHER_TIMEOUT")
NOT_IMPORT_ENV = ("LC_TERMINAL", "LC_TERMINAL_VERSION")  # match a prefix above; set by terminals, read by none
BATCH_ENV = ("CI", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "STEEREXP_LAUNCHER_FD", "STEEREXP_SWEEP_DEVICE")
# what a default run imports (the README's main job: textual inversion, its four evaluators, W&B), so a served run
# imports 0.05 s more (measured). Without the evaluators' modules (open_clip pulls in timm, torchvision and wandb)
# and W&B's, each served default run spent 2.5-4 s importing them. A module that is not installed is left to the
# run. Hydra's plugins are discovered once too (Plugins.instance(), as hydra.main does first)
PRELOAD = ("torch", "diffusers", "transformers", "hydra.core.utils", "hydra.core.plugins", "steerexp.run",
           "steerexp.cli", "steerexp.generators.sd", "steerexp.trainer", "steerexp.targets",
           "steerexp.objectives.composite", "steerexp.objectives.denoising", "steerexp.techniques.textual_inversion",
           "diffusers.guiders", "steerexp.evaluators.concept", "steerexp.evaluators.leakage",
           "steerexp.evaluators.clip", "steerexp.evaluators.memorisation", "steerexp.worlds.shapes.judge",
           "steerexp.scorers.clip", "steerexp.logging.wandb", "wandb")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGTSTP)
PACKAGE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- which server, and whether to use one


def mode(env=os.environ) -> str:
    """STEEREXP_SERVER as one of auto | on | off (a wrong value is refused in one line)."""
    text = env.get(ENV, "auto").strip().lower() or "auto"
    spellings = {"auto": ("auto",), "on": ("1", "on", "true", "yes"), "off": ("0", "off", "false", "no")}
    for name, words in spellings.items():
        if text in words:
            return name
    raise SystemExit(f"steerexp: error: {ENV}={env.get(ENV)!r}: use auto, 1 (on) or 0 (off)")


def batch_job(env=os.environ) -> bool:
    """CI, a SLURM/PBS/LSF job or a sweep worker: a served run would escape the job's limits (its cgroup, CPUs)."""
    return any(env.get(k) for k in BATCH_ENV)


def should_use(env=os.environ) -> bool:
    """Whether a command looks for a server: on, or auto outside batch jobs."""
    chosen = mode(env)
    return chosen == "on" or (chosen == "auto" and not batch_job(env))


def should_start(env=os.environ, interactive: bool | None = None) -> bool:
    """Whether a command that found no server starts one when it ends (see the module docstring)."""
    chosen = mode(env)
    if chosen != "auto":
        return chosen == "on"
    if interactive is None:
        interactive = os.isatty(0) and os.isatty(2)
    return bool(interactive) and not batch_job(env)


def server_dir(env=os.environ) -> Path:
    """This installation's folder of servers (one per interpreter and steerexp checkout: a server retires only
    the servers of its own installation)."""
    if env.get(DIR_ENV):
        root = Path(env[DIR_ENV])
    else:
        runtime = env.get("XDG_RUNTIME_DIR")
        shared = Path(f"/tmp/steerexp-{os.getuid()}")
        root = Path(runtime) / "steerexp" if runtime and os.path.isdir(runtime) else shared
    if len(str(root)) > 60:  # a socket's path has at most 107 bytes: a long folder moves to a short one of its own
        root = Path(f"/tmp/steerexp-{os.getuid()}") / hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return root / hashlib.sha256(f"{sys.prefix}\n{PACKAGE}".encode()).hexdigest()[:12]


def private(folder: Path) -> bool:
    """Nobody else can change what the folder holds: it is ours and writable by us alone, and every folder above
    it is ours or root's and writable by its owner alone, or sticky (as /tmp: nobody renames what is not theirs).
    So a socket found there is our server's, not one another user put there to receive our commands'
    environments."""
    try:
        folder = folder.resolve()  # the folders that hold it, not those a symlink's name passes through
        st = os.stat(folder)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return False
        for level in folder.parents:
            st = os.stat(level)
            if st.st_uid not in (os.getuid(), 0) or (st.st_mode & 0o022 and not st.st_mode & 0o1000):
                return False
        return True
    except OSError:
        return False


def make_private(folder: Path) -> None:
    """Create the folder and the levels of it that are missing with mode 0700 (whatever the umask), then check."""
    missing = [level for level in (folder, *folder.parents) if not level.exists()]
    try:
        for level in reversed(missing):
            level.mkdir(mode=0o700, exist_ok=True)
            os.chmod(level, 0o700)
    except OSError as err:
        raise SystemExit(f"steerexp: error: cannot make {folder}: {err}; set {DIR_ENV} to a folder of your own")
    if not private(folder):
        raise SystemExit(f"steerexp: error: {folder} (or its parent) is not this user's alone; remove it or set "
                         f"{DIR_ENV} to a folder of your own")


def _source_stats(root: Path, out: list) -> None:
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in ("__pycache__", "assets", "conf") and not entry.name.startswith("."):
                _source_stats(Path(entry.path), out)
        elif entry.name.endswith(".py"):
            st = entry.stat()
            out.append(f"{entry.path}:{st.st_mtime_ns}:{st.st_size}")


def key(env=os.environ, roots=(PACKAGE, PACKAGE.parent / "hydra_plugins")) -> str:
    """The hash of what a server's imported code and state depend on (see the module docstring). Configs and
    weights are read by each run itself, so they are not part of it."""
    parts = [sys.prefix, sys.base_prefix, sys.version, *map(str, roots)]  # not sys.executable: python = python3
    for root in roots:
        if Path(root).is_dir():
            _source_stats(Path(root), parts)
    for folder in sys.path[1:]:  # [0]: the script's folder (the console script's, or the server's cwd)
        parts.append(f"path {folder}")
        try:
            if not os.path.isdir(folder):
                parts.append(str(os.stat(folder).st_mtime_ns))  # a zip
                continue
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):  # what is installed (names: versions)
                if entry.name.endswith((".py", ".pth")):  # top-level modules and .pth files: their contents too
                    st = entry.stat()
                    parts.append(f"{entry.name}:{st.st_mtime_ns}:{st.st_size}")
                elif entry.name != "__pycache__":
                    parts.append(entry.name)
        except OSError:
            parts.append("-")
    parts += sorted(f"{k}={v}" for k, v in env.items()
                    if (k.startswith(IMPORT_ENV_PREFIXES) or k in IMPORT_ENV_NAMES) and k not in NOT_IMPORT_ENV)
    parts += _process_identity()
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def socket_path(k: str, env=os.environ) -> Path:
    return server_dir(env) / f"{k}.sock"


# ---------------------------------------------------------------- the client (standard library only)


def _send_message(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = json.dumps(message).encode()
    payload = struct.pack("!I", len(data)) + data
    sent = socket.send_fds(sock, [payload], list(fds)) if fds else sock.send(payload)
    if sent < len(payload):
        sock.sendall(payload[sent:])


def _lines(sock: socket.socket):
    pending = b""
    while True:
        data = sock.recv(4096)  # a signal handled meanwhile: recv goes on by itself (PEP 475)
        if not data:
            return
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            yield json.loads(line)


def serve_command(argv: list[str], env=os.environ) -> int | None:
    """Run `steerexp <argv>` in a matching server's fork: its exit code (negative: killed by that signal),
    or None when no server serves this environment (the caller runs it fresh)."""
    folder = server_dir(env)
    if not should_use(env) or not private(folder) or not any(folder.glob("*.sock")):
        return None  # (no socket at all: no key to compute, ~50 ms of listing sys.path folders saved)
    path = socket_path(key(env), env)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        if _peer_uid(sock) != os.getuid():
            raise ConnectionRefusedError
    except OSError:
        sock.close()
        return None

    def send(signum: int) -> None:
        try:
            sock.sendall(json.dumps({"signal": int(signum)}).encode() + b"\n")
        except OSError:
            pass

    queued: list[int] | None = []  # until the request is sent: a signal line must not precede it

    def forward(signum, _frame) -> None:
        if queued is not None:
            return queued.append(signum)
        if signum != signal.SIGTSTP:
            return send(signum)
        # Ctrl-Z: the run is in a session of its own (no terminal stops it): stop it, stop here; on `fg`, both go on
        send(signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, forward)
        send(signal.SIGCONT)

    # signals this process ignores (nohup, `&` in a script) stay ignored in the run, as a fresh process inherits them
    ignored = [int(s) for s in FORWARDED if signal.getsignal(s) == signal.SIG_IGN]
    previous = {s: signal.signal(s, forward) for s in FORWARDED if s not in ignored}  # before the request: no gap
    started = False
    try:
        _send_message(sock, {"argv": [sys.argv[0], *argv], "cwd": os.getcwd(), "env": dict(env), "path0": sys.path[0],
                             "ignored": ignored, "umask": _umask()}, [0, 1, 2])
        pending, queued = queued, None
        for signum in pending:
            forward(signum, None)
        for message in _lines(sock):
            if "pid" in message:
                started = True
            if "exit" in message:
                return int(message["exit"])
            if "refused" in message:  # retiring, or the key no longer matches: run fresh
                return None
    except OSError:
        pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    if not started:
        return None
    print(f"steerexp: error: the warm-start server ended before this run did; its log is in {server_dir(env)}; "
          f"run again (or set {ENV}=0 for fresh processes)", file=sys.stderr, flush=True)
    return 1


def _peer_uid(sock: socket.socket) -> int:
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]


def _process_identity() -> list[str]:
    """The settings a process inherits that a forked run could not take on from its client (raising niceness or a
    hard limit back needs privileges; a cgroup is joined, not inherited): a server serves only commands whose
    settings are its own, and the server, started by such a command, inherits them."""
    import resource

    limits = [f"{name}={resource.getrlimit(getattr(resource, name))}" for name in sorted(dir(resource))
              if name.startswith("RLIMIT_")]
    try:
        cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        cgroup = "-"
    return [f"nice={os.getpriority(os.PRIO_PROCESS, 0)}", f"cpus={sorted(os.sched_getaffinity(0))}",
            f"policy={os.sched_getscheduler(0)}", f"cgroup={cgroup}", *limits]


def _umask() -> int:
    umask = os.umask(0o22)
    os.umask(umask)
    return umask


def exit_as(code: int) -> None:
    """End this process as the served run ended: its exit code, or death by the same signal (no core file of this
    client for a signal that dumps core: the run's is the one that counts)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:
        import resource

        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL and SIGSTOP take no handler: they are already the default
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def main() -> None:
    """The `steerexp` console script: served by a warm server when one matches, else a fresh run (which then
    starts a server, when should_start says so)."""
    argv = sys.argv[1:]
    code = serve_command(argv)
    if code is not None:
        exit_as(code)
    if should_start():
        import atexit

        # when this run ends (exit_now runs the exit handlers: no contention), for the environment the command
        # started with (the run changes its own: W&B sets WANDB_SILENT, torch TORCHINDUCTOR_CACHE_DIR)
        atexit.register(_start_after_run, dict(os.environ))
    from steerexp.cli import main as cli_main

    cli_main()


# ---------------------------------------------------------------- starting, listing and stopping servers


def start(wait: bool = False, preload: list[str] = (), idle: float | None = None, quiet: bool = False,
          env: dict | None = None) -> Path:
    """Start a detached server for this environment (no-op if one is up or starting); its socket path."""
    import subprocess

    env = dict(os.environ if env is None else env)
    make_private(server_dir(env))  # first: the folder may be on sys.path
    k = key(env)
    path = socket_path(k, env)
    log = open(path.with_suffix(".log"), "ab")
    cmd = [sys.executable, "-m", "steerexp.warmstart", "serve", k]
    cmd += [f"--idle={idle}"] if idle is not None else []
    cmd += [f"--preload={m}" for m in preload]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                            cwd="/", close_fds=True, env=env)
    log.close()
    if wait:  # until it serves, or the server for this key that was already starting does
        import time

        deadline = time.time() + 300
        while not _alive(path) and time.time() < deadline:
            if proc.poll() is not None and (proc.returncode != 0 or not _locked(path.with_suffix(".lock"))):
                break  # it failed, or it found another one starting that has since gone
            time.sleep(0.05)
        if not _alive(path):
            raise SystemExit(f"steerexp: the warm-start server did not start; see {path.with_suffix('.log')}")
        if not quiet:
            print(f"steerexp warm-start server up: {path}")
    return path


def _start_after_run(env: dict) -> None:
    """Start a server at the end of a fresh run; a failure is left in the server's log, never in the run's output."""
    try:
        start(quiet=True, env=env)
    except BaseException:
        pass


def _locked(lock_path: Path) -> bool:
    """Whether a server holds this key's lock (it is up, or starting)."""
    import fcntl

    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _alive(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _servers(folder: Path) -> list[tuple[str, int]]:
    """(key, pid) of the servers whose pid files are in the folder and whose process is alive."""
    found = []
    for pid_file in sorted(folder.glob("*.pid")) if folder.is_dir() else []:
        try:
            pid = int(pid_file.read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"steerexp.warmstart" in command and pid_file.stem.encode() in command:  # not a reused pid
            found.append((pid_file.stem, pid))
    return found


def stop(folder: Path | None = None, keep: str | None = None) -> list[int]:
    """Retire every server in the folder but `keep`'s: each stops taking runs, finishes those it has, exits."""
    retired = []
    for k, pid in _servers(folder or server_dir()):
        if k != keep:
            try:
                os.kill(pid, signal.SIGTERM)
                retired.append(pid)
            except OSError:
                pass
    return retired


# ---------------------------------------------------------------- the server


def _reopen_stdio() -> None:
    """sys.std* on fds 0-2 as a fresh interpreter opens them: the server's encodings and error handlers (it
    started with the client's locale and PYTHONIOENCODING: they are in the key), line-buffered stdout on a
    terminal, and nothing buffered under PYTHONUNBUFFERED (also in the key)."""
    import io

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    streams = []
    for fd, old in ((0, sys.__stdin__), (1, sys.__stdout__), (2, sys.__stderr__)):
        encoding, errors = getattr(old, "encoding", None) or "utf-8", getattr(old, "errors", None) or "strict"
        if fd == 0:
            streams.append(io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding=encoding, errors=errors,
                                            newline="\n"))
            continue
        raw = io.open(fd, "wb", buffering=0, closefd=False)
        streams.append(io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding=encoding,
                                        errors=errors, line_buffering=fd == 2 or os.isatty(fd),
                                        write_through=unbuffered))
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child (every signal blocked since before the fork): become the client's process, run the
    command, never return."""
    from hydra_plugins.steerexp_launchers._zygote import become_new_process
    from steerexp.shutdown import exit_now

    code = 1
    try:
        os.setsid()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        _reopen_stdio()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.umask(request["umask"])
        for s in FORWARDED:  # a fresh interpreter's dispositions, and what the client ignores stays ignored
            signal.signal(s, signal.SIG_IGN if s in request["ignored"] else
                          signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])  # what was sent meanwhile arrives now, to these dispositions
        become_new_process()  # numpy's generator reseeded; the server's exit-time cleanups stay the server's
        sys.argv = list(request["argv"])
        sys.path[0] = request["path0"]  # the client's script folder, not the server's
        from steerexp.cli import main as cli_main

        cli_main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, (int, type(None))):
            print(done.code, file=sys.stderr)
    except KeyboardInterrupt:  # as a fresh interpreter does: the traceback, then death by SIGINT
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        exit_now(code)


def _now() -> str:
    import time

    return time.strftime("%F %T")


class Server:
    def __init__(self, k: str, idle: float, folder: Path, lock_fd: int, import_env: dict[str, str]):
        self.key, self.idle, self.folder, self.lock_fd = k, idle, folder, lock_fd
        self.import_env = import_env  # what the imports set in os.environ: each run gets it too (see serve())
        self.path = folder / f"{k}.sock"
        self.listener: socket.socket | None = None
        self.clients: dict[socket.socket, dict] = {}  # connection -> {"pid", "pidfd", "buffer", "argv"}
        self.retiring = False

    def bind(self) -> None:
        """Listen on the key's socket path (bound under a temporary name, then renamed: a client that connects
        finds a server that has imported everything)."""
        tmp = self.folder / f".{self.key}.{os.getpid()}.sock"
        tmp.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(tmp))
        os.chmod(tmp, 0o600)
        self.listener.listen(16)
        os.replace(tmp, self.path)
        self.inode = os.stat(self.path).st_ino

    def unbind(self) -> None:
        """Stop taking commands: the socket goes, and the key's lock with it (a new server for the key may start
        while this one finishes its runs)."""
        if self.listener is None:
            return
        try:
            os.close(self.lock_fd)
        except OSError:
            pass
        try:
            if os.stat(self.path).st_ino == self.inode:
                self.path.unlink()
        except OSError:
            pass
        self.listener.close()
        self.listener = None

    def accept(self) -> None:
        """Take one command; whatever the client does (hangs up, sends garbage), the server goes on."""
        conn, _ = self.listener.accept()
        try:
            self._start_run(conn)
        except Exception as err:
            print(f"{_now()} a request failed: {type(err).__name__}: {err}", flush=True)
            if conn not in self.clients:
                conn.close()

    def _start_run(self, conn: socket.socket) -> None:
        if _peer_uid(conn) != os.getuid():  # the folder is private; this is the second lock on the door
            conn.close()
            return
        try:
            request, fds, rest = self._receive(conn)
        except EOFError:  # a probe (start --wait): connected and hung up
            conn.close()
            return
        if self.retiring:
            for fd in fds:
                os.close(fd)
            conn.sendall(b'{"refused": "retiring"}\n')
            conn.close()
            return
        torch = sys.modules.get("torch")
        assert torch is None or not torch.cuda.is_initialized(), "CUDA started in the warm-start server"
        sys.stdout.flush()
        sys.stderr.flush()
        # every signal blocked across the fork: one sent to the run before it has its own dispositions (the
        # server's SIGTERM handler would swallow it) waits, and arrives when the child unblocks
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            for fd in fds:
                os.close(fd)
            raise
        if pid == 0:
            try:  # the child never comes back into the server's loop
                self.listener.close()
                conn.close()
                os.close(self.lock_fd)  # a long run does not hold the key's lock after the server is gone
                for other, state in self.clients.items():
                    other.close()
                    os.close(state["pidfd"])
                request["env"].update(self.import_env)
                _run_child(request, fds)
            finally:
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        for fd in fds:
            os.close(fd)
        self.clients[conn] = {"pid": pid, "pidfd": os.pidfd_open(pid), "buffer": b"", "argv": request["argv"][1:]}
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        if rest:  # a signal the client sent on the heels of its request
            self.client_message(conn, rest)

    @staticmethod
    def _receive(conn: socket.socket) -> tuple[dict, list[int], bytes]:
        """The request (a length, then JSON; stdin, stdout and stderr attached), and any bytes after it."""
        conn.settimeout(10)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        try:
            if not data and not fds:
                raise EOFError  # a probe (start --wait, status): connected and hung up
            if len(fds) != 3:
                raise ValueError(f"expected stdin, stdout and stderr, got {len(fds)} fds")
            while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
                more = conn.recv(1 << 16)
                if not more:
                    raise ValueError("the client hung up mid-request")
                data += more
            conn.settimeout(None)
            end = 4 + struct.unpack("!I", data[:4])[0]
            return json.loads(data[4:end]), fds, data[end:]
        except BaseException:
            for fd in fds:  # no later run inherits them
                os.close(fd)
            raise

    def client_message(self, conn: socket.socket, data: bytes | None = None) -> None:
        """A signal to forward, or the client's hangup (it died: SIGHUP to the run, as a terminal would)."""
        state = self.clients[conn]
        if data is None:
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
        if not data:
            self._signal(state, signal.SIGHUP)
            state["gone"] = True
            return
        *lines, state["buffer"] = (state["buffer"] + data).split(b"\n")
        for line in lines:
            try:
                self._signal(state, int(json.loads(line)["signal"]))
            except (ValueError, KeyError, TypeError):
                pass

    @staticmethod
    def _signal(state: dict, signum: int) -> None:
        """To the run's process group (the run and what it started). The child is unreaped until its pidfd is read,
        so its pid is still its own; before its setsid() its group is not yet its pid: then to the child alone
        (it has every signal blocked until it has its own dispositions)."""
        try:
            os.killpg(state["pid"], signum)
        except ProcessLookupError:
            try:
                os.kill(state["pid"], signum)
            except OSError:
                pass
        except OSError:
            pass

    def reap(self, conn: socket.socket) -> None:
        state = self.clients.pop(conn)
        os.close(state["pidfd"])
        _, status = os.waitpid(state["pid"], 0)
        code = os.waitstatus_to_exitcode(status)
        print(f"{_now()} served pid {state['pid']}: steerexp {' '.join(state['argv'])} -> exit {code}", flush=True)
        try:
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except OSError:
            pass
        conn.close()

    def serve(self) -> None:
        import select
        import time

        last = time.monotonic()
        while True:
            self.retiring = self.retiring or _retire_requested
            if self.retiring and self.listener is not None:
                self.unbind()
            if self.clients:
                last = time.monotonic()
            elif self.retiring or time.monotonic() - last > self.idle:
                return
            watched = [self.listener] if self.listener is not None else []
            watched += [c for c, s in self.clients.items() if not s.get("gone")]
            pidfds = {s["pidfd"]: c for c, s in self.clients.items()}
            try:
                ready, _, _ = select.select(watched + list(pidfds), [], [], 1.0)
            except InterruptedError:
                continue
            for item in ready:
                if item is self.listener:
                    self.accept()
                elif isinstance(item, int):
                    self.reap(pidfds[item])
                elif item in self.clients:
                    self.client_message(item)


def warm_caches() -> None:
    """What a default run reads from files, read once here for every run forked after: the default config's
    validation fills its tokenizer caches (0.3 s), and the default generator's pipeline is loaded and kept: each
    run forked after takes its own copy at its first load of the same files (0.3 s; generators.frozen.keep_loaded).
    A served run that loads other files reads them itself. A failure here is printed and left to the runs, which
    meet it themselves."""
    try:
        from steerexp import generators
        from steerexp.cli import compose_config
        from steerexp.validate import validate

        cfg = compose_config()
        validate(cfg)
        g = cfg.generator
        if g.get("_target_") == "steerexp.generators.load_generator":
            generators.preload(g.get("path"), g.get("dtype", "fp32"), g.get("embedded") or "shapes")
    except Exception as err:
        print(f"could not warm the default run's caches: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}",
              flush=True)


_retire_requested = False


def _retire(*_) -> None:
    global _retire_requested
    _retire_requested = True


def serve(k: str, idle: float, preload: list[str]) -> int:
    """The server's process: take the key's lock (one server per key), preload, listen, retire the others."""
    import fcntl
    import gc
    import time

    from hydra_plugins.steerexp_launchers._zygote import preload as import_once  # the sweeps' fork server's

    signal.signal(signal.SIGTERM, _retire)  # from the start: a `stop` during the imports retires it at once

    folder = server_dir()
    make_private(folder)
    lock = os.open(folder / f"{k}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another server for this key is up or starting
    if key() != k:  # the sources changed since the command that started this server computed the key
        print("the sources changed before the server started; not serving", flush=True)
        return 1
    os.close(os.pidfd_open(os.getpid()))  # Linux >= 5.3, else fail here (clients then run fresh)
    started, environment = time.time(), dict(os.environ)
    import_once([*PRELOAD, *preload])  # a module that fails is left to the run, whose own import then fails
    try:
        from hydra.core.plugins import Plugins

        Plugins.instance()
    except Exception as err:
        print(f"could not discover Hydra's plugins: {type(err).__name__}: {err}", flush=True)
    warm_caches()
    if key(environment) != k:  # a file changed while importing: what is imported may not be what the key says
        print("the sources changed while the server imported them; not serving", flush=True)
        return 1
    # the children's collector leaves the imported objects (the plugins' and the kept generator's too) alone: their
    # pages stay shared, and a run's model load (before the server kept the generator) took 0.30 s served against
    # 0.64 s without it (benchmarks/startup.py)
    gc.freeze()
    # what the imports set in os.environ (torch: TORCHINDUCTOR_CACHE_DIR): a fresh process's imports would set
    # the same in its own environment (the key covers the variables they read), so each run gets them too
    server = Server(k, idle, folder, lock, {name: value for name, value in os.environ.items()
                                            if environment.get(name) != value})
    server.bind()
    (folder / f"{k}.pid").write_text(str(os.getpid()))
    stop(folder, keep=k)
    print(f"{_now()} serving {server.path} (pid {os.getpid()}, imports {time.time() - started:.1f} s, "
          f"idle exit after {idle:.0f} s)", flush=True)
    try:
        server.serve()
    finally:
        server.unbind()  # the lock file stays (one inode per key: two servers never hold two locks for one key)
        pid_file = folder / f"{k}.pid"
        if pid_file.is_file() and pid_file.read_text() == str(os.getpid()):
            pid_file.unlink()
        print(f"{_now()} exiting", flush=True)
    return 0


def _cli(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m steerexp.warmstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("start", "serve"):
        p = sub.add_parser(name)
        if name == "serve":
            p.add_argument("key")
        else:
            p.add_argument("--wait", action="store_true", help="return when it serves")
        p.add_argument("--idle", type=float, default=None, help=f"seconds without a run before it exits "
                       f"(default ${IDLE_ENV} or {IDLE_DEFAULT:.0f})")
        p.add_argument("--preload", action="append", default=[], help="a module to import too (repeatable)")
    sub.add_parser("status")
    sub.add_parser("stop")
    opts = ap.parse_args(argv)
    idle = opts.idle if getattr(opts, "idle", None) is not None else float(os.environ.get(IDLE_ENV, IDLE_DEFAULT))
    if opts.command == "serve":
        return serve(opts.key, idle, opts.preload)
    if opts.command == "start":
        start(wait=opts.wait, preload=opts.preload, idle=idle)
        return 0
    if opts.command == "stop":
        print(f"retired: {stop() or 'none'}")
        return 0
    k = key()
    servers = _servers(server_dir())
    for sk, pid in servers:
        print(f"{sk} pid {pid}{'  (matches this environment)' if sk == k else ''}")
    if not servers:
        print(f"no warm-start server in {server_dir()}")
    return 0


if __name__ == "__main__":
    from steerexp.shutdown import exit_now

    # no interpreter teardown of torch & co. (seconds of CPU, and triton's leak reports); the exit handlers run: a
    # server's clean up after the imports it made (W&B's temporary media folder)
    exit_now(_cli(sys.argv[1:]))
