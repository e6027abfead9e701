"""Nothing lost, nothing silently wrong: exact resume after SIGKILL, evaluating a checkpoint with
technique.steps=0, clear errors for checkpoints that do not fit, and Ctrl-C that says how to resume."""
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steerexp.errors import ConfigError
from steerexp.run import run
from tests.helpers import compose_config, pickle_payload

STEERXP = str(Path(sys.executable).parent / "steerexp")
# a short training run whose evaluation is tiny, so the test measures training
QUICK = ["logger=none", "evaluator=[concept]", "eval.seeds=[0]", "eval.prompts=['a photo of a {}']",
         "sampling.steps=2", "trainer.checkpoint_every=10", "technique.batch_size=2"]


def _run_in_process(tmp_path, overrides, name):
    cfg = compose_config(QUICK + overrides)
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True)
    return run(cfg, run_dir, name, "tests"), run_dir


def _default_sigint() -> None:
    # a background job of a non-interactive shell (`pytest &`) starts with SIGINT ignored, which exec keeps:
    # the Ctrl-C test would then interrupt nothing
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args, cwd, **kw):
    return subprocess.Popen([STEERXP, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **kw)


def _run_dir_of(stdout: str) -> Path:
    return Path([l for l in stdout.splitlines() if l.startswith("run directory:")][-1].split(":", 1)[1].strip())


def _wait_for(path: Path, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("technique", [pytest.param("textual_inversion", marks=pytest.mark.slow), "prompt_delta",
                                       pytest.param("xti", marks=pytest.mark.slow),
                                       pytest.param("neti", marks=pytest.mark.slow)])   # the default suite: one
def test_resume_after_sigkill_gives_bit_identical_deltas(shipped, tmp_path, technique):
    steps = 60 if technique == "textual_inversion" else 12
    every = 10 if technique == "textual_inversion" else 3
    extra = [f"technique={technique}", f"technique.steps={steps}", f"trainer.checkpoint_every={every}"]
    if technique == "prompt_delta":  # a bounded budget, so that the projection is part of the trajectory
        extra += ["objective=[concept_score]", "technique.train_sampling_steps=2", "technique.budget.eps_text=0.5",
                  "technique.lr=0.5"]
    _, straight = _run_in_process(tmp_path, extra, "straight")

    # the same run, killed (SIGKILL) after its first checkpoint and resumed from its last.ckpt
    proc = _cli(QUICK + extra + ["hydra.run.dir=killed"], cwd=tmp_path)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert _wait_for(ckpt, proc), proc.communicate()[1][-3000:]
    time.sleep(0.3)  # let the checkpoint be written completely
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    killed_at = torch.load(ckpt, weights_only=True)["global_step"]
    assert 0 < killed_at < steps
    resumed = subprocess.run([STEERXP, *QUICK, *extra, f"ckpt_path={ckpt}", "hydra.run.dir=resumed"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = load_file(straight / "deltas.safetensors"), load_file(tmp_path / "resumed" / "deltas.safetensors")
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming from step {killed_at}"
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps


def test_steps_zero_with_a_checkpoint_evaluates_its_deltas(shipped, tmp_path):
    _, trained = _run_in_process(tmp_path, ["technique.steps=12"], "trained")
    learned = load_file(trained / "deltas.safetensors")["embeddings"]
    assert not torch.equal(learned, load_file(trained / "deltas.safetensors")["initial"])
    for source in (trained / "checkpoints" / "last.ckpt", trained / "deltas.safetensors"):
        metrics, evaluated = _run_in_process(
            tmp_path, ["technique.steps=0", f"ckpt_path={source}"], f"eval_{source.suffix[1:]}"
        )
        assert torch.equal(load_file(evaluated / "deltas.safetensors")["embeddings"], learned)
        assert "concept/target_rate/edited" in metrics
        assert not (evaluated / "checkpoints").exists()  # nothing was trained


def test_checkpoints_that_do_not_fit_are_one_clear_error(shipped, tmp_path):
    _, trained = _run_in_process(tmp_path, ["technique.steps=2", "technique.num_vectors=2"], "two")
    ckpt = trained / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["steerexp"]["structure"] == {"num_vectors": 2}
    # from its JSON sidecar, before anything loads
    with pytest.raises(ConfigError, match=r"technique.num_vectors: the checkpoint was trained with "
                                          r"technique.num_vectors=2, this run has 1; set technique.num_vectors=2"):
        _run_in_process(tmp_path, ["technique.steps=4", f"ckpt_path={ckpt}"], "one")
    Path(f"{ckpt}.json").unlink()  # without its sidecar (an older checkpoint): the same refusal where it loads
    with pytest.raises(ConfigError, match=r"technique.num_vectors=2 there, 1 here.*set technique.num_vectors"):
        _run_in_process(tmp_path, ["technique.steps=4", f"ckpt_path={ckpt}"], "one_old")
    with pytest.raises(ConfigError, match=r"ckpt_path.*written by steerexp.techniques.textual_inversion"):
        _run_in_process(
            tmp_path,
            ["technique=prompt_delta", "objective=[concept_score]", "technique.steps=0", f"ckpt_path={ckpt}"],
            "other",
        )
    with pytest.raises(ConfigError, match="ckpt_path: .*no such checkpoint file"):
        _run_in_process(tmp_path, ["technique.steps=0", f"ckpt_path={tmp_path / 'nope.ckpt'}"], "missing")


def test_checkpoints_load_without_pickle(shipped, tmp_path):
    """A .ckpt that carries a pickled object is refused (weights_only=True), and its code never runs."""
    marker = tmp_path / "pwned"

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": pickle_payload(marker)}, evil)
    with pytest.raises(ConfigError, match="not a readable weights-only checkpoint"):
        _run_in_process(tmp_path, ["technique.steps=0", f"ckpt_path={evil}"], "evil")
    assert not marker.exists()


def test_ctrl_c_prints_the_last_good_deltas_and_the_exact_resume_command(shipped, tmp_path):
    args = QUICK + ["technique.steps=4000", "hydra.run.dir=interrupted"]
    proc = _cli(args, cwd=tmp_path)
    assert _wait_for(tmp_path / "interrupted" / "checkpoints" / "last.ckpt", proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    run_dir = tmp_path / "interrupted"
    assert f"last good deltas: {run_dir / 'deltas.safetensors'}" in err
    assert (run_dir / "deltas.safetensors").is_file()
    line = [l for l in err.splitlines() if "resume exactly" in l][0]
    command = shlex.split(line.split(": ", 1)[1])
    assert command[0] == "steerexp" and f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in command
    assert set(a for a in args if not a.startswith("hydra.")) <= set(command[1:])  # the same overrides (a new run dir)
    assert json.loads((run_dir / "metrics.json").read_text())["run/failed"] is True


def _default_signals() -> None:
    # the child must not inherit an ignored SIGTERM/SIGINT (nohup, background jobs): the test sends them
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_DFL)


def test_sigterm_during_training_keeps_a_whole_step_and_says_how_to_resume(shipped, tmp_path):
    """What SLURM, Kubernetes and `timeout` send: the run stops at the end of its step, writes last.ckpt there,
    keeps the last good deltas and its metrics, prints the resume command and exits 143."""
    args = QUICK + ["technique.steps=4000", "hydra.run.dir=termed"]
    proc = subprocess.Popen([STEERXP, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
    run_dir = tmp_path / "termed"
    assert _wait_for(run_dir / "checkpoints" / "last.ckpt", proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM at step" in err
    step = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert saved == step   # the checkpoint of the step reached, not the last multiple of checkpoint_every
    assert (run_dir / "deltas.safetensors").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["run/failed"] is True
    line = [l for l in err.splitlines() if "resume exactly" in l][0]
    assert f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in line


def test_sigterm_during_evaluation_writes_the_metrics_so_far(shipped, tmp_path):
    args = ["logger=none", "technique.steps=2", "technique.batch_size=1", "sampling.steps=2",
            "evaluator=[concept]", f"eval.seeds=[{','.join(map(str, range(2000)))}]", "hydra.run.dir=eval_termed"]
    proc = subprocess.Popen([STEERXP, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
    run_dir = tmp_path / "eval_termed"
    assert _wait_for(run_dir / "deltas.safetensors", proc), proc.communicate()[1][-3000:]  # learned: evaluating now
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run/failed"] is True and metrics["generator/unchanged"] is True
    assert "delta_norm/embeddings" in metrics and "params/trainable" in metrics   # learned before the signal


@pytest.mark.slow   # 33 s; SIGTERM's stop at a step boundary stays in the default suite (the tests above)
def test_preemption_checkpoints_and_the_next_start_resumes_exactly(shipped, tmp_path):
    """preempt_signal=USR1: stop at the end of the step, PREEMPTED, exit 138; the same command started again in
    the same run directory resumes there and ends bit-identical to a run never interrupted."""
    args = QUICK + ["technique.steps=60", "preempt_signal=USR1", "hydra.run.dir=pre"]
    proc = subprocess.Popen([STEERXP, *args, "technique.steps=4000"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    run_dir = tmp_path / "pre"
    assert _wait_for(run_dir / "checkpoints" / "last.ckpt", proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert (run_dir / "PREEMPTED").is_file() and "pre-empted" in err
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < 60, "stop earlier in the run for this test to mean anything"
    again = subprocess.run([STEERXP, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the pre-empted run" in again.stderr and not (run_dir / "PREEMPTED").exists()
    whole = subprocess.run([STEERXP, *QUICK, "technique.steps=60", "hydra.run.dir=whole"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = load_file(run_dir / "deltas.safetensors"), load_file(tmp_path / "whole" / "deltas.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# slow: three real runs; the refusal itself is tested in-process in tests/test_preflight.py
@pytest.mark.slow
def test_a_run_dir_that_holds_a_run_is_never_replaced(shipped, tmp_path):
    args = QUICK + ["technique.steps=2", "hydra.run.dir=once"]
    first = subprocess.run([STEERXP, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (tmp_path / "once" / "metrics.json").read_bytes()
    second = subprocess.run([STEERXP, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 2 and second.stderr.startswith("steerexp: error: hydra.run.dir:"), second.stderr
    assert (tmp_path / "once" / "metrics.json").read_bytes() == before
    third = subprocess.run([STEERXP, *args, "overwrite=true"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]


def test_installing_twice_keeps_the_scheduler_s_handler(monkeypatch):
    """Every job of an in-process sweep installs the stop handlers; the handler a scheduler had installed before
    (submitit's requeue) is still the one a pre-emption hands over to."""
    from steerexp import shutdown

    calls = []
    scheduler = lambda signum, frame: calls.append(signum)  # noqa: E731
    monkeypatch.setattr(shutdown, "_previous", {})
    for name, value in (("training", True), ("pending", None), ("received", None)):  # our handler would only
        monkeypatch.setattr(shutdown, name, value)                                 # mark a pending stop
    old = signal.signal(signal.SIGUSR1, scheduler)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        shutdown.install("USR1")
        shutdown.install("USR1")
        monkeypatch.setattr(shutdown, "preempt", signal.SIGUSR1)
        assert shutdown.requeue() == "handed to the scheduler's handler" and calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)
        signal.signal(signal.SIGTERM, old_term)
