"""Numbers you can trust (issue 15, sections 1 and 2): the analytic judge of the shapes world, and
judges kept apart from objectives (who judged, an independent judge, judge agreement, reward hacking)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from steerexp import scorers
from steerexp.errors import ConfigError
from steerexp.evaluators.base import EvalContext
from steerexp.evaluators.concept import Concept
from steerexp.evaluators.leakage import Leakage
from steerexp.images import to_tensor
from steerexp.scorers import factory
from steerexp.scorers.analytic import load_analytic
from steerexp.scorers.classifier import HeadClassifier
from steerexp.validate import validate
from steerexp.worlds.shapes import world
from steerexp.worlds.shapes.judge import AnalyticJudge
from steerexp.worlds.shapes.report import EVAL_SEED
from tests.helpers import compose_config, tiny_run


@pytest.fixture(scope="module")
def judge() -> AnalyticJudge:
    return load_analytic()


@pytest.fixture
def fresh_scorers():
    return scorers.build(None)  # a run's scorers: the shipped defaults (run.build makes one per run)


def render(scenes, res: int = 32) -> torch.Tensor:
    return to_tensor(np.stack([world.render(s, res) for s in scenes]))


def blobs(n: int, seed: int = 0, red_bias: float = 0.0) -> torch.Tensor:
    """Noisy multicoloured blobs: a disc of random colours on a palette background."""
    g = torch.Generator().manual_seed(seed)
    images = render([world.Scene("circle", "red", "large", "center", "gray")] * n)
    noise = torch.rand(n, 3, 32, 32, generator=g)
    noise[:, 0] = (noise[:, 0] + red_bias).clamp(max=1)
    disc = torch.from_numpy(world.coverage("circle", 0.5, 0.5, 0.3, 32) > 0.5)
    return torch.where(disc, noise, images)


# ============================================================================ 1. the analytic judge
def test_analytic_judge_reads_fresh_world_renders(judge):
    """>= 0.99 per head on renders of a world stream no pretraining stage drew from (the generator was
    trained on seed 0, the scorers on seed 1000); every render is a clean one."""
    images, scenes = world.dataset(EVAL_SEED, 1000)
    x = to_tensor(images)
    pred = judge.predict(x)
    for head in world.HEADS:
        accuracy = np.mean([p == getattr(s, head) for p, s in zip(pred[head], scenes)])
        assert accuracy >= 0.99, (head, accuracy)
    assert float(judge.clean_score(x).min()) > 0.9


def test_analytic_judge_reads_any_size_and_tells_the_scene(judge):
    scenes = [world.Scene("star", "purple", "small", "left", "white", 0.01, -0.02),
              world.Scene("ring", "yellow", "large", "bottom", "black", -0.02, 0.0)]
    for res in (32, 64, 100):
        records = judge.read(render(scenes, res))
        for scene, rec in zip(scenes, records):
            assert {h: rec[h] for h in (*world.HEADS, "background")} == {
                h: getattr(scene, h) for h in (*world.HEADS, "background")}
            cx, cy = world.centre(scene.size, scene.position)
            assert abs(rec["cx"] - cx - scene.dx) < 0.02 and abs(rec["cy"] - cy - scene.dy) < 0.02
            assert abs(rec["radius"] - world.SIZES[scene.size]) < 0.02
            assert rec["clean"] > 0.9 and rec["p_shape"] > 0.5


def test_analytic_judge_is_a_classifier_scorer_without_gradients(judge, fresh_scorers):
    assert fresh_scorers.get("analytic") is judge and isinstance(judge, HeadClassifier)
    assert fresh_scorers.kind("analytic") == "analytic"
    x = render([world.Scene("square", "green", "large", "top", "gray")])
    assert float(scorers.prob(judge, x, "colour", "green")[0]) > 0.9
    assert float(scorers.prob(judge, x, "shape", ["square", "circle"])[0]) > 0.9
    assert judge.predict(x) == {"shape": ["square"], "colour": ["green"], "size": ["large"], "position": ["top"]}
    with pytest.raises(ValueError, match="no gradients"):
        scorers.log_prob(judge, x.clone().requires_grad_(True), "colour", "green")
    with pytest.raises(ValueError, match="knows no colour 'teal'"):
        scorers.prob(judge, x, "colour", "teal")
    with pytest.raises(ValueError, match="takes no settings"):
        scorers.build({"analytic": {"path": "x"}}).get("analytic")
    from steerexp.objectives.concept_score import ConceptScore

    with pytest.raises(ValueError, match="analytic judge has no gradients"):  # checked against the run's scorers
        ConceptScore("colour", "red", scorer="analytic").bind(fresh_scorers)


def test_clean_score_tells_clean_renders_from_blobs(judge):
    clean = judge.clean_score(render([world.Scene("circle", "red", "large", "center", "gray")] * 4))
    noisy = blobs(16)
    dirty = judge.clean_score(noisy)
    assert float(clean.min()) > 0.95 and float(dirty.max()) < 0.5
    assert float(judge.probs(noisy)["colour"].max(-1).values.max()) < 0.5  # no palette colour dominates


def test_judging_many_images_is_fast(judge):
    import time

    x = to_tensor(world.dataset(EVAL_SEED + 5, 256)[0])
    judge.fit(x[:2])  # warm
    start = time.perf_counter()
    judge.probs(x)
    assert time.perf_counter() - start < 5.0  # about 0.3 s on an idle 2-core machine; generous under load


# ============================================================================ 2. judges kept apart from objectives
class Fixed:
    """A technique whose baseline and edited images are given, optimised against `against`."""

    def __init__(self, baseline: torch.Tensor, edited: torch.Tensor, against=()):
        self.images = {False: baseline, True: edited}
        self.against = set(against)

    def generate(self, prompts, seeds, edited):
        return self.images[edited][: len(prompts)]

    def optimised_against(self):
        return self.against


class RedChannel(HeadClassifier):
    """A non-robust objective scorer: reads colour=red whenever red dominates the mean pixel."""

    def __init__(self):
        super().__init__()
        self.heads = {"colour": list(world.COLOURS)}

    def forward(self, x):
        logits = torch.zeros(len(x), len(world.COLOURS))
        logits[:, 0] = 200 * (x[:, 0].mean((1, 2)) - x[:, 1:].mean((1, 2, 3)))
        return {"colour": logits}


@pytest.fixture
def with_red_channel(monkeypatch):
    monkeypatch.setitem(factory.KINDS, "red_channel", lambda spec, device, key: RedChannel())
    return scorers.build({"fast": {"kind": "red_channel"}})


def colour_edit(edited: torch.Tensor, run: scorers.Scorers, against=("fast",), **kw) -> tuple[dict, EvalContext]:
    n = len(edited)
    base = render([world.Scene("circle", "blue", "large", "center", "gray")] * n)
    ctx = EvalContext(Fixed(base, edited, against), ["a blue circle"], list(range(n)), scorers=run, world=True)
    return Concept(head="colour", target="red", **kw).evaluate(ctx).metrics, ctx


def test_reward_hacking_is_flagged_on_blobs_and_not_on_clean_edits(with_red_channel, capsys):
    """The objective's scorer reads red on noisy red-tinted blobs; the analytic judge does not: reward hacking,
    one warning line. A clean red circle satisfies both: no flag."""
    m, ctx = colour_edit(blobs(8, red_bias=0.45), with_red_channel)
    assert m["concept/objective/target_rate/edited"] == 1.0 and m["concept/target_rate/edited"] <= 0.25
    assert m["concept/judged_by/analytic"] and m["concept/judge_is_objective"] is False
    assert m["concept/reward_hacking"] is True and m["concept/judge_agreement"] <= 0.25
    assert m["concept/clean_score/edited"] < 0.5 < m["concept/clean_score/baseline"]
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if "reward hacking" in line]) == 1
    assert ctx.judges["concept"] == {"judge": "analytic", "independent": "analytic", "objective": ["fast"]}

    m, _ = colour_edit(render([world.Scene("circle", "red", "large", "center", "gray")] * 8), with_red_channel)
    assert m["concept/objective/target_rate/edited"] == 1.0 == m["concept/target_rate/edited"]
    assert m["concept/reward_hacking"] is False and m["concept/judge_agreement"] == 1.0
    assert "reward hacking" not in capsys.readouterr().err


def test_a_judge_that_is_the_objective_says_so_once_and_reports_an_independent_one(with_red_channel, capsys):
    edited = blobs(8, red_bias=0.45)
    m, ctx = colour_edit(edited, with_red_channel, judge="fast")
    assert m["concept/judged_by/fast"] and m["concept/judge_is_objective"] is True
    assert m["concept/target_rate/edited"] == 1.0  # the objective's own scorer: fooled
    assert m["concept/independent/target_rate/edited"] <= 0.25  # the analytic judge: not
    assert m["concept/reward_hacking"] is True
    leak = Leakage(prompts=["a blue circle"], judge="fast", head="colour", target="red").evaluate(ctx).metrics
    assert leak["leakage/judge_is_objective"] is True and "leakage/independent/flip_rate" in leak
    err = [line for line in capsys.readouterr().err.splitlines() if "steerexp: warning" in line]
    assert len([line for line in err if "is a scorer this run optimised against" in line]) == 1  # once per run
    assert ctx.judges["leakage"]["independent"] == "analytic"


def test_default_judges(gen, tmp_path, fresh_scorers):
    x = render([world.Scene("circle", "red", "large", "center", "gray")])
    assert EvalContext(Fixed(x, x), ["a {}"], [0], world=True).default_judge() == "analytic"
    assert EvalContext(Fixed(x, x), ["a {}"], [0]).default_judge() == "classifier"  # no world generator
    on_world = Fixed(x, x)
    on_world.generator = gen  # the shipped generator draws the world: the context knows it from the generator
    assert gen.world == "shapes" and EvalContext(on_world, ["a {}"], [0]).default_judge() == "analytic"
    path = tmp_path / "u.pt"
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(path))
    user = scorers.build({"user": {"path": str(path), "classes": ["a", "b"]}})
    assert EvalContext(Fixed(x, x), ["a {}"], [0], scorers=user).default_judge() == "user"
    assert EvalContext(Fixed(x, x), ["a {}"], [0], scorers=user, world=True).default_judge() == "analytic"
    # a scorer that reads noisy latents (guidance) judges no images: no objective reading, and no crash
    ctx = EvalContext(Fixed(x, x, ["noisy"]), ["a {}"], [0], world=True)
    assert not ctx.reads("noisy", "colour", "red")
    m = Concept(head="colour", target="red").evaluate(ctx).metrics
    assert m["concept/judged_by/analytic"] and "concept/objective/target_rate/edited" not in m


class Bright(torch.nn.Module):
    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], dim=-1) * 20


def test_a_users_evaluation_classifier_is_kept_apart_from_the_objective(shipped, tmp_path, fresh_scorers, capsys):
    """Off the shapes world (a real SD model): the user's classifier is the judge; when it is also the
    objective no independent judge is left (the shipped classifier does not read real images): a warning."""
    path = tmp_path / "bright.pt"
    torch.jit.script(Bright()).save(str(path))
    run = scorers.build({"user": {"path": str(path), "classes": ["dark", "bright"]}})
    dark, bright = torch.full((4, 3, 64, 64), 0.2), torch.full((4, 3, 64, 64), 0.8)

    ctx = EvalContext(Fixed(dark, bright, ["user"]), ["a {}"], [0, 1, 2, 3], scorers=run)
    m = Concept(head="light", target="bright").evaluate(ctx).metrics
    assert m["concept/judged_by/user"] and m["concept/judge_is_objective"] is True
    assert m["concept/independent_judge_found"] is False and "concept/reward_hacking" not in m
    assert "no independent judge is configured" in capsys.readouterr().err

    # the objective used the shipped classifier: the user's classifier judges, independently
    ctx = EvalContext(Fixed(dark, bright, ["classifier"]), ["a {}"], [0, 1, 2, 3], scorers=run)
    m = Concept(head="light", target="bright").evaluate(ctx).metrics
    assert m["concept/judge_is_objective"] is False and m["concept/independent/target_rate/edited"] == 1.0
    assert ctx.judges["concept"]["independent"] == "user"
    # and a run judged by that classifier gets the user's classifier as the independent judge
    assert ctx.judging("leakage", "classifier").independent == "user"
    assert "warning" in capsys.readouterr().err


def test_techniques_and_objectives_say_what_they_optimise(gen, fresh_scorers):
    from steerexp.objectives.clip_similarity import ClipSimilarity
    from steerexp.objectives.composite import Composite
    from steerexp.objectives.concept_score import ConceptScore
    from steerexp.objectives.regularisers import DeltaL2
    from steerexp.techniques.latent_priming import LatentPriming
    from steerexp.techniques.nudging import Nudging
    from steerexp.techniques.prompt_search import PromptSearch
    from steerexp.techniques.protocols import OptimisesAgainst
    from steerexp.techniques.textual_inversion import TextualInversion

    both = Composite({"c": ConceptScore("colour", "red"), "t": ClipSimilarity(text="a red circle"),
                      "l2": DeltaL2()})
    assert both.optimised_against() == {"classifier", "clip"}
    assert Composite({"c": ConceptScore("colour", "red", weight=0.0), "l2": DeltaL2()}).optimised_against() == set()
    assert LatentPriming(gen).optimised_against() == {"classifier"}
    assert PromptSearch(gen, scorer="clip").optimised_against() == {"clip"}
    assert Nudging(gen).optimised_against() == {"clip"}
    assert Nudging(gen, mode="noise", filters=[{"kind": "classifier", "classes": ["red"]}]).optimised_against() == {
        "classifier"}
    ti = TextualInversion(gen)
    assert isinstance(ti, OptimisesAgainst) and ti.optimised_against() == set()  # the denoising loss: no scorer


def test_judge_settings_are_validated():
    validate(compose_config(["evaluator.concept.judge=classifier", "evaluator.leakage.judge=clip"]))
    cases = [
        (["evaluator.concept.judge=nope"], "evaluator.concept.judge", "names no scorer"),
        (["evaluator.leakage.judge=user"], "evaluator.leakage.judge", "scorers.user.path is not set"),
        (["+evaluator.concept.scorer=classifier"], "evaluator.concept.scorer", "evaluator.concept.judge=classifier"),
        (["technique=prompt_delta", "objective=[concept_score]", "objective.terms.concept_score.scorer=analytic"],
         "objective.terms.concept_score.scorer", "no gradients"),
        (["experiment=latent_offset_layout", "objective=[concept_score,attribute_keep]",
          "objective.terms.attribute_keep.scorer=clip"],
         "objective.terms.attribute_keep.scorer", "no image classifier"),
    ]
    for overrides, key, message in cases:
        with pytest.raises(ConfigError) as info:
            validate(compose_config(overrides))
        assert info.value.key == key and message in str(info.value), str(info.value)


def test_a_run_records_its_judges(shipped, tmp_path, fresh_scorers):
    """A tiny prompt_delta run against the classifier: the analytic judge heads the concept metrics, the
    classifier's reading sits next to it, and judges.json says who judged what."""
    metrics, run_dir = tiny_run(tmp_path, [
        "technique=prompt_delta", "objective=[concept_score]", "technique.steps=1", "technique.train_seeds=[100]",
        "technique.train_sampling_steps=1", "concept.head=colour", "concept.target=red",
        "eval.prompts=['a blue {}']", "evaluator=[concept,leakage]", "evaluator.leakage.prompts=['a red square']",
        "logger=none"])
    assert metrics["concept/judged_by/analytic"] is True and metrics["concept/judge_is_objective"] is False
    assert {"concept/objective/target_rate/edited", "concept/judge_agreement", "concept/reward_hacking",
            "concept/clean_score/edited", "leakage/judged_by/analytic"} <= set(metrics)
    judges = json.loads((run_dir / "judges.json").read_text())
    assert judges["concept"] == {"judge": "analytic", "independent": "analytic", "objective": ["classifier"]}
    assert all(isinstance(v, (int, float, bool)) for v in json.loads((run_dir / "metrics.json").read_text()).values())


