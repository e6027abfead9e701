import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import CLIPTokenizer

from steerexp.generators import FrozenGenerator, GeneratorChangedError, Guidance, load_generator
from steerexp.pretrain import generator as pg
from steerexp.pretrain.tokenizer import write_clip_tokenizer_files
from tests.helpers import compose_config



def test_shipped_folder_loads_with_diffusers(shipped):
    pipe = StableDiffusionPipeline.from_pretrained(shipped / "shapes")
    assert pipe.safety_checker is None
    out = pipe("a red circle on the left", num_inference_steps=4, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)
    index = json.loads((shipped / "shapes" / "model_index.json").read_text())
    assert index["tokenizer"][1] == "CLIPTokenizer" and index["text_encoder"][1] == "CLIPTextModel"


def test_tokenizer_is_real_clip_bpe(gen):
    import open_clip

    text = "a photo of a small red circle on the left"
    ours = gen.tokenize([text])[0].tolist()
    theirs = open_clip.tokenize([text])[0].tolist()
    n = theirs.index(49407) + 1
    assert ours[:n] == theirs[:n]


def test_generator_is_frozen_and_unchanged_after_sampling(gen):
    assert gen.is_frozen()
    params = [p for m in gen.modules for p in m.parameters()]
    assert params and not any(p.requires_grad for p in params)
    fp = gen.fingerprint()
    gen.generate(["a blue square at the top"] * 2, [0, 1], steps=4)
    assert gen.fingerprint() == fp and gen.unchanged()


def test_fingerprint_detects_a_changed_weight(shipped):
    g = load_generator(device="cpu")
    with torch.no_grad():
        next(g.unet.parameters()).view(-1)[0] += 1e-3
    assert not g.unchanged()
    with pytest.raises(GeneratorChangedError):
        g.assert_unchanged()


def test_same_seed_same_image_whatever_the_batch(gen):
    assert torch.equal(gen.initial_latents([5, 6, 7])[1], gen.initial_latents([6])[0])
    a = gen.generate(["a red circle"] * 3, [5, 6, 7], steps=4)
    b = gen.generate(["a red circle"], [6], steps=4)
    # the noise is identical; CPU kernels may round differently for another batch size
    assert (a[1] - b[0]).abs().max() < 2e-3
    assert not torch.allclose(a[0], a[1], atol=1e-2)


def test_sampling_with_gradients_reaches_only_the_inputs(gen):
    cond = gen.encode_prompt(["a green ring"])
    uncond = gen.encode_prompt([""])
    x = gen.initial_latents([0]).requires_grad_(True)
    out = gen.sample(cond, x, uncond, steps=3, guidance=Guidance(5.0), grad=True)
    out.pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for m in gen.modules for p in m.parameters())
    # gradient checkpointing gives the same gradient
    x2 = x.detach().clone().requires_grad_(True)
    gen.sample(cond, x2, uncond, steps=3, guidance=Guidance(5.0), grad=True, checkpoint=True).pow(2).mean().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    # without gradients nothing is tracked
    assert not gen.sample(cond, x.detach(), uncond, steps=2).requires_grad


def test_injected_token_embedding_changes_only_that_prompt(shipped):
    g = load_generator(device="cpu")
    (row,) = g.add_tokens(["<test-tok>"])
    assert row == 0 and g.tokenizer.convert_tokens_to_ids("<test-tok>") == g.base_vocab_size  # no table resized
    table = g.initializer_embedding("circle")[None]
    a = g.encode_prompt(["a red <test-tok>"], table)
    b = g.encode_prompt(["a red circle"])
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="already in the tokenizer"):
        g.add_tokens(["circle"])


