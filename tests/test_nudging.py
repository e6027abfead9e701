"""Embedding nudging, small: the memorisation filter separates a protected caption from an
ordinary prompt, nudging moves a memorised output past the threshold, the baselines run,
the preset runs end to end, bad input is clear, and the generator stays frozen."""
import json

import pytest
import torch
from safetensors.torch import load_file

from steerexp.images import nn_rms
from steerexp.run import run
from steerexp.techniques.nudging import Nudging
from steerexp.worlds.shapes import world
from tests.helpers import compose_config

PROTECTED = world.PROTECTED_CAPTIONS[0]   # "the emblem of the northern guild"
ORDINARY = "a red circle on the left"
STEPS = 8                                 # the shipped generator already reproduces protected images at 8 DDIM steps



def small(gen, **kw):
    args = dict(sampling={"steps": STEPS, "guidance_scale": 5.0}, opt_sampling_steps=STEPS, opt_steps=4, rounds=3)
    return Nudging(gen, **{**args, **kw})


def test_protected_caption_triggers_the_filter_and_an_ordinary_prompt_does_not(gen):
    tech = small(gen)
    images = tech.generate([PROTECTED, ORDINARY], [0, 0], edited=False)
    assert tech.check(images).tolist() == [True, False]
    rms = nn_rms(images, tech.protected)
    assert rms[0] < 0.1 < rms[1]
    # the other filter kinds: CLIP similarity to the protected set, a classifier rule ("no red")
    clip_rule = small(gen, filters=[{"kind": "clip", "tau": 0.9}])
    assert clip_rule.check(images).tolist() == [True, False]
    no_blue = small(gen, filters=[{"kind": "classifier", "head": "colour", "classes": ["blue"]}])
    blue = no_blue.generate(["a blue square at the top"], [0], edited=False)
    assert no_blue.check(torch.cat([images, blue])).tolist() == [False, False, True]


def test_nudging_moves_a_memorised_output_past_the_threshold(gen):
    tech = small(gen, latent="prompt")
    before = gen.fingerprint()
    edited = tech.generate([PROTECTED, ORDINARY], [0, 0], edited=True)
    rec, plain = tech.records[(PROTECTED, 0)], tech.records[(ORDINARY, 0)]
    assert rec.triggered and rec.rms_before < 0.1
    assert rec.rms_after > 0.1 and not rec.still_triggered and 1 <= rec.rounds <= 3
    assert float(nn_rms(edited[:1], tech.protected)) > 0.1
    # the ordinary prompt is left alone: no rounds, no offset, the plain image
    assert not plain.triggered and plain.rounds == 0 and float(plain.offset.abs().max()) == 0
    assert torch.equal(edited[1], plain.initial)
    assert set(tech.deltas()) == {"prompt_delta", "rounds", "triggered", "still_triggered"}
    assert gen.fingerprint() == before and gen.unchanged()


def test_baselines_change_only_the_prompt_embedding(gen):
    noise = small(gen, mode="noise", rounds=1)
    noise.generate([PROTECTED], [0], edited=True)
    rec = noise.records[(PROTECTED, 0)]
    n = rec.offset.numel()
    assert rec.rounds == 1 and abs(float(rec.offset.norm()) / (0.1 * n ** 0.5) - 1) < 0.1  # lambda * N(0, I)
    assert not torch.equal(rec.final, rec.initial)  # the noisy embedding was sampled from
    assert "prompt_delta" in noise.deltas() and "z_offset" not in noise.deltas()  # a prompt-embedding offset

    wen = small(gen, mode="wen", rounds=1, opt_steps=3)
    cond, z0 = gen.encode_prompt([PROTECTED]), gen.initial_latents([0])
    uncond = gen.encode_prompt([""])
    t = gen.schedule(STEPS).timesteps[0]
    magnitude = lambda d: float((gen.unet(z0, t, cond + d).sample - gen.unet(z0, t, uncond).sample).norm())
    with torch.no_grad():
        start = magnitude(torch.zeros_like(cond))
    d = wen.wen_round(cond, z0, uncond, torch.zeros_like(cond))
    with torch.no_grad():
        assert magnitude(d) < start  # the text-conditional noise magnitude falls
    assert gen.unchanged()


