"""The PIE-Bench-protocol evaluator (evaluators/pie_bench.py): run-length masks, the metrics against hand
computations with random-weight DINO-shaped ViT, CLIP and SqueezeNet folders, the NaN rule, the one-line errors,
and a tiny world-mode run with stand-ins through the Hydra config."""
import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from steerexp.errors import ConfigError
from steerexp.evaluators.pie_bench import (ClipScore, DinoStructure, Metrics, PieBench, aggregate, lpips_squeeze,
                                           mask_decode, protocol_resize)
from steerexp.evaluators.pie_bench_spec import PieBenchSpec
from steerexp.validate import validate
from tests.helpers import compose_config

SIDE = 64
KEY = "evaluator.pie_bench"


def rle_encode(mask: np.ndarray) -> list[int]:
    """A test encoder: (start, length) of every run of 1 in the row-major flattened mask."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def test_mask_decode_matches_known_masks():
    # by hand: runs (0, 3) and (10, 2) on a 3 x 4 array, no border rule
    want = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=bool)
    assert (mask_decode([0, 3, 10, 2], (3, 4), border=False) == want).all()
    # a run past the end is clipped (theirs: min(length, n - start))
    assert mask_decode([10, 100], (3, 4), border=False).sum() == 2
    # the border rule: the outermost rows and columns are edit region
    m = mask_decode([], (5, 6))
    assert m[0].all() and m[-1].all() and m[:, 0].all() and m[:, -1].all() and not m[1:-1, 1:-1].any()
    # round trip through the test encoder
    rng = np.random.default_rng(0)
    mask = rng.random((SIDE, SIDE)) > 0.7
    assert (mask_decode(rle_encode(mask), (SIDE, SIDE), border=False) == mask).all()
    with pytest.raises(ValueError, match="pairs"):
        mask_decode([1, 2, 3])


# ---------------------------------------------------------------------------- tiny weights and a tiny PIE folder
def tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters] + ["<|startoftext|>",
                                                                                  "<|endoftext|>"])}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_dino(folder):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=8, image_size=224), add_pooling_layer=False).save_pretrained(folder)
    return folder


def tiny_squeezenet(path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1(weights=None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def smooth_image(rng) -> np.ndarray:
    low = rng.random((8, 8, 3))
    up = np.kron(low, np.ones((SIDE // 8, SIDE // 8, 1)))
    return (up * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pie(tmp_path_factory):
    """A PIE-Bench-layout folder of 3 images (64 x 64), an edited folder, and tiny weights."""
    root = tmp_path_factory.mktemp("pie")
    data, out = root / "data", root / "output" / "tiny+edit" / "annotation_images"
    rng = np.random.default_rng(1)
    inside = np.zeros((SIDE, SIDE), dtype=bool)
    inside[16:40, 20:48] = True
    entries = {
        "000000000000": ("0_random_140/000000000000.jpg", "0", inside),
        "111000000000": ("1_change_object_80/1_artificial/1_animal/111000000000.jpg", "1", inside),
        "800000000000": ("8_change_background_80/800000000000.jpg", "8", np.ones((SIDE, SIDE), dtype=bool)),
    }
    mapping, sources, edits = {}, {}, {}
    for key, (rel, cat, mask) in entries.items():
        src = smooth_image(rng)
        edit = src.copy()
        if key == "000000000000":     # identical outside the mask; changed inside it
            edit[inside] = 255 - edit[inside]
        elif key == "111000000000":   # changed outside the mask only
            edit[50:60, 4:60] = 0
        else:
            edit = smooth_image(rng)
        for folder, img in ((data / "annotation_images", src), (out, edit)):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / rel.replace(".jpg", ".png"))
            (folder / rel.replace(".jpg", ".png")).rename(folder / rel)   # lossless bytes under PIE's name
        mapping[key] = {"image_path": rel, "original_prompt": "a red cat", "editing_prompt": "a [blue] cat",
                        "editing_instruction": "make it blue", "editing_type_id": cat, "blended_word": "cat cat",
                        "mask": rle_encode(mask)}
        sources[key], edits[key] = src, edit
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    weights = root / "weights"
    return {"data": data, "edited": out, "sources": sources, "edits": edits, "inside": inside,
            "dino": tiny_dino(weights / "dino"), "clip": tiny_clip(weights / "clip"),
            "lpips": tiny_squeezenet(weights / "squeezenet1_1.safetensors")}


@pytest.fixture(scope="module")
def nets(pie):
    return Metrics(dino=DinoStructure(str(pie["dino"])), clip=ClipScore(str(pie["clip"])),
                   lpips=lpips_squeeze(str(pie["lpips"])))


def chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None]


@functools.lru_cache(maxsize=None)
def hand_models(folder):
    from transformers import CLIPModel, CLIPProcessor, ViTModel

    if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
        return CLIPModel.from_pretrained(str(folder)).eval(), CLIPProcessor.from_pretrained(str(folder))
    return ViTModel.from_pretrained(str(folder)).eval()


def hand_structure(folder, a: np.ndarray, b: np.ndarray) -> float:
    """The structure distance without hooks: the last layer's input, its layernorm, its key projection."""
    model = hand_models(folder)
    sims = []
    for img in (a, b):
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()                 # 0..255, not divided
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
            1, 3, 1, 1)
        with torch.no_grad():
            hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
            last = model.layers[-1] if hasattr(model, "layers") else model.encoder.layer[-1]
            att = last.attention
            k = (att.k_proj if hasattr(att, "k_proj") else att.attention.key)(last.layernorm_before(hidden))[0]
        assert k.shape[0] == 1 + (224 // 8) ** 2
        kn = k / k.norm(dim=-1, keepdim=True)
        sims.append(kn @ kn.T)
    return float(((sims[0] - sims[1]) ** 2).mean())


def hand_clip(folder, img: np.ndarray, text: str) -> float:
    model, proc = hand_models(folder)
    with torch.no_grad():
        i = model.get_image_features(**proc(images=[torch.from_numpy(img).permute(2, 0, 1)], return_tensors="pt"))
        t = model.get_text_features(**proc(text=[text], return_tensors="pt", padding=True))
    i, t = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (i, t))
    return max(100 * float(F.cosine_similarity(i, t)), 0.0)


