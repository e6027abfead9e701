"""The specs of the input deltas (prompt_delta, latent_offset, prompt_delta_latent_offset) and of the training-free
sampling techniques (embedding_arithmetic, guidance, latent_priming, prompt_search, energy_guidance): every setting's
default lives in the spec, and a bad value is one line naming its key, before any import of torch."""
import pytest
import yaml

from steerexp import conf_dir
from steerexp.errors import ConfigError
from steerexp.validate import validate
from tests.helpers import compose_config

TECHNIQUES = ("prompt_delta", "latent_offset", "prompt_delta_latent_offset", "embedding_arithmetic", "guidance",
              "latent_priming", "prompt_search", "energy_guidance")


def error(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(list(overrides)))
    assert info.value.key == key, str(info.value)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("name", TECHNIQUES)
def test_the_yaml_only_extends_its_spec(name):
    data = yaml.safe_load((conf_dir() / "technique" / f"{name}.yaml").read_text())
    assert data == {"defaults": [f"/schema/technique/{name}@_here_", "_self_"]}
    assert validate(compose_config([f"technique={name}"])) == []


def test_the_input_deltas_share_one_spec_with_three_options():
    text, latent, both = (compose_config([f"technique={t}"]).technique for t in TECHNIQUES[:3])
    assert (text.text, text.latent, text.budget.eps_text, text.budget.eps_z) == (True, False, 4.0, None)
    assert (latent.text, latent.latent, latent.budget.eps_text, latent.budget.eps_z) == (False, True, None, 4.0)
    assert (both.text, both.latent, both.budget.eps_text, both.budget.eps_z) == (True, True, 4.0, 4.0)


@pytest.mark.parametrize("name", TECHNIQUES[:3])
def test_the_input_deltas_default_to_an_image_objective_and_refuse_denoising(name):
    from steerexp.combine import expanded

    cfg = expanded(compose_config([f"technique={name}"]))   # objective=auto, the default: the technique's own
    assert list(cfg.objective.terms) == ["concept_score", "delta_l2"]
    assert "denoising" in str(error([f"technique={name}", "objective=[denoising]"], "objective"))


BAD = [
    (["technique=embedding_arithmetic", "technique.mode=bogus"], "technique.mode", "pooled, aligned"),
    (["technique=embedding_arithmetic", "technique.world_direction=up"], "technique.world_direction", "size->large"),
    (["technique=embedding_arithmetic", "technique.base_contexts=[a]"], "technique.target_contexts", "paired"),
    (["technique=embedding_arithmetic", "technique.base_contexts=[a,b]", "technique.target_contexts=[c]"],
     "technique.target_contexts", "paired"),
    (["technique=embedding_arithmetic", "technique.gate=2"], "technique.gate", "[-1, 1]"),
    (["technique=guidance", "technique.schedule=bogus"], "technique.schedule", "weak_strong_weak"),
    (["technique=guidance", "technique.negative_mode=add"], "technique.negative_mode", "uncond, subtract"),
    (["technique=guidance", "technique.rescale=2"], "technique.rescale", "[0, 1]"),
    (["technique=guidance", "technique.scale=-1"], "technique.scale", ">= 0"),
    (["technique=guidance", "technique.interval_start=0.5", "technique.interval_end=0.5"], "technique.interval_end",
     "interval_start"),
    (["technique=guidance", "+technique.wieght=2"], "technique.wieght", "not a setting"),
    (["technique=latent_priming", "technique.top_k=65"], "technique.top_k", "candidates"),
    (["technique=latent_priming", "technique.combine=median"], "technique.combine", "mean, slerp"),
    (["technique=latent_priming", "technique.mix=1.5"], "technique.mix", "[0, 1]"),
    (["technique=latent_priming", "technique.candidates=0"], "technique.candidates", ">= 1"),
    (["technique=prompt_search", "technique.scorer=robust"], "technique.scorer", "concept, clip"),
    (["technique=prompt_search", "technique.beam_width=0"], "technique.beam_width", ">= 1"),
    (["technique=prompt_search", "technique.max_words=0"], "technique.max_words", ">= 1"),
    (["technique=prompt_search", "technique.vocabulary=[]"], "technique.vocabulary", "list of words"),
    (["technique=prompt_search", "technique.prompt=' '"], "technique.prompt", "empty"),
    (["technique=energy_guidance", "technique.start=0.9"], "technique.end", "technique.start"),
    (["technique=energy_guidance", "technique.scale=-1"], "technique.scale", ">= 0"),
    (["technique=energy_guidance", "technique.scorer=analytic"], "technique.scorer", "no gradient to guide"),
    (["technique=energy_guidance", "technique.head=hue"], "technique.head", "no head"),
    (["technique=energy_guidance", "technique.target=huge"], "technique.target", "no size"),
    (["technique=latent_priming", "technique.scorer=clip"], "technique.scorer", "cannot rank"),
    (["technique=latent_priming", "technique.scorer=noisy"], "technique.scorer", "cannot rank"),
    (["technique=latent_priming", "technique.scorer=robus"], "technique.scorer", "no scorer of the run"),
    (["technique=latent_priming", "technique.target=crimson"], "technique.target", "no size"),
    (["technique=prompt_search", "technique.head=hue"], "technique.head", "no head"),
    (["technique=prompt_delta", "technique.latent_mode=both"], "technique.latent_mode", "shared, per_seed"),
    (["technique=prompt_delta", "technique.text=false"], "technique.text", "nothing to learn"),
    (["technique=prompt_delta", "technique.train_sampling_steps=0"], "technique.train_sampling_steps", ">= 1"),
    (["technique=prompt_delta", "technique.train_sampling_steps=5000"], "technique.train_sampling_steps",
     "num_train_timesteps"),
    (["technique=prompt_delta", "technique.tokens=[1,1]"], "technique.tokens", "distinct"),
    (["technique=prompt_delta", "technique.train_seeds=[1,1]"], "technique.train_seeds", "more than once"),
    (["technique=prompt_delta", "technique.prompts=[]"], "technique.prompts", "non-empty"),
    (["technique=prompt_delta", "technique.budget.eps_text=-1"], "technique.budget.eps_text", "positive"),
    (["technique=prompt_delta", "technique.budget.chi=-1"], "technique.budget.chi", ">= 0"),
    (["technique=prompt_delta", "technique.budget.text_norm=row"], "technique.budget.text_norm", "tensor, token"),
    (["technique=prompt_delta", "+technique.budget.l2=0.1"], "technique.budget.l2", "delta_l2"),
    (["technique=prompt_delta", "+technique.budget.eps_zz=0.1"], "technique.budget.eps_zz", "budget.eps_z"),
    (["technique=prompt_delta_latent_offset", "technique.budget.joint=true", "technique.budget.eps_z=null"],
     "technique.budget.eps_z", "joint"),
    (["technique=prompt_delta_latent_offset", "technique.budget.joint=true", "technique.latent_mode=per_seed"],
     "technique.budget.joint", "per_seed"),
    (["technique=prompt_delta_latent_offset", "technique.budget.joint=true", "technique.budget.text_norm=token"],
     "technique.budget.joint", "text_norm"),
]