def tiny_sd_pipeline(folder, prediction_type="v_prediction"):
    """A random-config SD pipeline built here (no download), saved as a diffusers folder."""
    cfg = OmegaConf.create({
        "vae": {"block_out_channels": [8, 8], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4},
        "te": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        "unet": {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": 2, "norm_num_groups": 8},
    })
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(folder / "_tok", 16))
    from diffusers import DDIMScheduler
    pipe = StableDiffusionPipeline(
        vae=pg.build_vae(cfg.vae, 16), text_encoder=pg.build_text_encoder(cfg.te, tok), tokenizer=tok,
        unet=pg.build_unet(cfg.unet, 4, 8, 32),
        scheduler=DDIMScheduler(prediction_type=prediction_type, beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


def test_generator_sd_config_runs_a_local_pipeline(tmp_path):
    path = tiny_sd_pipeline(tmp_path)
    cfg = compose_config(["generator=sd", f"generator.path={path}", "generator.device=cpu", "generator.dtype=fp32"])
    g = instantiate(cfg.generator)
    assert isinstance(g, FrozenGenerator) and g.prediction_type == "v_prediction"
    images = g.generate(["a red circle", "a blue square"], [0, 1], steps=3)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert g.unchanged()


def test_missing_generator_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_generator(str(missing), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_generator(str(tmp_path / "empty"), device="cpu")


def test_bad_dtype_lists_choices():
    with pytest.raises(ValueError, match="fp32"):
        load_generator(None, device="cpu", dtype="float8")


def test_unknown_config_option_lists_the_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose_config(["generator=nope"])
    assert "shapes" in str(err.value) and "sd" in str(err.value)


def test_smoke_pretraining_builds_loadable_assets(smoke_assets):
    from steerexp.scorers.classifier import ConceptClassifier
    from steerexp.scorers.clip import CLIPScorer

    pipe = StableDiffusionPipeline.from_pretrained(smoke_assets / "shapes")
    assert pipe.unet is not None
    g = FrozenGenerator.from_pretrained(smoke_assets / "shapes", device="cpu")
    assert g.generate(["a red circle"], [0], steps=2).shape == (1, 3, 32, 32)
    clf = ConceptClassifier.from_pretrained(smoke_assets / "classifier")
    assert set(clf.heads) == {"shape", "colour", "size", "position"}
    clip = CLIPScorer(pretrained=smoke_assets / "clip" / "open_clip_model.safetensors")
    assert clip.encode_texts(["a red star"]).shape[-1] == clip.encode_images(torch.rand(1, 3, 32, 32)).shape[-1]
    assert json.loads((smoke_assets / "recipe.json").read_text())["config"]["seed"] == 0


def test_pretraining_one_stage_keeps_the_others_recipe(tmp_path):
    """recipe.json: rerunning one stage rewrites its own section and time, never another stage's recipe."""
    import json

    from hydra import compose, initialize_config_dir

    from steerexp import conf_dir
    from steerexp.pretrain.cli import run

    (tmp_path / "recipe.json").write_text(json.dumps({"config": {"classifier_robust": {"steps": 800}},
                                                      "seconds": {"classifier_robust": 1.0}}))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["smoke=true", f"out={tmp_path}", "stages=[classifier]"])
    run(cfg)
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["config"]["classifier_robust"] == {"steps": 800}  # not this run's smoke section
    assert recipe["config"]["classifier"]["steps"] == 3
    assert set(recipe["seconds"]) == {"classifier", "classifier_robust"}


def test_the_generator_stage_saves_its_early_unet_as_the_weak_model(smoke_assets, tmp_path):
    """generator_weak.fraction of the UNet's steps: its EMA weights in fp16, beside the generator, borrowing the
    rest from it (shared.json); `stages=[generator_weak]` runs the same seeded recipe only that far and writes the
    same weak UNet bit for bit; it refuses a generator folder whose VAE is not the one it trains."""
    import shutil

    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from steerexp import ASSETS, conf_dir
    from steerexp.generators import load_generator, shared_components
    from steerexp.pretrain.cli import run
    from tests.helpers.weak import rebuild_weak

    weak = smoke_assets / "shapes_weak"
    assert set(shared_components(weak)) == {"text_encoder", "tokenizer", "vae", "scheduler"}
    assert sorted(p.name for p in weak.iterdir()) == ["model_index.json", "shared.json", "unet"]
    tensors = load_file(weak / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    final = load_file(smoke_assets / "shapes" / "unet" / "diffusion_pytorch_model.safetensors")
    assert tensors.keys() == final.keys() and any(not torch.equal(tensors[k], final[k].half()) for k in final)
    g = load_generator(str(weak), device="cpu")
    assert g.generate(["a red circle"], [0], steps=2).shape == (1, 3, 32, 32)

    out = tmp_path / "rebuild"
    again = rebuild_weak(smoke_assets / "shapes", out, "generator_weak", "unet")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert (out / "shapes_weak" / "shared.json").read_bytes() == (weak / "shared.json").read_bytes()

    other = tmp_path / "other"
    shutil.copytree(ASSETS / "shapes", other / "shapes")   # the shipped generator: not this smoke recipe's VAE
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["smoke=true", f"out={other}", "stages=[generator_weak]"])
    with pytest.raises(RuntimeError, match="VAE differs"):
        run(cfg)
    assert not (other / "shapes_weak").exists()
