"""The generator axis (issue 17): sdxl, sd3 and flux behind the one FrozenGenerator interface.

Each family's tiny random-config pipeline (steerexp.generators.random_pipelines, no download) loads by
its model_index.json, samples exactly as diffusers' own pipeline does, and runs every technique end to
end with its fingerprint unchanged; what a family cannot run is refused in one line before it loads.
"""
from __future__ import annotations

import pytest
import torch

from steerexp.generators import Guidance, load_generator
from steerexp.generators.random_pipelines import make_random_pipeline
from tests.helpers import tiny_run

FAMILIES = {"sdxl": {}, "sd3": {}, "sd3_no_t5": {"t5": False}, "flux": {}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_random_pipeline(name.split("_")[0], root / name, size="tiny", **kw)
            for name, kw in FAMILIES.items()}


def diffusers_pipeline(name, folder):
    from diffusers import DDIMScheduler, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    if name == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        # the same DDIM the generator samples with (clip_sample off: Euler's config does not say it)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        return pipe
    if name.startswith("sd3"):
        return StableDiffusion3Pipeline.from_pretrained(folder, **({"text_encoder_3": None, "tokenizer_3": None}
                                                                    if name == "sd3_no_t5" else {}))
    return FluxPipeline.from_pretrained(folder)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_samples_as_its_diffusers_pipeline_does(folders, name):
    gen = load_generator(str(folders[name]), device="cpu")
    assert gen.family == name.split("_")[0]
    pipe = diffusers_pipeline(name, folders[name])
    scale = 3.5 if name == "flux" else 5.0
    guidance = Guidance(scale=scale)
    x = gen.initial_latents([0])
    with torch.no_grad():
        cond = gen.encode_prompt(["a red circle"])
        ours = gen.decode_latents(gen.sample(cond, x, gen.guidance_embeddings(guidance)[0], 3, guidance))
    kw = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=scale, output_type="pt",
              height=gen.resolution, width=gen.resolution)
    if name == "flux":  # the pipeline takes the transformer's 2x2 patches
        B, C, H, W = x.shape
        kw["latents"] = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
        kw["max_sequence_length"] = gen.encoders[1].max_length
    else:
        kw["latents"] = x.clone()
        if name == "sd3":
            kw["max_sequence_length"] = gen.encoders[2].max_length
    theirs = pipe(**kw).images
    assert ours.shape == theirs.shape and ours.std() > 0.01
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_inversion_inverts_the_euler_sampler(folders, name):
    """Flow-ODE inversion then Euler sampling come back to the start; the error shrinks with the steps."""
    gen = load_generator(str(folders[name]), device="cpu")
    with torch.no_grad():
        cond = gen.encode_prompt(["a red circle"])
        z0 = gen.sample(cond, gen.initial_latents([1]), None, 4, Guidance(scale=1.0))
        errors = []
        for steps in (5, 40):
            xT = gen.invert(z0, cond, None, steps)[-1]
            errors.append(float((gen.sample(cond, xT, None, steps, Guidance(scale=1.0)) - z0).abs().mean()))
    assert errors[1] < errors[0] / 2 and errors[1] < 0.05 * float(z0.abs().mean()), errors


def test_packed_conditioning_carries_the_pooled_vector(folders):
    """sdxl's conditioning is the hidden rows then the pooled row: a delta on that row moves the image."""
    gen = load_generator(str(folders["sdxl"]), device="cpu")
    L, D = gen.cond_shape
    hidden, pooled = gen.unpack(gen.encode_prompt(["a red circle"]))
    assert hidden.shape[1] == gen.tokenizer.model_max_length and pooled.shape[-1] == gen.pooled_dim
    delta = torch.zeros(L, D)
    delta[-1, : gen.pooled_dim] = 5.0
    a = gen.generate(["a red circle"], [0], steps=2)
    b = gen.generate(["a red circle"], [0], steps=2, delta=delta)
    assert (a - b).abs().max() > 1e-3


def test_sdxl_textual_inversion_export_loads_in_plain_diffusers(folders, tmp_path):
    """The exported learned_embeds.safetensors (clip_l and clip_g rows) loads with diffusers'
    load_textual_inversion into both text encoders, and the pipeline then draws what the run draws."""
    from safetensors.torch import load_file

    from steerexp.run import run
    from tests.helpers import compose_config

    cfg = compose_config(["generator=sd", f"generator.path={folders['sdxl']}", "generator.device=cpu",
                          "generator.dtype=fp32", "technique.steps=3", "technique.batch_size=2", "technique.lr=0.5",
                          "sampling.steps=3", "eval.seeds=[0]", "eval.prompts=['a red {}']", "logger=none",
                          "evaluator=[concept]"])
    (tmp_path / "run").mkdir()
    run(cfg, tmp_path / "run", "ti", "tests")
    state = load_file(tmp_path / "run" / "learned_embeds.safetensors")
    assert set(state) == {"clip_l", "clip_g"}

    pipe = diffusers_pipeline("sdxl", folders["sdxl"])
    token = cfg.technique.placeholder
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    gen = load_generator(str(folders["sdxl"]), device="cpu")
    assert [state[e.name].shape[-1] for e in gen.encoders] == [e.width for e in gen.encoders]
    gen.add_tokens([token])
    vectors = torch.cat([state["clip_l"].reshape(1, -1), state["clip_g"].reshape(1, -1)], dim=-1)
    prompt = f"a red {token}"
    ours = gen.generate([prompt], [0], steps=3, guidance=Guidance(scale=5.0), added_embeddings=vectors)
    theirs = pipe(prompt=prompt, latents=gen.initial_latents([0]), num_inference_steps=3, guidance_scale=5.0,
                  output_type="pt", height=gen.resolution, width=gen.resolution).images
    assert (ours - theirs).abs().max() < 1e-4
    plain = gen.generate(["a red object"], [0], steps=3, guidance=Guidance(scale=5.0))
    assert (ours - plain).abs().max() > 1e-3  # the token is not the initializer word any more


