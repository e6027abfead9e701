"""The optimisation-based presets (issue 15, section 4): each optimises or guides with a robust
scorer and is judged by a different, independent judge (the analytic judge on the shapes world)."""
import pytest

from steerexp.validate import validate
from tests.helpers import compose_config

# preset -> the scorer its objective optimises (or its guidance follows)
OPTIMISED = {
    "prompt_delta_colour": "robust",
    "latent_offset_layout": "robust",
    "latent_offset_colour": "robust",
    "joint_budget": "robust",
    "energy_guidance": "noisy",
}


def objective_scorers(cfg) -> set[str]:
    if cfg.technique.get("scorer"):  # training-free guidance names its scorer on the technique
        return {cfg.technique.scorer}
    return {term.scorer for term in cfg.objective.terms.values() if "scorer" in term}


@pytest.mark.parametrize("preset", sorted(OPTIMISED))
def test_preset_optimises_a_robust_scorer_and_is_judged_independently(preset):
    cfg = compose_config([f"experiment={preset}"])
    assert validate(cfg) == []
    assert objective_scorers(cfg) == {OPTIMISED[preset]}
    for name, evaluator in cfg.evaluator.items():
        # null: the analytic judge on the shapes world, which no objective can optimise
        assert evaluator.get("judge") in (None, "analytic"), (preset, name)


def test_layout_preset_aims_at_position_without_naming_one():
    cfg = compose_config(["experiment=latent_offset_layout"])
    assert (cfg.concept.head, cfg.concept.target) == ("position", "left")
    assert cfg.technique.latent and not cfg.technique.text and cfg.technique.latent_mode == "shared"
    positions = ("left", "right", "top", "bottom", "center")
    for prompt in list(cfg.technique.prompts) + list(cfg.eval.prompts):
        assert not any(p in prompt.split() for p in positions), prompt
    assert not set(cfg.technique.train_seeds) & set(cfg.eval.seeds)  # judged on held-out seeds