def test_metrics_against_hand_computations(pie, nets):
    src, inside = pie["sources"]["000000000000"], pie["inside"]
    mask = torch.from_numpy(mask_decode(rle_encode(inside), (SIDE, SIDE)))[None]
    same = nets(chw(src), chw(src), mask, ["a red cat"], ["a blue cat"])
    assert same["psnr_unedit"][0] == np.inf          # torchmetrics' PSNR of identical images, as theirs
    assert same["mse_unedit"][0] == 0 and same["lpips_unedit"][0] == 0
    assert same["ssim_unedit"][0] == pytest.approx(100.0)    # x 10^2
    assert same["structure"][0] == 0
    assert same["clip_source"][0] == pytest.approx(hand_clip(pie["clip"], src, "a red cat"), abs=1e-3)

    # changed inside the mask only: the background metrics see nothing, the structure and the CLIP scores do
    edit_in = pie["edits"]["000000000000"]
    v = nets(chw(src), chw(edit_in), mask, ["a red cat"], ["a blue cat"])
    assert v["psnr_unedit"][0] == np.inf and v["mse_unedit"][0] == 0 and v["lpips_unedit"][0] == 0
    assert v["ssim_unedit"][0] == pytest.approx(100.0)
    assert v["structure"][0] == pytest.approx(1e3 * hand_structure(pie["dino"], src, edit_in), rel=1e-4)
    assert v["structure"][0] > 0
    assert v["clip_whole"][0] == pytest.approx(hand_clip(pie["clip"], edit_in, "a blue cat"), abs=1e-3)
    masked = (edit_in * mask[0].numpy()[..., None]).astype(np.uint8)
    assert v["clip_edited"][0] == pytest.approx(hand_clip(pie["clip"], masked, "a blue cat"), abs=1e-3)
    assert v["clip_source"][0] == same["clip_source"][0]

    # changed outside the mask: MSE and PSNR by hand (the masked-out zeros count in the mean), SSIM and LPIPS move
    edit_out = src.copy()
    edit_out[50:60, 4:60] = 0
    v = nets(chw(src), chw(edit_out), mask, ["a red cat"], ["a blue cat"])
    keep = 1 - mask[0].numpy()[..., None].astype(np.float64)
    mse = (((edit_out / 255.0) * keep - (src / 255.0) * keep) ** 2).mean()
    assert v["mse_unedit"][0] == pytest.approx(1e4 * mse, rel=1e-5)
    assert v["psnr_unedit"][0] == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
    assert v["ssim_unedit"][0] < 99.9 and v["lpips_unedit"][0] > 0
    assert v["clip_edited"][0] == pytest.approx(
        nets(chw(src), chw(src), mask, ["a red cat"], ["a blue cat"])["clip_edited"][0], abs=1e-4)  # same inside


