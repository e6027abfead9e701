"""The warm-start server (steerexp.warmstart): a `steerexp` command served by a fork of a process that imported
torch & co. once behaves as the fresh process would (same metrics and deltas, its stdout and stderr where the
shell sent them, its exit code, Ctrl-C), and is used only when nothing its imports depend on changed.

One server for the module (its own folder under tmp_path; STEEREXP_SERVER=1 for these commands only: conftest
turns servers off for the rest of the suite). A probe module the server preloads records, at each served run's
exit, its pid, its parent, whether torch was imported before the command started (the proof a command was
served, not run fresh) and how many generators the server loaded ahead are left unused.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from steerexp import warmstart

STEERXP = str(Path(sys.executable).parent / "steerexp")
QUICK = ["evaluator=[]", "logger=none", "technique.steps=6"]
PROBE = """
import atexit, json, os, sys, time
imported = time.time()
def write():
    if os.environ.get("PROBE_FILE"):
        frozen = sys.modules.get("steerexp.generators.frozen")
        media = sys.modules.get("wandb.sdk.data_types._private")
        open(os.environ["PROBE_FILE"], "w").write(json.dumps(
            {"pid": os.getpid(), "ppid": os.getppid(), "imported": imported, "torch": "torch" in sys.modules,
             "kept": None if frozen is None else len(frozen._KEPT), "media": media and media.MEDIA_TMP.name}))
atexit.register(write)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    (root / "modules").mkdir()
    (root / "modules" / "warm_probe.py").write_text(PROBE)
    env = dict(os.environ, STEEREXP_SERVER="1", STEEREXP_SERVER_DIR=str(root / "server"),
               PYTHONPATH=str(root / "modules"), WANDB_MODE="disabled")
    subprocess.run([sys.executable, "-m", "steerexp.warmstart", "start", "--wait", "--idle=300",
                    "--preload=warm_probe"], env=env, check=True, capture_output=True, timeout=120)
    pid = int(next(warmstart.server_dir(env).glob("*.pid")).read_text())
    yield {"env": env, "pid": pid}
    os.kill(pid, signal.SIGTERM)


