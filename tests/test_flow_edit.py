"""FlowEdit and RF-Inversion (issue 33, section 1): each update rule against a hand-written reference on a tiny
pipeline, one step, to float tolerance; the ε form on the UNet; a tiny end-to-end run on a flow pipeline; and the
one-line refusals before anything loads."""
from __future__ import annotations

import json

import pytest
import torch

from steerexp.errors import ConfigError
from steerexp.techniques.flow_edit import FlowEdit, FlowView, noise_streams
from steerexp.techniques.rf_inversion import RFInversion
from steerexp.validate import validate
from tests.helpers import compose_config, tiny_run
from tests.helpers.flow import TARGETS, hand_velocity

def streams(n, seed=0):
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + j) for j in range(n)]
    return lambda shape: torch.stack([torch.randn(shape, generator=g) for g in gens])


# ---------------------------------------------------------------------------- FlowEdit: the update rule
@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize("n_max,n_min,n_avg", [(1, 0, 2), (2, 1, 1)])
def test_flowedit_step_matches_the_papers_algorithm(flow_gens, arch, n_max, n_min, n_avg):
    """Algorithm 1 of Kulikov et al.: one FlowEdit step (averaged over n_avg draws), then (n_min = 1) the switch to
    the target trajectory and one plain Euler step, written out by hand on the raw transformer."""
    gen, T, ws, wt = flow_gens[arch], 3, 1.5, 4.0
    tech = FlowEdit(gen, targets=TARGETS, sampling={"steps": T}, steps=T, n_max=n_max, n_min=n_min, n_avg=n_avg,
                    source_guidance=ws, target_guidance=wt)
    tech.prepare()
    prompts = tech.target_prompts()
    with torch.no_grad():
        target = gen.encode_prompt(prompts)
        ours = tech.flowedit(slice(0, 2), target)
        # the reference: sigmas t_n of the sampler (sigma of step i = T - n), the update rule by hand
        sched = gen.schedule(T)
        sig = torch.cat([sched.noise, sched.noise_prev[-1:]])        # t at steps 0..T-1, then 0
        x_src, draw = tech.x0, streams(2)
        z_fe, i = x_src.clone(), T - n_max
        t, t_next, time_in = sig[i], sig[i + 1], sched.timesteps[i]
        dv = 0
        for _ in range(n_avg):
            n = draw(x_src.shape[1:])
            z_src = (1 - t) * x_src + t * n
            z_tar = z_fe + z_src - x_src
            dv = dv + hand_velocity(gen, z_tar, time_in, target, tech.empty, wt) \
                - hand_velocity(gen, z_src, time_in, tech.cond, tech.empty, ws)
        z_fe = z_fe + (t_next - t) * dv / n_avg
        if n_min == 1:
            i = T - 1
            t, t_next, time_in = sig[i], sig[i + 1], sched.timesteps[i]
            z_tar = z_fe + (1 - t) * x_src + t * draw(x_src.shape[1:]) - x_src
            z_fe = z_tar + (t_next - t) * hand_velocity(gen, z_tar, time_in, target, tech.empty, wt)
    assert ours.shape == x_src.shape and (ours - x_src).abs().max() > 1e-3
    torch.testing.assert_close(ours, z_fe, rtol=1e-5, atol=1e-5)


def test_flowedit_with_the_source_prompt_at_equal_scales_returns_the_source(flow_gens):
    gen = flow_gens["sd3"]
    tech = FlowEdit(gen, targets=TARGETS, sampling={"steps": 4}, steps=4, n_max=3, source_guidance=2.0,
                    target_guidance=2.0)
    tech.prepare()
    with torch.no_grad():
        torch.testing.assert_close(tech.flowedit(slice(0, 2), tech.cond), tech.x0, rtol=0, atol=1e-5)
    assert tech.inversion_seconds("flowedit") == 0.0 and "flowedit" in tech.methods()
    tech.compute()   # inversion-free: nothing runs until a method beside flowedit asks for the inversion
    tech.edit("flowedit")
    tech.reconstruct("vae")
    assert tech.pivots is None and "invert" not in tech.seconds
    assert tech.reconstruct("ddim_w1").shape == tech.images.shape and tech.pivots is not None
    # an image's noise is its own stream, so its edit does not depend on its batch
    assert torch.equal(noise_streams(range(1, 2), 0, tech.x0)(), noise_streams(range(0, 2), 0, tech.x0)()[1:])


