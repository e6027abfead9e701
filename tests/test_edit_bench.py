"""The edit benchmark (evaluators/edit_bench.py): ground truth from the world, a tiny end-to-end run of
`steerexp experiment=world_edit_bench`, and the user-folder mode without ground truth."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from steerexp.errors import ConfigError
from steerexp.evaluators.base import EvalContext
from steerexp.evaluators.edit_bench import TYPES, EditBench, fill, object_mask, psnr_where, ssim_where, target_scene
from steerexp.images import to_tensor
from steerexp.techniques.ddim_inversion import DDIMInversion
from steerexp.validate import validate
from steerexp.worlds.shapes import world
from tests.helpers import compose_config

TEMPLATE = "a {size} {colour} {shape} {position} on a {background} background"


def test_each_edit_changes_exactly_its_attribute_and_the_render_is_the_ground_truth():
    _, scenes = world.dataset(2, 12, shapes=world.SEEN_SHAPES)
    for i, scene in enumerate(scenes):
        for kind in TYPES:
            t = target_scene(scene, kind, seed=0, index=i)
            assert t == target_scene(scene, kind, seed=0, index=i)  # deterministic
            changed = [f for f in ("shape", "colour", "size", "position", "background", "dx", "dy")
                       if getattr(t, f) != getattr(scene, f)]
            assert changed == [kind]
            assert t.shape in world.SEEN_SHAPES
            src, tgt = fill(TEMPLATE, scene).split(), fill(TEMPLATE, t).split()
            assert len(src) == len(tgt) and src != tgt  # a word swap: P2P's replace applies
    # the exact object mask is what the renderer draws at coverage >= 0.5
    img = world.render(scenes[0])
    bg = np.array(world.BACKGROUNDS[scenes[0].background])
    fg = np.array(world.COLOURS[scenes[0].colour])
    half = np.abs(img.astype(float) - bg).sum(-1) >= 0.5 * np.abs(fg - bg).sum() - 2
    assert (object_mask(scenes[0], 32).numpy() == half).mean() > 0.97


def test_masked_psnr_and_ssim():
    a = torch.rand(2, 3, 32, 32)
    b = a.clone()
    where = torch.zeros(2, 32, 32, dtype=torch.bool)
    where[:, :16] = True
    b[:, :, 16:] = 0  # differs only outside `where`
    assert psnr_where(b, a, where).tolist() == [100.0, 100.0]
    assert (psnr_where(b, a, ~where) < 20).all()
    assert ssim_where(b, a, where).min() > ssim_where(b, a, ~where).max()


TINY_BENCH = ["experiment=world_edit_bench", "logger=none", "technique.targets.k=2", "sampling.steps=3",
              "technique.inner_steps=1", "evaluator.edit_bench.types=[colour,size]", "evaluator.edit_bench.grid_rows=2",
              "evaluator.edit_bench.methods=[sdedit_s0.5,ddim_w7.5,nti+p2p,di+p2p+blend]"]


def check_bench_run(m: dict, run_dir) -> None:
    assert m["generator/unchanged"] is True and m["edit_bench/judged_by/analytic"] is True
    for kind in ("colour", "size", "all"):
        for method in ("sdedit_s0.5", "ddim_w7.5", "nti+p2p", "di+p2p+blend", "ground_truth", "vae"):
            for metric in ("success", "kept", "kept_vae", "iou_target", "bg_psnr", "bg_ssim", "gt_psnr", "perceptual",
                           "seconds"):
                assert f"edit_bench/{kind}/{metric}/{method}" in m, (kind, metric, method)
        # the exact target render: the judge reads the new attribute and nothing else changed
        assert m[f"edit_bench/{kind}/success/ground_truth"] == 1.0
        assert m[f"edit_bench/{kind}/kept/ground_truth"] == 1.0
        assert m[f"edit_bench/{kind}/gt_psnr/ground_truth"] == 100.0
        assert m[f"edit_bench/{kind}/success/vae"] == 0.0  # no edit: the attribute is still the source's
        assert m[f"edit_bench/{kind}/gt_psnr/ddim_w7.5"] < 60
    assert m["edit_bench/colour/seconds/nti+p2p"] > m["edit_bench/colour/seconds/di+p2p+blend"] > 0
    if m["edit_bench/vae_ok/images"] > 0:  # the sources whose VAE round trip the judge reads as the source
        assert m["edit_bench/colour/vae_ok/kept/vae"] == 1.0 and m["edit_bench/colour/vae_ok/success/vae"] == 0.0
    for grid in ("edit_bench_colour", "edit_bench_size", "attention_colour"):
        assert (run_dir / "samples" / f"{grid}.png").is_file(), grid


def test_tiny_world_edit_bench_run_writes_its_metrics(shipped, tmp_path):
    from steerexp.run import run

    metrics = run(compose_config(TINY_BENCH), tmp_path, "bench", "tests")
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    check_bench_run(on_disk, tmp_path)


@pytest.mark.slow
def test_tiny_world_edit_bench_runs_from_the_cli(shipped, tmp_path):
    run_dir = tmp_path / "bench"
    out = subprocess.run([sys.executable, "-m", "steerexp.cli", *TINY_BENCH, f"hydra.run.dir={run_dir}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    check_bench_run(json.loads((run_dir / "metrics.json").read_text()), run_dir)


def make_user_folder(folder, masks: bool, as_json: bool = False):
    images, scenes = world.dataset(5, 2, shapes=world.SEEN_SHAPES, colour="red")
    rows = []
    for i, (im, sc) in enumerate(zip(images, scenes)):
        Image.fromarray(im).save(folder / f"img{i}.png")
        row = {"image": f"img{i}.png", "source": fill(TEMPLATE, sc),
               "target": fill(TEMPLATE, world.Scene(**(sc.to_dict() | {"colour": "blue"})))}
        if masks:
            mask = (object_mask(sc, 32).numpy() * 255).astype(np.uint8)
            Image.fromarray(np.stack([mask] * 3, -1)).save(folder / f"mask{i}.png")
            row["mask"] = f"mask{i}.png"
        rows.append(row)
    if as_json:
        (folder / "edits.json").write_text(json.dumps(rows))
        return folder / "edits.json", images
    lines = [",".join(rows[0])] + [",".join(r.values()) for r in rows]
    (folder / "edits.csv").write_text("\n".join(lines) + "\n")
    return folder / "edits.csv", images


@pytest.mark.parametrize("masks, as_json", [(True, False), (False, True)])
def test_user_folder_mode_reports_only_metrics_without_ground_truth(gen, tmp_path, masks, as_json):
    manifest, images = make_user_folder(tmp_path, masks, as_json)
    tech = DDIMInversion(gen, targets={"manifest": str(manifest)}, sampling={"steps": 3, "guidance_scale": 5.0},
                         guidance_scale=5.0, edit={"control": "p2p"})
    tech.prepare()
    tech.compute()
    assert torch.equal(tech.images, to_tensor(images)) and tech.scenes is None
    assert tech.target_prompts()[0].split()[2] == "blue"
    assert (tech.masks is not None) == masks
    ctx = EvalContext(tech, ["{}"], [0])
    res = EditBench(methods=["ddim_w5", "ddim_w5+p2p"], prompt_template=TEMPLATE).evaluate(ctx)
    m = res.metrics
    assert not any("success" in k or "gt_psnr" in k for k in m)  # nothing that needs ground truth
    for method in ("ddim_w5", "ddim_w5+p2p"):
        assert 5 < m[f"edit_bench/user/psnr_source/{method}"] < 100
        assert -1 <= m[f"edit_bench/user/clip_target/{method}"] <= 1
        assert m[f"edit_bench/user/seconds/{method}"] > 0
        assert (f"edit_bench/user/bg_psnr/{method}" in m) == masks
    if masks:  # outside the object the edit keeps the image better than over the whole image
        assert m["edit_bench/user/bg_psnr/ddim_w5"] > m["edit_bench/user/psnr_source/ddim_w5"]
    assert res.grids["samples/edit_bench_user"].shape[0] == 3


def test_bad_manifests_and_bench_settings_fail_clearly(gen, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "bad.csv").write_text("image,source\na.png,a red circle\n")
    with pytest.raises(ValueError, match="row 1 .* has no 'target'"):
        DDIMInversion(gen, targets={"manifest": str(tmp_path / "bad.csv")}).prepare()
    (tmp_path / "missing.csv").write_text("image,source,target\nnope.png,a red circle,a blue circle\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        DDIMInversion(gen, targets={"manifest": str(tmp_path / "missing.csv")}).prepare()
    with pytest.raises(ValueError, match="has no {background}"):
        EditBench(types=["background"], prompt_template="a {colour} {shape}")
    for override, key in [("evaluator.edit_bench.types=[texture]", "evaluator.edit_bench.types"),
                          ("evaluator.edit_bench.methods=[nti+blend]", "evaluator.edit_bench.methods[0]"),
                          ("evaluator.edit_bench.attention_maps=nti", "evaluator.edit_bench.attention_maps"),
                          ("technique.targets.prompt_template='a {colour} {shape}'",
                           "evaluator.edit_bench.prompt_template")]:
        with pytest.raises(ConfigError) as err:
            validate(compose_config(["experiment=world_edit_bench", override]))
        assert err.value.key == key, override