@pytest.mark.parametrize("overrides, key, text", BAD, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD)])
def test_a_bad_setting_is_one_line_naming_its_key(overrides, key, text):
    assert text in str(error(overrides, key))


def test_what_the_specs_allow():
    for overrides in (["technique=latent_offset", "technique.budget.joint=true"],   # one delta: its own ball
                      ["technique=prompt_delta", "technique.tokens=blue"],
                      ["technique=prompt_delta", "technique.tokens=[2,3]"],
                      ["technique=latent_offset", "technique.latent_mode=per_seed", "technique.budget.eps_z=null"],
                      ["technique=embedding_arithmetic", "technique.base_contexts=[a small circle]",
                       "technique.target_contexts=[a large circle]", "technique.world_direction=null"],
                      ["technique=guidance", "technique.schedule=interval", "technique.interval_start=0.2"],
                      ["technique=energy_guidance", "technique.scorer=clip", "technique.head=anything"],
                      ["technique=latent_priming", "technique.scorer=robust", "technique.head=colour",
                       "technique.target=red"],
                      ["technique=prompt_search", "technique.scorer=clip", "technique.head=anything"]):
        assert validate(compose_config(overrides)) == [], overrides


def test_the_torch_code_reads_the_values_from_the_specs():
    """The enums are declared once, in the torch-free specs: a torch module that uses one imports it (the others
    check their settings with the spec itself: spec.check_settings)."""
    from steerexp.generators import frozen
    from steerexp.techniques import (budgets, embedding_arithmetic, embedding_arithmetic_spec, energy_guidance,
                                     energy_guidance_spec, guidance_spec, input_delta, input_delta_spec,
                                     latent_priming, latent_priming_spec, prompt_search, prompt_search_spec)

    assert frozen.SCHEDULES is guidance_spec.SCHEDULES
    assert frozen.NEGATIVE_MODES is guidance_spec.NEGATIVE_MODES
    assert energy_guidance.GUIDING_KINDS is energy_guidance_spec.GUIDING_KINDS
    for module, name, spec_module in ((budgets, "TEXT_NORMS", input_delta_spec),
                                      (input_delta, "LATENT_MODES", input_delta_spec),
                                      (embedding_arithmetic, "MODES", embedding_arithmetic_spec),
                                      (latent_priming, "COMBINES", latent_priming_spec),
                                      (prompt_search, "SCORERS", prompt_search_spec)):
        declared = getattr(spec_module, name)
        assert getattr(module, name, declared) is declared, f"{module.__name__}.{name} is a second copy"