def test_an_unsupported_pipeline_class_names_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="KandinskyPipeline.*StableDiffusionXLPipeline.*FluxPipeline"):
        load_generator(str(tmp_path), device="cpu")


# ---------------------------------------------------------------------------- every technique on every family
WORLD_TARGETS = ["technique.targets.k=1", "++technique.targets.fixed.colour=red"]
TRAINED = ["technique.steps=2", "technique.batch_size=1", "technique.train_sampling_steps=2",
           "technique.train_seeds=[100]", "objective=[concept_score,delta_l2]"]
TECHNIQUES = {
    "textual_inversion": ["technique.steps=2", "technique.batch_size=2", "technique.targets.k=2"],
    "prompt_delta": TRAINED,
    "latent_offset": TRAINED,
    "prompt_delta_latent_offset": TRAINED,
    "null_text_inversion": ["technique.inner_steps=2", *WORLD_TARGETS],
    "ddim_inversion": WORLD_TARGETS,
    "ddim_inversion+p2p": ["technique=ddim_inversion", "technique.edit.control=p2p", *WORLD_TARGETS],
    "direct_inversion": ["technique.edit.control=null", *WORLD_TARGETS],
    "direct_inversion+p2p": ["technique=direct_inversion", *WORLD_TARGETS],
    "negative_prompt_inversion": WORLD_TARGETS,
    "embedding_arithmetic": [],
    "energy_guidance": [],
    "guidance": [],
    "latent_priming": ["technique.candidates=2", "technique.top_k=1"],
    "noise_search": ["technique.max_calls=4", "technique.candidates=2", "technique.neighbours=1"],
    "nudging": ["technique.rounds=1", "technique.opt_steps=1", "technique.opt_sampling_steps=2"],
    "prompt_search": ["technique.max_calls=4", "technique.beam_width=1", "technique.proposals=2"],
    "reno": ["technique.iterations=1", "technique.max_calls=8", "technique.opt_sampling_steps=2"],
}
# what a family cannot run, and the words of the one-line refusal
REFUSED = {
    ("sd3", "ddim_inversion+p2p"): "joint attention", ("sd3", "direct_inversion+p2p"): "joint attention",
    ("flux", "ddim_inversion+p2p"): "joint attention", ("flux", "direct_inversion+p2p"): "joint attention",
    ("flux", "null_text_inversion"): "distilled", ("flux", "negative_prompt_inversion"): "distilled",
}


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_every_technique_runs_on_every_family(folders, tmp_path, monkeypatch, name, technique):
    base = ["generator=sd", f"generator.path={folders[name]}", "generator.device=cpu", "generator.dtype=fp32",
            "sampling.steps=2", "eval.seeds=[0]", "eval.prompts=['a red {}']", "logger=none", "evaluator=[concept]"]
    extra = ([] if "+" in technique else [f"technique={technique}"]) + TECHNIQUES[technique]
    refusal = REFUSED.get((name, technique))
    if refusal:
        import steerexp.generators as generators

        def no_loading(*_a, **_k):
            raise AssertionError("the generator loaded before the refusal")

        monkeypatch.setattr(generators, "from_pretrained", no_loading)
        with pytest.raises(ValueError, match=f"does not apply to the {name} generator family: .*{refusal}") as err:
            tiny_run(tmp_path, extra, name=technique, base=base)
        assert "\n" not in str(err.value)
        return
    metrics, run_dir = tiny_run(tmp_path, extra, name=technique, base=base)
    assert metrics["generator/unchanged"] is True
    assert (run_dir / "metrics.json").is_file()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_p2p_edit_methods_are_refused_on_joint_attention_before_loading(folders, tmp_path, monkeypatch, name):
    import steerexp.generators as generators

    def no_loading(*_a, **_k):
        raise AssertionError("the generator loaded before the refusal")

    monkeypatch.setattr(generators, "from_pretrained", no_loading)
    base = ["generator=sd", f"generator.path={folders[name]}", "generator.device=cpu", "generator.dtype=fp32",
            "sampling.steps=2", "eval.seeds=[0]", "eval.prompts=['{}']", "logger=none", "evaluator=[edit]"]
    extra = ["technique=ddim_inversion", *WORLD_TARGETS, "evaluator.edit.methods=[ddim_w1,ddim_w1+p2p]"]
    with pytest.raises(ValueError, match=r"evaluator\.edit\.methods: ddim_w1\+p2p use Prompt-to-Prompt.*joint "
                                         r"attention.*evaluator\.edit\.methods=\[ddim_w1\]") as err:
        tiny_run(tmp_path, extra, name="edit_p2p", base=base)
    assert "\n" not in str(err.value)
