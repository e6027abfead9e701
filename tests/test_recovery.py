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


@pytest.mark.parametrize("technique", ["textual_inversion", "prompt_delta"])
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
    with pytest.raises(ConfigError, match=r"technique.num_vectors=2 there, 1 here.*set technique.num_vectors"):
        _run_in_process(tmp_path, ["technique.steps=4", f"ckpt_path={ckpt}"], "one")
    with pytest.raises(ConfigError, match=r"ckpt_path.*written by steerexp.techniques.textual_inversion"):
        _run_in_process(
            tmp_path,
            ["technique=prompt_delta", "objective=[concept_score]", "technique.steps=0", f"ckpt_path={ckpt}"],
            "other",
        )
    with pytest.raises(ConfigError, match="ckpt_path: checkpoint not found"):
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
