"""Resolution and aspect are settings (issue 32 §2): generator.height / generator.width.

Checked before loading (one line naming the key, exit 2 from the CLI): positive whole pixels, divisible by
the VAE's scale factor (x2 where the denoiser reads 2x2 latent patches: SD3, FLUX), within the family's limit.
A run then samples, inverts and trains at that size, and image files and world targets are fitted to it.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from steerexp import ASSETS
from steerexp.errors import ConfigError
from steerexp.generators import Guidance, load_generator
from steerexp.generators.random_pipelines import make_random_pipeline
from steerexp.validate import validate
from tests.helpers import compose_config, tiny_run

SHAPES = ASSETS / "shapes"
H, W = 64, 96  # a non-square size the tiny random folders (VAE factor 8, default 64 px) take


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    return {arch: make_random_pipeline(arch, root / arch, size="tiny") for arch in ("sd15", "sd3", "flux")}


def refused(overrides, key) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["logger=none", *overrides]))
    assert info.value.key == key, str(info.value)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------- validated before loading
@pytest.mark.parametrize("value", ["0", "-32", "32.5", "abc", "true"])
def test_a_size_that_is_not_a_positive_whole_number_is_refused(value):
    assert "positive whole number of pixels" in refused([f"generator.height={value}"], "generator.height")


def test_the_embedded_shapes_generator_takes_non_square_multiples_of_its_vae_factor():
    validate(compose_config(["generator.height=32", "generator.width=48"]))  # VAE factor 4, default 32 px
    msg = refused(["generator.width=30"], "generator.width")
    assert "is 30 px, not divisible by 4 (the VAE's scale factor" in msg and "generator.width=28 or 32" in msg
    msg = refused(["generator.height=256"], "generator.height")
    assert "above the 128 px this model allows" in msg


def test_sizes_follow_each_family_rule(folders):
    sd = ["generator=sd", f"generator.path={folders['sd15']}", "generator.dtype=fp32", "generator.device=cpu"]
    validate(compose_config([*sd, f"generator.height={H}", f"generator.width={W}"]))
    validate(compose_config([*sd, "generator.width=72"]))  # VAE factor 8; a UNet takes any latent side
    assert "not divisible by 8" in refused([*sd, "generator.width=68"], "generator.width")
    for arch in ("sd3", "flux"):  # the transformer reads 2x2 latent patches: multiples of 16
        base = ["generator=sd", f"generator.path={folders[arch]}", "generator.dtype=fp32", "generator.device=cpu"]
        validate(compose_config([*base, f"generator.height={H}", f"generator.width={W}"]))
        msg = refused([*base, "generator.width=72"], "generator.width")
        assert "not divisible by 16" in msg and "2x2 patches" in msg and "generator.width=64 or 80" in msg
    sd3 = ["generator=sd", f"generator.path={folders['sd3']}", "generator.dtype=fp32", "generator.device=cpu"]
    msg = refused([*sd3, "generator.height=272"], "generator.height")  # its pos_embed_max_size is 16 patches
    assert "above the 256 px" in msg and "position embedding covers at most 16 patches" in msg


def test_the_cli_refuses_a_bad_size_in_one_line_before_loading(tmp_path):
    from tests.test_cli import config_env, steerexp

    out = steerexp(["generator.width=30", "logger=none"], tmp_path, env=config_env())
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("steerexp: error: generator.width: is 30 px, not divisible by 4")
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_the_loader_applies_the_same_rule(folders):
    with pytest.raises(ValueError, match="generator.width: is 72 px, not divisible by 16"):
        load_generator(str(folders["flux"]), device="cpu", width=72)
    with pytest.raises(ValueError, match="generator.height: is 256 px, above the 128 px"):  # 4x the default side
        load_generator(device="cpu", height=256)
    assert load_generator(device="cpu", height=128, width=64).image_size == (128, 64)


# ---------------------------------------------------------------------------- sampling at the size
def test_an_sd_family_generator_samples_non_square_as_its_pipeline_does(folders):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    gen = load_generator(str(folders["sd15"]), device="cpu", height=H, width=W)
    assert gen.image_size == (H, W) and gen.latent_shape() == (4, H // 8, W // 8)
    with pytest.raises(ValueError, match="not square"):
        gen.resolution  # noqa: B018 (a square-only reader fails loudly, not silently wrong)
    x = gen.initial_latents([0])
    guidance = Guidance(scale=5.0)
    ours = gen.generate(["a red circle"], [0], steps=3, guidance=guidance)
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd15"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(gen.scheduler.config)  # the DDIM the generator samples with
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt="a red circle", latents=x, num_inference_steps=3, guidance_scale=5.0, output_type="pt",
                  height=H, width=W).images
    assert ours.shape == theirs.shape == (1, 3, H, W) and ours.std() > 0.01
    assert (ours - theirs).abs().max() < 1e-4


def test_a_flow_family_generator_samples_non_square_as_its_pipeline_does(folders):
    """FLUX's shift mu follows the image's patch count: the schedule is the pipeline's at 64x96, not at 64x64."""
    from diffusers import FluxPipeline

    gen = load_generator(str(folders["flux"]), device="cpu", height=H, width=W)
    x = gen.initial_latents([0])
    assert x.shape == (1, 16, H // 8, W // 8)
    ours = gen.generate(["a red circle"], [0], steps=3, guidance=Guidance(scale=3.5))
    pipe = FluxPipeline.from_pretrained(folders["flux"])
    pipe.set_progress_bar_config(disable=True)
    B, C, h, w = x.shape
    packed = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w // 4, C * 4)
    theirs = pipe(prompt="a red circle", latents=packed, num_inference_steps=3, guidance_scale=3.5, output_type="pt",
                  height=H, width=W, max_sequence_length=gen.encoders[1].max_length).images
    assert ours.shape == theirs.shape == (1, 3, H, W) and ours.std() > 0.01
    assert (ours - theirs).abs().max() < 1e-4
    square = load_generator(str(folders["flux"]), device="cpu")
    assert square.schedule(3).timesteps.tolist() != gen.schedule(3).timesteps.tolist()  # mu differs with the size


# ---------------------------------------------------------------------------- training and targets at the size
def denoised_sizes(monkeypatch, cls) -> set:
    """Every latent (h, w) the family's denoiser is called on from now on."""
    seen, denoise = set(), cls.denoise

    def spy(self, x, *a, **k):
        seen.add(tuple(x.shape[-2:]))
        return denoise(self, x, *a, **k)

    monkeypatch.setattr(cls, "denoise", spy)
    return seen


@pytest.mark.parametrize("arch,technique", [("sd15", "textual_inversion"), ("flux", "prompt_delta")])
def test_a_technique_trains_and_samples_at_the_size(folders, tmp_path, monkeypatch, arch, technique):
    from steerexp.generators.flux import FluxGenerator
    from steerexp.generators.sd import SDGenerator
    from steerexp.techniques.textual_inversion import TextualInversion

    seen = denoised_sizes(monkeypatch, SDGenerator if arch == "sd15" else FluxGenerator)
    targets = []
    if technique == "textual_inversion":  # world targets are drawn square and fitted to 64x96 (images.fit=crop)
        prepare = TextualInversion.prepare
        monkeypatch.setattr(TextualInversion, "prepare",
                            lambda self: (prepare(self), targets.append(tuple(self.target_images.shape))))
        extra = ["technique.steps=1", "technique.batch_size=1", "technique.targets.k=1"]
    else:
        extra = ["technique=prompt_delta", "technique.steps=1", "technique.batch_size=1",
                 "technique.train_sampling_steps=2", "technique.train_seeds=[100]",
                 "objective=[concept_score,delta_l2]"]
    base = ["generator=sd", f"generator.path={folders[arch]}", "generator.device=cpu", "generator.dtype=fp32",
            f"generator.height={H}", f"generator.width={W}", "sampling.steps=2", "eval.seeds=[0]",
            "eval.prompts=['a red {}']", "logger=none", "evaluator=[concept]"]
    metrics, run_dir = tiny_run(tmp_path, extra, name=technique, base=base)
    assert metrics["generator/unchanged"] is True
    assert seen == {(H // 8, W // 8)}, seen  # every denoiser call, training and sampling, at 64x96
    if technique == "textual_inversion":
        assert targets == [(1, 3, H, W)]


def test_inversion_targets_and_masks_follow_the_size(tmp_path, monkeypatch):
    """DDIM inversion of world targets on the shapes generator at 32x48: targets, latents, the edit evaluator's
    scene masks and P2P's cross-attention maps (each layer's grid keeps the 2:3 aspect) all at 32x48."""
    from steerexp.generators import attention
    from steerexp.generators.sd import SDGenerator

    seen, grids, layer_grid = denoised_sizes(monkeypatch, SDGenerator), set(), attention.Controller.layer_grid
    monkeypatch.setattr(attention.Controller, "layer_grid", lambda self, q: grids.add(layer_grid(self, q)) or
                        layer_grid(self, q))
    base = ["generator.height=32", "generator.width=48", "technique=ddim_inversion", "technique.targets.k=1",
            "++technique.targets.fixed.colour=red", "sampling.steps=2", "eval.seeds=[0]", "eval.prompts=['{}']",
            "logger=none", "evaluator=[edit]", "evaluator.edit.methods=[ddim_w1,ddim_w1+p2p+blend]"]
    metrics, run_dir = tiny_run(tmp_path, [], name="ddim", base=base)
    assert metrics["generator/unchanged"] is True
    assert 0 < metrics["edit/background_fraction"] < 1 and "edit/success/ddim_w1+p2p+blend" in metrics
    assert seen == {(8, 12)}, seen
    assert grids == {(8, 12), (4, 6)}, grids


def test_image_files_are_fitted_to_a_non_square_size(tmp_path):
    from steerexp.images import read_image

    arr = np.zeros((40, 40, 3), np.uint8)
    arr[:10] = 255  # a white top band a centre crop to 2:1 removes
    Image.fromarray(arr).save(tmp_path / "sq.png")
    out = read_image(tmp_path / "sq.png", "technique.targets.folder", (16, 32))
    assert out.shape == (16, 32, 3) and out.max() == 0  # crop: rows 10..30 of 40 (the 2:1 centre), resized
    with pytest.raises(ValueError, match="is 40x40 but the generator works at 32x16"):
        read_image(tmp_path / "sq.png", "technique.targets.files", (16, 32), switches="technique.targets")
    with pytest.warns(UserWarning, match="resizing .* from 40x40 to 32x16"):
        out = read_image(tmp_path / "sq.png", "technique.targets.files", (16, 32), switches="technique.targets",
                         resize=True)
    assert out.shape == (16, 32, 3) and out.max() == 0


def test_world_references_keep_a_non_square_runs_aspect():
    """The shapes world draws squares: its images and masks at 32x48 are drawn at the longer side and centre-
    cropped (images.fit=crop) to the run's aspect; a square run's are the world's own, unchanged."""
    from steerexp.evaluators.edit import scene_mask
    from steerexp.evaluators.memorisation import Memorisation
    from steerexp.images import to_tensor
    from steerexp.targets import world_dataset
    from steerexp.worlds.shapes import world

    square, _ = world_dataset(3, 2, 32)
    assert np.array_equal(square, world.dataset(3, 2, res=32)[0])
    wide, scenes = world_dataset(3, 2, (32, 48))
    assert wide.shape == (2, 32, 48, 3) and np.array_equal(wide, world.dataset(3, 2, res=48)[0][:, 8:40])
    mask = scene_mask(scenes[0], (32, 48)).numpy()
    full = scene_mask(scenes[0], 48).numpy()
    assert mask.shape == (32, 48) and np.array_equal(mask, full[8:40])
    refs = Memorisation(reference="protected").references(None, "protected", (32, 48))
    assert tuple(refs.shape) == (8, 3, 21, 32)
    assert torch_equal(Memorisation(reference="protected").references(None, "protected", (32, 32)),
                       to_tensor(world.protected_set()[0]))


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
