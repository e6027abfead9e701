"""Prompt-to-Prompt attention control (generators/attention.py) and Direct Inversion on the embedded
generator, tiny: 2-3 world images, 6 DDIM steps. Each property is checked on a measurement that could
come out the other way."""
import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from steerexp.errors import ConfigError
from steerexp.generators import Guidance, attention
from steerexp.techniques.ddim_inversion import DDIMInversion, parse_method
from steerexp.techniques.direct_inversion import DirectInversion
from steerexp.validate import validate
from tests.helpers import compose_config

STEPS = 6
TEMPLATE = "a {size} {colour} {shape} {position} on a {background} background"


def psnr(images, originals) -> float:
    return float(peak_signal_noise_ratio(images, originals, data_range=1.0, dim=(1, 2, 3), reduction="none").mean())


@pytest.fixture(scope="module")
def inverted(gen):
    tech = DDIMInversion(gen, targets={"k": 3, "seed": 4, "fixed": {"colour": "red"}, "prompt_template": TEMPLATE},
                         sampling={"steps": STEPS, "guidance_scale": 5.0}, guidance_scale=5.0,
                         edit={"replace": {"red": "blue"}, "control": "p2p"})
    tech.prepare()
    tech.compute()
    return tech


def test_processors_are_installed_for_sampling_only_and_the_weights_never_change(gen):
    before = {k: type(v) for k, v in gen.unet.attn_processors.items()}
    fingerprint = gen.fingerprint()
    ctrl = attention.Controller(attention.EditControl(), gen.tokenizer, ["a red circle"], ["a blue circle"], 2,
                                gen.latent_shape()[1:], gen.device)
    with attention.controlled(gen.unet, ctrl):
        inside = gen.unet.attn_processors
        assert len(inside) == len(before) and all(isinstance(p, attention.Processor) for p in inside.values())
    assert {k: type(v) for k, v in gen.unet.attn_processors.items()} == before
    with pytest.raises(RuntimeError, match="boom"), attention.controlled(gen.unet, ctrl):
        raise RuntimeError("boom")  # restored on error too
    assert {k: type(v) for k, v in gen.unet.attn_processors.items()} == before
    # a whole P2P edit: the processors hold no weights, nothing is trained
    z = gen.initial_latents([0])
    c = gen.encode_prompt(["a red circle", "a blue circle"])
    attention.sample_pair(gen, z, c[:1], c[1:], gen.encode_prompt([""]), 2, Guidance(5.0), ctrl)
    assert ctrl.step == 2
    assert {k: type(v) for k, v in gen.unet.attn_processors.items()} == before
    assert gen.fingerprint() == fingerprint and gen.unchanged()


def test_identical_prompts_reproduce_the_source_and_a_swap_does_not(gen, inverted):
    """From the inversion and from plain sampling: with the target prompt = the source prompt the
    target branch is the source branch (= the method's reconstruction), within float noise."""
    tech = inverted
    same = tech.edit("ddim_w5+p2p", tech.source_prompts)
    assert (same - tech.reconstruct("ddim_w5")).abs().max() < 1e-4
    assert (tech.edit("ddim_w5+p2p") - tech.reconstruct("ddim_w5")).abs().max() > 0.1  # the swap edits
    z = gen.initial_latents([3, 4])
    c = gen.encode_prompt(["a red circle on the left", "a green square at the top"])
    ctrl = lambda tgt: attention.Controller(attention.EditControl(), gen.tokenizer, ["a red circle on the left",
                                            "a green square at the top"], tgt, STEPS, gen.latent_shape()[1:],
                                            gen.device)
    empty = gen.encode_prompt([""])
    src, tgt = attention.sample_pair(gen, z, c, c, empty, STEPS, Guidance(5.0),
                                     ctrl(["a red circle on the left", "a green square at the top"]))
    assert (src - tgt).abs().max() < 1e-4
    plain = gen.sample(c, z, empty, STEPS, Guidance(5.0))
    assert (src - plain).abs().max() < 1e-3  # the source branch is plain sampling (explicit attention, batched)
    images_src, images_tgt = attention.generate_pair(gen, ["a red circle on the left"], ["a blue circle on the left"],
                                                     [3], STEPS, Guidance(5.0))
    assert (images_src - gen.generate(["a red circle on the left"], [3], STEPS, Guidance(5.0))).abs().max() < 1e-3
    assert (images_tgt - images_src).abs().max() > 0.1  # the swap edits


