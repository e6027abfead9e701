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
    scorers.configure(None)
    yield
    scorers.configure(None)  # later tests see the shipped defaults


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
    scorers.configure({"classifier": str(folder)})  # as the run does with cfg.scorers

    x = torch.rand(2, 3, 32, 32)
    ConceptScore("size", "large").log_prob(x)                                    # an objective
    tech = SimpleNamespace(scorer="concept", head="size", target="large", _log_p=None,
                           generator=SimpleNamespace(device=torch.device("cpu")))
    EnergyGuidance.log_p(tech)(x)                                                # techniques
    PromptSearch._score_fn(SimpleNamespace(scorer="concept", head="size", target="large"))(x)
    ClassifierFilter(head="colour", classes=["red"])(x, None)
    ctx = EvalContext(object(), ["a {}"], [0])  # evaluators (off the shapes world: the classifier judges)
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
    assert run.configured("user") and not scorers.current().configured("user")
    assert run.get("second") is run.get("classifier") is scorers.load_classifier()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(scorers.prob(run.get("user"), x, "any head", "bright"), Dark()(x).softmax(-1)[:, 1])
    with pytest.raises(ValueError, match="no scorer named 'third'"):
        run.get("third")
    with pytest.raises(ValueError, match="scorers.user is not set"):
        scorers.current().get("user")


def test_attribute_keep_is_the_kl_from_the_start_reading_and_pulls_back_to_it(shipped, fresh_scorers):
    from steerexp.objectives.composite import Composite, ObjectiveInputs
    from steerexp.objectives.concept_score import AttributeKeep, ConceptScore

    term = AttributeKeep(heads=["shape", "colour"], scorer="robust")
    clf = scorers.get("robust")
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
        AttributeKeep(heads=["hue"])
    with pytest.raises(ValueError, match="analytic judge has no gradients"):
        AttributeKeep(scorer="analytic")


def test_attribute_keep_refuses_a_one_head_model(tmp_path, fresh_scorers):
    """A user's one-head model answers every head name with the same output: nothing to keep apart."""
    from steerexp.objectives.concept_score import AttributeKeep

    class Dark(torch.nn.Module):
        def forward(self, x):
            return torch.stack([0.5 - x.mean((1, 2, 3)), x.mean((1, 2, 3)) - 0.5], -1)

    path = tmp_path / "dark.pt"
    torch.jit.script(Dark()).save(str(path))
    scorers.configure({"user": {"path": str(path), "classes": ["dark", "bright"]}})
    with pytest.raises(ValueError, match="one-head model"):
        AttributeKeep(heads=["shape"], scorer="user")


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
    clf = scorers.get("robust")
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
