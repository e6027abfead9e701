"""What a researcher sees on the console (issue 18): a default run prints its metrics and its run
directory and nothing else (no library warnings, no loading bars); on a terminal, progress bars for
training and for every evaluation phase, and none when the output is not a terminal."""
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from steerexp import progress

STEERXP = str(Path(sys.executable).parent / "steerexp")
# the default job (TI + concept, leakage, clip, memorisation + W&B offline), briefly
BRIEF = ["technique.steps=3", "technique.batch_size=2", "eval.seeds=[0]", "eval.prompts=['a photo of a {}']",
         "sampling.steps=2"]


def user_env(**extra) -> dict:
    """The environment a user's shell has: none of the test suite's W&B settings, no warning filters."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PYTHONWARNINGS", "HYDRA_FULL_ERROR"))}
    env.update(CUDA_VISIBLE_DEVICES="", **extra)
    return env


def sized(fd: int) -> int:
    """Give a pseudo-terminal a size, as every real terminal has (a fresh pty is 0 x 0)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    return fd


def metrics_and_run_dir(stdout: str) -> tuple[dict, Path]:
    """stdout is the metrics (one JSON object) then `run directory: <dir>`, and nothing else."""
    *metrics, last = stdout.rstrip("\n").split("\n")
    assert last.startswith("run directory: "), stdout
    return json.loads("\n".join(metrics)), Path(last.split(": ", 1)[1])