def test_keep_adds_the_classifier_kl_to_the_initial_output(gen):
    """technique.keep: + weight * sum over heads of KL(p(head | initial) || p(head | x)), by hand with the classifier;
    0 where the output reads as the initial one; the classifier is recorded as optimised against."""
    tech = small(gen, keep={"heads": ["colour", "shape"], "weight": 2.5, "scorer": "classifier"})
    assert tech.optimised_against() == {"clip", "classifier"} and small(gen).optimised_against() == {"clip"}
    assert small(gen, keep={"heads": ["colour"], "weight": 0}).keep is None  # weight 0: no term, nothing optimised
    with torch.no_grad():
        images = tech._sample(gen.encode_prompt([PROTECTED, ORDINARY]), gen.initial_latents([0, 0]), None, STEPS)
    start = images.flip(0)  # each output held to the other's reading
    pref, und = tech.preferred_embeddings([PROTECTED, ORDINARY]), tech.undesired_for(images)
    beta, offset = torch.ones(2), torch.zeros(2, 4)
    with torch.no_grad():
        plain = tech.objective(images, pref, und, beta, offset)
        held = tech.objective(images, pref, und, beta, offset, start)
        same = tech.objective(images, pref, und, beta, offset, images)
        clf = tech.scorers.get("classifier")
        kl = sum(torch.nn.functional.kl_div(clf(images)[h].log_softmax(-1), clf(start)[h].log_softmax(-1),
                                            reduction="none", log_target=True).sum(-1) for h in ("colour", "shape"))
    assert torch.allclose(held - plain, 2.5 * kl, atol=1e-4) and float(kl.min()) > 0.1
    assert torch.allclose(same, plain, atol=1e-5)
    for keep, message in (({"heads": ["colour"], "ref": "start"}, "unknown key"), ({"heads": []}, "heads is empty"),
                          ({"heads": ["hue"]}, r"technique.keep.heads: unknown head"), ({}, "null or"),
                          ({"heads": ["colour"], "weight": -1}, "weight must be"),
                          ({"heads": ["colour"], "weight": float("inf")}, "weight must be")):
        with pytest.raises(ValueError, match=message):
            small(gen, keep=keep).prepare()  # (the heads against the run's scorers: in prepare)
    with pytest.raises(ValueError, match="mode=noise has none"):
        small(gen, mode="noise", keep={"heads": ["colour"]})


def test_keep_holds_each_output_to_its_own_initial_image(gen, monkeypatch):
    """run_batch hands the keep term the initial output of each output it nudges, and only of those."""
    tech = small(gen, keep={"heads": ["colour"], "weight": 1.0, "scorer": "classifier"}, rounds=1, opt_steps=1)
    starts = []
    per_head = tech.keep.per_head
    monkeypatch.setattr(tech.keep, "per_head", lambda images, start, prompts=None: starts.append(start) or
                        per_head(images, start, prompts))
    tech.generate([ORDINARY, PROTECTED], [0, 0], edited=True)
    assert len(starts) == 1 and starts[0].shape[0] == 1  # one Adam step, the one triggered output
    assert torch.equal(starts[0][0], tech.records[(PROTECTED, 0)].initial)


def test_bad_input_is_clear(gen, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="protected set is empty"):
        Nudging(gen, protected=str(tmp_path / "empty")).prepare()  # read per the run's image policy: in prepare
    with pytest.raises(ValueError, match="protected set is empty"):
        Nudging(gen, protected=torch.zeros(0, 3, 32, 32)).prepare()
    for name in ("alpha", "beta", "gamma"):
        with pytest.raises(ValueError, match=f"technique.{name} must be >= 0"):
            Nudging(gen, **{name: -0.5})
    with pytest.raises(ValueError, match="unknown filter kind"):
        Nudging(gen, filters=[{"kind": "nsfw"}])
    with pytest.raises(ValueError, match="filters is empty"):
        Nudging(gen, filters=[])
    with pytest.raises(ValueError, match="technique.latent"):
        Nudging(gen, latent="unet")
    with pytest.raises(ValueError, match="needs exemplar images"):
        Nudging(gen, preferred="exemplars")


def test_preset_runs_end_to_end(shipped, tmp_path):
    cfg = compose_config([
        "experiment=nudging_memorisation", "logger=none", f"sampling.steps={STEPS}", "eval.seeds=[0]",
        f"eval.prompts=['{PROTECTED}','{ORDINARY}']", "technique.latent=prompt", "technique.opt_steps=4",
        f"technique.opt_sampling_steps={STEPS}",
        f"evaluator.nudging.protected_prompts=['{PROTECTED}']", f"evaluator.nudging.ordinary_prompts=['{ORDINARY}']",
        f"evaluator.memorisation.prompts=['{PROTECTED}']",
    ])
    metrics = run(cfg, tmp_path, "nudge", "tests")
    assert metrics["nudging/protected/not_memorised/baseline"] == 0.0
    assert metrics["nudging/protected/not_memorised/edited"] == 1.0
    assert metrics["memorisation/frac_below_threshold"] == 0.0
    assert metrics["nudging/ordinary/false_trigger_rate"] == 0.0
    assert metrics["nudging/protected/rounds_mean"] >= 1 and metrics["generator/unchanged"] is True
    deltas = load_file(str(tmp_path / "deltas.safetensors"))
    rows = json.loads((tmp_path / "nudges.json").read_text())
    assert [r["prompt"] for r in rows] == [PROTECTED, ORDINARY] and deltas["prompt_delta"].shape[0] == 2
    assert deltas["triggered"].tolist() == [True, False]
    assert (tmp_path / "samples" / "nudging.png").is_file()
    judges = json.loads((tmp_path / "judges.json").read_text())  # the preset's keep term optimises the robust scorer
    assert "robust" in judges["nudging"]["objective"] and judges["nudging"]["judge"] == "analytic"


def test_evaluator_needs_the_nudging_technique():
    from steerexp.evaluators.base import EvalContext
    from steerexp.evaluators.nudging import Nudging as NudgingEval

    with pytest.raises(ValueError, match="needs technique=nudging"):
        NudgingEval().evaluate(EvalContext(object(), ["a"], [0]))
