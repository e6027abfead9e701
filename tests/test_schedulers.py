"""Issue 32 §1: sampling and inversion follow the pipeline folder's scheduler config, or refuse a setting in one
line before loading.

The equality matrix: one tiny random pipeline folder per family (steerexp.generators.random_pipelines, the hub
scheduler configs), and per setting and value a copy of it (every file symlinked, the scheduler config rewritten)
whose scheduler carries that setting. steerexp samples it, and so does the family's own diffusers pipeline loaded
from the same folder, on the same initial latents, and the final latents are compared:

- sd / sdxl: the copies' scheduler is a DDIMScheduler with the setting, so the pipeline samples with exactly that
  scheduler; the math is the same (DDIMScheduler.step), and the latents are bit-identical on the CPU. The hub
  configs themselves (PNDM, Euler) are compared with the pipeline after the usual swap,
  DDIMScheduler.from_config(config) (clip_sample off: those classes have none), also bit-identical.
- sd3 / flux: the Euler flow step x + (sigma_prev - sigma) v is written as a_prev x0 + b_prev eps in steerexp (one
  rule for every family), so the latents agree to float rounding: a stated tolerance of FLOW_ATOL (absolute, on
  latents of std ~1).

Inversion uses the same rule as sampling: with a model whose output does not depend on x (so each DDIM / Euler
step is exactly invertible), inverting then sampling returns the start for every setting, clipping and
thresholding included; a different rule for the inversion's levels or x0 limit would not.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from steerexp.errors import ConfigError
from steerexp.generators import Guidance, family_class, pipeline_class_of, sampling
from steerexp.generators.checks import check_scheduler
from steerexp.generators.random_pipelines import SCHEDULERS, make_random_pipeline

FLOW_ATOL = 1e-5
STEPS = 3  # 1000 // 3 = 333: "trailing" and "linspace" step to other timesteps than the next one
ARCH = {"sd": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}

DDIM = {"_class_name": "DDIMScheduler"}
# (family, name, changes to the family's hub scheduler config); the VP cases use DDIMScheduler with the setting
VP_CASES = {
    "hub": {},
    "ddim": {},
    "leading": {"timestep_spacing": "leading"},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "steps_offset_0": {"steps_offset": 0},
    "set_alpha_to_one": {"set_alpha_to_one": True},
    "clip_sample": {"clip_sample": True},
    "clip_sample_range_2": {"clip_sample": True, "clip_sample_range": 2.0},
    "thresholding": {"thresholding": True},
    "thresholding_dynamic": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0},
    "v_prediction": {"prediction_type": "v_prediction"},
    "zero_snr_v_trailing": {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                            "timestep_spacing": "trailing"},
}
FLOW_CASES = {
    "hub": {},
    "shift_1": {"shift": 1.0, "use_dynamic_shifting": False},
    "shift_3": {"shift": 3.0, "use_dynamic_shifting": False},
    "dynamic": {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096},
    "dynamic_linear": {"use_dynamic_shifting": True, "time_shift_type": "linear"},
    "shift_terminal": {"shift_terminal": 0.2},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
}
CASES = [(f, c) for f in ("sd", "sdxl") for c in VP_CASES] + [(f, c) for f in ("sd3", "flux") for c in FLOW_CASES]
# the cases that run by default (a few seconds each on a loaded CPU); the whole matrix runs with -m slow
FAST = {("sd", "hub"), ("sdxl", "hub"), ("sdxl", "zero_snr_v_trailing"), ("sdxl", "thresholding_dynamic"),
        ("sd3", "hub"), ("sd3", "dynamic"), ("flux", "hub")}


def matrix(cases):
    """pytest params of `cases` ((family, case, ...) tuples), those outside FAST marked slow."""
    return [pytest.param(*c, marks=() if tuple(c[:2]) in FAST and (len(c) < 3 or (c[0], c[2]) in FAST)
                         else pytest.mark.slow) for c in cases]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("scheduler_bases")
    return {family: make_random_pipeline(arch, root / family, size="tiny") for family, arch in ARCH.items()}


def variant(base: Path, dst: Path, config: dict) -> Path:
    """The pipeline folder `base` with every file symlinked and its scheduler config replaced by `config`."""
    for p in base.rglob("*"):
        target = dst / p.relative_to(base)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif p.name != "scheduler_config.json":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(p)
    (dst / "scheduler").mkdir(parents=True, exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index = json.loads((base / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", config["_class_name"]]  # the class diffusers loads
    (dst / "model_index.json").unlink()
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst


def case_config(family: str, case: str) -> dict:
    hub = dict(SCHEDULERS[ARCH[family]])
    if family in ("sd3", "flux"):
        return hub | FLOW_CASES[case]
    if case == "hub":
        return hub
    return hub | DDIM | VP_CASES[case]


def as_diffusers_samples(pipe):
    """The family's own diffusers pipeline, loaded from the folder, with the scheduler it loaded (the hub's PNDM
    and Euler configs: swapped to DDIM)."""
    import diffusers

    pipe.set_progress_bar_config(disable=True)
    if type(pipe.scheduler).__name__ not in ("DDIMScheduler", "FlowMatchEulerDiscreteScheduler"):
        # the hub PNDM / Euler configs: the usual swap to DDIM; those classes have no clip_sample
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe


def pipeline_latents(family: str, pipe, gen, x: torch.Tensor, prompt: str) -> torch.Tensor:
    kw = dict(prompt=prompt, num_inference_steps=STEPS, output_type="latent", height=gen.resolution,
              width=gen.resolution)
    if family == "flux":  # the pipeline takes and returns the transformer's 2x2 patches
        B, C, H, W = x.shape
        kw |= dict(guidance_scale=3.5, max_sequence_length=gen.encoders[1].max_length,
                   latents=x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4))
        out = pipe(**kw).images
        return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
    kw |= dict(guidance_scale=1.0, latents=x.clone())  # guidance 1: one conditional pass in both
    if family == "sd3":
        kw["max_sequence_length"] = gen.encoders[2].max_length
    return pipe(**kw).images


def with_scheduler_of(loaded, folder: Path):
    """The pipeline `loaded` with the scheduler of `folder`, as from_pretrained(folder) would give it: the class
    model_index.json names, from_pretrained from scheduler/, and the pipeline's __init__ run again (its config
    fix-ups: StableDiffusionPipeline's clip_sample and steps_offset). The models are shared, not loaded again."""
    import diffusers

    name = json.loads((folder / "model_index.json").read_text())["scheduler"][1]
    scheduler = getattr(diffusers, name).from_pretrained(str(folder), subfolder="scheduler")
    extra = {"requires_safety_checker": False} if type(loaded).__name__ == "StableDiffusionPipeline" else {}
    return type(loaded)(**(loaded.components | {"scheduler": scheduler}), **extra)