def command(args, cwd, env, **kw):
    return subprocess.Popen([STEERXP, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def served(server, tmp_path, args, name="probe.json", **kw):
    """Run `steerexp <args>` served: (completed process, probe); asserts it was served."""
    probe = tmp_path / name
    started = time.time()
    proc = command(args, tmp_path, dict(server["env"], PROBE_FILE=str(probe)), **kw)
    out, err = proc.communicate(timeout=300)
    seen = json.loads(probe.read_text())
    assert seen["ppid"] == server["pid"] and seen["torch"] and seen["imported"] < started, (seen, err[-2000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen


def test_a_served_run_gives_what_a_fresh_process_gives(shipped, server, tmp_path):
    _, before = served(server, tmp_path, ["--help"], name="help.json")
    assert before["kept"] == 1  # the default generator, loaded by the server for its runs
    fresh = subprocess.run([STEERXP, *QUICK, "hydra.run.dir=fresh"], cwd=tmp_path, capture_output=True, text=True,
                           env=dict(server["env"], STEEREXP_SERVER="0"), timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    out, seen = served(server, tmp_path, [*QUICK, "hydra.run.dir=warm"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert seen["kept"] == 0  # it took its copy of the generator the server had loaded
    # W&B, imported by the server, made its media folder there: a run's exit must leave it to the server (each
    # run's exit deleted it, and the next served run that logged an image failed)
    assert seen["media"] and Path(seen["media"]).is_dir()
    assert out.stderr == fresh.stderr == ""  # the quiet console either way
    assert out.stdout.replace("warm", "fresh").splitlines()[-1] == fresh.stdout.splitlines()[-1]  # the run directory
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("fresh", "warm")]
    for m in metrics:
        m.pop("run/seconds")
    assert metrics[0] == metrics[1] and metrics[0]["generator/unchanged"] is True
    deltas = [load_file(tmp_path / d / "deltas.safetensors") for d in ("fresh", "warm")]
    assert deltas[0].keys() == deltas[1].keys() and all(deltas[0][k].equal(deltas[1][k]) for k in deltas[0])
    config = [(tmp_path / d / ".hydra" / "config.yaml").read_text() for d in ("fresh", "warm")]
    assert config[0] == config[1]  # same working directory, same argv: the same resolved config


def test_stdout_goes_where_the_shell_sent_it_and_errors_keep_their_exit_code(server, tmp_path):
    with open(tmp_path / "out.txt", "w") as sink:
        probe = tmp_path / "help.json"
        proc = subprocess.run([STEERXP, "--help"], cwd=tmp_path, stdout=sink, stderr=subprocess.PIPE, text=True,
                              env=dict(server["env"], PROBE_FILE=str(probe)), timeout=120)
    assert proc.returncode == 0 and "Configuration groups" in (tmp_path / "out.txt").read_text()
    assert json.loads(probe.read_text())["ppid"] == server["pid"]
    bad, _ = served(server, tmp_path, ["technique=nope"], name="bad.json")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("steerexp: error: technique: no option 'nope'") and bad.stderr.count("\n") == 1


def long_run(server, tmp_path, name: str, **kw) -> tuple[subprocess.Popen, Path]:
    """A served 4000-step run, once it has written its first checkpoint: the client's process and the probe file."""
    probe = tmp_path / f"{name}.json"
    proc = command(["logger=none", "evaluator=[]", "technique.steps=4000", f"hydra.run.dir={name}"], tmp_path,
                   dict(server["env"], PROBE_FILE=str(probe)), **kw)
    ckpt = tmp_path / name / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), proc.communicate()[1][-3000:]
    return proc, probe


def test_ctrl_c_reaches_the_run_and_the_client_ends_as_a_fresh_run_would(shipped, server, tmp_path):
    proc, probe = long_run(server, tmp_path, "interrupted")
    proc.send_signal(signal.SIGINT)  # the client's only: the run is in the server's child, its own session
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]  # the run's exit code (tests/test_recovery.py: the fresh run's)
    assert f"last good deltas: {tmp_path / 'interrupted' / 'deltas.safetensors'}" in err
    assert "resume exactly" in err
    assert json.loads(probe.read_text())["ppid"] == server["pid"]


def test_a_killed_client_takes_its_run_with_it(shipped, server, tmp_path):
    proc, _ = long_run(server, tmp_path, "orphan")
    runs = server_children(server["pid"])
    assert len(runs) == 1, runs
    proc.kill()  # SIGKILL: the client cannot forward anything; the server sees its socket close
    proc.wait()
    deadline = time.time() + 30
    while server_children(server["pid"]) and time.time() < deadline:
        time.sleep(0.05)
    assert server_children(server["pid"]) == []  # the run got SIGHUP, as a closed terminal's run would


def server_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if Path(f"/proc/{c}/stat").read_text().split()[2] != "Z"]


def test_the_key_follows_sources_installs_and_import_time_environment(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    env = {"HOME": "/home/u", "PATH": "/bin", "HF_HOME": "/hf", "PWD": "/x"}
    base = warmstart.key(env, roots=[package])
    for other in ({"PWD": "/elsewhere", "TERM": "xterm"}, {"XDG_SESSION_ID": "7"}, {"LC_TERMINAL": "iTerm2"},
                  {"HYDRA_FULL_ERROR": "1"}, {"WANDB_SILENT": "true"}, {"WANDB_NAME": "a"}):  # per login, or
        assert warmstart.key(dict(env, **other), roots=[package]) == base, other  # read by the run itself
    for other in ({"TQDM_DISABLE": "1"}, {"CUDA_VISIBLE_DEVICES": "1"},  # read at import (tqdm; a device count)
                  {"WANDB_DEBUG": "1"}, {"TIMM_USE_OLD_CACHE": "1"}):  # the server imports wandb and timm
        assert warmstart.key(dict(env, **other), roots=[package]) != base, other
    assert warmstart.key(dict(env, HF_HOME="/other"), roots=[package]) != base
    assert warmstart.key(dict(env, OMP_NUM_THREADS="1"), roots=[package]) != base
    st = (package / "sub" / "b.py").stat()
    os.utime(package / "sub" / "b.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # an edit
    assert warmstart.key(env, roots=[package]) != base
    os.utime(package / "sub" / "b.py", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert warmstart.key(env, roots=[package]) == base
    (package / "sub" / "__pycache__").mkdir()  # bytecode written by an import changes nothing
    assert warmstart.key(env, roots=[package]) == base
    site = tmp_path / "site"
    site.mkdir()
    sys.path.append(str(site))
    try:
        with_site = warmstart.key(env, roots=[package])
        (site / "newpkg-1.0.dist-info").mkdir()  # an install
        assert warmstart.key(env, roots=[package]) != with_site
    finally:
        sys.path.remove(str(site))


def test_when_a_command_starts_a_server():
    assert warmstart.should_start({}, interactive=True)
    assert not warmstart.should_start({}, interactive=False)  # scripts and pipes: never by default
    for batch in ("CI", "SLURM_JOB_ID", "STEEREXP_LAUNCHER_FD"):
        assert not warmstart.should_start({batch: "1"}, interactive=True)
    assert warmstart.should_start({"STEEREXP_SERVER": "1"}, interactive=False)
    assert not warmstart.should_start({"STEEREXP_SERVER": "off"}, interactive=True)
    with pytest.raises(SystemExit, match="STEEREXP_SERVER='maybe': use auto, 1 .on. or 0 .off."):
        warmstart.mode({"STEEREXP_SERVER": "maybe"})


def test_off_means_fresh_and_servers_retire_or_idle_out(shipped, tmp_path):
    """STEEREXP_SERVER=0 bypasses a server; `stop` retires one (it exits, its socket and pid file go, the next
    command runs fresh); one with --idle=1 exits by itself a second after its last run."""
    env = {k: v for k, v in os.environ.items() if k not in warmstart.BATCH_ENV}
    env.update(STEEREXP_SERVER="1", STEEREXP_SERVER_DIR=str(tmp_path / "servers"), WANDB_MODE="disabled")
    folder = warmstart.server_dir(env)  # this installation's subfolder

    def start(idle: str) -> int:
        subprocess.run([sys.executable, "-m", "steerexp.warmstart", "start", "--wait", f"--idle={idle}"], env=env,
                       check=True, capture_output=True, timeout=120)
        assert client_socket_path(env).exists()
        return int(next(folder.glob("*.pid")).read_text())

    def gone(pid: int) -> bool:
        deadline = time.time() + 30
        while Path(f"/proc/{pid}").exists() and time.time() < deadline:
            time.sleep(0.1)
        return not Path(f"/proc/{pid}").exists()

    def help_served(**extra) -> bool:
        before = served_lines(folder)
        out = subprocess.run([STEERXP, "--help"], cwd=tmp_path, env=dict(env, **extra), capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "Configuration groups" in out.stdout, out.stderr[-2000:]
        return served_lines(folder) > before

    pid = start("300")
    assert help_served() and not help_served(STEEREXP_SERVER="0")
    assert help_served(STEEREXP_SERVER="auto")  # auto: a server that is up serves scripts too
    # but not a batch job (the run stays in the job's limits)
    assert not help_served(STEEREXP_SERVER="auto", SLURM_JOB_ID="12")
    assert warmstart.stop(folder) == [pid] and gone(pid)
    assert list(folder.glob("*.sock")) == [] and list(folder.glob("*.pid")) == []
    assert not help_served(STEEREXP_SERVER="auto")  # nothing serves: fresh (and, not on a terminal, starts none)
    pid = start("1")
    assert gone(pid) and list(folder.glob("*.sock")) == []


def served_lines(folder: Path) -> int:
    return sum(log.read_text().count(" served pid ") for log in folder.glob("*.log"))


def client_socket_path(env: dict) -> Path:
    """The socket a `steerexp` with this environment connects to (computed in a fresh process, as the console
    script's: the pytest process's own sys.path differs)."""
    out = subprocess.run([sys.executable, "-c", "from steerexp import warmstart; print(warmstart.socket_path("
                          "warmstart.key()))"], env=env, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_a_folder_others_can_write_in_is_never_used(tmp_path):
    import socket

    env = dict(os.environ, STEEREXP_SERVER="1", STEEREXP_SERVER_DIR=str(tmp_path / "shared"))
    folder = warmstart.server_dir(env)
    warmstart.make_private(folder)
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a socket at the very path a command would use
    planted.bind(str(client_socket_path(env)))
    planted.listen(1)
    planted.setblocking(False)
    folder.chmod(0o777)  # e.g. made by someone else in /tmp: the socket could be theirs
    out = subprocess.run([STEERXP, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Configuration groups" in out.stdout  # run fresh
    with pytest.raises(BlockingIOError):
        planted.accept()  # it never connected
    folder.chmod(0o700)
    proc = subprocess.Popen([STEERXP, "--help"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    planted.setblocking(True)
    planted.settimeout(30)
    planted.accept()[0].close()  # the same socket in a private folder is connected to (the check above could fail)
    planted.close()
    assert proc.communicate(timeout=120)[0].count("Configuration groups") == 1  # hung up on: it ran fresh
    folder.chmod(0o777)
    with pytest.raises(SystemExit, match="is not this user's alone; remove it or set STEEREXP_SERVER_DIR"):
        warmstart.make_private(folder)
    old = os.umask(0o002)  # a umask that leaves folders group-writable: the ones warmstart makes are 0700 anyway
    try:
        made = tmp_path / "a" / "b" / "c"
        warmstart.make_private(made)
        assert warmstart.private(made) and all((m.stat().st_mode & 0o777) == 0o700 for m in (made, made.parent))
    finally:
        os.umask(old)
    long = {"STEEREXP_SERVER_DIR": str(tmp_path / ("x" * 120))}  # sockets take at most 107 bytes of path
    assert len(str(warmstart.socket_path(warmstart.key(long), long))) < 100


def test_a_command_from_a_terminal_starts_a_server_and_the_next_is_served_on_that_terminal(shipped, tmp_path):
    """No settings (STEEREXP_SERVER unset: auto): a fresh command on a terminal starts a server when it ends; the
    next command is served, and its progress bar (drawn only on a terminal) reaches the terminal."""
    import pty
    import threading

    env = {k: v for k, v in os.environ.items() if k not in (*warmstart.BATCH_ENV, "STEEREXP_SERVER")}
    env.update(STEEREXP_SERVER_DIR=str(tmp_path / "servers"), WANDB_MODE="disabled")
    folder = warmstart.server_dir(env)

    def on_terminal(args):
        main, sub = pty.openpty()
        proc = subprocess.Popen([STEERXP, *args], cwd=tmp_path, env=env, stdin=sub, stdout=sub, stderr=sub)
        os.close(sub)
        chunks = []

        def read():
            while True:
                try:
                    data = os.read(main, 4096)
                except OSError:  # EIO: every writer closed the terminal
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=read)
        reader.start()
        proc.wait(timeout=300)
        reader.join(timeout=60)
        os.close(main)
        return proc.returncode, b"".join(chunks).decode(errors="replace")

    code, text = on_terminal(["--help"])
    assert code == 0 and "Configuration groups" in text
    path = client_socket_path(env)
    deadline = time.time() + 120
    while not warmstart._alive(path) and time.time() < deadline:
        time.sleep(0.1)
    assert warmstart._alive(path), (folder / f"{path.stem}.log").read_text()[-2000:]
    try:
        code, text = on_terminal(["logger=none", "evaluator=[]", "technique.steps=30", "hydra.run.dir=served"])
        assert code == 0, text[-3000:]
        # the bar (on a terminal that reports no size: 0 x 0) and the metrics, on the terminal
        assert "training: 100%" in text and "30/30 steps" in text and "run directory: " in text
        log = (folder / f"{path.stem}.log").read_text()
        assert "steerexp logger=none evaluator=[] technique.steps=30 hydra.run.dir=served -> exit 0" in log
    finally:
        warmstart.stop(folder)


def test_ignored_hangups_stay_ignored_and_a_killed_run_kills_its_client_the_same_way(shipped, server, tmp_path):
    """`nohup steerexp ... &`: SIGHUP ignored by the client is ignored by the run (a fresh process inherits that),
    so the run completes. A run killed by a signal (the OOM killer's SIGKILL) ends its client by the same signal."""
    probe = tmp_path / "probe.json"
    args = ["logger=none", "evaluator=[]", "technique.steps=60", "trainer.checkpoint_every=5", "hydra.run.dir=nohup"]
    proc = subprocess.Popen([STEERXP, *args], cwd=tmp_path, env=dict(server["env"], PROBE_FILE=str(probe)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    ckpt = tmp_path / "nohup" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)  # ignored by the client: nothing forwarded
    (run,) = server_children(server["pid"])
    os.kill(run, signal.SIGHUP)  # and ignored by the run itself, as a fresh process would inherit it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "run directory:" in out, err[-3000:]
    assert json.loads(probe.read_text())["ppid"] == server["pid"]

    proc, _ = long_run(server, tmp_path, "oom")
    (run,) = server_children(server["pid"])
    os.kill(run, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_the_key_follows_what_a_forked_run_could_not_take_on(tmp_path):
    """Niceness and limits are inherited, and a fork cannot undo a server's (raising them back needs privileges):
    a command with other settings has another key, so it starts (and gets) a server of its own settings."""
    import resource

    def key_with(setup) -> str:
        def preexec():
            setup()
        out = subprocess.run([sys.executable, "-c", "from steerexp import warmstart; print(warmstart.key())"],
                             capture_output=True, text=True, check=True, preexec_fn=preexec)
        return out.stdout.strip()

    plain = key_with(lambda: None)
    assert key_with(lambda: None) == plain
    assert key_with(lambda: os.nice(5)) != plain
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert key_with(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))) != plain


def test_ctrl_z_stops_the_run_with_its_client_and_fg_resumes_both(shipped, server, tmp_path):
    """The run is in a session of its own, so no terminal stops it: the client's SIGTSTP stops the run (SIGSTOP),
    then the client; SIGCONT to the client (`fg`) resumes the run, which then trains on."""
    def state(pid: int) -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    def wait_for(check) -> bool:
        deadline = time.time() + 30
        while not check() and time.time() < deadline:
            time.sleep(0.05)
        return check()

    # the client in a process group of its own in pytest's session, as a shell runs a job: the kernel discards a
    # SIGTSTP sent to a process of an orphaned group (pytest's own, when pytest was started in the background)
    proc, _ = long_run(server, tmp_path, "paused", process_group=0)
    (run,) = server_children(server["pid"])
    proc.send_signal(signal.SIGTSTP)
    assert wait_for(lambda: state(run) == "T" and state(proc.pid) == "T")
    ckpt = tmp_path / "paused" / "checkpoints" / "last.ckpt"
    stopped_at = ckpt.stat().st_mtime_ns
    proc.send_signal(signal.SIGCONT)
    assert wait_for(lambda: state(run) != "T" and state(proc.pid) != "T")
    assert wait_for(lambda: ckpt.stat().st_mtime_ns != stopped_at)  # training goes on: a new checkpoint
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
