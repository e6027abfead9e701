"""The second embedded generator, `generator=shapes_flow` (issue 19): a miniature SD3-format flow-matching
transformer trained by `steerexp-pretrain 'stages=[generator_flow]'` on the shapes world.

It is shipped in the package's assets (29 MB of its own: it borrows the shapes generator's VAE and tokenizer
files through shared.json), and the tests also build it with the smoke stage (the recipe, 3 steps). The folder
loads with diffusers' own
StableDiffusion3Pipeline and samples as steerexp's SD3Generator does; training builds the conditioning exactly
as both of them do; a technique runs on it with the fingerprint unchanged.
"""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from hydra import compose, initialize_config_dir

from steerexp import conf_dir
from steerexp.errors import ConfigError
from steerexp.generators import Guidance, load_generator
from steerexp.pretrain.flow_generator import conditioning
from steerexp.validate import validate
from steerexp.worlds.shapes import world
from tests.helpers import compose_config, tiny_run
from tests.test_families import TECHNIQUES

PROMPTS = ["a red circle on the left", "a small blue star", ""]
CLIP_LENGTH, T5_LENGTH = 16, 24  # conf/pretrain.yaml generator_flow: max_length, t5_max_length


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The generator_flow stage of steerexp-pretrain in smoke mode (the recipe, a few steps)."""
    from steerexp.pretrain.cli import run as pretrain_run

    out = tmp_path_factory.mktemp("flow")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["smoke=true", f"out={out}", "stages=[generator_flow]"])
    pretrain_run(cfg)
    return out


@pytest.fixture(scope="module")
def pipe(built):
    return StableDiffusion3Pipeline.from_pretrained(built / "shapes_flow")


@pytest.fixture(scope="module")
def flow(built):
    return load_generator(str(built / "shapes_flow"), device="cpu")


def test_folder_loads_and_samples_with_diffusers(pipe, built):
    folder = built / "shapes_flow"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"][1] == "SD3Transformer2DModel" and index["text_encoder_3"][1] == "T5EncoderModel"
    assert pipe.vae.config.shift_factor == 0.0
    out = pipe("a red circle on the left", num_inference_steps=4, max_sequence_length=T5_LENGTH, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 45e6  # the full recipe's folder measured 39 MB


def test_training_conditioning_is_the_pipelines_and_the_generators(pipe, flow):
    """flow_generator.conditioning (what training feeds the transformer) == StableDiffusion3Pipeline.encode_prompt
    == SD3Generator.encode_prompt, on the stage's weights."""
    ids = [t(PROMPTS, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
           for t, n in ((pipe.tokenizer, CLIP_LENGTH), (pipe.tokenizer_2, CLIP_LENGTH), (pipe.tokenizer_3, T5_LENGTH))]
    joint = pipe.transformer.config.joint_attention_dim
    with torch.no_grad():
        hidden, pooled = conditioning(pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, *ids, joint)
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                                         max_sequence_length=T5_LENGTH)
        ours_hidden, ours_pooled = flow.unpack(flow.encode_prompt(PROMPTS))
    assert hidden.shape == (3, CLIP_LENGTH + T5_LENGTH, joint)
    torch.testing.assert_close(hidden, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, theirs_pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_hidden, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_pooled, pooled, rtol=0, atol=1e-6)


def test_t5_tokenizer_world_words_whole_heldout_spelled(flow):
    t5 = flow.encoders[2]
    assert flow.family == "sd3" and flow.t5_length == T5_LENGTH
    assert flow.cond_shape == (CLIP_LENGTH + T5_LENGTH + 1, 128)  # + the pooled row
    ids = t5.tokenizer("a red circle on the left").input_ids
    assert len(ids) == 7 and ids[-1] == t5.tokenizer.eos_token_id  # one piece a word, then '</s>'
    assert len(t5.word_ids(world.HELDOUT)) == len(world.HELDOUT) + 1  # never in a caption: '▁' + its letters
    assert t5.tokenizer.unk_token_id not in t5.word_ids("zebra")  # any other word: characters, no <unk>


def test_sampling_matches_the_diffusers_pipeline(pipe, flow):
    x = flow.initial_latents([0])
    guidance = Guidance(scale=5.0)
    with torch.no_grad():
        cond = flow.encode_prompt(["a green square"])
        ours = flow.decode_latents(flow.sample(cond, x, flow.guidance_embeddings(guidance)[0], 3, guidance))
    theirs = pipe("a green square", num_inference_steps=3, guidance_scale=5.0, latents=x.clone(), output_type="pt",
                  height=32, width=32, max_sequence_length=T5_LENGTH).images
    assert (ours - theirs).abs().max() < 1e-4