@pytest.fixture(scope="module")
def generators(bases, tmp_path_factory):
    """(steerexp's generator, the family's diffusers pipeline) per (family, case). The "hub" cases are the folders
    loaded as load_generator loads them; the others swap the case's scheduler into that pipeline."""
    root, cache, loaded = tmp_path_factory.mktemp("scheduler_cases"), {}, {}

    def get(family: str, case: str):
        if (family, case) not in cache:
            cls = family_class(pipeline_class_of(bases[family]))
            if family not in loaded:
                loaded[family] = cls.load(str(bases[family]), "fp32")  # the hub scheduler config
            if case == "hub":
                pipe = loaded[family]
            else:
                pipe = with_scheduler_of(loaded[family], variant(bases[family], root / f"{family}-{case}",
                                                                 case_config(family, case)))
            cache[family, case] = cls.from_pipeline(pipe, torch.device("cpu"), torch.float32), pipe
        return cache[family, case]

    return get


@pytest.fixture(scope="module")
def runs(generators):
    """(steerexp's latents, the pipeline's latents, the generator) per (family, case), computed once."""
    cache = {}

    def get(family: str, case: str):
        if (family, case) not in cache:
            gen, pipe = generators(family, case)
            x = gen.initial_latents([0])
            guidance = Guidance(scale=3.5 if family == "flux" else 1.0)
            with torch.no_grad():
                cond = gen.encode_prompt(["a red circle"])
                ours = gen.sample(cond, x.clone(), None, STEPS, guidance)
                theirs = pipeline_latents(family, as_diffusers_samples(pipe), gen, x, "a red circle")
            cache[family, case] = ours, theirs, gen
        return cache[family, case]

    return get