# ============================================================================ the documented adversarial case
@pytest.mark.slow
def test_prompt_delta_through_all_25_steps_is_flagged_as_reward_hacking(shipped, tmp_path, fresh_scorers, capfd):
    """experiments/prompt_delta_colour as first documented: a delta on all 32 token positions of "a blue
    circle" (eps 32), optimised against the shipped classifier through all 25 DDIM steps (120 Adam steps, lr
    0.05, batch 4, training seeds 100-107), turns it red for the classifier on held-out seeds 0-15; the
    analytic judge does not agree: the flag fires, with one warning line. The settings are pinned here (the
    preset itself now optimises the robust classifier on the colour word only). About 4 minutes on the idle
    2-core machine (2 threads: 234 s; 1 thread: 411 s, same figures)."""
    metrics, run_dir = tiny_run(tmp_path, [
        "experiment=prompt_delta_colour", "technique.tokens=all", "technique.train_sampling_steps=25",
        "technique.budget.eps_text=32", "technique.steps=120", "technique.lr=0.05", "technique.batch_size=4",
        "technique.train_seeds=[100,101,102,103,104,105,106,107]", "objective.terms.concept_score.scorer=classifier",
        "eval.prompts=['a blue circle']", "eval.seeds=[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]",
        "evaluator=[concept]", "evaluator.concept.judge=classifier", "logger=none"], base=[])
    assert metrics["concept/judge_is_objective"] is True  # judged by the objective's own scorer, as documented
    assert metrics["concept/target_rate/edited"] >= 0.8  # ... which reads red
    assert metrics["concept/independent/target_rate/edited"] < 0.8  # the analytic judge does not
    assert metrics["concept/reward_hacking"] is True
    err = capfd.readouterr().err.splitlines()
    assert len([line for line in err if "reward hacking" in line]) == 1
    assert json.loads((run_dir / "judges.json").read_text())["concept"]["independent"] == "analytic"