def test_protocol_resize_is_torchvisions_resize_224_max_480():
    assert protocol_resize(torch.zeros(1, 3, 512, 512)).shape[-2:] == (224, 224)
    assert protocol_resize(torch.zeros(1, 3, 512, 768)).shape[-2:] == (224, 336)
    assert protocol_resize(torch.zeros(1, 3, 100, 1000)).shape[-2:] == (48, 480)   # longer side capped at 480


def test_aggregation_drops_nan_and_keeps_inf():
    assert aggregate(np.array([1.0, np.nan, 3.0])) == (2.0, 1)
    assert aggregate(np.array([1.0, np.inf])) == (np.inf, 0)
    mean, dropped = aggregate(np.array([np.nan]))
    assert np.isnan(mean) and dropped == 1


def test_folder_mode_and_the_nan_rule(pie, nets):
    bench = PieBench(data=str(pie["data"]), edited=[str(pie["edited"])], dino=str(pie["dino"]), clip=str(pie["clip"]),
                     lpips_backbone=str(pie["lpips"]), device="cpu")
    result = bench.evaluate(None)
    m, method = result.metrics, "tiny+edit"   # named by the folder above annotation_images, as PnPInversion's output
    assert m["pie_bench/images"] == 3
    _, rows = result.tables["pie_bench/per_image"]
    assert len(rows) == 3
    # the all-image mask (type 8): its background metrics are NaN and dropped from the means, clip_edited is not
    for metric in ("psnr_unedit", "lpips_unedit_e3", "mse_unedit_e4", "ssim_unedit_e2"):
        assert m[f"pie_bench/all/dropped/{metric}/{method}"] == 1
        assert np.isnan(m[f"pie_bench/type_8/{metric}/{method}"])
        assert m[f"pie_bench/type_8/dropped/{metric}/{method}"] == 1
    assert m[f"pie_bench/all/dropped/clip_edited/{method}"] == 0
    assert not np.isnan(m[f"pie_bench/type_8/clip_edited/{method}"])
    # each mean is over the images with a value: the two others, as computed one by one
    per = {}
    for key in ("000000000000", "111000000000"):
        item = json.loads((pie["data"] / "mapping_file.json").read_text())[key]
        mask = torch.from_numpy(mask_decode(item["mask"], (SIDE, SIDE)))[None]
        per[key] = nets(chw(pie["sources"][key]), chw(pie["edits"][key]), mask, ["a red cat"], ["a blue cat"])
    assert m[f"pie_bench/type_1/mse_unedit_e4/{method}"] == pytest.approx(per["111000000000"]["mse_unedit"][0])
    assert m[f"pie_bench/all/mse_unedit_e4/{method}"] == pytest.approx(
        np.mean([per[k]["mse_unedit"][0] for k in per]))   # (Metrics gives the reported units: x 10^4)
    assert m[f"pie_bench/all/psnr_unedit/{method}"] == np.inf   # image 0 is untouched outside its mask: inf, kept
    assert m[f"pie_bench/type_1/psnr_unedit/{method}"] == pytest.approx(per["111000000000"]["psnr_unedit"][0])
    assert m[f"pie_bench/all/structure_e3/{method}"] > 0
    assert not any("standin" in k for k in m)
    # only some categories
    m0 = PieBench(data=str(pie["data"]), edited={"x": str(pie["edited"])}, categories=[8], dino=str(pie["dino"]),
                  clip=str(pie["clip"]), lpips_backbone=str(pie["lpips"]), device="cpu").evaluate(None).metrics
    assert m0["pie_bench/images"] == 1 and np.isnan(m0["pie_bench/all/psnr_unedit/x"])