@pytest.mark.parametrize("family,case", matrix(CASES))
def test_sampling_equals_the_family_pipeline_under_each_setting(runs, family, case):
    ours, theirs, _ = runs(family, case)
    assert ours.shape == theirs.shape and torch.isfinite(ours).all() and ours.std() > 0.01
    if family in ("sd", "sdxl"):
        assert torch.equal(ours, theirs), float((ours - theirs).abs().max())
    else:
        assert (ours - theirs).abs().max() <= FLOW_ATOL, float((ours - theirs).abs().max())


# each setting changes the result (else the equality above would prove nothing about it): (family, case, baseline)
CHANGES = [("sdxl", c, "ddim") for c in VP_CASES if c not in ("hub", "ddim", "leading")]
CHANGES += [("sd", c, "ddim") for c in ("trailing", "linspace", "set_alpha_to_one", "thresholding", "v_prediction")]
CHANGES += [("sd3", c, "shift_3") for c in ("shift_1", "dynamic", "shift_terminal", "karras", "exponential")]
CHANGES += [("flux", c, "hub") for c in ("shift_1", "shift_3", "dynamic_linear", "shift_terminal", "karras")]
CHANGES += [("sdxl", "zero_snr_v_trailing", "hub"), ("sdxl", "thresholding_dynamic", "hub"), ("sd3", "dynamic", "hub")]


@pytest.mark.parametrize("family,case,baseline", matrix(CHANGES))
def test_each_setting_changes_the_sampling(runs, family, case, baseline):
    ours, _, _ = runs(family, case)
    base, _, _ = runs(family, baseline)
    assert (ours - base).abs().max() > 1e-3


@pytest.mark.slow
def test_stable_diffusion_pipeline_rewrites_clip_sample_and_steps_offset_and_steerexp_follows(runs):
    """StableDiffusionPipeline turns clip_sample=true off and steps_offset=0 into 1 when it loads a folder (a
    diffusers deprecation fix-up); steerexp samples what that pipeline samples (the equality above), and so the
    sd copies with those settings sample as plain DDIM does."""
    assert torch.equal(runs("sd", "clip_sample")[0], runs("sd", "ddim")[0])
    assert torch.equal(runs("sd", "steps_offset_0")[0], runs("sd", "ddim")[0])
    assert not torch.equal(runs("sdxl", "steps_offset_0")[0], runs("sdxl", "ddim")[0])  # sdxl keeps steps_offset


def test_hub_configs_sample_without_clipping(generators):
    """SD 1.5's PNDM and SDXL's Euler configs have no clipping of their own: DDIM over them does not clip."""
    for family in ("sd", "sdxl"):
        gen = generators(family, "hub")[0]
        schedule = gen.schedule(STEPS)
        assert schedule.clip_range is None and schedule.threshold is None
        assert type(gen.scheduler).__name__ == "DDIMScheduler" and gen.scheduler.config.set_alpha_to_one is False


