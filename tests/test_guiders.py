"""The `guider` group (issue 34, section 1): diffusers' guiders in the project's sampler (steerexp/guiders.py).

- diffusers' ClassifierFreeGuidance through the guider path gives the project's CFG images bit for bit (CPU);
- the guiders that combine predictions (cfg, apg, cfg_zero_star, tcfg) sample on the embedded UNet and on the tiny
  SD3 (flow matching) and SDXL pipelines, with gradients and checkpointing too, and a run with one goes end to end;
- what cannot run is refused in one line before anything loads (the guiders that need layer hooks or a weaker
  model, FDG without kornia, any guider on FLUX's distilled guidance, settings out of range);
- the hooked guiders (PAG, SLG) run their third pass through diffusers' hooks on the family's blocks, which are gone
  after sampling, with the generator unchanged.
"""
from __future__ import annotations

import pytest
import torch
from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance,
                               TangentialClassifierFreeGuidance)

from steerexp.errors import ConfigError
from steerexp.generators import Guidance, load_generator
from tests.helpers import compose_config, tiny_run

COMBINING = {"cfg": ClassifierFreeGuidance, "apg": AdaptiveProjectedGuidance,
             "cfg_zero_star": ClassifierFreeZeroStarGuidance, "tcfg": TangentialClassifierFreeGuidance}
