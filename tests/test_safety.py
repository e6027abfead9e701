"""A config cannot run arbitrary code: only allowlisted `_target_`s instantiate, and each payload
that ran before is refused before it has any effect."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steerexp import safety
from steerexp.errors import ConfigError
from tests.helpers import compose_config, pickle_payload

STEERXP = str(Path(sys.executable).parent / "steerexp")


def _cli(args, cwd, env=None):
    return subprocess.run([STEERXP, *args, "logger=none"], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


def test_shell_command_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "FILE"
    out = _cli(["+evaluator.x._target_=distutils.spawn.spawn", f'+evaluator.x.cmd=[sh,-c,"id > {marker}"]'], tmp_path)
    assert out.returncode != 0
    assert "evaluator.x._target_" in out.stderr and "distutils.spawn.spawn" in out.stderr
    assert not marker.exists()


def test_builtins_open_payload_leaves_the_file_alone(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    out = _cli(["+evaluator.x._target_=builtins.open", f"+evaluator.x.file={victim}", "+evaluator.x.mode=w"], tmp_path)
    assert out.returncode != 0 and "builtins.open" in out.stderr
    assert victim.read_text() == "keep me"


def test_payload_inside_a_shared_preset_is_refused(tmp_path):
    marker = tmp_path / "FILE"
    presets = tmp_path / "shared_conf" / "experiment"
    presets.mkdir(parents=True)
    (presets / "evil.yaml").write_text(
        "# @package _global_\n"
        "evaluator:\n"
        "  x:\n"
        "    _target_: subprocess.run\n"
        f"    args: [sh, -c, 'touch {marker}']\n")
    out = _cli(["--config-dir", str(tmp_path / "shared_conf"), "experiment=evil"], tmp_path)
    assert out.returncode != 0 and "evaluator.x._target_" in out.stderr and "subprocess.run" in out.stderr
    assert not marker.exists()


def test_payload_in_hydra_s_own_nodes_is_refused(tmp_path):
    """Hydra instantiates its callbacks before the task: the guard covers its instantiation too."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    out = _cli(["+hydra.callbacks.x._target_=builtins.open", f"+hydra.callbacks.x.file={victim}",
                "+hydra.callbacks.x.mode=w"], tmp_path)
    assert out.returncode != 0 and "builtins.open" in out.stderr
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("override", [
    "technique._target_=builtins.print",
    "+evaluator.x._target_=torch.load",
    "generator._target_=os.system",
])
def test_each_payload_is_refused_before_anything_is_built(override):
    cfg = compose_config([override])
    key = override.split("=")[0].lstrip("+")
    with pytest.raises(ConfigError, match=rf"^{key}: _target_ .* is not allowlisted"):
        safety.check_targets(cfg)


def test_torch_load_pickle_payload_never_runs(shipped, tmp_path):
    from steerexp.run import build

    marker = tmp_path / "pwned"

    evil = tmp_path / "evil.pt"
    torch.save({"x": pickle_payload(marker)}, evil)
    cfg = compose_config(
        ["+evaluator.x._target_=torch.load", f"+evaluator.x.f={evil}", "+evaluator.x.weights_only=false"]
    )
    with pytest.raises(ConfigError, match=r"evaluator\.x.*_target_.*torch\.load"):  # build's instantiate guard
        build(cfg)
    assert not marker.exists()


def test_aliases_through_steerexp_modules_are_refused(shipped):
    """`steerexp.run.torch.load` starts with "steerexp." but is torch's function."""
    from hydra.utils import instantiate

    safety.install_guard()
    with pytest.raises(ConfigError, match=r"resolves to torch\..*not steerexp code"):
        instantiate({"_target_": "steerexp.run.torch.load", "f": "/dev/null"})


def test_hydra_instantiation_of_other_code_is_refused_by_the_guard():
    from hydra.utils import instantiate

    safety.install_guard()
    with pytest.raises(ConfigError, match="builtins.print"):
        instantiate({"_target_": "builtins.print", "_args_": ["should not print"]})
    assert instantiate({"_target_": "steerexp.objectives.denoising.Denoising"}) is not None


def test_the_user_opts_in_from_the_environment_only(monkeypatch):
    cfg = compose_config(["+evaluator.mine._target_=mylab.judges.Judge"])
    with pytest.raises(ConfigError, match=safety.ALLOW_ENV):
        safety.check_targets(cfg)
    monkeypatch.setenv(safety.ALLOW_ENV, "mylab.judges.")
    safety.check_targets(cfg)  # allowed now
    monkeypatch.setenv(safety.ALLOW_ENV, "mylab.judges.Other")
    with pytest.raises(ConfigError):
        safety.check_targets(cfg)


def test_a_user_classifier_factory_is_code_and_needs_the_allowlist(monkeypatch):
    from steerexp.scorers import load_user_classifier

    with pytest.raises(ConfigError, match="scorers.user.path.*'os.system'"):
        load_user_classifier("os:system")


def test_every_shipped_config_passes_the_allowlist():
    from steerexp import conf_dir

    for option in sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml")):
        safety.check_targets(compose_config([f"experiment={option}"]))
    for group in ("technique", "objective", "evaluator", "generator"):
        for option in sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")):
            override = f"{group}=[{option}]" if group in ("evaluator",) else f"{group}={option}"
            safety.check_targets(compose_config([override]))
