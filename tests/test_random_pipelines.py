"""Random-weight pipelines of every family (steerexp.generators.random_pipelines): the tiny folders load with
diffusers' own pipeline class from the local path and sample; the real configs have the public sizes."""
import json

import pytest
import torch

from steerexp.generators.random_pipelines import (
    ARCHS,
    make_random_pipeline,
    parameter_counts,
    pipeline_class,
    word_list,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("random_pipelines")
    return {arch: make_random_pipeline(arch, root / arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_pipeline_loads_and_samples(folders, arch):
    import diffusers

    folder = folders[arch]
    cls = pipeline_class(folder)
    assert cls is getattr(diffusers, {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                                      "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[arch])
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    kw = {} if arch == "flux" else {"guidance_scale": 5.0}
    images = pipe(["a photo of a red star", "a blue circle"], num_inference_steps=2, height=64, width=48,
                  output_type="pt", generator=torch.Generator().manual_seed(0), **kw).images
    assert images.shape == (2, 3, 64, 48)
    assert torch.isfinite(images).all()


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = make_random_pipeline("sd15", tmp_path / "a", seed=3)
    b = make_random_pipeline("sd15", tmp_path / "b", seed=3)
    c = make_random_pipeline("sd15", tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["conv_in.weight"], wc["conv_in.weight"])


def test_tokenizers_offline(folders):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(folders["sd15"] / "tokenizer")
    one_token = [w for w in word_list() if w.isalpha()]
    assert all(len(clip(w, add_special_tokens=False).input_ids) == 1 for w in one_token)
    assert clip("xyzzy").input_ids[0] == len(clip) - 2  # unknown words split into byte symbols
    t5 = T5TokenizerFast.from_pretrained(folders["flux"] / "tokenizer_2")
    ids = t5("a photo of a xyzzy").input_ids
    assert ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0 and t5.unk_token_id not in ids


def test_steerexp_generator_loads_tiny_sd15(folders):
    from steerexp.generators import load_generator

    gen = load_generator(str(folders["sd15"]), device="cpu")
    assert gen.base_vocab_size == len(gen.tokenizer) and gen.unchanged()
    images = gen.generate(["a red star"], [0], steps=2)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_sd3_without_t5_and_options(tmp_path):
    folder = make_random_pipeline("sd3", tmp_path / "sd3", t5=False, dtype="bf16")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and not (folder / "text_encoder_3").exists()
    with pytest.raises(ValueError, match="expected"):  # as with the real SD3 folders: T5 is dropped by name
        pipeline_class(folder).from_pretrained(str(folder))
    pipe = pipeline_class(folder).from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None,
                                                  torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="sd3 only"):
        make_random_pipeline("flux", tmp_path / "flux", t5=False)
    with pytest.raises(FileExistsError):
        make_random_pipeline("sd3", folder)


def test_real_configs_match_public_sizes():
    """Parameter counts of the real configurations (meta device: no memory) against the public models."""
    sd15 = parameter_counts("sd15", "real")
    assert sd15 == {"vae": 83_653_863, "text_encoder": 123_060_480, "unet": 859_520_964}
    sdxl = parameter_counts("sdxl", "real")
    assert sdxl["unet"] == 2_567_463_684 and round(sdxl["text_encoder_2"] / 1e6) == 695
    sd3 = parameter_counts("sd3", "real")
    assert round(sd3["transformer"] / 1e9, 2) == 2.03 and round(sd3["text_encoder_3"] / 1e9, 2) == 4.76
    flux = parameter_counts("flux", "real")
    assert round(flux["transformer"] / 1e9, 1) == 11.9
    reduced = parameter_counts("flux", "real", depth=0.25, t5_layers=4)
    assert reduced["transformer"] < flux["transformer"] / 3
