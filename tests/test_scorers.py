"""One scorer package: one factory, one classifier setting honoured by objectives, techniques
and evaluators alike, each model built once; one "log p(target) under a head"."""
import shutil
from types import SimpleNamespace

import pytest
import torch

from steerexp import scorers
from steerexp.scorers.classifier import ConceptClassifier


@pytest.fixture
def fresh_scorers():
    return scorers.build(None)  # a run's scorers: the shipped defaults (run.build makes one per run)


def test_log_prob_and_prob_read_a_head_as_the_classifier_does(shipped):
    clf = scorers.load_classifier()
    x = torch.rand(3, 3, 32, 32)
    idx = clf.class_index("colour", "red")
    assert torch.equal(scorers.log_prob(clf, x, "colour", "red"), clf(x)["colour"].log_softmax(-1)[:, idx])
    assert torch.equal(scorers.prob(clf, x, "colour", "red"), clf.probs(x)["colour"][:, idx])
    both = scorers.prob(clf, x, "colour", ["red", "blue"])
    assert torch.allclose(both, clf.probs(x)["colour"][:, [idx, clf.class_index("colour", "blue")]].sum(-1))
    with pytest.raises(ValueError, match="unknown classifier head 'hue'"):
        scorers.log_prob(clf, x, "hue", "red")


def test_one_classifier_setting_reaches_every_scorer_user(shipped, tmp_path, monkeypatch, fresh_scorers):
    from steerexp.evaluators.base import EvalContext
    from steerexp.evaluators.concept import Concept
    from steerexp.objectives.concept_score import ConceptScore
    from steerexp.techniques.energy_guidance import EnergyGuidance
    from steerexp.techniques.nudging import ClassifierFilter
    from steerexp.techniques.prompt_search import PromptSearch

    folder = tmp_path / "my_classifier"
    shutil.copytree(scorers.DEFAULT_CLASSIFIER, folder)
    loaded = []
    original = ConceptClassifier.from_pretrained.__func__
    monkeypatch.setattr(ConceptClassifier, "from_pretrained",
                        classmethod(lambda cls, f=scorers.DEFAULT_CLASSIFIER: loaded.append(f) or original(cls, f)))
    run = scorers.build({"classifier": str(folder)})  # as run.build does with cfg.scorers, passed to every part

    x = torch.rand(2, 3, 32, 32)
    term = ConceptScore("size", "large")                                         # an objective
    term.bind(run)
    term.log_prob(x)
    tech = SimpleNamespace(scorer="concept", head="size", target="large", _log_p=None, scorers=run,
                           generator=SimpleNamespace(device=torch.device("cpu")))
    EnergyGuidance.log_p(tech)(x)                                                # techniques
    PromptSearch._score_fn(SimpleNamespace(scorer="concept", head="size", target="large", scorers=run))(x)
    ClassifierFilter(head="colour", classes=["red"])(x, SimpleNamespace(scorers=run))
    ctx = EvalContext(object(), ["a {}"], [0], run)  # evaluators (off the shapes world: the classifier judges)
    Concept(head="size", target="large").scores(ctx.judging("concept", None, "size", "large").scorer, x)
    assert ctx.classifier is scorers.load_classifier(folder)
    assert [str(f) for f in loaded] == [str(folder.resolve())]  # built once, from the one setting


def test_scorers_by_name_and_a_user_classifier(shipped, tmp_path, fresh_scorers):
    class Dark(torch.nn.Module):
        def forward(self, x):
            return torch.stack([0.5 - x.mean((1, 2, 3)), x.mean((1, 2, 3)) - 0.5], -1)

    path = tmp_path / "dark.pt"
    torch.jit.script(Dark()).save(str(path))
    run = scorers.build({"user": {"path": str(path), "classes": ["dark", "bright"]},
                         "second": {"kind": "classifier", "path": None}})  # several judges side by side
    assert run.configured("user") and not scorers.build(None).configured("user")
    assert run.get("second") is run.get("classifier") is scorers.load_classifier()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(scorers.prob(run.get("user"), x, "any head", "bright"), Dark()(x).softmax(-1)[:, 1])
    with pytest.raises(ValueError, match="no scorer named 'third'"):
        run.get("third")
    with pytest.raises(ValueError, match="scorers.user is not set"):
        scorers.build(None).get("user")


