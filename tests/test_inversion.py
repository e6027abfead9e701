"""DDIM inversion, null-text inversion and negative-prompt inversion on the embedded generator,
tiny: 2-3 world images, 6 DDIM steps. Each effect is asserted on a measurement that could
come out the other way."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchmetrics.functional.image import peak_signal_noise_ratio

from steerexp.run import run
from steerexp.techniques.ddim_inversion import DDIMInversion
from steerexp.techniques.negative_prompt_inversion import NegativePromptInversion
from steerexp.techniques.null_text_inversion import NullTextInversion
from steerexp.worlds.shapes import world
from tests.helpers import compose_config

STEPS = 6



def psnr(images, originals) -> float:
    return float(peak_signal_noise_ratio(images, originals, data_range=1.0, dim=(1, 2, 3), reduction="none").mean())


def test_ddim_inversion_reconstructs_better_at_w1_than_at_w75(gen):
    tech = DDIMInversion(gen, targets={"k": 3, "seed": 5}, sampling={"steps": STEPS})
    tech.prepare()
    tech.compute()
    assert tech.latents_T.shape == (3, *gen.latent_shape())
    w1, w75 = psnr(tech.reconstruct("ddim_w1"), tech.images), psnr(tech.reconstruct("ddim_w7.5"), tech.images)
    assert w1 > w75 + 1.0, (w1, w75)
    assert psnr(tech.reconstruct("vae"), tech.images) > w75
    assert gen.unchanged()


def test_nti_loss_falls_and_beats_ddim_inversion_at_the_same_w(gen, tmp_path):
    kw = dict(targets={"k": 2, "seed": 3}, sampling={"steps": STEPS}, guidance_scale=5.0, inner_steps=5,
              early_stopping=False)
    nti = NullTextInversion(gen, **kw)
    nti.prepare()
    nti.compute()
    h = nti.history
    assert np.mean(h["loss_end"]) < 0.7 * np.mean(h["loss_empty"]), h  # optimising the null lowers the step error
    assert np.mean(h["loss_end"]) < np.mean(h["loss_start"])
    p_nti, p_ddim = psnr(nti.reconstruct("nti"), nti.images), psnr(nti.reconstruct("ddim_w5"), nti.images)
    assert p_nti > p_ddim + 1.0, (p_nti, p_ddim)
    # the deltas are the nulls [N, S, L, D] and x_T; a fresh technique reconstructs the same from them
    deltas = nti.deltas()
    assert set(deltas) == {"latents_T", "null_embeddings"}
    assert deltas["null_embeddings"].shape == (2, STEPS, gen.tokenizer.model_max_length, gen.embed_dim)
    again = NullTextInversion(gen, **kw)
    again.prepare()
    again.load_deltas(deltas)
    assert torch.allclose(again.reconstruct("nti"), nti.reconstruct("nti"), atol=1e-5)
    assert gen.unchanged()


def test_nti_early_stopping_and_batching(gen):
    """Early stopping takes fewer inner steps; a batch of 2 gives each image what it gets alone."""
    kw = dict(targets={"k": 2, "seed": 3}, sampling={"steps": 4}, guidance_scale=5.0, inner_steps=4)
    stop = NullTextInversion(gen, early_stop=0.05, **kw)
    stop.prepare()
    stop.compute()
    assert np.mean(stop.history["inner_steps"]) < 4
    alone = NullTextInversion(gen, batch_size=1, early_stopping=False, **kw)
    batched = NullTextInversion(gen, batch_size=2, early_stopping=False, **kw)
    for t in (alone, batched):
        t.prepare()
        t.compute()
    diff = (alone.null_embeddings - batched.null_embeddings).abs().max()
    assert diff < 2e-3, float(diff)  # float noise of batched convolutions only


def test_npi_needs_no_gradient_and_reconstructs_like_ddim_w1(gen):
    npi = NegativePromptInversion(gen, targets={"k": 2, "seed": 5, "fixed": {"colour": "red"}},
                                  sampling={"steps": STEPS}, guidance_scale=7.5)
    assert not any(p.requires_grad for p in npi.parameters())
    with torch.no_grad():  # the whole inversion runs without autograd
        npi.prepare()
        npi.compute()
        rec = npi.reconstruct()
        edit = npi.edit()
    assert not any(p.requires_grad for p in npi.parameters())
    assert npi.parameter_counts()["trainable"] == 0
    # null := c collapses CFG to eps(c): the reconstruction is DDIM's at w = 1, whatever w
    assert torch.allclose(rec, npi.reconstruct("ddim_w1"), atol=1e-4)
    assert not torch.allclose(edit, rec, atol=1e-2)
    assert npi.target_prompts()[0] != npi.source_prompts[0]


def test_bad_inputs_give_clear_errors(gen, tmp_path):
    ok = world.dataset(0, 1, res=32)[0][0]
    Image.fromarray(ok).save(tmp_path / "ok.png")
    Image.fromarray(ok).resize((48, 40)).save(tmp_path / "big.png")
    Image.fromarray(ok).convert("RGBA").save(tmp_path / "rgba.png")

    def prepared(files, **targets):
        t = DDIMInversion(gen, targets={"files": files, "prompts": "a red circle", **targets}, sampling={"steps": 2})
        t.prepare()
        return t

    with pytest.raises(ValueError, match=r"48x40.*32x32.*resize"):
        prepared([str(tmp_path / "big.png")])
    with pytest.warns(UserWarning, match="resizing"):
        assert prepared([str(tmp_path / "big.png")], resize=True).images.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="mode RGBA.*convert"):
        prepared([str(tmp_path / "rgba.png")])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        prepared([str(tmp_path / "ok.png"), str(tmp_path / "missing.png")])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepared(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="prompts"):
        DDIMInversion(gen, targets={"files": [str(tmp_path / "ok.png")]}, sampling={"steps": 2}).prepare()
    with pytest.raises(ValueError, match="sampling.steps.*must be >= 1, got 0"):
        DDIMInversion(gen, sampling={"steps": 0})
    with pytest.raises(ValueError, match="colour='pink'"):
        DDIMInversion(gen, targets={"k": 1, "fixed": {"colour": "pink"}}, sampling={"steps": 2}).prepare()
    with pytest.raises(ValueError, match="inner_steps"):
        NullTextInversion(gen, inner_steps=0)
    with pytest.raises(ValueError, match="changes no word"):
        t = prepared([str(tmp_path / "ok.png")])
        t.edit_cfg["replace"] = {"green": "blue"}
        t.target_prompts()
    assert prepared(str(tmp_path / "ok.png")).images.shape == (1, 3, 32, 32)  # a single file works


def test_scene_mask_covers_the_rendered_object():
    from steerexp.evaluators.edit import scene_mask

    images, scenes = world.dataset(0, 6, res=32)
    for im, sc in zip(images, scenes):
        drawn = np.abs(im.astype(int) - np.array(world.BACKGROUNDS[sc.background])).max(-1) > 0
        mask = scene_mask(sc, 32).numpy()
        assert drawn.sum() > 0 and (drawn <= mask).all() and mask.sum() < 1.5 * drawn.sum() + 20


def test_tiny_inversion_run_writes_metrics_deltas_and_grids(shipped, tmp_path):
    cfg = compose_config(["experiment=nti_edit", "logger=none", "technique.targets.k=2", "eval.seeds=[0,1]",
                          "sampling.steps=4", "technique.inner_steps=3", "evaluator=[inversion,edit,concept]"])
    metrics = run(cfg, tmp_path, "t", "tests")
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["generator/unchanged"] is True and on_disk["run/seconds"] > 0
    for method in ("vae", "ddim_w1", "ddim_w7.5", "npi", "nti"):
        assert 0 < on_disk[f"inversion/psnr/{method}"] < 100 and -1 <= on_disk[f"inversion/ssim/{method}"] <= 1
    psnr = {m: on_disk[f"inversion/psnr/{m}"] for m in ("vae", "ddim_w7.5", "nti")}
    assert psnr["vae"] > psnr["ddim_w7.5"] and psnr["nti"] > psnr["ddim_w7.5"]  # the reported ordering, tiny
    for method in ("ddim_w1", "ddim_w7.5", "npi", "nti"):
        assert 0 <= on_disk[f"edit/success/{method}"] <= 1 and on_disk[f"edit/bg_rms/{method}"] >= 0
    assert 0 <= metrics["concept/target_rate/edited"] <= 1
    deltas = load_file(tmp_path / "deltas.safetensors")
    assert set(deltas) == {"latents_T", "null_embeddings"} and deltas["null_embeddings"].shape[:2] == (2, 4)
    assert on_disk["params/trainable"] == deltas["null_embeddings"].numel()  # the nulls: N x S x L x D
    for grid in ("inversion", "edit", "grid"):
        assert (tmp_path / "samples" / f"{grid}.png").is_file()


def test_nti_leaves_no_gradient_on_any_generator_weight(shipped):
    """NTI backpropagates through the frozen UNet to the null embedding at every inner step: afterwards no
    generator parameter has a .grad or requires grad, and the fast proof holds (issue 32, section 4)."""
    from steerexp.generators import load_generator

    g = load_generator(device="cpu")  # its own copy: a grad left by another test's generator cannot mask one here
    nti = NullTextInversion(g, targets={"k": 1, "seed": 3}, sampling={"steps": 3}, guidance_scale=5.0,
                            inner_steps=2, early_stopping=False)
    nti.prepare()
    nti.compute()
    assert np.sum(nti.history["inner_steps"]) == 3 * 2  # a backward ran at every inner step
    params = [(f"{name}.{key}", p) for name, m in g.named_modules for key, p in m.named_parameters()]
    assert params and [n for n, p in params if p.grad is not None or p.requires_grad] == []
    assert g.changes() == []