def test_the_default_job_prints_only_its_metrics_and_run_directory(shipped, tmp_path):
    args = [*BRIEF, "evaluator.leakage.prompts=['a red circle']", "hydra.run.dir=run"]
    out = subprocess.run([STEERXP, *args], cwd=tmp_path, capture_output=True, text=True,
                         env=user_env(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == "", f"the console should hold no warnings or bars:\n{out.stderr[-3000:]}"
    metrics, run_dir = metrics_and_run_dir(out.stdout)
    assert run_dir == tmp_path / "run" or run_dir == Path("run")
    assert metrics["generator/unchanged"] is True and "concept/target_rate/edited" in metrics
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "the default logs to W&B offline"


def test_verbose_brings_the_libraries_logs_back(shipped, tmp_path):
    out = subprocess.run([STEERXP, *BRIEF, "logger=none", "evaluator=[concept]", "verbose=true", "hydra.run.dir=v"],
                         cwd=tmp_path, capture_output=True, text=True, env=user_env(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.strip(), "verbose=true shows the libraries' logs (diffusers / transformers loading)"
    metrics_and_run_dir(out.stdout)


# ------------------------------------------------------------------ progress bars, in process
@pytest.fixture
def pty_stream():
    """A text stream on a pseudo-terminal (read continuously, so a full terminal buffer never blocks the
    writer), and a function returning what was written to it so far. The test itself makes it sys.stderr:
    pytest's output capture sets sys.stderr again between a fixture's setup and the test."""
    parent, child = pty.openpty()
    sized(parent)
    stream = io.TextIOWrapper(os.fdopen(child, "wb", buffering=0), write_through=True)
    assert stream.isatty()
    chunks, done = [], threading.Event()

    def drain() -> None:
        while not done.is_set():
            if select.select([parent], [], [], 0.05)[0]:
                chunks.append(os.read(parent, 65536))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    def read() -> str:
        time.sleep(0.2)
        return b"".join(chunks).decode(errors="replace")

    yield stream, read
    done.set()
    reader.join()
    stream.close()
    os.close(parent)


def test_auto_bars_follow_the_terminal_and_sweeps(monkeypatch):
    progress.configure("auto")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.enabled()  # a pipe, a file, CI
    parent, child = pty.openpty()
    try:
        with os.fdopen(child, "w") as tty:
            monkeypatch.setattr(sys, "stderr", tty)
            assert progress.enabled()
            monkeypatch.setattr(progress, "in_sweep", lambda: True)
            assert not progress.enabled()  # a sweep job: no bars, even on a terminal
    finally:
        os.close(parent)
    progress.configure("true")
    assert progress.enabled()
    progress.configure("false")
    monkeypatch.setattr(progress, "in_sweep", lambda: False)
    assert not progress.enabled()
    with pytest.raises(ValueError, match="progress must be one of"):
        progress.configure("sometimes")
    progress.configure("auto")


def test_fractional_advances_never_pass_the_total(pty_stream, monkeypatch, recwarn):
    """Images advance per denoising step (n / steps): their float sum may overshoot the total."""
    stream, read = pty_stream
    monkeypatch.setattr(sys, "stderr", stream)
    progress.configure("true")
    try:
        with progress.phase("x", 2) as bar:
            for _ in range(7):  # 7/6 of the total
                progress.advance(2 / 6)
            assert bar.n <= 2 and bar.n == pytest.approx(2)
    finally:
        progress.configure("auto")
    assert not [w for w in recwarn if "clamping" in str(w.message)]
    assert "2/2 images" in read()


@pytest.mark.parametrize("mode, sweep", [("MULTIRUN", True), ("RUN", False)])
def test_a_job_of_a_sweep_knows_it_is_one(mode, sweep):
    """Every launcher runs a sweep's jobs with the sweep's Hydra config (in process or in its workers)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from steerexp import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.mode={mode}"], return_hydra_config=True)
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        assert progress.in_sweep() is sweep
    finally:
        HydraConfig.instance().cfg = previous


def _train_and_sample(gen, placeholder, steps=4):
    """A few TI steps and the paired samples of 2 prompts x 2 seeds (the module's generator is shared: a new
    placeholder token each time)."""
    from steerexp.evaluators.base import EvalContext
    from steerexp.techniques.textual_inversion import TextualInversion
    from steerexp.trainer import fit

    tech = TextualInversion(gen, steps=steps, batch_size=2, targets={"k": 2}, placeholder=placeholder,
                            sampling={"steps": 2, "guidance_scale": 5.0})
    tech.prepare()
    fit({"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1}, tech, [], None, None, None)
    EvalContext(tech, ["a photo of a {}", "a {}"], [0, 1]).paired()
    return tech


def test_on_a_terminal_training_and_sampling_draw_bars(gen, pty_stream, monkeypatch):
    stream, read = pty_stream
    monkeypatch.setattr(sys, "stderr", stream)
    progress.configure("auto")
    _train_and_sample(gen, "<tty-test>")
    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", read())
    assert re.search(r"training: 100%.*4/4 steps.*loss=[0-9.e+-]+.*\|delta\|=[0-9.e+-]+", shown), shown
    # the paired samples: 2 prompts x 2 seeds, baseline + edited = 8 images, counted as they denoise
    assert re.search(r"samples: 2 prompts x 2 seeds, baseline \+ edited: 100%.*8/8 images", shown), shown


def test_without_a_terminal_nothing_is_drawn(gen, capfd):
    progress.configure("auto")
    capfd.readouterr()
    _train_and_sample(gen, "<pipe-test>")
    err = capfd.readouterr().err
    assert "training" not in err and "images" not in err and "\r" not in err, err


# ------------------------------------------------------------------ the whole CLI on a pseudo-terminal
@pytest.mark.slow
def test_the_cli_on_a_terminal_shows_bars_then_the_metrics(shipped, tmp_path):
    pid, fd = pty.fork()
    if pid == 0:  # the child: steerexp with stdout and stderr on the terminal
        os.chdir(tmp_path)
        os.execve(STEERXP, [STEERXP, *BRIEF, "logger=none", "hydra.run.dir=tty"], user_env(TERM="xterm"))
    sized(fd)
    chunks, deadline = [], time.time() + 900
    while time.time() < deadline:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 0, shown[-3000:]
    assert re.search(r"training: 100%.*3/3 steps", shown), shown
    assert re.search(r"samples: .*: 100%.*images", shown), shown
    assert "warning" not in shown.lower() and "Loading pipeline components" not in shown, shown
    assert shown.rstrip().splitlines()[-1].startswith("run directory: ")