@pytest.mark.parametrize("family,case", [(f, c) for f, c in CASES if c != "hub"])
def test_inversion_follows_the_sampling_rule(generators, family, case):
    """Each inversion step is undone by the sampling step it inverts: from the inverted latent, sampling step i
    (with the same eps) lands on a_from limit(x0_from) + b_from eps, where x0_from is the start's x0 at the
    level the step came from: x itself when the setting has no x0 limit. So inversion steps between the same
    levels (timestep_spacing, steps_offset, set_alpha_to_one) and limits x0 (clip_sample, thresholding) as
    sampling does; a different rule for either gives another latent."""
    gen = generators(family, case)[0]
    schedule = gen.schedule_for(STEPS, gen.initial_latents([0]))
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(STEPS, 1, *gen.latent_shape(), generator=g)
    flow = schedule.prediction_type == "flow"
    if flow:  # the Euler step and its inversion read the velocity at each end: a constant one makes them exact
        model = lambda x, t, i: eps[i].to(x)
    else:  # DDIM: the output that step i reads as eps[i] (at whatever x)
        model = lambda x, t, i: schedule.output(eps[i].to(x), x, i)
    z0 = torch.randn(1, *gen.latent_shape(), generator=g) * 1.5
    xs = sampling.invert(model, z0, schedule)
    limited = schedule.clip_range is not None or schedule.threshold is not None
    bites = 0
    for k in range(STEPS):
        i = STEPS - 1 - k
        if schedule.signal[i] == 0 and not flow:  # zero terminal SNR's top step: pure noise, eps = x whatever out
            continue
        x, x_i = xs[k], xs[k + 1]
        a_from, b_from = schedule.signal_prev[i], schedule.noise_prev[i]
        x0_from = (x - b_from * eps[i]) / a_from if not flow else x - b_from * eps[i]
        expected = a_from * schedule.limit(x0_from) + b_from * eps[i] if not flow else x
        back = schedule.step(*schedule.split(model(x_i, schedule.timesteps[i], i), x_i, i), i)
        scale = max(1.0, float(x_i.abs().max()), float(x0_from.abs().max()))
        tol = 1e-5 if schedule.prediction_type != "v_prediction" else 1e-3  # v: x0 / a, a near 0 at zero SNR
        assert (back - expected).abs().max() <= tol * scale, (k, float((back - expected).abs().max()))
        if not limited:
            assert (expected - x).abs().max() <= 1e-5 * scale
        bites += int(not torch.equal(schedule.limit(x0_from), x0_from))
    assert bites > 0 if limited else bites == 0  # the limit acts here: the check above is not vacuous


