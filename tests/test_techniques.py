"""The training-free techniques on the embedded generator, small: each effect goes the
expected way on a paired measure, strength 0 is exactly the baseline, bad input is clear."""
import numpy as np
import pytest
import torch

from steerexp.scorers.classifier import ConceptClassifier
from steerexp.techniques.embedding_arithmetic import EmbeddingArithmetic
from steerexp.techniques.energy_guidance import EnergyGuidance
from steerexp.techniques.guidance import GuidanceTuning
from steerexp.techniques.latent_priming import LatentPriming
from steerexp.techniques.prompt_search import PromptSearch

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow ring"]
SEEDS = list(range(8))
STEPS = 12



@pytest.fixture(scope="module")
def clf(shipped):
    return ConceptClassifier.from_pretrained()


def paired(tech, prompts=PROMPTS, seeds=SEEDS):
    ps = [p for p in prompts for _ in seeds]
    ss = [s for _ in prompts for s in seeds]
    with torch.no_grad():
        return tech.generate(ps, ss, edited=False), tech.generate(ps, ss, edited=True)


def rate(clf, images, head, target):
    return float((clf.probs(images)[head][:, clf.class_index(head, target)] >= 0.5).float().mean())


def test_arithmetic_large_direction_raises_the_large_rate(gen, clf):
    tech = EmbeddingArithmetic(gen, world_direction="size->large", alpha=4.0, sampling={"steps": STEPS})
    tech.compute()
    small = ["a small red circle", "a small blue square", "a small green triangle", "a small yellow ring"]
    base, edit = paired(tech, small)
    assert rate(clf, edit, "size", "large") > rate(clf, base, "size", "large") + 0.2
    assert gen.unchanged()


def test_arithmetic_alpha_zero_is_exactly_the_baseline(gen):
    tech = EmbeddingArithmetic(gen, world_direction="colour->red", alpha=0.0, sampling={"steps": 4})
    tech.compute()
    base, edit = paired(tech, PROMPTS[:2], [0, 1])
    assert torch.equal(base, edit)


def test_arithmetic_gate_leaves_dissimilar_prompts_alone(gen):
    tech = EmbeddingArithmetic(gen, world_direction="size->large", alpha=2.0, gate=1.0, sampling={"steps": 4})
    tech.compute()
    assert tech.gate_mask(["the emblem of the northern guild", "a red circle"]).sum() == 0
    tech.gate = -1.0
    assert tech.gate_mask(["a red circle"]).sum() == 1


def test_arithmetic_bad_contexts(gen):
    with pytest.raises(ValueError, match="empty"):
        EmbeddingArithmetic(gen, base_contexts=[], target_contexts=[])
    with pytest.raises(ValueError, match="paired one to one"):
        EmbeddingArithmetic(gen, base_contexts=["a"], target_contexts=["b", "c"])
    with pytest.raises(ValueError, match="or neither"):
        EmbeddingArithmetic(gen, base_contexts=["a"])


def test_guidance_higher_scale_raises_saturation(gen):
    from steerexp.evaluators.quality import saturation

    tech = GuidanceTuning(gen, scale=1.0, sampling={"steps": STEPS, "guidance_scale": 1.0})
    low, _ = paired(tech)
    tech.strength = 15.0
    _, high = paired(tech)
    assert saturation(high)["saturation"] > saturation(low)["saturation"]
    assert saturation(high)["clipped_fraction"] > saturation(low)["clipped_fraction"]


def test_negative_prompt_subtract_moves_away_from_it(gen, clf):
    tech = GuidanceTuning(gen, scale=5.0, negative_prompt="a large object", negative_mode="subtract",
                          negative_weight=3.0, sampling={"steps": STEPS})
    base, edit = paired(tech)
    assert rate(clf, edit, "size", "large") < rate(clf, base, "size", "large")


def test_guidance_bad_knobs():
    from steerexp.generators import Guidance

    with pytest.raises(ValueError, match="schedule"):
        Guidance(schedule="zigzag")
    with pytest.raises(ValueError, match="rescale"):
        Guidance(rescale=2.0)


def test_latent_priming_raises_the_target_rate(gen, clf):
    tech = LatentPriming(gen, head="size", target="large", candidates=32, top_k=4, mix=0.8, sampling={"steps": STEPS})
    tech.compute()
    base, edit = paired(tech)
    assert rate(clf, edit, "size", "large") > rate(clf, base, "size", "large")
    assert tech.primed.norm() == pytest.approx(np.sqrt(tech.primed.numel()), rel=1e-4)  # on the Gaussian shell
    tech.strength = 0.0
    b0, e0 = paired(tech, PROMPTS[:1], [0, 1])
    assert torch.equal(b0, e0)


def test_latent_priming_bad_input(gen):
    with pytest.raises(ValueError, match="top_k"):
        LatentPriming(gen, candidates=4, top_k=8)
    with pytest.raises(ValueError, match="combine"):
        LatentPriming(gen, combine="median")


