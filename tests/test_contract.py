"""The contract of issue 30, section 0: generator x technique x objective x evaluator compose.

Every technique (conf/technique/*.yaml, enumerated here: a new one is covered or the test fails) runs with the
defaults: its own objective (`objective: auto`, its spec's default_objective) and the default evaluators, each of
which applies or switches to its documented alternative (memorisation against the world's protected set for a
technique without target images). Every technique x evaluator pair (conf/evaluator/*.yaml) either validates or is
refused in one line, before torch is imported. The end-to-end runs (`steerexp technique=X`, tiny) are marked slow.
"""
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from steerexp import combine, conf_dir, spec
from steerexp.errors import ConfigError
from steerexp.validate import validate
from tests.helpers import compose_config

TECHNIQUES = sorted(p.stem for p in (conf_dir() / "technique").glob("*.yaml"))
EVALUATORS = sorted(p.stem for p in (conf_dir() / "evaluator").glob("*.yaml"))
ROOT = Path(__file__).parents[1]


def only(cfg, evaluator: str):
    """`cfg` with the evaluator list [evaluator] (what `evaluator=[<evaluator>]` composes: the nodes are
    independent), composed once per technique instead of once per pair."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for name in [n for n in out.evaluator if n != evaluator]:
            del out.evaluator[name]
    return out


def outcome(cfg) -> ConfigError | None:
    """None when the config validates, else its one-line ConfigError."""
    try:
        validate(cfg)
    except ConfigError as err:
        assert "\n" not in str(err), str(err)
        return err
    return None


def technique_spec(technique: str):
    return combine.technique_spec(compose_config([f"technique={technique}"]))


# ============================================================================ fast: in-process, every pair
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_the_defaults_compose_into_a_run_that_works(technique):
    """`steerexp technique=X`: its own objective, and every default evaluator applies (or switches)."""
    cfg = compose_config([f"technique={technique}"])
    tech = combine.technique_spec(cfg)
    assert tech is not None, f"conf/technique/{technique}.yaml extends no spec (issue 30: every technique has one)"
    assert validate(cfg) == []
    assert cfg.objective.get("auto") is True   # validate leaves the composed config as it was
    combine.expand(cfg)
    if tech.trainable:
        assert tuple(cfg.objective.terms) == tech.default_objective
        assert not set(tech.default_objective) & set(tech.refuses_objective)
    else:
        assert cfg.objective is None   # training-free: no objective
    assert list(cfg.evaluator) == list(combine.default_evaluators())   # none of them skipped
    assert cfg.evaluator.memorisation.reference == ("targets" if tech.has_targets else "protected")
    assert validate(cfg) == [] and combine.expand(cfg) == []   # idempotent


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_every_evaluator_validates_or_is_refused_in_one_line(technique):
    cfg = compose_config([f"technique={technique}", f"evaluator=[{','.join(EVALUATORS)}]"])
    tech = combine.technique_spec(cfg)
    for name in EVALUATORS:
        pair = only(cfg, name)
        ev = spec.build(pair.evaluator[name], f"evaluator.{name}")
        err = outcome(pair)
        why = ev.applies(tech)
        if why is None:
            assert err is None, f"{technique} x {name}: {err}"
        else:
            assert err is not None and err.key.startswith(f"evaluator.{name}"), (technique, name, str(err))


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_a_listed_evaluator_composes_as_the_matrix_assumes(evaluator):
    """`evaluator=[E]` composed for real gives what `only()` gives, for the default technique."""
    real = compose_config([f"evaluator=[{evaluator}]"])
    assert OmegaConf.to_container(real.evaluator) == OmegaConf.to_container(
        only(compose_config([f"evaluator=[{','.join(EVALUATORS)}]"]), evaluator).evaluator)


def test_an_explicit_combination_that_cannot_work_is_refused_before_torch():
    """Refusals in one line, from the specs alone: no torch import (a fresh process), well under 2 s each."""
    cases = [
        (["technique=prompt_delta", "evaluator=[memorisation]", "evaluator.memorisation.reference=targets"],
         "evaluator.memorisation.reference"),
        (["technique=prompt_delta", "objective=[denoising]"], "objective"),
        (["technique=ddim_inversion", "evaluator=[magnitude]"], "evaluator.magnitude"),
        (["technique=textual_inversion", "evaluator=[edit]"], "evaluator.edit"),
        (["technique=guidance", "evaluator=[concept,nudging]"], "evaluator.nudging"),
    ]
    code = f"""