def test_attribute_keep_is_the_kl_from_the_start_reading_and_pulls_back_to_it(shipped, fresh_scorers):
    from steerexp.objectives.composite import Composite, ObjectiveInputs
    from steerexp.objectives.concept_score import AttributeKeep, ConceptScore

    term = AttributeKeep(heads=["shape", "colour"], scorer="robust")
    clf = fresh_scorers.get("robust")
    g = torch.Generator().manual_seed(0)
    start = torch.rand(3, 3, 32, 32, generator=g)
    assert term.loss(ObjectiveInputs(images=start.clone(), start_images=start)).abs() < 1e-6  # unchanged: 0
    edited = torch.rand(3, 3, 32, 32, generator=g).requires_grad_(True)
    value = term.loss(ObjectiveInputs(images=edited, start_images=start))
    p, q = clf(start), clf(edited)  # the KL by hand, summed over the kept heads
    kl = sum((p[h].softmax(-1) * (p[h].log_softmax(-1) - q[h].log_softmax(-1))).sum(-1).mean()
             for h in ("shape", "colour"))
    assert value > 0 and torch.allclose(value, kl)
    value.backward()  # a step against its gradient moves the edited images' reading towards the start's
    with torch.no_grad():
        step = 0.1 * edited.grad / edited.grad.norm()  # a small L2 step down the gradient
        stepped = term.loss(ObjectiveInputs(images=edited - step, start_images=start))
    assert stepped < value
    objective = Composite({"concept_score": ConceptScore("position", "left", scorer="robust"), "attribute_keep": term})
    assert objective.needs_start and objective.optimised_against() == {"robust"}
    with pytest.raises(ValueError, match=r"attribute_keep.heads: unknown head\(s\) \['hue'\]"):
        AttributeKeep(heads=["hue"]).bind(fresh_scorers)  # checked against the run's scorers
    with pytest.raises(ValueError, match="analytic judge has no gradients"):
        AttributeKeep(scorer="analytic").bind(fresh_scorers)


def test_attribute_keep_refuses_a_one_head_model(tmp_path, fresh_scorers):
    """A user's one-head model answers every head name with the same output: nothing to keep apart."""
    from steerexp.objectives.concept_score import AttributeKeep

    class Dark(torch.nn.Module):
        def forward(self, x):
            return torch.stack([0.5 - x.mean((1, 2, 3)), x.mean((1, 2, 3)) - 0.5], -1)

    path = tmp_path / "dark.pt"
    torch.jit.script(Dark()).save(str(path))
    run = scorers.build({"user": {"path": str(path), "classes": ["dark", "bright"]}})
    with pytest.raises(ValueError, match="one-head model"):
        AttributeKeep(heads=["shape"], scorer="user").bind(run)


