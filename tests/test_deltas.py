"""Optimised input deltas (prompt_delta, latent_offset, both) and the image objectives, tiny:
the budget holds after every step, the objective improves, the generator stays frozen,
resume continues from the checkpoint, deltas.safetensors reproduces the edit, bad input is clear."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from steerexp.run import _instantiate
from steerexp.techniques.input_delta import InputDelta
from tests.helpers import TINY, compose_config, tiny_run

# 2 DDIM steps to optimise through, 3 training seeds, 1 eval prompt x 1 seed, no W&B.
DELTA = TINY + [
    "technique=prompt_delta", "objective=[concept_score]", "technique.train_sampling_steps=2",
    "technique.train_seeds=[100,101,102]", "logger=none", "evaluator=[concept]",
    "concept.head=colour", "concept.target=red",   # the objective's and the evaluator's target
    "eval.prompts=['a blue {}']", "eval.seeds=[0]", "sampling.steps=2",
]


def make(gen, extra=(), prepare=True):
    """The technique of a config, around the module's generator (the run flow's build, minus loading)."""
    from steerexp import scorers
    from steerexp.images import ImagePolicy

    cfg = compose_config(DELTA + list(extra))
    objective = _instantiate(cfg.objective)
    technique = _instantiate(cfg.technique, generator=gen, objective=objective, sampling=cfg.sampling,
                             _recursive_=False)
    technique.bind(scorers.build(cfg.scorers), ImagePolicy.from_config(cfg.images))  # and its objective, as build
    if prepare:
        technique.prepare()
    return technique


def fit(technique, steps):
    from steerexp.trainer import fit as lightning_fit

    technique.steps = steps
    lightning_fit({"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1}, technique, [], None,
                  None, None)


# ------------------------------------------------------------------ budgets
@pytest.mark.parametrize("extra, check", [
    (["technique.budget.eps_text=0.5"], lambda n: n["text"] <= 0.5 * (1 + 1e-5)),
    (["technique=latent_offset", "technique.latent_mode=per_seed", "technique.budget.eps_z=0.3",
      "eval.seeds=[100]"], lambda n: bool((n["latent"] <= 0.3 * (1 + 1e-5)).all())),
    (["technique=prompt_delta_latent_offset", "technique.budget.eps_text=0.5", "technique.budget.eps_z=0.3",
      "technique.budget.joint=true"], lambda n: (n["text"] / 0.5) ** 2 + (n["latent"] / 0.3) ** 2 <= 1 + 1e-5),
], ids=["text-tensor", "latent-per-seed", "joint"])
def test_the_budget_is_never_exceeded_after_any_step(gen, monkeypatch, extra, check):
    original = InputDelta.apply_budget  # runs inside every optimizer step, before any checkpoint
    before, after = [], []

    def recorded(self):
        before.append({k: v.clone() for k, v in self.norms().items()})
        original(self)
        after.append({k: v.clone() for k, v in self.norms().items()})

    monkeypatch.setattr(InputDelta, "apply_budget", recorded)
    fit(make(gen, ["technique.lr=0.5"] + extra), steps=4)  # through Lightning, as the run flow trains
    assert len(after) == 4 and all(check(n) for n in after)
    assert not all(check(n) for n in before)  # the raw steps did leave the ball: the projection acted
    assert gen.unchanged()


def test_token_norm_bounds_every_row(gen):
    tech = make(gen, ["technique.budget.text_norm=token", "technique.budget.eps_text=0.2"])
    with torch.no_grad():
        tech.text_delta.normal_()
    tech.apply_budget()
    rows = tech.text_delta.norm(dim=-1)
    assert torch.allclose(rows, torch.full_like(rows, 0.2), atol=1e-5)


# ------------------------------------------------------------------ objectives
def optimise(tech, steps, lr):
    batch = (torch.arange(2),)
    with torch.no_grad():
        before = float(tech.training_loss(batch))
    opt = torch.optim.Adam([p for p in tech.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = tech.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tech.apply_budget()
    with torch.no_grad():
        return before, float(tech.training_loss(batch))


def test_prompt_delta_raises_the_target_log_probability(gen):
    tech = make(gen, ["technique.budget.eps_text=8"])
    before, after = optimise(tech, steps=6, lr=0.1)
    assert after < before - 1.0  # -log p(red) of the training batch drops
    assert gen.unchanged()


def test_latent_offset_moves_toward_a_reconstruction_target(gen):
    tech = make(gen, ["technique=latent_offset", "objective=[reconstruction,delta_l2]",
                                "objective.terms.delta_l2.weight=0.001", "technique.budget.chi=0.01"])
    assert set(tech.objective.terms) == {"reconstruction", "delta_l2"}
    before, after = optimise(tech, steps=6, lr=0.1)
    assert after < before
    assert gen.unchanged()


def test_objective_terms_compose_with_weights(gen):
    tech = make(gen, ["objective=[concept_score,delta_l2,proximity]", "objective.terms.delta_l2.weight=0.5"])
    with torch.no_grad():
        tech.text_delta.fill_(0.1)
        total = tech.training_loss((torch.tensor([0, 1]),))
    last = tech.objective.last
    assert set(last) == {"concept_score", "delta_l2", "proximity"}
    assert last["delta_l2"] == pytest.approx(0.5 * float(tech.text_delta.pow(2).sum()), rel=1e-4)
    assert last["proximity"] > 0 and float(total) == pytest.approx(sum(last.values()), rel=1e-4)


def test_proximity_border_reads_only_the_frame():
    """proximity.border=k: the pixel MSE over the k-pixel frame at the edges only; the centre may change freely."""
    from steerexp.objectives.composite import ObjectiveInputs
    from steerexp.objectives.regularisers import Proximity

    start = torch.zeros(2, 3, 8, 8)
    centre = start.clone()
    centre[..., 2:6, 2:6] = 1.0  # an object in the middle
    edge = start.clone()
    edge[..., 0, :] = 1.0  # the top row: 8 of the 48 pixels of the 2-pixel frame of an 8 x 8 image
    frame = Proximity(border=2)
    assert float(frame.loss(ObjectiveInputs(images=centre, start_images=start))) == 0.0
    assert float(frame.loss(ObjectiveInputs(images=edge, start_images=start))) == pytest.approx(8 / 48)
    assert float(Proximity().loss(ObjectiveInputs(images=centre, start_images=start))) == pytest.approx(16 / 64)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="proximity.border"):
            Proximity(border=bad)
    with pytest.raises(ValueError, match="covers the whole"):
        Proximity(border=4).loss(ObjectiveInputs(images=centre, start_images=start))


def test_train_objective_is_the_objective_over_every_training_pair(gen):
    """technique/train_objective: the mean objective over all (prompt, training seed) pairs with the final deltas,
    what restarts with other seeds are compared by; it falls when training lowers the loss."""
    tech = make(gen, ["objective=[concept_score,delta_l2]", "objective.terms.delta_l2.weight=0.5"])
    with torch.no_grad():
        tech.text_delta.fill_(0.1)
    pairs = torch.arange(len(tech.pairs()))
    with torch.no_grad():
        total = tech.training_loss((pairs,))  # one batch of every pair = the mean over pairs
    want = tech.objective.last
    d = tech.diagnostics()
    assert d["train_objective"] == pytest.approx(float(total), rel=1e-4)
    assert d["train_objective/concept_score"] == pytest.approx(want["concept_score"], rel=1e-4)
    assert d["train_objective/delta_l2"] == pytest.approx(want["delta_l2"], rel=1e-4)
    before, after = optimise(tech, steps=6, lr=0.1)
    assert after < before and tech.diagnostics()["train_objective"] < d["train_objective"]


def test_denoising_composes_with_delta_l2_and_image_terms_need_images(gen):
    """One objective protocol: objective=[denoising,delta_l2] is textual inversion plus an L2 on v* - v_init
    (the one way to set L2); a term the technique cannot feed is one clear error."""
    def make_ti(placeholder, objective):  # a placeholder of its own: the module's generator keeps added tokens
        cfg = compose_config(TINY + ["technique.targets.k=2", f"technique.placeholder='{placeholder}'", *objective])
        tech = _instantiate(cfg.technique, generator=gen, objective=_instantiate(cfg.objective), sampling=cfg.sampling,
                            _recursive_=False)
        tech.prepare()
        return tech

    tech = make_ti("<l2*>", ["objective=[denoising,delta_l2]", "objective.terms.delta_l2.weight=0.5"])
    with torch.no_grad():
        tech.embeddings.add_(0.1)
        total = tech.training_loss(tech.batch_at(0))
    last = tech.objective.last
    assert set(last) == {"denoising", "delta_l2"}
    assert last["delta_l2"] == pytest.approx(0.5 * float((tech.embeddings - tech.initial).pow(2).sum()), rel=1e-4)
    assert float(total) == pytest.approx(sum(last.values()), rel=1e-4)
    tech = make_ti("<img*>", ["objective=[concept_score]"])
    with pytest.raises(ValueError, match="objective term 'concept_score' needs images"):
        tech.training_loss(tech.batch_at(0))


# ------------------------------------------------------------------ the run flow
def test_deltas_file_reproduces_the_evaluated_edit(gen, tmp_path):
    metrics, run_dir = tiny_run(tmp_path, ["technique=prompt_delta_latent_offset", "technique.steps=2",
                                           "evaluator.concept.judge=classifier"], base=DELTA)
    deltas = load_file(run_dir / "deltas.safetensors")
    assert set(deltas) == {"text_delta", "latent_delta"}  # only the deltas, never the generator
    assert metrics["generator/unchanged"] is True and metrics["delta_norm/text"] > 0
    fresh = make(gen, ["technique=prompt_delta_latent_offset"])
    fresh.load_deltas(deltas)
    from steerexp.scorers.classifier import ConceptClassifier

    clf = ConceptClassifier.from_pretrained()
    images = fresh.generate(["a blue {}"], [0], edited=True)
    score = float(clf.probs(images)["colour"][0, clf.class_index("colour", "red")])
    assert score == pytest.approx(metrics["concept/score_mean/edited"], abs=1e-5)
    assert not torch.equal(images, fresh.generate(["a blue {}"], [0], edited=False))


def test_resume_continues_from_the_checkpointed_deltas(shipped, tmp_path, monkeypatch):
    _, first = tiny_run(tmp_path, ["technique.steps=4"], name="first", base=DELTA)
    ckpt = first / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 4 and set(saved["state_dict"]) == {"text_delta"}
    started = {}
    original = InputDelta.on_train_start

    def record(self):
        started["text_delta"] = self.text_delta.detach().clone()
        original(self)

    monkeypatch.setattr(InputDelta, "on_train_start", record)
    _, second = tiny_run(tmp_path, ["technique.steps=6", f"ckpt_path={ckpt}"], name="second", base=DELTA)
    assert torch.equal(started["text_delta"], saved["state_dict"]["text_delta"])
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_word_delta_touches_only_prompts_with_the_word(gen):
    tech = make(gen, ["technique.tokens=blue"])
    assert tuple(tech.text_delta.shape) == (1, tech.generator.embed_dim)
    with torch.no_grad():
        tech.text_delta.normal_(std=2.0)
    same = tech.generate(["a red square"], [0], edited=True)
    assert torch.equal(same, tech.generate(["a red square"], [0], edited=False))
    assert not torch.equal(tech.generate(["a blue square"], [0], edited=True),
                           tech.generate(["a blue square"], [0], edited=False))


def test_strength_zero_is_exactly_the_baseline(gen):
    tech = make(gen, ["technique=prompt_delta_latent_offset"])
    with torch.no_grad():
        tech.text_delta.normal_()
        tech.latent_delta.normal_()
    tech.strength = 0.0
    assert torch.equal(tech.generate(["a blue {}"], [3], edited=True), tech.generate(["a blue {}"], [3], edited=False))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "extra, error, match",
    [
        (["technique.budget.eps_text=-1"], ValueError, "eps_text: must be a positive"),
        (["technique=latent_offset", "technique.budget.eps_z=-0.5"], ValueError, "eps_z: must be a positive"),
        (["technique.train_sampling_steps=0"], ValueError, "train_sampling_steps: must be a number >= 1"),
        (["sampling.steps=0"], ValueError, "sampling.steps must be >= 1"),
        (["objective.terms.concept_score.head=hue"], ValueError, r"unknown head 'hue'.*colour"),
        (["objective.terms.concept_score.target=crimson"], ValueError, r"unknown colour 'crimson'.*red"),
        (
            [
                "objective=clip_similarity",
                "objective.terms.clip_similarity.text=null",
                "objective.terms.clip_similarity.image=/nowhere/target.png",
            ],
            FileNotFoundError,
            "image not found: /nowhere",
        ),
        (
            ["objective=reconstruction", "objective.terms.reconstruction.scene.colour=teal"],
            ValueError,
            "unknown colour 'teal'",
        ),
        (["objective=denoising"], ValueError, "needs an image objective"),
        (["technique.tokens=green"], ValueError, "does not occur in training prompt"),
        (
            ["technique=prompt_delta_latent_offset", "technique.budget.joint=true", "technique.budget.eps_z=null"],
            ValueError,
            "joint shares one budget",
        ),
    ],
    ids=[
        "neg-eps-text",
        "neg-eps-z",
        "zero-train-steps",
        "zero-steps",
        "head",
        "attribute",
        "clip-image",
        "scene",
        "denoising",
        "word",
        "joint",
    ],
)
def test_bad_input_is_rejected_before_training(gen, extra, error, match):
    with pytest.raises(error, match=match):
        make(gen, extra)  # the config's own instantiation and prepare(), as the run flow does before any training


def test_per_seed_offsets_refuse_unseen_seeds(gen):
    tech = make(gen, ["technique=latent_offset", "technique.latent_mode=per_seed"])
    with pytest.raises(ValueError, match="per-seed latent offsets exist only for"):
        tech.generate(["a blue {}"], [7], edited=True)


def test_clip_and_reconstruction_accept_image_files(shipped, tmp_path):
    from steerexp.objectives.clip_similarity import ClipSimilarity
    from steerexp.objectives.composite import ObjectiveInputs
    from steerexp.objectives.reconstruction import Reconstruction

    path = tmp_path / "target.png"
    Image.fromarray(np.full((48, 48, 3), (220, 40, 40), np.uint8)).save(path)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    for term in (ClipSimilarity(image=str(path)), Reconstruction(image=str(path))):
        loss = term(ObjectiveInputs(images))
        (grad,) = torch.autograd.grad(loss, images)
        assert loss.ndim == 0 and grad.abs().sum() > 0
    # the file's content is the target: its own colour scores better than another
    red, blue = torch.tensor([220, 40, 40]) / 255, torch.tensor([40, 40, 220]) / 255
    as_images = lambda c: c.view(1, 3, 1, 1).expand(2, 3, 32, 32)
    for term in (ClipSimilarity(image=str(path)), Reconstruction(image=str(path))):
        assert term(ObjectiveInputs(as_images(red))) < term(ObjectiveInputs(as_images(blue)))
    with pytest.raises(ValueError, match="exactly one target"):
        ClipSimilarity(text="a red circle", image=str(path))
