"""The objective terms' and the evaluators' specs (objectives/*_spec.py, evaluators/*_spec.py): each yaml's node
extends its spec, so Hydra checks the types while composing, unknown keys are refused with the closest one, and the
ranges and cross-field rules answer in one line before anything loads."""
import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from steerexp import conf_dir, spec
from steerexp.errors import ConfigError
from steerexp.preflight import compose_error
from steerexp.validate import validate
from tests.helpers import compose_config

OBJECTIVES = sorted(p.stem for p in (conf_dir() / "objective").glob("*.yaml") if p.stem != "auto")
EVALUATORS = sorted(p.stem for p in (conf_dir() / "evaluator").glob("*.yaml"))
DELTA = ["technique=prompt_delta"]


def refused(overrides, key) -> str:
    """The one-line error of these overrides (at compose, as the CLI words it, or from validate)."""
    try:
        cfg = compose_config(overrides)
    except HydraException as err:
        one_line = compose_error(err)
        assert one_line is not None, str(err)
        error = one_line
    else:
        with pytest.raises(ConfigError) as info:
            validate(cfg)
        error = info.value
    assert error.key == key, str(error)
    assert "\n" not in str(error)
    return str(error)


@pytest.mark.parametrize("term", OBJECTIVES)
def test_every_term_node_extends_its_spec(term):
    cfg = compose_config([*DELTA, f"objective=[{term}]"])
    cls = spec.spec_of(cfg.objective.terms[term])
    assert cls is not None and cls.group == "objective" and cls.label == term
    assert cfg.objective._target_ == "steerexp.objectives.composite.Composite"


@pytest.mark.parametrize("name", EVALUATORS)
def test_every_evaluator_node_extends_its_spec(name):
    cfg = compose_config([f"evaluator=[{name}]"])
    cls = spec.spec_of(cfg.evaluator[name])
    assert cls is not None and cls.group == "evaluator" and cls.label == name


def test_unknown_keys_and_wrong_types_are_one_line():
    assert "did you mean evaluator.leakage.tolerance" in refused(["+evaluator.leakage.tolerence=0.2"],
                                                                  "evaluator.leakage.tolerence")
    assert "did you mean objective.terms.delta_l2.weight" in refused(
        [*DELTA, "+objective.terms.delta_l2.wieght=2"], "objective.terms.delta_l2.wieght")
    assert "a number" in refused(["evaluator.concept.threshold=abc"], "evaluator.concept.threshold")
    assert "true or false" in refused(["evaluator=[quality]", "evaluator.quality.fid=maybe"], "evaluator.quality.fid")
    assert "evaluator.concept.judge=classifier" in refused(["+evaluator.concept.scorer=classifier"],
                                                           "evaluator.concept.scorer")   # renamed


@pytest.mark.parametrize("overrides, key, text", [
    (["evaluator.concept.threshold=1.5"], "evaluator.concept.threshold", "(0, 1)"),
    (["evaluator.memorisation.reference=bogus"], "evaluator.memorisation.reference", "auto, targets, protected"),
    (["evaluator=[quality]", "evaluator.quality.reference_images=1"], "evaluator.quality.reference_images", ">= 2"),
    (["evaluator=[leakage]", "evaluator.leakage.tolerance=2"], "evaluator.leakage.tolerance", "[0, 1]"),
    (["technique=guidance", "evaluator=[magnitude]", "evaluator.magnitude.strengths=[]"],
     "evaluator.magnitude.strengths", "non-empty list"),
    (["technique=ddim_inversion", "evaluator=[edit]", "evaluator.edit.keep=[colour,shape]"], "evaluator.edit.keep",
     "edited head 'colour'"),
    (["technique=ddim_inversion", "evaluator=[inversion]", "evaluator.inversion.methods=[ddim_w1+p2p]"],
     "evaluator.inversion.methods[0]", "not an inversion method"),
    (["evaluator.leakage.judge=noisy"], "evaluator.leakage.judge", "noisy latents"),
    ([*DELTA, "objective=[denoising]"], "objective", "cannot learn from"),
    (["objective.terms.denoising.weight=-1"], "objective.terms.denoising.weight", ">= 0"),
    ([*DELTA, "objective=[concept_score]", "objective.terms.concept_score.weight=nan"],
     "objective.terms.concept_score.weight", ">= 0"),
    (["objective=[denoising]", "objective.terms.denoising.min_timestep=500",
      "objective.terms.denoising.max_timestep=100"], "objective.terms.denoising.max_timestep", "above"),
    ([*DELTA, "objective=[concept_score]", "concept.head=hue"], "objective.terms.concept_score.head", "no head"),
    ([*DELTA, "objective=[concept_score]", "concept.head=colour", "concept.target=crimson"],
     "objective.terms.concept_score.target", "no colour"),
    ([*DELTA, "objective=[clip_similarity]", "objective.terms.clip_similarity.image=x.png"],
     "objective.terms.clip_similarity", "exactly one target"),
    ([*DELTA, "objective=[reconstruction]", "objective.terms.reconstruction.scene.colour=teal"],
     "objective.terms.reconstruction.scene.colour", "unknown colour 'teal'"),
    ([*DELTA, "objective=[reconstruction]", "objective.terms.reconstruction.distance=l3"],
     "objective.terms.reconstruction.distance", "mse, l1"),
    ([*DELTA, "objective=[delta_l2]", "objective.terms.delta_l2.deltas=[]"], "objective.terms.delta_l2.deltas",
     "non-empty list"),
])
def test_ranges_and_rules_are_one_line_before_loading(overrides, key, text):
    assert text in refused(overrides, key)


def test_the_yaml_defaults_are_the_specs():
    """The yaml files hold no values of their own: what composes is the spec's defaults (a yaml value that
    differs from its spec would be a second place to keep it)."""
    for name in EVALUATORS:
        node = compose_config([f"evaluator=[{name}]"]).evaluator[name]
        assert OmegaConf.to_container(node) == OmegaConf.to_container(OmegaConf.structured(spec.spec_of(node)))
    for term in OBJECTIVES:
        node = compose_config([*DELTA, f"objective=[{term}]"]).objective.terms[term]
        assert OmegaConf.to_container(node) == OmegaConf.to_container(OmegaConf.structured(spec.spec_of(node)))