def one_line_error(spec: PieBenchSpec, key: str, match: str) -> None:
    with pytest.raises(ConfigError) as err:
        spec.check(KEY)
    assert err.value.key == key, str(err.value)
    assert "\n" not in str(err.value) and match in str(err.value)


def test_paths_are_refused_in_one_line_before_heavy_work(pie, tmp_path):
    ok = dict(data=str(pie["data"]), edited=[str(pie["edited"])], dino=str(pie["dino"]), clip=str(pie["clip"]),
              lpips_backbone=str(pie["lpips"]))
    PieBenchSpec(**ok).check(KEY)   # all present: no error
    one_line_error(PieBenchSpec(**ok | {"data": str(tmp_path / "nope")}), f"{KEY}.data", "not a folder")
    one_line_error(PieBenchSpec(**ok | {"edited": None}), f"{KEY}.edited", "needs the edited images")
    one_line_error(PieBenchSpec(**ok | {"dino": None}), f"{KEY}.dino", "nothing is downloaded")
    one_line_error(PieBenchSpec(**ok | {"lpips_backbone": None}), f"{KEY}.lpips_backbone", "download")
    one_line_error(PieBenchSpec(**ok | {"dino": str(tmp_path)}), f"{KEY}.dino", "config.json")
    one_line_error(PieBenchSpec(**ok | {"dino": str(pie["clip"])}), f"{KEY}.dino", "'clip' model")
    one_line_error(PieBenchSpec(**ok | {"clip": str(pie["dino"])}), f"{KEY}.clip", "'vit' model")
    one_line_error(PieBenchSpec(**ok | {"lpips_backbone": str(pie["data"] / "mapping_file.json")}),
                   f"{KEY}.lpips_backbone", "squeezenet1_1")
    one_line_error(PieBenchSpec(**ok | {"categories": [12]}), f"{KEY}.categories", "0-9")
    patch16 = tmp_path / "vit16"
    patch16.mkdir()
    (patch16 / "config.json").write_text(json.dumps({"model_type": "vit", "patch_size": 16}))
    (patch16 / "model.safetensors").write_bytes(b"")
    one_line_error(PieBenchSpec(**ok | {"dino": str(patch16)}), f"{KEY}.dino", "ViT-B/8")
    # world mode: the weights are optional (stand-ins), but a given path is still checked
    PieBenchSpec().check(KEY)
    one_line_error(PieBenchSpec(clip=str(tmp_path)), f"{KEY}.clip", "config.json")
    # through the composed config: validate refuses before anything loads
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["technique=ddim_inversion", "evaluator=[pie_bench]",
                                 f"{KEY}.data={pie['data']}", f"{KEY}.edited=[{pie['edited']}]"]))
    assert err.value.key == f"{KEY}.dino"
    # a folder that passes the light check but lacks weights (they would stay random): refused, naming the key
    import shutil

    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial_dino"
    shutil.copytree(pie["dino"], partial)
    state = load_file(str(partial / "model.safetensors"))
    kept = {k: v for k, v in state.items() if "k_proj" not in k and ".key." not in k}
    save_file(kept, str(partial / "model.safetensors"))
    PieBenchSpec(**ok | {"dino": str(partial)}).check(KEY)
    with pytest.raises(ValueError, match=f"{KEY}.dino: .* lacks"):
        DinoStructure(str(partial))
    # a weights file that passes the light check but does not load: one line naming the key
    broken = tmp_path / "broken_sq.safetensors"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{KEY}.lpips_backbone"):
        lpips_squeeze(str(broken))