def test_smoke_stage_builds_a_loadable_flow_generator(built, flow):
    assert flow.family == "sd3" and flow.world == "shapes"  # a recipe.json beside it: a steerexp-pretrain build
    assert flow.generate(["a red circle"], [0], steps=2).shape == (1, 3, 32, 32)
    assert "generator_flow" in json.loads((built / "recipe.json").read_text())["seconds"]


def test_technique_runs_on_shapes_flow_with_the_fingerprint_unchanged(tmp_path, built):
    metrics, _ = tiny_run(tmp_path, ["generator=sd", f"generator.path={built / 'shapes_flow'}", "generator.device=cpu",
                                     "generator.dtype=fp32", "technique.steps=2", "sampling.steps=2",
                                     "eval.seeds=[0]", "logger=none", "evaluator=[concept]"])
    assert metrics["generator/unchanged"] is True
    assert metrics["params/trainable"] == 64 + 32 + 128  # one added token in CLIP-L, CLIP-G and T5: the flow generator


@pytest.mark.slow   # 13 s
def test_quality_gate_report_runs_on_the_flow_generator(built):
    from steerexp.worlds.shapes.report import report

    out = report(str(built / "shapes_flow"), samples=8, steps=2)
    rates = ("prompt_shape_agreement", "prompt_colour_agreement", "heldout_name_rate", "protected_reproduction_rate")
    for key in rates:
        assert 0.0 <= out[key] <= 1.0
    assert out["sample_seconds_16x25"] > 0 and out["settings"]["samples"] == 8


# ---------------------------------------------------------------------------- what is shipped
def test_shipped_models_stay_under_50_mb():
    """Everything in the package's assets folder ships. shapes_flow (29 MB of its own even when it borrows the
    shapes VAE and tokenizers) would take it past 50 MB, so steerexp-pretrain builds it outside the package (the
    next test); the shapes generator's weak model (2.2 MB) ships."""
    from steerexp import ASSETS

    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert size < 50e6, f"src/steerexp/assets is {size / 1e6:.1f} MB; keep the shipped models under 50 MB"