def test_attribute_keep_with_the_prompt_as_reference(shipped, fresh_scorers):
    """reference=prompt: cross-entropy to the class the prompt names; a head it names no class of keeps the start's
    reading (the KL of reference=start)."""
    from steerexp.objectives.composite import Composite, ObjectiveInputs
    from steerexp.objectives.concept_score import AttributeKeep
    from steerexp.scorers import named_class

    shapes = ["circle", "square", "cross"]
    assert named_class("a purple cross", shapes) == 2 and named_class("a red object", shapes) is None
    assert named_class("a circle and a square", shapes) is None  # several: no single class
    assert named_class("A red {}", ["red", "blue"]) == 0 and named_class("a {}, blue", ["red", "blue"]) == 1
    g = torch.Generator().manual_seed(0)
    start, edited = torch.rand(2, 2, 3, 32, 32, generator=g)  # two images each
    prompts = ["a purple cross", "a red circle"]
    inputs = ObjectiveInputs(images=edited, start_images=start, prompts=prompts)
    clf = fresh_scorers.get("robust")
    out, before = clf(edited), clf(start)
    want = -torch.stack([out["shape"].log_softmax(-1)[i, clf.class_index("shape", p.split()[-1])]
                         for i, p in enumerate(prompts)]).mean()  # shape: both prompts name one
    p = before["size"].softmax(-1)  # size: neither names one
    want = want + (p * (p.log() - out["size"].log_softmax(-1))).sum(-1).mean()
    term = AttributeKeep(heads=["shape", "size"], scorer="robust", reference="prompt")
    assert torch.allclose(term.loss(inputs), want, atol=1e-5)
    assert "prompts" in Composite({"attribute_keep": term}).needs
    with pytest.raises(ValueError, match="needs prompts"):  # a technique that gives no prompts: one clear error
        Composite({"attribute_keep": term})(ObjectiveInputs(images=edited, start_images=start))
    with pytest.raises(ValueError, match="reference must be start or prompt"):
        AttributeKeep(reference="target")


def test_two_runs_in_one_process_each_use_their_own_scorers_and_image_policy(shipped, tmp_path, monkeypatch):
    """run.build makes ONE Scorers and ONE ImagePolicy per run and passes them to what uses them: two runs in one
    process with different `scorers:` and `images:` each rank, judge and read with their own, every model is built
    once per run, and nothing in steerexp.scorers or steerexp.images holds a run's state afterwards."""
    import ast
    import inspect
    from types import ModuleType

    import steerexp.images
    import steerexp.run as run_module
    import steerexp.scorers.factory
    from tests.helpers import tiny_run

    loaded, original = [], ConceptClassifier.from_pretrained.__func__
    monkeypatch.setattr(ConceptClassifier, "from_pretrained", classmethod(
        lambda cls, f=scorers.DEFAULT_CLASSIFIER: loaded.append(str(f)) or original(cls, f)))
    built, build = [], run_module.build
    monkeypatch.setattr(run_module, "build", lambda cfg: built.append(build(cfg)) or built[-1])
    modules = (steerexp.images, scorers, steerexp.scorers.factory)

    def state():  # every module-level name and the object it holds (submodules imported on first use aside)
        return {m.__name__: {k: id(v) for k, v in vars(m).items() if not isinstance(v, ModuleType)} for m in modules}

    before = state()
    folders = [tmp_path / "classifier_a", tmp_path / "classifier_b"]
    for folder, fit in zip(folders, ("crop", "pad")):
        shutil.copytree(scorers.DEFAULT_CLASSIFIER, folder)
        # latent priming ranks its candidates with scorers.classifier; the concept evaluator judges with it
        tiny_run(tmp_path, [f"scorers.classifier={folder}", f"images.fit={fit}", "technique=latent_priming",
                            "technique.candidates=2", "technique.top_k=1", "technique.prompts=['a red circle']",
                            "evaluator=[concept]", "evaluator.concept.judge=classifier", "logger=none"],
                 name=folder.name, base=["eval.seeds=[0,1]", "eval.prompts=['a red {}']", "sampling.steps=4"])
    (_, first, _), (_, second, _) = built
    assert first.scorers is not second.scorers and first.image_policy is not second.image_policy
    for tech, folder, fit in ((first, folders[0], "crop"), (second, folders[1], "pad")):
        assert tech.scorers.spec["classifier"] == str(folder) and tech.image_policy.fit == fit
        assert tech.scorers.get("classifier") is scorers.load_classifier(folder)  # the one its parts used
    assert loaded == [str(f.resolve()) for f in folders]  # each run's classifier, built once for the whole run
    # nothing module-level changed: no run's scorers or policy is left behind for the next run to pick up
    assert state() == before
    for m in modules:  # and no function can set one: no `global` statement in these modules
        tree = ast.parse(inspect.getsource(m))
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], m.__name__
    assert not any(hasattr(m, name) for m in modules for name in ("configure", "current", "policy", "_policy"))