TINY_WORLD = ["experiment=world_edit_bench", "logger=none", "technique=ddim_inversion", "technique.targets.k=2",
              "sampling.steps=3", "evaluator=[pie_bench]", "~evaluator.edit_bench",
              "evaluator.pie_bench.types=[colour,background]",
              "evaluator.pie_bench.prompt_template=${technique.targets.prompt_template}",
              "evaluator.pie_bench.methods=[ddim_w7.5]",
              "print_metrics=[generator/unchanged]"]


def test_tiny_world_run_names_its_standins(shipped, tmp_path):
    from steerexp.run import run

    m = run(compose_config(TINY_WORLD), tmp_path, "pie", "tests")
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert m["generator/unchanged"] is True and on_disk["pie_bench/images"] == 2
    standins = ("structure_standin_classifier_selfsim_e3", "lpips_unedit_standin_classifier_conv_e3",
                "clip_source_standin_tinyclip", "clip_whole_standin_tinyclip", "clip_edited_standin_tinyclip")
    for group in ("all", "colour", "background"):
        for method in ("ddim_w7.5", "ground_truth", "vae"):
            for metric in standins + ("psnr_unedit", "mse_unedit_e4", "ssim_unedit_e2"):
                assert f"pie_bench/{group}/{metric}/{method}" in on_disk, (group, metric, method)
    # a stand-in is never under a real metric's name
    for real in ("structure_e3", "lpips_unedit_e3", "clip_whole", "clip_edited", "clip_source"):
        assert not any(k.split("/")[2] == real for k in on_disk if k.count("/") == 3), real
    # the exact target render differs from the source only inside the world's edit region
    for group in ("colour", "background"):
        assert on_disk[f"pie_bench/{group}/mse_unedit_e4/ground_truth"] == 0
        assert on_disk[f"pie_bench/{group}/psnr_unedit/ground_truth"] == float("inf")
        assert on_disk[f"pie_bench/{group}/mse_unedit_e4/ddim_w7.5"] > 0
    assert on_disk["pie_bench/all/dropped/psnr_unedit/ddim_w7.5"] == 0


@pytest.mark.slow
def test_folder_mode_runs_from_the_cli(shipped, pie, tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "folder"
    out = subprocess.run([sys.executable, "-m", "steerexp.cli", "technique=ddim_inversion", "technique.targets.k=1",
                          "sampling.steps=2", "logger=none", "evaluator=[pie_bench]", f"{KEY}.data={pie['data']}",
                          f"{KEY}.edited=[{pie['edited']}]", f"{KEY}.dino={pie['dino']}", f"{KEY}.clip={pie['clip']}",
                          f"{KEY}.lpips_backbone={pie['lpips']}", f"hydra.run.dir={run_dir}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["pie_bench/images"] == 3 and m["pie_bench/all/dropped/psnr_unedit/tiny+edit"] == 1
    assert m["pie_bench/type_1/structure_e3/tiny+edit"] > 0 and m["generator/unchanged"] is True
    assert "Loading weights" not in out.stderr


def test_edited_folders_named_by_a_mapping_or_without_clashes(pie, tmp_path):
    """`edited` as {method: folder} (a DictConfig under Hydra) keeps its folders; two folders that would get the
    same method name are refused in one line instead of one silently replacing the other."""
    from omegaconf import OmegaConf

    from steerexp.evaluators.pie_bench_spec import edited_folders

    given = OmegaConf.create({"ddim": "/data/out/ddim/annotation_images"})
    assert edited_folders(given) == {"ddim": "/data/out/ddim/annotation_images"}
    with pytest.raises(ConfigError, match=f"{KEY}.edited: .* would both be the method 'ddim'"):
        edited_folders(["r1/ddim/annotation_images", "r2/ddim/annotation_images"])


def test_image_paths_must_stay_inside_the_named_folders(pie, tmp_path):
    from steerexp.evaluators.pie_bench import load_mapping

    mapping = json.loads((pie["data"] / "mapping_file.json").read_text())
    for bad in ("../outside.jpg", "/etc/passwd"):
        key = next(iter(mapping))
        (tmp_path / "m.json").write_text(json.dumps({key: mapping[key] | {"image_path": bad}}))
        with pytest.raises(ValueError, match="leaves the images folder"):
            load_mapping(tmp_path / "m.json", None)