def test_shapes_flow_is_built_outside_the_package(tmp_path, monkeypatch):
    """generator=shapes_flow reads, and steerexp-pretrain (no out=) writes, $STEEREXP_BUILT/shapes_flow
    (default ~/.cache/steerexp); the shipped generator stays in the package's assets."""
    from steerexp import ASSETS
    from steerexp.generators import embedded_path
    from steerexp.pretrain import cli, flow_generator

    monkeypatch.setenv("STEEREXP_BUILT", str(tmp_path / "built"))
    assert embedded_path("shapes_flow") == tmp_path / "built" / "shapes_flow"
    assert embedded_path("shapes") == ASSETS / "shapes"
    with pytest.raises(ConfigError) as info:  # not built there yet: one line with the build command
        validate(compose_config(["generator=shapes_flow"]))
    assert info.value.key == "generator.embedded" and "stages=[generator_flow]" in str(info.value)
    written = []
    monkeypatch.setattr(flow_generator, "pretrain_flow_generator",
                        lambda cfg, folder, seed, vae, **kw: written.append(folder))  # record where, build nothing
    monkeypatch.setattr(cli, "ASSETS", tmp_path / "assets")  # the recipe.json this run writes goes there
    (tmp_path / "assets").mkdir()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["stages=[generator_flow]"])
    cli.run(cfg)
    assert written == [tmp_path / "built" / "shapes_flow"]
    monkeypatch.delenv("STEEREXP_BUILT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert embedded_path("shapes_flow") == tmp_path / "cache" / "steerexp" / "shapes_flow"


@pytest.fixture
def beside_shapes(built, tmp_path):
    """The smoke-built folder (full copies) beside a copy of the shipped shapes VAE and tokenizer."""
    import shutil

    from steerexp import ASSETS

    shutil.copytree(built / "shapes_flow", tmp_path / "shapes_flow")
    for name in ("vae", "tokenizer"):
        shutil.copytree(ASSETS / "shapes" / name, tmp_path / "shapes" / name)
    return tmp_path


def test_share_with_sibling_replaces_identical_copies_and_samples_the_same(built, beside_shapes):
    from steerexp.pretrain.flow_generator import share_with_sibling

    folder = beside_shapes / "shapes_flow"
    manifest = share_with_sibling(folder)
    assert manifest == {"vae": {"from": "shapes/vae", "config": {"shift_factor": 0.0}},
                        "tokenizer": {"from": "shapes/tokenizer", "config": {"model_max_length": CLIP_LENGTH}},
                        "tokenizer_2": {"from": "shapes/tokenizer", "config": {"model_max_length": CLIP_LENGTH}}}
    assert json.loads((folder / "shared.json").read_text()) == manifest
    assert not any((folder / name).exists() for name in manifest)
    ours = load_generator(str(folder), device="cpu").generate(PROMPTS[:2], [0, 1], steps=2)
    full = load_generator(str(built / "shapes_flow"), device="cpu").generate(PROMPTS[:2], [0, 1], steps=2)
    assert torch.equal(ours, full)


def test_share_with_sibling_keeps_a_copy_that_differs(beside_shapes):
    from steerexp.pretrain.flow_generator import share_with_sibling

    merges = beside_shapes / "shapes" / "tokenizer" / "merges.txt"
    merges.write_text(merges.read_text() + "x y\n")  # the sibling's tokenizer is no longer the same
    folder = beside_shapes / "shapes_flow"
    assert set(share_with_sibling(folder)) == {"vae"}
    assert (folder / "tokenizer").is_dir() and (folder / "tokenizer_2").is_dir() and not (folder / "vae").exists()


def test_shared_json_cannot_reach_outside_the_folders_parent(beside_shapes):
    """A pipeline folder may borrow only from a sibling folder: one line naming generator.path, before loading."""
    folder = beside_shapes / "shapes_flow"
    (folder / "shared.json").write_text(json.dumps({"vae": {"from": "../../etc"}}))
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["generator=sd", f"generator.path={folder}", "generator.device=cpu"]))
    assert info.value.key == "generator.path" and "beside shapes_flow" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("entry,words", [
    ({"from": "/etc"}, "must borrow a folder beside"),
    ({"from": "shapes/vae", "config": {"subfolder": "../../../anywhere"}}, "overrides 'subfolder', which is not a key"),
    ({"from": "shapes/vae", "config": {"use_safetensors": False}}, "overrides 'use_safetensors'"),
    ({"from": "shapes/vae", "config": 3}, "not a mapping of config keys"),
])
def test_shared_json_sets_only_config_keys_of_a_sibling_folder(beside_shapes, entry, words):
    """An override is a key of the borrowed component's own config, never a loader argument (a subfolder that
    would leave the parent, pickle weights): one line, before loading."""
    folder = beside_shapes / "shapes_flow"
    (folder / "shared.json").write_text(json.dumps({"vae": entry}))
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["generator=sd", f"generator.path={folder}", "generator.device=cpu"]))
    assert info.value.key == "generator.path" and words in str(info.value) and "\n" not in str(info.value)


def test_a_component_class_comes_from_diffusers_or_transformers_only(beside_shapes):
    from steerexp.generators.frozen import borrowed_components

    folder = beside_shapes / "shapes_flow"
    (folder / "shared.json").write_text(json.dumps({"vae": {"from": "shapes/vae", "config": {"shift_factor": 0.0}}}))
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = ["os", "system"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="must name a class of diffusers or transformers"):
        borrowed_components(folder)


def test_shipped_recipe_is_the_recipe_in_conf():
    """assets/recipe.json, written by the steerexp-pretrain runs that built the shipped assets, holds the same
    section for every stage as conf/pretrain.yaml: no asset was built by a recipe the repository no longer has."""
    from omegaconf import OmegaConf

    from steerexp import ASSETS

    conf = OmegaConf.load(conf_dir() / "pretrain.yaml")
    del conf["hydra"]
    conf = OmegaConf.to_container(conf, resolve=True)
    shipped = json.loads((ASSETS / "recipe.json").read_text())["config"]
    sections = ("world", "vae", "text_encoder", "unet", "generator_weak", "generator_flow", "classifier",
                "classifier_robust", "classifier_noisy", "clip")
    assert {k: shipped[k] for k in sections} == {k: conf[k] for k in sections}


ELSEWHERE = {"ddim_inversion+p2p", "direct_inversion+p2p", "textual_inversion"}  # refused; its own test above


