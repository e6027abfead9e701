"""Noise optimisation (reno, noise_search): tiny runs end to end through the CLI's config, the budget in
generator calls counted independently (hooks on the frozen UNet), the reward rises over each output's own
start, the generator stays frozen, and bad settings are one clear error naming the key."""
import pytest
import torch

from steerexp import scorers
from steerexp.errors import ConfigError
from steerexp.techniques.noise_search import NoiseSearch
from steerexp.techniques.reno import ReNO
from tests.helpers import compose_config, tiny_run

STEPS = 4  # sampling steps of the tiny cases
PROMPTS = ["a red circle", "a blue square"]
SEEDS = [3, 4]  # plain samples of these are not on the left (the classifier's log p(left) is low): room to improve

TINY_NOISE = [
    "eval.seeds=[0,1]",
    "eval.prompts=['a red circle','a blue {}']",
    f"sampling.steps={STEPS}",
    "concept.head=position",
    "concept.target=left",
    "evaluator=[concept]",
    "logger=none",
]


class CallCounter:
    """Counts what the UNet really computes: forward rows (one guided call = cond + uncond = 2 rows) and
    backward passes (rows of the gradient reaching its first layer, the UNet's input)."""

    def __init__(self, unet, branches: int = 2):
        self.branches, self.forward_rows, self.backward_rows = branches, 0, 0
        self.handles = [unet.register_forward_hook(self._forward),
                        unet.conv_in.register_full_backward_hook(self._backward)]

    def _forward(self, _module, args, _out):
        self.forward_rows += len(args[0])

    def _backward(self, _module, grad_in, _grad_out):
        self.backward_rows += len(grad_in[0]) if grad_in[0] is not None else 0

    def calls(self, outputs: int) -> tuple[float, float]:
        """(forward calls, backward passes) per output."""
        return self.forward_rows / self.branches / outputs, self.backward_rows / self.branches / outputs

    def remove(self):
        for h in self.handles:
            h.remove()


def texts_seeds():
    return [p for p in PROMPTS for _ in SEEDS], [s for _ in PROMPTS for s in SEEDS]


def optimise_counted(gen, tech):
    """The technique's records on PROMPTS x SEEDS, and the UNet's (forward calls, backward passes) per output."""
    texts, seeds = texts_seeds()
    counter = CallCounter(gen.unet)
    try:
        records = tech.optimise(texts, seeds)
    finally:
        counter.remove()
    return records, *counter.calls(len(texts))


def rewards_of(tech, images, texts):
    with torch.no_grad():
        return tech.reward(images, texts)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("technique,extra", [("reno", ["technique.max_calls=40"]),
                                             ("noise_search", ["technique.max_calls=24", "technique.candidates=4"])])
def test_runs_end_to_end_within_its_budget(tmp_path, shipped, technique, extra):
    metrics, run_dir = tiny_run(tmp_path, [f"technique={technique}", *extra], name=technique, base=TINY_NOISE)
    assert metrics["generator/unchanged"] is True
    assert 0 < metrics["technique/calls_per_image"] <= int(extra[0].split("=")[1])
    assert metrics["technique/outputs"] == 4  # 2 prompts x 2 seeds, each optimised once
    assert metrics["technique/reward_final"] >= metrics["technique/reward_start"]
    assert metrics["concept/judge_is_objective"] is False  # the analytic judge; the objective is the classifier
    assert "concept/objective/target_rate/edited" in metrics
    assert (run_dir / f"{technique}.json").is_file()


# ----------------------------------------------------------------------------- ReNO
@pytest.mark.parametrize("checkpoint", [False, True])
def test_reno_counts_its_calls_honestly(gen, shipped, checkpoint):
    tech = ReNO(gen, max_calls=50, opt_sampling_steps=3, checkpoint=checkpoint, sampling={"steps": STEPS})
    records, forward, backward = optimise_counted(gen, tech)
    k, n = 3, tech.iterations
    assert n >= 1
    assert records[0].forward_calls == forward == (n + 1) * k + n * k * checkpoint + STEPS
    assert records[0].backward_calls == 2 * backward == 2 * n * k  # a backward pass counts as 2 calls
    assert records[0].calls == tech.planned_calls() <= 50
    assert gen.unchanged()


def test_reno_raises_its_reward_over_its_start(gen, shipped):
    texts, seeds = texts_seeds()
    # keep=last: the final iterate itself, not a best-of selection; optimised through all the sampling steps,
    # so the returned image is the one scored
    tech = ReNO(gen, max_calls=5 * STEPS * 3 + STEPS, lr=1.0, opt_sampling_steps=None, keep="last",
                sampling={"steps": STEPS})
    records = tech.optimise(texts, seeds)
    start = torch.tensor([r.reward_start for r in records])
    final = torch.tensor([r.reward_final for r in records])
    assert final.mean() > start.mean() + 1.0, (start, final)
    images = torch.stack([r.image for r in records])
    assert torch.allclose(rewards_of(tech, images, texts), final, atol=1e-3)
    # the output is what the optimised noise gives: sampling it again reproduces the image
    with torch.no_grad():
        cond, uncond = tech.conditioning(texts)
        again = tech.sample(cond, torch.stack([r.noise for r in records]), uncond, STEPS).cpu()
    assert torch.allclose(again, images, atol=1e-4)
    # the noise stays near the Gaussian shell (chi term): norms within 25% of sqrt(d)
    d = records[0].noise.numel()
    assert all(abs(r.noise.norm() / d ** 0.5 - 1) < 0.25 for r in records)
    assert gen.unchanged()