PROMPTS = ["a red circle", "a photo of a blue star"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random pipelines: SD3 (flow matching, joint attention) and SDXL (a DDIM UNet with pooled embeddings)."""
    from steerexp.generators.random_pipelines import make_random_pipeline

    root = tmp_path_factory.mktemp("guiders")
    return {name: make_random_pipeline(name, root / name, size="tiny") for name in ("sd3", "sdxl")}


@pytest.mark.parametrize("scale", [5.0, 1.0])
def test_cfg_through_the_guider_path_gives_the_project_cfg_images_bit_for_bit(gen, scale):
    seeds = [0, 1]
    ours = gen.generate(PROMPTS, seeds, steps=4, guidance=Guidance(scale=scale))
    theirs = gen.generate(PROMPTS, seeds, steps=4, guidance=Guidance(scale=scale, guider=ClassifierFreeGuidance()))
    assert ours.std() > 0.01
    assert torch.equal(ours, theirs)


def test_a_technique_samples_with_the_run_guider_for_baseline_and_edit(gen):
    """The run hands the guider to every technique in `sampling` (run.build); the guidance technique's edit uses it
    at the edit's scale. With diffusers' CFG, both images are the project's, bit for bit."""
    from steerexp.techniques.guidance import GuidanceTuning

    plain = GuidanceTuning(gen, scale=7.5, sampling={"steps": 3, "guidance_scale": 5.0})
    guided = GuidanceTuning(gen, scale=7.5, sampling={"steps": 3, "guidance_scale": 5.0,
                                                      "guider": ClassifierFreeGuidance()})
    assert guided.guidance.guider.guidance_scale == 5.0 and guided.edit.guider.guidance_scale == 7.5
    for edited in (False, True):
        assert torch.equal(plain.generate(["a {}"], [3], edited), guided.generate(["a {}"], [3], edited))
    paired = GuidanceTuning(gen, scale=7.5, baseline_guider=False,   # guider_sweep: the edit vs plain CFG
                            sampling={"steps": 3, "guidance_scale": 5.0, "guider": AdaptiveProjectedGuidance()})
    assert paired.guidance.guider is None and isinstance(paired.edit.guider, AdaptiveProjectedGuidance)


@pytest.mark.parametrize("name", list(COMBINING))
def test_combining_guiders_sample_on_the_embedded_unet(gen, name):
    kw = {"eta": 0.0} if name == "apg" else {}
    guided = gen.generate(PROMPTS[:1], [0], steps=3, guidance=Guidance(scale=7.0, guider=COMBINING[name](**kw)))
    assert guided.shape == (1, 3, *gen.image_size) and torch.isfinite(guided).all()
    if name != "cfg":  # each changes the combination (APG with eta=0 drops the parallel part; CFG-Zero* zeroes step 0)
        plain = gen.generate(PROMPTS[:1], [0], steps=3, guidance=Guidance(scale=7.0))
        assert (guided - plain).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
@pytest.mark.parametrize("name", list(COMBINING))
def test_combining_guiders_sample_on_the_tiny_pipelines(folders, family, name):
    other = load_generator(str(folders[family]), device="cpu")
    assert other.prediction_type == ("flow" if family == "sd3" else "epsilon")
    guidance = Guidance(scale=4.0, guider=COMBINING[name]())
    out = other.generate(PROMPTS[:1], [0], steps=2, guidance=guidance)
    assert torch.isfinite(out).all()
    if name == "cfg":
        assert torch.equal(out, other.generate(PROMPTS[:1], [0], steps=2, guidance=Guidance(scale=4.0)))


@pytest.mark.parametrize("name", ["apg", "tcfg"])
def test_guiders_sample_with_gradients_and_checkpointing(gen, name):
    """Techniques that optimise through sampling (reno, nudging) run it with gradients and checkpointing: the
    guider's combination is differentiable and stateless, so the recomputed steps give the same gradients."""
    guidance = Guidance(scale=5.0, guider=COMBINING[name]())
    cond, uncond = gen.encode_prompt(["a red circle"]), gen.encode_prompt([""])
    grads = []
    for checkpoint in (False, True):
        z = gen.initial_latents([0]).requires_grad_(True)
        gen.sample(cond, z, uncond, 2, guidance, grad=True, checkpoint=checkpoint).square().mean().backward()
        grads.append(z.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_run_with_a_guider_goes_end_to_end(tmp_path):
    base = ["logger=none", "technique=guidance", "technique.scale=9", "guider=apg", "guider.eta=0.5",
            "sampling.steps=2", "eval.seeds=[0]", "eval.prompts=['a {}']", "evaluator=[concept]"]
    metrics, run_dir = tiny_run(tmp_path, [], name="apg", base=base)
    assert metrics["generator/unchanged"] is True
    assert "concept/target_rate/edited" in metrics


# ---------------------------------------------------------------------------- refused, in one line, before loading
def _refusal(overrides):
    from steerexp.validate import validate

    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("name,why", [("seg", "never made in diffusers 0.42"), ("fdg", "kornia")])
def test_guiders_the_sampler_cannot_run_are_refused_saying_why(name, why):
    msg = _refusal([f"guider={name}"])
    assert msg.startswith(f"guider: {name} (diffusers.guiders.") and why in msg and "guider=apg" in msg


@pytest.mark.parametrize("overrides,words", [
    (["guider=apg", "+guider.guidance_scale=3"], "guider.guidance_scale: is set by the run"),
    (["guider=apg", "+guider.eat=1"], "did you mean guider.eta"),
    (["guider=apg", "guider.adaptive_projected_guidance_momentum=-0.5"], "would count it twice"),
    (["guider=cfg", "guider.start=0.6", "guider.stop=0.5"], "guider.stop: must be at least guider.start"),
    (["guider=cfg_zero_star", "guider.zero_init_steps=-1"], "guider.zero_init_steps: must be a number >= 0"),
    (["guider=cfg", "technique=guidance", "technique.schedule=interval"], "technique.schedule: acts inside"),
])
def test_guider_settings_are_checked_before_loading(overrides, words):
    assert words in _refusal(overrides)


def test_guiders_are_refused_on_flux_distilled_guidance_before_loading(tmp_path, monkeypatch):
    import steerexp.generators as generators
    from steerexp.generators.random_pipelines import make_random_pipeline

    folder = make_random_pipeline("flux", tmp_path / "flux", size="tiny")

    def no_loading(*_a, **_k):
        raise AssertionError("the generator loaded before the refusal")

    monkeypatch.setattr(generators, "from_pretrained", no_loading)
    msg = _refusal(["generator=sd", f"generator.path={folder}", "generator.device=cpu", "generator.dtype=fp32",
                    "guider=cfg_zero_star"])
    assert msg.startswith("guider: ClassifierFreeZeroStarGuidance combines") and "distilled" in msg


def test_the_project_cfg_knobs_and_a_guider_do_not_mix_from_python():
    with pytest.raises(ValueError, match="guidance_rescale and start/stop"):
        Guidance(scale=5.0, rescale=0.5, guider=ClassifierFreeGuidance())


def test_an_older_diffusers_is_refused_before_loading(monkeypatch):
    import steerexp.guider_spec as guider_spec

    monkeypatch.setattr(guider_spec, "_diffusers_version", lambda: (0, 30))
    assert "guider: needs diffusers >= 0.42" in _refusal(["guider=tcfg"])


def test_a_guider_that_needs_its_own_passes_is_refused_when_sampling_from_python(gen):
    from diffusers.guiders import AutoGuidance

    for guider in (AutoGuidance(auto_guidance_layers=[0], dropout=0.1), AdaptiveProjectedGuidance()):
        name = type(guider).__name__
        if name == "AdaptiveProjectedGuidance":  # combines cond and uncond only: runs
            assert gen.generate(PROMPTS[:1], [0], steps=1, guidance=Guidance(scale=5.0, guider=guider)).isfinite().all()
            continue
        with pytest.raises(ValueError, match=f"{name} needs passes of its own"):
            gen.generate(PROMPTS[:1], [0], steps=1, guidance=Guidance(scale=5.0, guider=guider))


# ---------------------------------------------------------------------------- hooked guiders: PAG and SLG
def _hooks_left(module) -> int:
    return sum(len(getattr(m, "_diffusers_hook").hooks) for m in module.modules() if hasattr(m, "_diffusers_hook"))


def _hooked(name, **kw):   # every step but the first (diffusers: int(start S) < k < int(stop S))
    from diffusers.guiders import PerturbedAttentionGuidance, SkipLayerGuidance

    if name == "pag":
        return PerturbedAttentionGuidance(perturbed_guidance_layers=[0], perturbed_guidance_start=0.0,
                                          perturbed_guidance_stop=1.0, **kw)
    return SkipLayerGuidance(skip_layer_config={"indices": [0], "fqn": "auto"}, skip_layer_guidance_start=0.0,
                             skip_layer_guidance_stop=1.0, **kw)


@pytest.mark.parametrize("name", ["pag", "slg"])
def test_hooked_guiders_perturb_the_unet_and_leave_no_hook(gen, name):
    plain = gen.generate(PROMPTS, [0, 1], steps=3, guidance=Guidance(scale=5.0))
    guided = gen.generate(PROMPTS, [0, 1], steps=3, guidance=Guidance(scale=5.0, guider=_hooked(name)))
    assert (guided - plain).abs().max() > 0.05   # the third, perturbed pass moves the images
    assert _hooks_left(gen.unet) == 0 and gen.unchanged()
    scale = {"perturbed_guidance_scale": 0.0} if name == "pag" else {"skip_layer_guidance_scale": 0.0}
    zero = gen.generate(PROMPTS, [0, 1], steps=3, guidance=Guidance(scale=5.0, guider=_hooked(name, **scale)))
    assert (zero - plain).abs().max() < 1e-4     # at perturbation scale 0: CFG (its passes are not batched)


@pytest.mark.parametrize("name", ["pag", "slg"])
def test_hooked_guiders_run_on_the_tiny_sdxl(folders, name):
    """SDXL: the mid block's transformer blocks (SD3 is refused: test_hooked_guider_blocks_are_checked...)."""
    other = load_generator(str(folders["sdxl"]), device="cpu")
    plain = other.generate(PROMPTS[:1], [0], steps=2, guidance=Guidance(scale=4.0))
    guided = other.generate(PROMPTS[:1], [0], steps=2, guidance=Guidance(scale=4.0, guider=_hooked(name)))
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
    assert _hooks_left(other.denoiser) == 0 and other.unchanged()


def test_pag_samples_with_gradients_and_checkpointing(gen):
    cond, uncond = gen.encode_prompt(["a red circle"]), gen.encode_prompt([""])
    grads = []
    for checkpoint in (False, True):
        z = gen.initial_latents([0]).requires_grad_(True)
        guidance = Guidance(scale=5.0, guider=_hooked("pag"))
        gen.sample(cond, z, uncond, 2, guidance, grad=True, checkpoint=checkpoint).square().mean().backward()
        grads.append(z.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and _hooks_left(gen.unet) == 0


@pytest.mark.parametrize("name,stop", [("pag", "guider.perturbed_guidance_stop=1"),
                                       ("slg", "guider.skip_layer_guidance_stop=1")])
def test_a_run_with_a_hooked_guider_goes_end_to_end(tmp_path, name, stop):
    base = ["logger=none", "technique=guidance", "technique.scale=7", f"guider={name}", stop,
            "sampling.steps=2", "eval.seeds=[0]", "eval.prompts=['a {}']", "evaluator=[concept]"]
    metrics, _ = tiny_run(tmp_path, [], name=name, base=base)
    assert metrics["generator/unchanged"] is True and "concept/target_rate/edited" in metrics


def test_hooked_guider_blocks_are_checked_before_loading(folders):
    assert "names block 1, and this sd generator has 1 mid-block" in _refusal(
        ["guider=pag", "guider.perturbed_guidance_layers=[0,1]"])
    assert "must be a non-empty list of block indices" in _refusal(
        ["guider=slg", "guider.skip_layer_config.indices=[]"])
    sd3 = ["generator=sd", f"generator.path={folders['sd3']}", "generator.device=cpu", "generator.dtype=fp32"]
    assert "text stream on as its image stream" in _refusal(sd3 + ["guider=slg"])
    assert "image-to-image attention only" in _refusal(sd3 + ["guider=pag"])
    # a window that leaves the perturbed pass no step (diffusers: int(start S) < k < int(stop S)) would be plain CFG
    assert "leaves the perturbed pass no step" in _refusal(["guider=slg", "sampling.steps=8"])
    assert "leaves the perturbed pass no step" in _refusal(
        ["guider=pag", "guider.perturbed_guidance_start=0.5", "guider.perturbed_guidance_stop=0.5"])
    _refusal_free = compose_config(["guider=pag", "sampling.steps=2"])   # the default window 0-1: step 1 of 2
    from steerexp.validate import validate

    validate(_refusal_free)


def test_flow_editors_refuse_a_guider():
    for technique in ("flow_edit", "rf_inversion", "rf_solver"):
        msg = _refusal([f"technique={technique}", "technique.edit.control=null", "guider=apg"])
        assert msg.startswith("guider: ") and "source_guidance / target_guidance" in msg


@pytest.mark.parametrize("overrides,words", [
    (["technique=null_text_inversion"], "null-text inversion's optimisation"),
    (["technique=ddim_inversion", "technique.edit.control=p2p"], "p2p (technique.edit.control)"),
    (["experiment=world_edit_bench", "technique=ddim_inversion", "technique.edit.control=null"],
     "+p2p (evaluator methods)"),
])
def test_hooked_guiders_are_refused_where_the_branches_run_batched(overrides, words):
    assert words in _refusal(overrides + ["guider=pag"])


def test_pag_without_cfg_makes_its_perturbed_pass(gen):
    """At guidance scale 1 PAG guides with the perturbed pass alone: cond + s (cond - cond_perturbed). diffusers
    0.42's own pass counting would make that pass from the unconditional inputs without the hook (CFG at scale s);
    the adapter puts the hook on the conditional pass itself."""
    plain = gen.generate(PROMPTS, [0, 1], steps=3, guidance=Guidance(scale=1.0))
    pag = gen.generate(PROMPTS, [0, 1], steps=3, guidance=Guidance(scale=1.0, guider=_hooked("pag")))
    cfg_at_s = gen.generate(PROMPTS, [0, 1], steps=3, guidance=Guidance(scale=2.8))
    assert (pag - plain).abs().max() > 0.05 and (pag - cfg_at_s).abs().max() > 0.05


# ---------------------------------------------------------------------------- autoguidance: a weak model's pass
@pytest.fixture(scope="module")
def weak_folder(tmp_path_factory):
    """A weak model of the embedded generator for the tests: its UNet with every weight shrunk by 10 % (so its
    predictions differ), stored as steerexp-pretrain stores the shipped one (fp16, the rest borrowed)."""
    import json
    import shutil

    from diffusers import UNet2DConditionModel

    from steerexp import ASSETS

    root = tmp_path_factory.mktemp("weak")
    shutil.copytree(ASSETS / "shapes", root / "shapes")
    unet = UNet2DConditionModel.from_pretrained(ASSETS / "shapes" / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(0.9)
    unet.to(torch.float16).save_pretrained(root / "weak" / "unet")
    shutil.copy(ASSETS / "shapes" / "model_index.json", root / "weak" / "model_index.json")
    (root / "weak" / "shared.json").write_text(json.dumps(
        {n: {"from": f"shapes/{n}", "config": {}} for n in ("text_encoder", "tokenizer", "vae", "scheduler")}))
    return root / "weak"


def _autoguidance(folder, scale=3.0, **kw):
    from steerexp.guiders import autoguidance

    return autoguidance(str(folder), guidance_scale=scale, **kw)


def test_autoguidance_is_the_weak_model_guided_toward_the_generator(gen, weak_folder):
    """D = D_weak + w (D - D_weak), both conditional (Karras et al. 2024): by hand with the two UNets, one step;
    the unconditional branch plays no part; the generator is unchanged and its own UNet is back in place."""
    from diffusers import UNet2DConditionModel

    weak = UNet2DConditionModel.from_pretrained(weak_folder / "unet", torch_dtype=torch.float32)
    cond, uncond = gen.encode_prompt(PROMPTS), gen.encode_prompt(["", ""])
    x, t = gen.initial_latents([0, 1]), torch.tensor(700)
    with torch.no_grad():
        strong_pred, weak_pred = gen.unet(x, t, cond).sample, weak(x, t, cond).sample
        ours = gen.model_output(x, t, cond, uncond, Guidance(scale=3.0, guider=_autoguidance(weak_folder)), 0, 4)
        other_uncond = gen.model_output(x, t, cond, torch.zeros_like(uncond),
                                        Guidance(scale=3.0, guider=_autoguidance(weak_folder)), 0, 4)
    assert (strong_pred - weak_pred).abs().max() > 1e-2
    assert torch.allclose(ours, weak_pred + 3.0 * (strong_pred - weak_pred), atol=1e-5)
    assert torch.equal(ours, other_uncond)
    assert gen.denoiser is gen.unet and gen.unchanged()


def test_autoguidance_outside_its_window_or_at_scale_1_is_the_conditional_prediction(gen, weak_folder, monkeypatch):
    from steerexp import guiders

    calls = []
    real = guiders.weak_denoiser
    monkeypatch.setattr(guiders, "weak_denoiser", lambda *a: calls.append(1) or real(*a))
    cond, uncond = gen.encode_prompt(PROMPTS[:1]), gen.encode_prompt([""])
    x, t = gen.initial_latents([0]), torch.tensor(500)
    with torch.no_grad():
        plain = gen.unet(x, t, cond).sample
        at_1 = gen.model_output(x, t, cond, uncond, Guidance(scale=1.0, guider=_autoguidance(weak_folder, 1.0)), 0, 4)
        late = gen.model_output(x, t, cond, uncond, Guidance(scale=3.0, guider=_autoguidance(weak_folder, stop=0.5)),
                                3, 4)
        inside = gen.model_output(x, t, cond, uncond, Guidance(scale=3.0, guider=_autoguidance(weak_folder, stop=0.5)),
                                  1, 4)
    assert torch.equal(at_1, plain) and torch.equal(late, plain) and len(calls) == 1
    assert (inside - plain).abs().max() > 1e-3


def test_autoguidance_samples_with_gradients_and_keeps_its_weak_model_at_the_new_scale(gen, weak_folder):
    from steerexp.guiders import with_scale

    guider = _autoguidance(weak_folder)
    assert with_scale(guider, 7.0).weak_model == guider.weak_model and with_scale(guider, 7.0).guidance_scale == 7.0
    cond, uncond = gen.encode_prompt(["a red circle"]), gen.encode_prompt([""])
    z = gen.initial_latents([0]).requires_grad_(True)
    gen.sample(cond, z, uncond, 2, Guidance(scale=3.0, guider=guider), grad=True).square().mean().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() > 0
    from steerexp.guiders import weak_denoiser

    weak = weak_denoiser(guider.weak_model, gen.unet)
    assert not any(p.requires_grad or p.grad is not None for p in weak.parameters()) and gen.unchanged()


@pytest.mark.parametrize("weak", ["embedded", "folder"])
def test_a_run_with_autoguidance_goes_end_to_end(tmp_path, weak_folder, weak):
    """With the shipped weak model (the default, assets/shapes_weak) and with a folder given."""
    from steerexp import ASSETS

    base = ["logger=none", "technique=guidance", "technique.scale=3", "guider=autoguidance", "sampling.steps=2",
            "eval.seeds=[0]", "eval.prompts=['a {}']", "evaluator=[concept]"]
    base += [f"guider.weak_model={weak_folder}"] if weak == "folder" else []
    metrics, _ = tiny_run(tmp_path, [], name="autoguidance", base=base)
    assert metrics["generator/unchanged"] is True and "concept/target_rate/edited" in metrics
    from steerexp.guiders import weak_folder as folder_of

    assert folder_of("embedded") == ASSETS / "shapes_weak" and (ASSETS / "shapes_weak" / "unet").is_dir()


def test_autoguidance_weak_models_are_checked_before_loading(folders, weak_folder, tmp_path):
    sd3 = ["generator=sd", f"generator.path={folders['sd3']}", "generator.device=cpu", "generator.dtype=fp32"]
    loaded = _refusal(sd3 + ["guider=autoguidance"])
    assert loaded.startswith("guider.weak_model: embedded") and "sd3 folder (no early checkpoint" in loaded
    assert "not a local pipeline folder" in _refusal(["guider=autoguidance", f"guider.weak_model={tmp_path}"])
    assert "is a StableDiffusionXLPipeline and the generator a StableDiffusionPipeline" in _refusal(
        ["guider=autoguidance", f"guider.weak_model={folders['sdxl']}"])
    assert "null-text inversion's optimisation" in _refusal(
        ["technique=null_text_inversion", "guider=autoguidance", f"guider.weak_model={weak_folder}"])
    for technique in ("xti", "neti"):   # per-layer processors on the generator's UNet only
        assert "per-layer attention processors" in _refusal([f"technique={technique}", "guider=autoguidance"])


def test_a_weak_model_of_another_family_is_refused_at_load(gen, folders):
    from steerexp.guiders import weak_denoiser

    with pytest.raises(ValueError, match="is a SD3Transformer2DModel and the generator's denoiser a UNet2DCondition"):
        weak_denoiser(folders["sd3"], gen.unet)


def test_the_weak_model_fraction_is_checked():
    from omegaconf import OmegaConf

    from steerexp.pretrain.weak import early_step

    assert early_step(OmegaConf.create({"generator_weak": {"fraction": 0.1}}), 9000) == 900
    assert early_step(OmegaConf.create({"generator_weak": {"fraction": 0.1}}), 3) == 1
    assert early_step(OmegaConf.create({"generator_weak": {"fraction": None}}), 3) is None
    for bad in (0, 1.5, -0.1, "x"):
        with pytest.raises(ValueError, match="must be in"):
            early_step(OmegaConf.create({"generator_weak": {"fraction": bad}}), 100)


def test_the_run_gives_autoguidance_its_embedded_generators_weak_model():
    """run.build resolves weak_model=embedded to the run's embedded generator's (shapes: the shipped shapes_weak;
    shapes_flow: test_shapes_flow)."""
    from steerexp import ASSETS
    from steerexp.run import build

    cfg = compose_config(["guider=autoguidance", "technique=guidance", "logger=none", "evaluator=[concept]",
                          "sampling.steps=2"])
    _, technique, _ = build(cfg)
    assert technique.guidance.guider.weak_model == ASSETS / "shapes_weak"
