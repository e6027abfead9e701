import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from steerexp.techniques.base import NaNLossError
from tests.helpers import TINY, compose_config, tiny_run


def test_every_config_option_instantiates(shipped, tmp_path):
    from hydra.utils import instantiate
    from steerexp import combine, conf_dir
    from steerexp.run import build

    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in conf_dir().iterdir() if p.is_dir()}
    assert {"generator", "technique", "objective", "evaluator", "logger", "trainer", "launcher", "experiment"} <= set(
        groups
    )
    cfg = compose_config([f"evaluator=[{','.join(groups['evaluator'])}]"])
    generator, technique, evaluators = build(cfg)
    assert len(evaluators) == len(groups["evaluator"])
    for option in groups["technique"]:
        technique_cfg = compose_config([f"technique={option}"]).technique
        assert instantiate(technique_cfg, generator=generator, _recursive_=False).generator is generator
    for option in groups["objective"]:
        objective_cfg = compose_config([f"objective={option}"])
        combine.expand(objective_cfg)  # objective=auto: the technique's own (steerexp/combine.py)
        assert callable(instantiate(objective_cfg.objective))
    for option in groups["logger"]:
        assert compose_config([f"logger={option}"]).logger.mode in ("offline", "online", "disabled")
    for option in groups["trainer"]:
        assert compose_config([f"trainer={option}"]).trainer.checkpoint_every > 0
    for option in groups["callbacks"]:  # training-loop callbacks by _target_ (steerexp.trainer)
        callbacks = compose_config([f"callbacks={option}"]).get("callbacks") or {}
        assert all(instantiate(node) is not None for node in callbacks.values())
    for option in groups["launcher"]:
        compose_config([f"launcher={option}"])  # composes (it selects Hydra's launcher)
    for option in groups["experiment"]:
        assert compose_config([f"experiment={option}"]).experiment_name


def test_tiny_textual_inversion_run_writes_the_run_directory(shipped, tmp_path):
    metrics, run_dir = tiny_run(tmp_path)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["generator/unchanged"] is True and on_disk["run/seconds"] > 0
    for key in (
        "concept/target_rate/baseline",
        "concept/target_rate/edited",
        "concept/paired_diff/mean",
        "concept/wilcoxon_p",
        "leakage/flip_rate",
        "leakage/pixel_rms",
        "leakage/passed",
        "clip/text_similarity/edited",
        "clip/image_similarity/edited",
        "memorisation/nn_rms/min",
        "params/trainable",
        "params/frozen",
    ):
        assert key in on_disk, key
    assert all(isinstance(v, (int, float, bool)) for v in on_disk.values())
    assert on_disk["params/trainable"] == 64 and on_disk["params/frozen"] > 1_000_000
    deltas = load_file(run_dir / "deltas.safetensors")
    assert set(deltas) == {"embeddings", "initial"}  # only the deltas, never the generator
    assert (run_dir / "learned_embeds.safetensors").is_file()
    grid = Image.open(run_dir / "samples" / "grid.png")
    assert grid.width > grid.height  # 2 prompt rows, 2 x 2 seed columns
    assert (run_dir / "samples" / "leakage.png").is_file()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == {"embeddings", "initial"}
    # a TI edit only touches prompts that use the token: unrelated prompts are identical
    assert metrics["leakage/flip_rate"] == 0.0 and metrics["leakage/pixel_rms"] == 0.0


def test_training_moves_only_the_new_rows_and_lowers_the_loss(shipped, tmp_path):
    from steerexp.run import build

    cfg = compose_config(TINY + ["technique.steps=0"])
    generator, technique, _ = build(cfg)
    technique.prepare()
    opt_params = technique.configure_optimizers().param_groups[0]["params"]
    assert len(opt_params) == 1 and opt_params[0] is technique.embeddings
    batch = (torch.arange(4) % len(technique.latents),)
    fixed = lambda: float(np.mean([technique.training_loss(batch).item() for _ in range(3)]))
    before = fixed()
    opt = torch.optim.Adam([technique.embeddings], lr=5e-3)
    for _ in range(60):
        loss = technique.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed() < before
    assert generator.unchanged()


def test_resume_from_checkpoint_continues_the_step_count(shipped, tmp_path):
    _, first = tiny_run(tmp_path, ["technique.steps=4"], name="first")
    ckpt = first / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4
    _, second = tiny_run(tmp_path, ["technique.steps=6", f"ckpt_path={ckpt}", "evaluator=[concept]"], name="second")
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_export_loads_in_diffusers_with_the_same_prompt_embedding(shipped, tmp_path):
    from diffusers import StableDiffusionPipeline
    from steerexp.generators import load_generator

    metrics, run_dir = tiny_run(tmp_path, ["technique.num_vectors=2", "evaluator=[concept]"])
    pipe = StableDiffusionPipeline.from_pretrained(shipped / "shapes")
    pipe.load_textual_inversion(str(run_dir / "learned_embeds.safetensors"))
    prompt = "a photo of a <v*>"
    theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    g = load_generator(device="cpu")
    g.add_tokens(["<v*>", "<v*>_1"])
    vectors = load_file(run_dir / "deltas.safetensors")["embeddings"]
    ours = g.encode_prompt(["a photo of a <v*> <v*>_1"], vectors)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_multi_vector_placeholder_adds_diffusers_style_tokens(shipped):
    from steerexp.run import build

    _, technique, _ = build(compose_config(TINY + ["technique.num_vectors=3"]))
    technique.prepare()
    assert technique.tokens == ["<v*>", "<v*>_1", "<v*>_2"]
    assert technique.fill("a {}", edited=True) == "a <v*> <v*>_1 <v*>_2"
    assert technique.fill("a {}", edited=False) == "a star"