@pytest.mark.parametrize("technique", sorted(set(TECHNIQUES) - ELSEWHERE))
def test_every_technique_runs_a_tiny_version_on_shapes_flow(built, tmp_path, technique):
    """The flow generator (the recipe's folder, smoke-built): every technique end to end, fingerprint unchanged.
    P2P is refused before loading (joint attention): test_families checks that refusal on the same family."""
    base = ["generator=sd", f"generator.path={built / 'shapes_flow'}", "generator.device=cpu", "generator.dtype=fp32",
            "sampling.steps=2",
            "eval.seeds=[0]", "eval.prompts=['a red {}']", "logger=none", "evaluator=[concept]"]
    metrics, run_dir = tiny_run(tmp_path, [f"technique={technique}", *TECHNIQUES[technique]], name=technique,
                                base=base)
    assert metrics["generator/unchanged"] is True
    assert (run_dir / "metrics.json").is_file()


# ---------------------------------------------------------------------------- autoguidance's weak flow model
def test_the_flow_stage_saves_its_early_transformer_as_the_weak_model(built, tmp_path):
    """generator_weak.fraction of generator_flow.steps: the transformer's EMA weights in fp16 beside the flow
    generator, borrowing the rest from it; `stages=[generator_flow_weak]` reruns the seeded recipe that far and
    writes the same weights; autoguidance samples with it on the flow family (the generator's transformer back in
    place, unchanged)."""
    from safetensors.torch import load_file

    from steerexp.generators import shared_components
    from steerexp.guiders import autoguidance
    from tests.helpers.weak import rebuild_weak

    weak = built / "shapes_flow_weak"
    assert sorted(p.name for p in weak.iterdir()) == ["model_index.json", "shared.json", "transformer"]
    assert {k: v[0] for k, v in shared_components(weak).items()} == {
        name: built / "shapes_flow" / name for name in ("scheduler", "text_encoder", "text_encoder_2",
                                                        "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
                                                        "vae")}
    tensors = load_file(weak / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}

    again = rebuild_weak(built / "shapes_flow", tmp_path / "rebuild", "generator_flow_weak", "transformer")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)

    gen = load_generator(str(built / "shapes_flow"), device="cpu")
    plain = gen.generate(PROMPTS[:2], [0, 1], steps=2, guidance=Guidance(scale=1.0))
    guided = gen.generate(PROMPTS[:2], [0, 1], steps=2, guidance=Guidance(scale=3.0, guider=autoguidance(str(weak))))
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
    assert gen.denoiser is gen.transformer and gen.unchanged()


def test_a_flow_weak_model_borrows_through_shapes_flow_and_autoguidance_finds_it_built(built, beside_shapes,
                                                                                         monkeypatch):
    """A weak model beside a shapes_flow that borrows from shapes (a full build into out=DIR): what shapes_flow
    borrows is followed there, with its overrides. generator=shapes_flow guider=autoguidance validates with the
    weak model built beside the built generator ($STEEREXP_BUILT), and the run resolves it there."""
    import shutil

    from steerexp.generators import shared_components, weak_path
    from steerexp.pretrain.flow_generator import share_with_sibling
    from steerexp.run import build

    share_with_sibling(beside_shapes / "shapes_flow")
    shutil.copytree(built / "shapes_flow_weak", beside_shapes / "shapes_flow_weak")
    borrowed = shared_components(beside_shapes / "shapes_flow_weak")
    assert borrowed["vae"] == (beside_shapes / "shapes" / "vae", {"shift_factor": 0.0})
    assert borrowed["tokenizer_2"] == (beside_shapes / "shapes" / "tokenizer", {"model_max_length": CLIP_LENGTH})
    assert borrowed["text_encoder_3"] == (beside_shapes / "shapes_flow" / "text_encoder_3", {})

    monkeypatch.setenv("STEEREXP_BUILT", str(built))
    assert weak_path("shapes_flow") == built / "shapes_flow_weak"
    cfg = compose_config(["generator=shapes_flow", "guider=autoguidance", "technique=guidance", "logger=none",
                          "evaluator=[concept]", "sampling.steps=2"])
    validate(cfg)
    _, technique, _ = build(cfg)
    assert technique.guidance.guider.weak_model == built / "shapes_flow_weak"
    shutil.rmtree(beside_shapes / "shapes_flow_weak")
    monkeypatch.setenv("STEEREXP_BUILT", str(beside_shapes))   # shapes_flow built there, its weak model not
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["generator=shapes_flow", "guider=autoguidance"]))
    assert info.value.key == "guider.weak_model" and "stages=[generator_flow_weak]" in str(info.value)
    assert "\n" not in str(info.value)