def test_reno_keep_best_never_ends_below_the_plain_sample(gen, shipped):
    texts, seeds = texts_seeds()
    tech = ReNO(gen, max_calls=40, lr=50.0, opt_sampling_steps=None, sampling={"steps": STEPS})  # wild steps
    records = tech.optimise(texts, seeds)
    assert all(r.reward_final >= r.reward_start for r in records)


def test_reno_needs_gradients(gen, shipped):
    tech = ReNO(gen, rewards={"analytic": 1.0}, max_calls=40, sampling={"steps": STEPS})
    tech.bind(scorers.build({"analytic": None}))  # the run's scorers, as run.build binds them
    with pytest.raises((ValueError, RuntimeError), match="gradient"):
        tech.optimise(["a red circle"], [0])


# ----------------------------------------------------------------------------- noise search
def test_noise_search_counts_its_calls_and_improves(gen, shipped):
    texts, seeds = texts_seeds()
    tech = NoiseSearch(gen, max_calls=7 * STEPS + 2, candidates=3, neighbours=2, radius=0.5,
                       sampling={"steps": STEPS})
    records, forward, backward = optimise_counted(gen, tech)
    assert backward == 0
    assert records[0].calls == forward == 7 * STEPS == tech.planned_calls()  # 3 candidates + 4 neighbours
    assert all(r.reward_final >= r.reward_start for r in records)
    assert any(r.reward_final > r.reward_start + 0.5 for r in records)
    # the output is the scored sample of the kept noise, and the seed's own noise is candidate 0
    images = torch.stack([r.image for r in records])
    assert torch.allclose(rewards_of(tech, images, texts), torch.tensor([r.reward_final for r in records]), atol=1e-3)
    with torch.no_grad():
        plain = gen.generate(texts, seeds, steps=STEPS, guidance=tech.guidance)
    assert torch.allclose(rewards_of(tech, plain, texts), torch.tensor([r.reward_start for r in records]), atol=1e-3)
    assert gen.unchanged()


def test_noise_search_is_per_prompt_and_seed(gen, shipped):
    """An output's search depends on its own prompt and seed only, not on the batch it was searched in."""
    texts, seeds = texts_seeds()
    tech = NoiseSearch(gen, max_calls=4 * STEPS, candidates=2, neighbours=2, sampling={"steps": STEPS})
    together = tech.optimise(texts, seeds)
    alone = tech.optimise(texts[1:2], seeds[1:2])[0]
    assert torch.equal(alone.noise, together[1].noise)
    assert alone.reward_final == pytest.approx(together[1].reward_final, abs=1e-4)


def test_edited_samples_are_the_optimised_ones(gen, shipped):
    tech = NoiseSearch(gen, max_calls=2 * STEPS, candidates=2, sampling={"steps": STEPS})
    assert tech.optimised_against() == {"classifier"}
    with torch.no_grad():
        edited = tech.generate(["a {}"], [5], edited=True)
    record = tech.records[("a object", 5)]
    assert torch.equal(edited[0], record.image)
    assert tech.diagnostics()["calls_per_image"] == 2 * STEPS
    assert set(tech.deltas()) == {"noise_offset", "reward_start", "reward_final", "calls"}


def test_each_technique_records_what_it_optimises_against(gen, shipped):
    from steerexp.techniques.latent_priming import LatentPriming

    reno = ReNO(gen, rewards={"classifier": 0.0, "robust": 1.0, "clip": 0.5}, sampling={"steps": STEPS})
    reno.prepare()  # loads the reward's scorers
    assert reno.optimised_against() == {"robust", "clip"}
    assert LatentPriming(gen, scorer="robust", candidates=2, top_k=1).optimised_against() == {"robust"}


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("technique,override,key", [
    ("reno", "technique.rewards.classifier=-1", "technique.rewards.classifier"),
    ("reno", "technique.rewards={classifier:0.0,clip:0.0}", "technique.rewards"),
    ("reno", "+technique.rewards.analytic=1.0", "technique.rewards.analytic"),
    ("reno", "+technique.rewards.nosuch=1.0", "technique.rewards.nosuch"),
    ("reno", "technique.max_calls=10", "technique.max_calls"),
    ("reno", "technique.keep=worst", "technique.keep"),
    ("reno", "technique.momentum=1.5", "technique.momentum"),
    ("reno", "technique.grad_clip=0", "technique.grad_clip"),
    ("noise_search", "technique.radius=0", "technique.radius"),
    ("noise_search", "technique.max_calls=20", "technique.max_calls"),
    ("noise_search", "+technique.rewards.noisy=1.0", "technique.rewards.noisy"),
])
def test_bad_settings_name_the_key(technique, override, key):
    from steerexp.validate import validate

    cfg = compose_config([f"technique={technique}", *TINY_NOISE, override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    assert "\n" not in str(err.value)


def test_constructors_refuse_bad_settings(gen):
    with pytest.raises(ValueError, match="technique.max_calls"):
        ReNO(gen, max_calls=10, sampling={"steps": STEPS})
    with pytest.raises(ValueError, match="technique.rewards"):
        ReNO(gen, rewards={"classifier": 0.0}, sampling={"steps": STEPS})
    with pytest.raises(ValueError, match="technique.keep"):
        ReNO(gen, keep="worst", sampling={"steps": STEPS})
    with pytest.raises(ValueError, match="technique.radius"):
        NoiseSearch(gen, radius=1.5, sampling={"steps": STEPS})
    with pytest.raises(ValueError, match="technique.max_calls"):
        NoiseSearch(gen, candidates=8, max_calls=10, sampling={"steps": STEPS})