import json, sys, time
from steerexp.errors import ConfigError
from steerexp.validate import validate
from tests.helpers import compose_config
out = []
for overrides in {[c[0] for c in cases]!r}:
    start = time.time()
    try:
        validate(compose_config(overrides))
        out.append([None, None, time.time() - start])
    except ConfigError as err:
        out.append([err.key, str(err), time.time() - start])
print(json.dumps({{"results": out, "torch": "torch" in sys.modules}}))
"""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["torch"] is False
    for (overrides, key), (got, message, seconds) in zip(cases, found["results"]):
        assert got == key, (overrides, message)
        assert "\n" not in message
        assert seconds < 6.0, (overrides, seconds)   # <= 2 s on an idle machine; generous under load


def test_default_list_switches_and_skips_an_explicit_list_refuses():
    """memorisation: reference=auto switches to the protected set for a technique without target images (one
    line); with the default list an evaluator that cannot apply is dropped with a line saying why."""
    cfg = compose_config(["technique=guidance"])
    notes = combine.expand(cfg)
    assert cfg.evaluator.memorisation.reference == "protected"
    assert any("memorisation" in n and "protected" in n for n in notes) and all("\n" not in n for n in notes)
    cfg = compose_config(["technique=guidance", "evaluator.memorisation.reference=targets"])
    notes = combine.expand(cfg)
    assert "memorisation" not in cfg.evaluator and any("memorisation skipped" in n for n in notes)
    assert validate(cfg) == []
    ti = compose_config(["evaluator=[memorisation]"])
    combine.expand(ti)
    assert ti.evaluator.memorisation.reference == "targets"


def test_objective_auto_is_the_techniques_own_and_settings_apply_on_top():
    cfg = compose_config(["technique=prompt_delta", "objective.terms.delta_l2.weight=0.5"])
    combine.expand(cfg)
    assert list(cfg.objective.terms) == ["concept_score", "delta_l2"] and cfg.objective.terms.delta_l2.weight == 0.5
    assert cfg.objective.terms.concept_score.head == cfg.concept.head   # ${concept.head} resolves in the run
    cfg = compose_config(["technique=prompt_delta", "objective=[auto,proximity]"])
    combine.expand(cfg)
    assert list(cfg.objective.terms) == ["concept_score", "delta_l2", "proximity"]
    err = outcome(compose_config(["technique=prompt_delta", "objective=[auto,denoising]"]))
    assert err is not None and err.key == "objective" and "denoising" in str(err)
    cfg = compose_config(["technique=guidance", "objective=[concept_score]"])   # training-free: ignored, as before
    assert validate(cfg) == []


# ============================================================================ slow: every technique, end to end
def tiny(technique: str) -> list[str]:
    """Tiny settings for `technique`: the run's own (1 seed, 1 prompt, 2 sampling steps), and for each cost knob its
    spec declares, a small value (so a new technique gets them by naming its knobs as the others do)."""
    node = compose_config([f"technique={technique}"]).technique
    knobs = {"steps": 2, "batch_size": 2, "train_seeds": "[100]", "train_sampling_steps": 1, "inner_steps": 1,
             "candidates": 2, "top_k": 1, "beam_width": 1, "proposals": 2, "rounds": 1, "opt_steps": 1,
             "opt_sampling_steps": 1, "iterations": 1, "max_calls": 12, "nudge_batch": 2, "batch": 2}
    out = ["logger=none", "eval.seeds=[0]", "eval.prompts=['{}']", "sampling.steps=2"]
    out += [f"technique.{k}={v}" for k, v in knobs.items() if k in node]
    if isinstance(node.get("targets"), dict) or OmegaConf.is_dict(node.get("targets")):
        if "k" in node.targets:
            out.append("technique.targets.k=1")
    if node.get("seeds") is not None and OmegaConf.is_list(node.seeds):
        out.append("technique.seeds=[100]")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_every_technique_runs_with_its_defaults(technique, tmp_path):
    """`steerexp technique=X` with tiny settings runs to the end, and records the objective it used."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    env.pop("HYDRA_FULL_ERROR", None)
    run_dir = tmp_path / "run"
    args = [f"technique={technique}", *tiny(technique), f"hydra.run.dir={run_dir}"]
    start = time.time()
    res = subprocess.run([sys.executable, "-m", "steerexp.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900, env=env)
    assert res.returncode == 0, f"steerexp {' '.join(args)}\n{res.stderr[-3000:]}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["generator/unchanged"] is True, technique
    recorded = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    tech = technique_spec(technique)
    if tech.trainable:
        assert tuple(recorded.objective.terms) == tech.default_objective
    else:
        assert recorded.objective is None
    assert "auto" not in (recorded.evaluator.get("memorisation") or {}).get("reference", "")
    print(f"{technique}: {time.time() - start:.1f} s")