def test_prompt_search_beats_the_hand_written_prompt(gen):
    tech = PromptSearch(gen, prompt="a photo of a object", target="star", max_calls=20, beam_width=2, proposals=6,
                        seeds=[100, 101], sampling={"steps": 8})
    tech.compute()
    scores = dict(tech.history)
    assert tech.calls <= 20
    assert scores[tech.best_prompt] >= scores["a photo of a object"]
    assert tech.best_prompt != "a photo of a object"


def test_prompt_search_bad_input(gen):
    with pytest.raises(ValueError, match="beam_width"):
        PromptSearch(gen, beam_width=-1)
    with pytest.raises(ValueError, match="max_calls"):
        PromptSearch(gen, max_calls=0)


def test_energy_guidance_raises_the_target_rate(gen, clf):
    tech = EnergyGuidance(gen, head="size", target="large", scale=20.0, sampling={"steps": STEPS})
    base, edit = paired(tech, PROMPTS[:2], SEEDS[:6])
    assert rate(clf, edit, "size", "large") > rate(clf, base, "size", "large")
    tech.strength = 0.0
    b0, e0 = paired(tech, PROMPTS[:1], [0])
    assert torch.equal(b0, e0)


def test_guidance_schedules_and_rescale_by_hand():
    from steerexp.generators import Guidance

    interval = Guidance(scale=5.0, schedule="interval", interval_start=0.2, interval_end=0.6)
    assert [interval.scale_at(i, 10) for i in range(10)] == [1, 1, 5, 5, 5, 5, 1, 1, 1, 1]
    wsw = [Guidance(scale=5.0, schedule="weak_strong_weak").scale_at(i, 10) for i in range(10)]
    assert wsw[0] < 2 and wsw[-1] < 2 and max(wsw) == pytest.approx(1 + 4 * np.sin(np.pi * 0.45))
    assert wsw == pytest.approx(wsw[::-1])
    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    plain = Guidance(scale=7.0).combine(cond, uncond)
    assert torch.allclose(plain, uncond + 7.0 * (cond - uncond))
    full = Guidance(scale=7.0, rescale=1.0).combine(cond, uncond)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), atol=1e-5)  # phi = 1 matches cond std
    neg = torch.randn(2, 4, 8, 8)
    guidance = Guidance(scale=7.0, negative_prompt="x", negative_mode="subtract", negative_weight=2.0)
    sub = guidance.combine(cond, uncond, negative=neg)
    assert torch.allclose(sub, plain - 2.0 * (neg - uncond))


# ---------------------------------------------------------------------------- textual inversion: encoding the targets
def _ti(gen, mode, name="", **kw):
    from steerexp.techniques.textual_inversion import TextualInversion

    tech = TextualInversion(gen, placeholder=f"<enc-{mode}{name}>", encode_targets=mode, flip=True, steps=2,
                            batch_size=2, targets={"k": 3, "shape": "star", "seed": 0}, **kw)
    tech.prepare()
    return tech


def test_ti_encodes_targets_up_front_or_when_a_step_draws_them(gen, monkeypatch):
    """encode_targets: eager encodes every target (and flip) in prepare; lazy encodes each target alone the first
    time a step draws it, and only those; auto is eager on the 32 px world (its recorded figures) and lazy above
    EAGER_MAX_SIDE px."""
    from steerexp.techniques import textual_inversion

    eager, lazy, auto = _ti(gen, "eager"), _ti(gen, "lazy"), _ti(gen, "auto")
    assert eager.latents.shape[0] == 6 and lazy.latents is None and auto.latents is not None
    calls = []
    encode = gen.encode_images
    monkeypatch.setattr(gen, "encode_images", lambda images, *a, **k: calls.append(len(images)) or encode(images))
    idx = torch.tensor([4, 1, 4])
    got = lazy.target_latents(idx)
    assert calls == [1, 1] and sorted(lazy.encoded) == [1, 4]          # each drawn target once, alone
    alone = torch.cat([encode(lazy.pixels[i : i + 1]).float().cpu() for i in (4, 1, 4)])
    assert torch.equal(got, alone)                                       # exactly its own encoding
    assert torch.allclose(got, eager.target_latents(idx), atol=1e-4)     # the batch encoding, to float tolerance
    lazy.target_latents(torch.tensor([1]))
    assert calls == [1, 1]                                               # cached
    monkeypatch.setattr(textual_inversion, "EAGER_MAX_SIDE", 16)
    assert _ti(gen, "auto", "-small-side").latents is None               # above the side: lazy


def test_ti_encode_targets_is_checked_before_loading():
    from steerexp.errors import ConfigError
    from steerexp.validate import validate
    from tests.helpers import compose_config

    with pytest.raises(ConfigError, match="technique.encode_targets: must be one of auto, eager, lazy"):
        validate(compose_config(["technique.encode_targets=later"]))