def test_injection_windows_are_what_makes_the_difference(inverted):
    """With both windows empty P2P is the bare prompt swap; with them it is not."""
    tech = inverted
    bare = tech.edit("ddim_w5")
    tech.control.cross_steps, tech.control.self_steps = (0.0, 0.0), (0.0, 0.0)
    try:
        off = tech._run("ddim_w5+p2p", tech.target_prompts())
    finally:
        tech.control.cross_steps, tech.control.self_steps = (0.0, 0.8), (0.0, 0.4)
    assert (off - bare).abs().max() < 1e-3  # float noise of explicit attention in a larger batch
    assert (tech.edit("ddim_w5+p2p") - bare).abs().max() > 0.05
    # Direct Inversion skips its source's unconditional pass (3 branches, not 4): the target is the same
    gen, target = tech.generator, tech.generator.encode_prompt(tech.target_prompts())
    outs = []
    for uncond in (False, True):  # control_uncond=True keeps all 4 branches; with empty windows nothing is injected
        ctrl = attention.Controller(attention.EditControl(cross_steps=(0, 0), self_steps=(0, 0), control_uncond=uncond),
                                    gen.tokenizer, tech.source_prompts, tech.target_prompts(), STEPS, (8, 8),
                                    gen.device)
        outs.append(attention.sample_pair(gen, tech.latents_T, tech.cond, target, tech.empty, STEPS, tech.guidance,
                                          ctrl, trajectory=tech.pivots)[1])
    assert (outs[0] - outs[1]).abs().max() < 1e-4
    assert (gen.decode_latents(outs[0]) - bare).abs().max() < 1e-3  # = the bare prompt swap


def test_local_blend_keeps_the_source_outside_the_mask(gen, inverted):
    """Direct Inversion + local blend: the source branch ends at x*_0 exactly, and outside the final
    attention mask the target latent is the source's, cell for cell; inside, it is edited."""
    tech = inverted
    ctrl = tech.controller(tech.source_prompts, tech.target_prompts())
    target = gen.encode_prompt(tech.target_prompts())
    src, tgt = attention.sample_pair(gen, tech.latents_T, tech.cond, target, tech.empty, STEPS, tech.guidance, ctrl,
                                     trajectory=tech.pivots, blend=True)
    assert torch.equal(src, tech.pivots[0].to(src))
    mask = ctrl.blend_mask().expand_as(tgt).bool()
    assert 0 < mask.float().mean() < 1  # a real mask: some cells kept, some edited
    assert torch.equal(tgt[~mask], src[~mask])
    assert (tgt[mask] - src[mask]).abs().max() > 1e-2
    # in pixels: the blended edit stays closer to the original than the unblended one
    blended, unblended = tech.edit("di+p2p+blend"), tech.edit("di+p2p")
    assert psnr(blended, tech.images) > psnr(unblended, tech.images) - 0.5


def test_direct_inversion_reconstructs_at_least_as_well_as_ddim(gen):
    tech = DirectInversion(gen, targets={"k": 2, "seed": 6, "fixed": {"colour": "red"}},
                           sampling={"steps": STEPS, "guidance_scale": 7.5}, edit={"control": "p2p"})
    tech.prepare()
    tech.compute()
    di = psnr(tech.reconstruct(), tech.images)
    for method in ("ddim_w1", "ddim_w7.5"):
        assert di >= psnr(tech.reconstruct(method), tech.images), method
    assert di == pytest.approx(psnr(tech.reconstruct("vae"), tech.images))  # the source branch is x*_t: exact
    assert tech.edit_method() == "di+p2p" and tech.edit().shape == tech.images.shape
    assert tech.inversion_seconds("di+p2p") > 0 and tech.inversion_seconds("sdedit_s0.5") == 0
    assert gen.unchanged()