def test_limit_is_ddim_schedulers_threshold_and_clip():
    from diffusers import DDIMScheduler

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    for kw in ({"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.5},
               {"thresholding": True}):
        ddim = DDIMScheduler(**kw)
        assert torch.equal(sampling.threshold_sample(x0, kw.get("dynamic_thresholding_ratio", 0.995),
                                                     kw.get("sample_max_value", 1.0)), ddim._threshold_sample(x0))
    schedule = sampling.Schedule.from_ddim(DDIMScheduler(clip_sample=True, clip_sample_range=1.5), 2)
    assert torch.equal(schedule.limit(x0), x0.clamp(-1.5, 1.5)) and schedule.starting_at(1).clip_range == 1.5


# ---------------------------------------------------------------------------- refusals, before loading
REFUSED = [
    ("sdxl", {"use_karras_sigmas": True}, "use_karras_sigmas=true"),
    ("sd", {"_class_name": "DDIMScheduler", "prediction_type": "sample"}, 'prediction_type="sample"'),
    ("sd", {"timestep_spacing": "karras"}, 'timestep_spacing="karras"'),
    ("sd", {"beta_schedule": "sigmoid"}, 'beta_schedule="sigmoid"'),
    ("sdxl", {"timestep_type": "continuous"}, 'timestep_type="continuous"'),
    ("sd", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "FlowMatchEulerDiscreteScheduler"),
    ("sd3", {"stochastic_sampling": True}, "stochastic_sampling=true"),
    ("flux", {"invert_sigmas": True}, "invert_sigmas=true"),
    ("sd3", {"_class_name": "DDIMScheduler"}, "DDIMScheduler"),
    ("flux", {"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_beta_sigmas=true"),
    ("sdxl", {"_class_name": "DDIMScheduler", "clip_sample": True, "clip_sample_range": 0}, "clip_sample_range=0"),
]


@pytest.mark.parametrize("family,changes,words", REFUSED)
def test_unfollowed_settings_are_refused_in_one_line(bases, tmp_path, family, changes, words):
    folder = variant(bases[family], tmp_path / "v", dict(SCHEDULERS[ARCH[family]]) | changes)
    with pytest.raises(ConfigError) as err:
        check_scheduler(folder, family)
    line = str(err.value)
    assert err.value.key == "generator.path" and words in line, line
    assert ("model_index.json" if "Scheduler" in words else "scheduler_config.json") in line, line
    assert "\n" not in line and "; set " in line, line


@pytest.mark.parametrize("family", list(ARCH))
def test_hub_configs_pass_the_check(bases, family):
    check_scheduler(bases[family], family)


def test_cli_refuses_a_scheduler_setting_with_exit_2_before_loading(bases, tmp_path):
    folder = variant(bases["sd3"], tmp_path / "sd3-stochastic", dict(SCHEDULERS["sd3"]) | {"stochastic_sampling": True})
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env |= {"CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    args = ["generator=sd", f"generator.path={folder}", "generator.device=cpu", "generator.dtype=fp32", "logger=none"]
    out = subprocess.run([sys.executable, "-m", "steerexp.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("steerexp: error: generator.path: the scheduler setting stochastic_sampling=true")
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr and out.stdout == ""
    assert time.perf_counter() - start < 6.0  # as tests/test_cli.py: no model was loaded
    assert not list(tmp_path.glob("outputs/*/*"))


def test_random_pipelines_write_the_hub_scheduler_configs(bases):
    from diffusers import DDIMScheduler, PNDMScheduler

    for family, arch in ARCH.items():
        written = json.loads((bases[family] / "scheduler" / "scheduler_config.json").read_text())
        assert written == SCHEDULERS[arch]
    sd15 = PNDMScheduler.from_pretrained(str(bases["sd"]), subfolder="scheduler")
    assert DDIMScheduler.from_config(sd15.config).config.clip_sample is False  # as on the real SD 1.5 folder
    assert SCHEDULERS["sd15"]["steps_offset"] == 1 and SCHEDULERS["sd15"]["set_alpha_to_one"] is False
    assert SCHEDULERS["sd3"]["shift"] == 3.0 and "use_dynamic_shifting" not in SCHEDULERS["sd3"]
    flux = SCHEDULERS["flux"]
    assert (flux["use_dynamic_shifting"], flux["base_shift"], flux["max_shift"], flux["base_image_seq_len"],
            flux["max_image_seq_len"]) == (True, 0.5, 1.15, 256, 4096)


def test_ddim_for_clips_only_where_the_scheduler_class_does():
    """sd.ddim_for: the sd / sdxl DDIM carries the pipeline scheduler's settings over, and clips or thresholds only
    where the scheduler's own class has the setting on (a class without it never clips; DDIMScheduler's default
    clip_sample=True applies to a DDIM config that omits the key, as in diffusers)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    from steerexp.generators.sd import ddim_for

    pndm = PNDMScheduler(steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading", beta_end=0.012)
    for other in (pndm, EulerDiscreteScheduler(prediction_type="v_prediction")):
        ddim = ddim_for(other)
        assert ddim.config.clip_sample is False and ddim.config.thresholding is False
    assert (ddim_for(pndm).config.steps_offset, ddim_for(pndm).config.set_alpha_to_one) == (1, False)
    assert ddim_for(pndm).config.beta_end == 0.012
    assert ddim_for(EulerDiscreteScheduler(prediction_type="v_prediction")).config.prediction_type == "v_prediction"
    on = ddim_for(DDIMScheduler(clip_sample=True, clip_sample_range=2.0, thresholding=True))
    assert on.config.clip_sample is True and on.config.clip_sample_range == 2.0 and on.config.thresholding is True
    assert ddim_for(DDIMScheduler(clip_sample=False)).config.clip_sample is False
    without_key = {k: v for k, v in DDIMScheduler().config.items() if k != "clip_sample"}
    assert ddim_for(DDIMScheduler.from_config(without_key)).config.clip_sample is True