def test_budget_clip_keeps_the_delta_inside_the_ball(shipped, tmp_path):
    metrics, run_dir = tiny_run(tmp_path, ["technique.budget.max_norm=0.05", "technique.lr=0.5", "evaluator=[concept]"])
    d = load_file(run_dir / "deltas.safetensors")
    assert float((d["embeddings"] - d["initial"]).norm(dim=-1).max()) <= 0.05 + 1e-6
    assert metrics["delta_norm/embeddings"] <= 0.05 + 1e-6


# ------------------------------------------------------------------ bad input
def test_negative_budget_is_rejected_before_work(shipped, tmp_path):
    with pytest.raises(ValueError, match="max_norm: must be a positive"):
        tiny_run(tmp_path, ["technique.budget.max_norm=-1"])
    with pytest.raises(ValueError, match="l2 is not a budget.*delta_l2"):  # L2 is the delta_l2 objective term
        tiny_run(tmp_path, ["+technique.budget.l2=0.1"])


def test_zero_target_images_is_rejected(shipped, tmp_path):
    with pytest.raises(ValueError, match="K = 0"):
        tiny_run(tmp_path, ["technique.targets.k=0"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="technique.targets.folder: no PNG/JPG images"):
        tiny_run(tmp_path, [f"technique.targets.folder={tmp_path / 'empty'}"])


def test_missing_image_folder_names_the_field(shipped, tmp_path):
    with pytest.raises(ValueError, match="technique.targets.folder.*nowhere"):  # (a ConfigError, before loading)
        tiny_run(tmp_path, [f"technique.targets.folder={tmp_path / 'nowhere'}"])


def test_unreadable_image_names_the_file(shipped, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "ok.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        tiny_run(tmp_path, [f"technique.targets.folder={folder}"])


def test_target_folder_of_user_images_trains(shipped, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 48, 3), 60 * i, np.uint8)).save(folder / f"{i}.jpg")
    metrics, _ = tiny_run(tmp_path, [f"technique.targets.folder={folder}", "evaluator=[concept]"])
    assert metrics["generator/unchanged"] is True


def test_placeholder_already_in_vocabulary(shipped, tmp_path):
    with pytest.raises(ValueError, match="already in the tokenizer"):
        tiny_run(tmp_path, ["technique.placeholder=circle"])


def test_unknown_group_option_lists_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="textual_inversion"):
        compose_config(["technique=nope"])


def test_nan_loss_stops_and_keeps_the_last_good_deltas(shipped, tmp_path, monkeypatch):
    from steerexp.techniques.textual_inversion import TextualInversion

    original = TextualInversion.training_loss
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss = original(self, batch)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(TextualInversion, "training_loss", poisoned)
    with pytest.raises(NaNLossError, match="last good deltas"):
        tiny_run(tmp_path, ["technique.steps=6", "evaluator=[concept]"], name="nan")
    d = load_file(tmp_path / "nan" / "deltas.safetensors")
    assert torch.isfinite(d["embeddings"]).all()
    assert not torch.equal(d["embeddings"], d["initial"])  # the two good steps were kept
    m = json.loads((tmp_path / "nan" / "metrics.json").read_text())
    assert m["run/failed"] is True and m["generator/unchanged"] is True


def test_a_failing_evaluation_keeps_the_trained_deltas_and_closes_the_run(shipped, tmp_path, monkeypatch):
    from steerexp.evaluators.concept import Concept

    def broken(self, ctx):
        raise RuntimeError("evaluator crashed")

    monkeypatch.setattr(Concept, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluator crashed"):
        tiny_run(tmp_path, ["evaluator=[concept]"], name="crash")
    run_dir = tmp_path / "crash"
    d = load_file(run_dir / "deltas.safetensors")
    assert not torch.equal(d["embeddings"], d["initial"])  # the 3 training steps are kept
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["run/failed"] is True and m["generator/unchanged"] is True


def test_magnitude_sweep_of_the_ti_strength(shipped, tmp_path):
    metrics, run_dir = tiny_run(
        tmp_path,
        [
            "evaluator=[magnitude]",
            "evaluator.magnitude.strengths=[0,1]",
            "evaluator.magnitude.leakage_prompts=['a green square at the top']",
        ],
    )
    assert metrics["magnitude/flip_rate/0"] == 0.0  # strength 0 of a token edit touches nothing unrelated
    assert {"magnitude/target_rate/0", "magnitude/target_rate/1", "magnitude/sweet_spot_found"} <= set(metrics)
    assert (run_dir / "samples" / "magnitude.png").is_file()
    json.loads((run_dir / "metrics.json").read_text())  # valid JSON: no NaN


def test_wandb_job_type_follows_the_technique(shipped):
    """A run that learns deltas is a W&B "train" job; a training-free one (or 0 steps) is "eval"."""
    from steerexp.run import build

    _, ti, _ = build(compose_config(TINY + ["logger=none"]))
    assert ti.job_type == "train"
    ti.steps = 0
    assert ti.job_type == "eval"
    _, arithmetic, _ = build(compose_config(["logger=none", "technique=embedding_arithmetic"]))
    assert arithmetic.job_type == "eval"