def test_token_maps_refinement_and_reweighting(gen):
    tok = gen.tokenizer
    mapper, alphas = attention.token_map(tok, "a red circle", "a blue circle")
    assert torch.equal(mapper, torch.arange(tok.model_max_length)) and bool((alphas == 1).all())  # word swap
    mapper, alphas = attention.token_map(tok, "a red circle", "a large red circle")
    # [start, a, large, red, circle, end]: 'large' is new, the rest aligns one place later
    assert alphas[:6].tolist() == [1, 1, 0, 1, 1, 1] and mapper[[0, 1, 3, 4, 5]].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="same number of tokens"):
        attention.token_map(tok, "a red circle", "a large red circle", mode="replace")
    assert attention.word_positions(tok, "a red circle on the left", "circle") == [3]
    ctrl = attention.Controller(attention.EditControl(reweight={"blue": 3.0}), tok, ["a red circle"],
                                ["a blue circle"], 4, (8, 8), gen.device)
    assert ctrl.equalizer[0, 2] == 3.0 and ctrl.equalizer[0, 3] == 1.0
    assert attention.changed_words("a red circle", "a blue circle") == (["red"], ["blue"])
    # prompts of different lengths run end to end (refinement)
    z = gen.initial_latents([1])
    c = gen.encode_prompt(["a red circle", "a large red circle"])
    ctrl = attention.Controller(attention.EditControl(), tok, ["a red circle"], ["a large red circle"], 3, (8, 8),
                                gen.device)
    src, tgt = attention.sample_pair(gen, z, c[:1], c[1:], gen.encode_prompt([""]), 3, Guidance(5.0), ctrl)
    assert torch.isfinite(tgt).all() and (src - tgt).abs().max() > 0


def test_attention_maps_per_token_make_a_grid(inverted):
    maps, src_tokens, tgt_tokens = inverted.attention_maps("ddim_w5+p2p")
    n = len(inverted.images)
    assert maps.shape[:2] == (2, n) and maps.shape[-2:] == (8, 8)
    assert src_tokens[0][:3] == ["a", "large" if "large" in inverted.source_prompts[0] else "small", "red"]
    assert "blue" in tgt_tokens[0]
    grid = attention.token_grid(inverted.images, maps[0], src_tokens)
    assert grid.shape[0] == 3 and grid.shape[1] >= n * 32 and grid.shape[2] >= (len(src_tokens[0]) + 1) * 32
    with pytest.raises(ValueError, match="add \\+p2p"):
        inverted.attention_maps("ddim_w5")


def test_method_names_and_bad_settings_fail_clearly(gen):
    assert parse_method("nti+p2p+blend") == ("nti", True, True)
    with pytest.raises(ValueError, match="blend mask comes from P2P"):
        parse_method("nti+blend")
    with pytest.raises(ValueError, match="control must be null"):
        DDIMInversion(gen, edit={"control": "masactrl"})
    with pytest.raises(ValueError, match="blend=true needs"):
        DDIMInversion(gen, edit={"blend": True})
    with pytest.raises(ValueError, match="cross_steps"):
        DDIMInversion(gen, edit={"control": "p2p", "cross_steps": 1.5})
    with pytest.raises(ValueError, match="no setting 'cross_step'"):
        DDIMInversion(gen, edit={"cross_step": 0.5})


@pytest.mark.parametrize("override, key", [
    ("technique.edit.control=masactrl", "technique.edit.control"),
    ("technique.edit.cross_steps=1.5", "technique.edit.cross_steps"),
    ("technique.edit.self_steps=[0.6,0.2]", "technique.edit.self_steps"),
    ("technique.edit.blend=true", "technique.edit.blend"),
    ("+technique.edit.cross_step=0.5", "technique.edit.cross_step"),
    ("technique.edit.reweight={blue:-1}", "technique.edit.reweight.blue"),
    ("technique.edit.blend_threshold=1.5", "technique.edit.blend_threshold"),
    ("technique.edit.mode=swap", "technique.edit.mode"),
    ("technique.targets.manifest=/nowhere/edits.csv", "technique.targets.manifest"),
])
def test_validation_names_the_bad_edit_key(override, key):
    cfg = compose_config(["technique=null_text_inversion", override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key and err.value.fix