def test_the_eps_form_is_ddim_in_flow_coordinates(gen):
    """On the UNet (epsilon prediction) FlowView's Euler step in z = x / (a + b), sigma = b / (a + b) is the DDIM
    step a' x0 + b' eps: the ε form FlowEdit and RF-Inversion run in."""
    steps = 5
    sched = gen.schedule(steps)
    view = FlowView(sched)
    x0 = gen.encode_images(torch.rand(1, 3, *gen.image_size))
    cond = gen.encode_prompt(["a red circle on the left"])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    fn = lambda x, t, i: gen.denoise(x, t, cond)
    with torch.no_grad():
        for i in (0, 2, steps - 1):
            a, b, a2, b2 = sched.signal[i], sched.noise[i], sched.signal_prev[i], sched.noise_prev[i]
            x = a * x0 + b * noise
            eps = gen.denoise(x, sched.timesteps[i], cond)
            ddim = a2 * (x - b * eps) / a + b2 * eps
            z = x / (a + b)
            z_next = z + (view.sigma(i, prev=True) - view.sigma(i)) * view.velocity(fn, z, i)
            torch.testing.assert_close((a2 + b2) * z_next, ddim, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flowedit_and_rfinv_edit_on_the_unet_in_the_eps_form(gen):
    tech = FlowEdit(gen, targets=TARGETS, sampling={"steps": 4, "guidance_scale": 3.0}, steps=4, n_max=3)
    tech.prepare()
    assert tech.edit("flowedit").shape == (2, 3, *gen.image_size)
    rf = RFInversion(gen, targets=TARGETS, sampling={"steps": 4, "guidance_scale": 3.0})
    rf.prepare()
    rf.compute()
    assert rf.edit("rfinv").shape == (2, 3, *gen.image_size) and rf.rf_latents.shape == (2, *gen.latent_shape())
    assert gen.unchanged()


# ---------------------------------------------------------------------------- RF-Inversion: the update rules
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_rf_inversion_steps_match_the_papers_controlled_odes(flow_gens, arch):
    """Rout et al.: one step of the controlled forward ODE (Eq. 8, from the clean end toward y_1) and one step of
    the controlled reverse ODE (Eq. 17, toward y_0), written out by hand (one sampling step: sigma 0 -> 1 -> 0)."""
    gen, gamma, eta, w_inv, w = flow_gens[arch], 0.6, 0.7, 1.0, 3.0
    tech = RFInversion(gen, targets=TARGETS, sampling={"steps": 1, "guidance_scale": w}, gamma=gamma, eta=eta,
                       start=0.0, stop=1.0, invert_guidance=w_inv)
    tech.prepare()
    tech.compute()
    prompts = tech.target_prompts()
    with torch.no_grad():
        target = gen.encode_prompt(prompts)
        ours = tech.edit("rfinv", prompts)
        sched = gen.schedule(1)
        s1, t1 = sched.noise[0], sched.timesteps[0]              # the top: sigma 1 (model time 1000)
        y0, y1 = tech.x0, streams(2)(tech.x0.shape[1:])
        empty = tech.empty.expand(2, -1, -1)
        u = hand_velocity(gen, y0, t1 * 0, empty, tech.empty, w_inv)   # the unconditional field at sigma 0
        u_cond = (y1 - y0) / (1 - 0)
        y_top = y0 + (s1 - 0) * (u + gamma * (u_cond - u))
        torch.testing.assert_close(tech.rf_latents, y_top, rtol=1e-5, atol=1e-5)
        v = -hand_velocity(gen, y_top, t1, target, tech.empty, w)     # reverse time
        v_cond = (y0 - y_top) / s1                                  # (y0 - X) / (1 - t), t = 1 - sigma
        x = y_top + (s1 - 0) * (v + eta * (v_cond - v))
        theirs = gen.decode_latents(x).float()
    assert float(s1) == pytest.approx(1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_rf_inversion_without_control_is_the_plain_euler_sampler(flow_gens):
    """gamma = eta = 0: the forward is the flow ODE read at the current level, the reverse plain Euler."""
    gen = flow_gens["sd3"]
    tech = RFInversion(gen, targets=TARGETS, sampling={"steps": 3, "guidance_scale": 1.0}, gamma=0.0, eta=0.0)
    tech.prepare()
    tech.compute()
    with torch.no_grad():
        plain = gen.sample(tech.cond, tech.rf_latents, None, 3)
        torch.testing.assert_close(tech.reconstruct("rfinv"), gen.decode_latents(plain).float(), rtol=1e-4,
                                   atol=1e-4)
    assert tech.pivots is None and "invert" not in tech.seconds  # rfinv alone never runs the DDIM/Euler inversion
    assert tech.reconstruct("ddim_w1").shape == tech.images.shape and tech.pivots is not None  # asked for: it runs


# ---------------------------------------------------------------------------- end to end, and refusals
def flow_base(folder):
    return ["generator=sd", f"generator.path={folder}", "generator.device=cpu", "generator.dtype=fp32",
            "sampling.steps=3", "eval.seeds=[0]", "eval.prompts=['{}']", "logger=none",
            "technique.targets.k=1", "++technique.targets.fixed.colour=red"]


@pytest.mark.parametrize("technique,method", [("flow_edit", "flowedit"), ("rf_inversion", "rfinv")])
def test_a_tiny_flux_run_edits_with_the_method(flows, tmp_path, technique, method):
    extra = [f"technique={technique}", "evaluator=[edit]", f"evaluator.edit.methods=[ddim_w1,{method}]",
             "technique.batch_size=1"]
    metrics, run_dir = tiny_run(tmp_path, extra, name=technique, base=flow_base(flows["flux"]))
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["generator/unchanged"] is True
    assert 0 <= on_disk[f"edit/success/{method}"] <= 1 and on_disk[f"edit/bg_rms/{method}"] >= 0
    assert (run_dir / "samples" / "edit.png").is_file()


def refusal(overrides) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert "\n" not in str(err.value)
    return err.value


def test_settings_are_refused_in_one_line_before_loading(flows, tmp_path):
    assert refusal(["technique=flow_edit", "technique.n_max=30", "sampling.steps=25"]).key == "technique.n_max"
    assert refusal(["technique=flow_edit", "technique.steps=10", "technique.n_max=4", "technique.n_min=4"]
                   ).key == "technique.n_min"
    assert refusal(["technique=flow_edit", "technique.n_avg=0"]).key == "technique.n_avg"
    assert refusal(["technique=flow_edit", "technique.edit.control=p2p"]).key == "technique.edit.control"
    assert refusal(["technique=rf_inversion", "technique.start=0.5", "technique.stop=0.25"]).key == "technique.start"
    assert refusal(["technique=rf_inversion", "technique.gamma=1.5"]).key == "technique.gamma"
    assert refusal(["technique=rf_inversion", "evaluator=[edit]", "evaluator.edit.methods=[rfinv+p2p]"]
                   ).key == "evaluator.edit.methods[0]"
    err = refusal(["technique=ddim_inversion", "evaluator=[edit]", "evaluator.edit.methods=[ddim_w1,flowedit]"])
    assert err.key == "evaluator.edit.methods[1]" and "technique=flow_edit" in str(err)
    # FLUX without a guidance input (schnell-like) cannot apply two FlowEdit scales
    schnell = tmp_path / "schnell"
    schnell.mkdir()
    for p in flows["flux"].iterdir():
        (schnell / p.name).symlink_to(p)
    (schnell / "transformer").unlink()
    (schnell / "transformer").mkdir()
    for p in (flows["flux"] / "transformer").iterdir():
        (schnell / "transformer" / p.name).symlink_to(p)
    config = json.loads((flows["flux"] / "transformer" / "config.json").read_text()) | {"guidance_embeds": False}
    (schnell / "transformer" / "config.json").unlink()
    (schnell / "transformer" / "config.json").write_text(json.dumps(config))
    err = refusal(flow_base(schnell) + ["technique=flow_edit"])
    assert err.key == "technique.target_guidance" and "guidance input" in str(err)
    assert validate(compose_config(flow_base(schnell) + ["technique=flow_edit", "technique.target_guidance=3.5"]
                                   )) == []
    assert validate(compose_config(flow_base(schnell) + ["technique=rf_inversion"])) == []


def test_the_cli_refuses_with_exit_code_2(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    res = subprocess.run([sys.executable, "-m", "steerexp.cli", "technique=flow_edit", "technique.n_avg=0",
                          "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "technique.n_avg" in res.stderr


@pytest.mark.slow
def test_both_methods_run_on_a_smoke_built_shapes_flow(tmp_path_factory, tmp_path):
    """shapes_flow (the SD3-format miniature; its smoke recipe, 3 steps, so the test does not depend on the weights)."""
    from hydra import compose, initialize_config_dir

    from steerexp import conf_dir
    from steerexp.pretrain.cli import run as pretrain_run

    out = tmp_path_factory.mktemp("shapes_flow")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        pretrain_run(compose(config_name="pretrain", overrides=["smoke=true", f"out={out}",
                                                                 "stages=[generator_flow]"]))
    for technique, method in (("flow_edit", "flowedit"), ("rf_inversion", "rfinv")):
        extra = [f"technique={technique}", "evaluator=[edit]", f"evaluator.edit.methods=[{method}]"]
        metrics, run_dir = tiny_run(tmp_path, extra, name=technique, base=flow_base(out / "shapes_flow"))
        assert metrics["generator/unchanged"] is True and 0 <= metrics[f"edit/success/{method}"] <= 1


def test_the_eps_form_reads_the_clean_end_at_time_zero_with_its_own_coefficients(gen):
    """FlowView.velocity_at_end on the DDIM UNet (where RF-Inversion's forward ODE starts): the model is read at time 0
    on x = (a + b) z with the level after the last step's (a, b), and v = eps - x0 from that split; at a step i,
    the same with the step's own (a, b) and time."""
    view = FlowView(gen.schedule(5))
    s, last = view.schedule, len(view) - 1
    z = torch.randn(2, *gen.latent_shape(), generator=torch.Generator().manual_seed(0))
    eps = torch.randn_like(z)
    seen = []

    def model_output(x, t, i):
        seen.append((x.clone(), float(t), i))
        return eps   # an epsilon-predicting model that always predicts this noise

    a, b = s.signal_prev[last], s.noise_prev[last]
    v = view.velocity_at_end(model_output, z)
    x = (a + b) * z
    assert seen[-1][1] == 0.0 and seen[-1][2] == last and torch.allclose(seen[-1][0], x)
    assert torch.allclose(v, eps - (x - b * eps) / a, atol=1e-5)
    assert 0 < float(view.sigma(last, prev=True)) < 0.1 and not torch.allclose(a + b, torch.ones(()))
    a, b = s.signal[1], s.noise[1]
    v1 = view.velocity(model_output, z, 1)
    assert seen[-1][1] == float(s.timesteps[1]) and torch.allclose(seen[-1][0], (a + b) * z)
    assert torch.allclose(v1, eps - ((a + b) * z - b * eps) / a, atol=1e-5)


def test_edit_bench_counts_a_lazy_inversion_once(monkeypatch):
    """A flow editor inverts lazily, inside the first edit that reads the inversion; edit_bench runs that inversion
    before timing the edit (TimedInversion.inverted), then adds inversion_seconds: counted once, not twice."""
    from steerexp.evaluators import edit_bench
    from steerexp.techniques.protocols import TimedInversion

    clock = [0.0]

    class Lazy:
        ran = False

        def inverted(self, method):
            if not self.ran:
                self.ran, clock[0] = True, clock[0] + 10.0   # the inversion: 10 s

        def inversion_seconds(self, method):
            return 10.0 / 2

        def edit(self, method, prompts=None):
            self.inverted(method)
            clock[0] += 1.0                                   # the edit: 1 s
            return torch.zeros(2, 3, 4, 4)

    monkeypatch.setattr(edit_bench.time, "process_time", lambda: clock[0])
    tech = Lazy()
    assert isinstance(tech, TimedInversion)
    _, seconds = edit_bench.timed_edit(tech, "ddim_w7.5", ["a", "b"], 2)
    assert seconds == (1.0 + 10.0) / 2


def test_inverted_runs_what_loaded_deltas_lack(gen):
    """Deltas loaded from a file hold x*_T only: TimedInversion.inverted runs Direct Inversion's trajectory before
    an edit is timed (and nothing for a method x*_T serves)."""
    from steerexp.techniques.ddim_inversion import DDIMInversion

    tech = DDIMInversion(gen, targets=TARGETS, sampling={"steps": 3})
    tech.prepare()
    tech.compute()
    saved = tech.latents_T.detach().clone()
    fresh = DDIMInversion(gen, targets=TARGETS, sampling={"steps": 3})
    fresh.prepare()
    fresh.load_deltas({"latents_T": saved})
    fresh.inverted("ddim_w7.5")
    assert fresh.pivots is None                      # the swap reads x*_T: nothing to run
    fresh.inverted("di+p2p")
    assert fresh.pivots is not None and torch.equal(fresh.pivots[-1].float().cpu(), saved)
