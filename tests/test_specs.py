"""Each part owns its rules (steerexp/spec.py): a technique defined only here, with a spec and nothing else,
gets the same one-line errors as every built-in, with no edit anywhere else. This test is the contract."""
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from steerexp import preflight
from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.base_spec import TechniqueSpec
from steerexp.validate import validate


@register("technique", "only_in_tests")
@dataclass
class OnlyInTestsSpec(TechniqueSpec):
    _target_: str = "tests.test_specs.OnlyInTests"
    weight: float = 1.0
    mode: str = "soft"
    slot_word: str = "circle"

    def check(self, key: str) -> None:
        self.positive(key, "weight", 1.0)
        self.one_of(key, "mode", ("soft", "hard"))


@pytest.fixture
def conf(tmp_path, monkeypatch):
    folder = tmp_path / "conf" / "technique"
    folder.mkdir(parents=True)
    (folder / "only_in_tests.yaml").write_text("defaults:\n  - /schema/technique/only_in_tests@_here_\n  - _self_\n")
    monkeypatch.setenv("STEEREXP_ALLOW_TARGETS", "tests.test_specs.")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "conf"


def _check(conf, *overrides):
    plan = preflight.check_argv(["--config-dir", str(conf), "technique=only_in_tests", "evaluator=[concept]",
                                 *overrides])
    return validate(plan.cfg)


def test_the_spec_s_defaults_and_type_reach_the_composed_config(conf):
    plan = preflight.check_argv(["--config-dir", str(conf), "technique=only_in_tests"])
    assert plan.cfg.technique.weight == 1.0 and plan.cfg.technique.mode == "soft"
    _check(conf)   # the defaults pass


@pytest.mark.parametrize("override,key,text", [
    ("technique.weight=-1", "technique.weight", "must be > 0"),          # a range: the spec's check()
    ("technique.weight=nan", "technique.weight", "finite"),
    ("technique.mode=bogus", "technique.mode", "must be one of soft, hard"),   # an enum
    ("technique.weight=abc", "technique.weight", "must be a number"),    # a type: Hydra, at compose
    ("technique.wieght=2", "technique.wieght", "did you mean technique.weight"),   # an unknown key
    ("+technique.wieght=2", "technique.wieght", "did you mean technique.weight"),  # ... appended
])
def test_a_spec_alone_gives_one_line_errors(conf, override, key, text):
    with pytest.raises(ConfigError) as err:
        _check(conf, override)
    assert err.value.key == key and text in str(err.value) and "\n" not in str(err.value)


def test_spec_modules_import_no_torch():
    code = ("import sys; from steerexp.spec import register_all; register_all(); "
            "print([m for m in ('torch', 'lightning', 'diffusers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_every_shipped_technique_has_a_spec():
    """A new technique under conf/technique/ is covered, or this fails: its yaml extends a registered spec."""
    from steerexp import conf_dir
    from steerexp.spec import spec_of
    from tests.helpers import compose_config

    missing = [p.stem for p in sorted((conf_dir() / "technique").glob("*.yaml"))
               if spec_of(compose_config([f"technique={p.stem}"]).technique) is None]
    assert missing == [], f"techniques without a spec: {missing}"
