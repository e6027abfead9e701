"""RF-Solver and RF-Edit (Wang, Pu, Qi, Guo, Ma, Huang, Chen, Li, Shan, "Taming Rectified Flow for Inversion and
Editing", ICML 2025; arXiv:2411.04746, https://arxiv.org/abs/2411.04746; the authors' code:
https://github.com/wangjiangshan0725/RF-Solver-Edit, FLUX_Image_Edit/src/flux/sampling.py `denoise` and
flux/modules/layers.py), behind the inversion techniques' edit interface.

Time is the sampler's sigma (0: the clean image, 1: pure noise; the paper's t) and v(z, sigma) = dz/dsigma is the
model's guided velocity (flow families: the output itself; the UNets: the ε form of flow_edit.FlowView). The levels
are the schedule's sigmas s_0 > s_1 > ... > s_{T-1} (shift included) and the clean end s_T after the last step.

RF-Solver (the paper's RF-Solver section: the exact solution of the rectified-flow ODE, whose non-linear part, the
velocity, is expanded in a Taylor series to second order, its derivative estimated by a finite difference over half
a step). One step from level s to level s' (h = s' - s: h < 0 sampling, h > 0 inverting), `rf_step`:

    v      = v(Z_s, s)                                   the velocity where the step starts
    Z_mid  = Z_s + (h / 2) v                             half an Euler step
    v'     = (v(Z_mid, s + h / 2) - v) / (h / 2)         the finite-difference estimate of dv/dsigma
    Z_s'   = Z_s + h v + (1 / 2) h^2 v'                  the second-order Taylor step

Algebraically Z_s' = Z_s + h v(Z_mid, s + h / 2), the explicit midpoint rule; the code keeps the paper's form (as
the authors' `denoise` computes it: the derivative from the half step's prediction, then the Taylor step, in that
order, so rounding follows it too). The paper's equation numbers are not quoted
here: they could not be checked against the paper's text offline; the sections are named instead.
`order=1` drops the v' term: the Euler step at the same levels (the ablation; one model call a step, not two).
Sampling steps s_0 -> s_T; inversion runs the same rule through the levels in reverse, s_T -> s_0, each step
reading the model where it starts (the first at the clean end: model time 0, as in the authors' code, whose
inversion reverses the timestep list). The model time of a half step: flow families, the mean of its two levels'
times (time is sigma x num_train_timesteps); the UNets, see below.

RF-Edit (the paper's editing section: self-attention feature sharing). The source is inverted with the source prompt
at `source_guidance`; at every model evaluation of the first `share_steps` sampling steps (keyed by the sampling
step i the inversion step undoes, and its stage: 0 where the step starts, 1 at the half step) the V (value
projection) of the chosen attention layers is stored. The edit samples from the inverted latent with the target
prompt at `target_guidance`, and at the same (layer, i, stage) replaces the image tokens' V by the stored source V;
the text tokens' V is never touched. The processors (`sharing`) wrap the family's own attention processor and are
installed only for the inversion and for the edit's sampling, and the original ones are put back whatever happens:
no weight changes, so the generator's fingerprint does not move. The authors' FLUX code shares the V of all tokens
of the last 18 single-stream blocks for `inject` = 2-8 steps; here the image tokens only, in the layers
`share_blocks` (null: the last half of the attention layers).

"Reconstructing" with `rfsolver` is inversion, then sampling with the source prompt at `source_guidance` (no
sharing), so it measures the solver's round trip. The inverted latents are kept as deltas (`solver_latents`); the
shared V features live in memory (on the CPU) for the run.

Families:
  - sd3 (and the embedded shapes_flow): diffusers' JointAttnProcessor2_0; the image stream's V is attn.to_v's output
    (the text stream's, attn.add_v_proj's, is left alone).
  - flux: FluxAttnProcessor; double-stream blocks: attn.to_v's output (image tokens only); single-stream blocks:
    attn.to_v of [text, image], of which the last h w / 4 tokens (the image's) are replaced. Fused QKV projections
    are refused in one line. Distilled guidance: works (RF-Solver needs velocities only): source_guidance and
    target_guidance are the guidance inputs of the inversion and the edit (the authors': FLUX.1-dev, inversion at
    guidance 1, edit at 2); on a FLUX without a guidance input (schnell) they are ignored.
  - the variance-preserving UNets (sd, sdxl, the embedded shapes), the ε form: the schedule's levels are DDIM's
    (flow_edit.FlowView), and a half step lies between the training schedule's integer timesteps, so the UNet is read
    at the fractional timestep where log(alpha_bar), interpolated linearly in t between integer timesteps (as
    DPM-Solver's wrapper of discrete-time models does, Lu et al. 2022), has the half step's sigma (clamped to the
    table: a half step less noisy than timestep 0 is read at 0); value sharing acts
    on the self-attention layers (attn1), all of whose tokens are image tokens.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from steerexp.generators import FrozenGenerator, Guidance, sampling
from steerexp.generators.attention import swapped_processors
from steerexp.techniques.flow_edit import FlowEditor, FlowView

# the processors whose V is attn.to_v's output (the ones `sharing` can wrap)
SHARING_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "JointAttnProcessor2_0", "FluxAttnProcessor")


# ---------------------------------------------------------------------------- the levels and the velocity there
@dataclass(frozen=True)
class Level:
    """A noise level: its sigma, the model's time input there, and the schedule step it belongs to (None: the clean
    end or a half step)."""
    sigma: torch.Tensor
    time: torch.Tensor
    step: int | None = None
    end: bool = False


@dataclass(frozen=True)
class Levels:
    """The levels s_0 .. s_T of a schedule (a FlowView), their half steps, and the velocity at any of them."""
    view: FlowView
    alphas_cumprod: torch.Tensor | None = None     # the UNets: the training schedule's alpha_bar (half steps)

    def __len__(self) -> int:
        return len(self.view) + 1

    def __getitem__(self, k: int) -> Level:
        T, s = len(self.view), self.view.schedule
        if k < T:
            return Level(self.view.sigma(k), s.timesteps[k], k)
        return Level(self.view.sigma(T - 1, prev=True), s.timesteps[T - 1] * 0, None, True)

    @property
    def end_scale(self) -> torch.Tensor:
        """a + b at the clean end: x = end_scale z (1 for flow)."""
        return self.view.scale(len(self.view) - 1, prev=True)

    def half(self, a: Level, b: Level) -> Level:
        """The level halfway (in sigma) between a and b."""
        sigma = (a.sigma + b.sigma) / 2
        if self.view.flow:
            return Level(sigma, (a.time.double() + b.time.double()).float() / 2)
        return Level(sigma, vp_time(self.alphas_cumprod, sigma))

    def velocity(self, fn: sampling.ModelOutput, z: torch.Tensor, level: Level) -> torch.Tensor:
        """v(z, level) from `fn(x, t, i)` (the guided output; the caller binds i)."""
        if level.step is not None:
            return self.view.velocity(fn, z, level.step)
        if level.end:
            return self.view.velocity_at_end(fn, z)
        if self.view.flow:
            return fn(z, level.time, 0)
        a, b = vp_coefficients(level.sigma)
        x = (a + b).to(z) * z
        one = sampling.Schedule(level.time.reshape(1), a.reshape(1), b.reshape(1), a.reshape(1), b.reshape(1),
                                self.view.schedule.prediction_type)
        eps, x0 = one.split(fn(x, level.time, 0), x, 0)
        return eps - x0


def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the variance-preserving latent whose flow sigma = b / (a + b) is `sigma` (a^2 + b^2 = 1)."""
    scale = 1 / ((1 - sigma) ** 2 + sigma ** 2).sqrt()
    return (1 - sigma) * scale, sigma * scale


def vp_time(alphas_cumprod: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The fractional timestep whose alpha_bar (log alpha_bar interpolated linearly between the integer timesteps)
    is a^2 of `sigma` (vp_coefficients)."""
    a, _ = vp_coefficients(sigma.double())
    log_ac = alphas_cumprod.double().log().cpu().numpy()                  # decreasing in t
    t = np.interp(float((a ** 2).log()), log_ac[::-1], np.arange(len(log_ac), dtype=np.float64)[::-1])
    return torch.tensor(t, dtype=torch.float32)


# ---------------------------------------------------------------------------- the solver
Velocity = Callable[[torch.Tensor, Level, int, int], torch.Tensor]   # v(z, level, sampling step i, stage)


def rf_step(velocity: Callable[[torch.Tensor, Level, int], torch.Tensor], z: torch.Tensor, start: Level, end: Level,
            order: int, half: Callable[[Level, Level], Level]) -> torch.Tensor:
    """One RF-Solver step (module docstring) from `start` to `end`; `velocity(z, level, stage)`."""
    h = (end.sigma - start.sigma).to(z)
    v = velocity(z, start, 0)
    if order == 1:
        return z + h * v                                       # Euler
    z_mid = z + (h / 2) * v
    dv = (velocity(z_mid, half(start, end), 1) - v) / (h / 2)  # v', the finite-difference derivative
    return z + h * v + 0.5 * h ** 2 * dv                       # the second-order Taylor step


def rf_solve(velocity: Velocity, z: torch.Tensor, levels: Levels, order: int, inverse: bool = False,
             steps: range | None = None) -> torch.Tensor:
    """RF-Solver through the sampling steps `steps` (default: all; inverting: all, from the clean end up, each
    inversion step undoing sampling step i). In the view's z (x = end_scale z at the clean end)."""
    T = len(levels.view)
    steps = steps if steps is not None else (range(T - 1, -1, -1) if inverse else range(T))
    for i in steps:
        start, end = (levels[i + 1], levels[i]) if inverse else (levels[i], levels[i + 1])
        z = rf_step(lambda x, level, stage, i=i: velocity(x, level, i, stage), z, start, end, order, levels.half)
    return z


# ---------------------------------------------------------------------------- value sharing
class ValueSharer:
    """Stores the V of `layers` at every evaluation of the first `steps` sampling steps (mode "store": the
    inversion) and puts them back into the image tokens' V at the same evaluation (mode "share": the edit)."""

    def __init__(self, layers: list[str], steps: int, image_tokens: int):
        self.layers, self.steps, self.image_tokens = list(layers), int(steps), int(image_tokens)
        self.mode = "off"
        self.key = (0, 0)                                   # (sampling step, stage) of the evaluation running
        self.values: dict[tuple[str, int, int], torch.Tensor] = {}
        self.shared: list[tuple[str, int, int]] = []       # every replacement made (what the window did)

    def at(self, step: int, stage: int) -> None:
        self.key = (int(step), int(stage))

    def __call__(self, layer: str, value: torch.Tensor) -> torch.Tensor:
        """value [B, L, D], attn.to_v's output; its last `image_tokens` (at most L) tokens are the image's."""
        step, stage = self.key
        if self.mode == "off" or step >= self.steps or layer not in self.layers:
            return value
        n, key = min(self.image_tokens, value.shape[1]), (layer, step, stage)
        if self.mode == "store":
            self.values[key] = value[:, value.shape[1] - n:].detach().to("cpu", copy=True)
            return value
        if key not in self.values:
            raise RuntimeError(f"no source V stored for {layer} at step {step}: invert (compute()) before editing")
        src, B = self.values[key].to(value), len(value)
        if len(src) != B:   # the edit's batch holds cond and uncond (classifier-free guidance): every branch shares
            if B % len(src) == 0:
                src = src.repeat(B // len(src), 1, 1)
            elif len(src) % B == 0:
                src = src[:B]                               # the inversion's cond branch (model_output's first)
            else:
                raise RuntimeError(f"{layer}: a batch of {B} cannot share the {len(src)} stored source values")
        self.shared.append(key)
        return torch.cat([value[:, : value.shape[1] - n], src], dim=1)


class _WithSharedV:
    """An attention module as its processor sees it, with attn.to_v's output passed through the sharer."""

    def __init__(self, attn, to_v):
        self.__dict__.update(_attn=attn, to_v=to_v)

    def __getattr__(self, name):
        return getattr(self.__dict__["_attn"], name)


class SharedValueProcessor:
    """The family's own processor, run on the module with its V passed through a ValueSharer (no other change:
    with nothing to store or share it computes exactly what the processor computes)."""

    def __init__(self, processor, sharer: ValueSharer, layer: str):
        self.processor, self.sharer, self.layer = processor, sharer, layer

    def __call__(self, attn, hidden_states, *args, **kwargs):
        to_v = lambda x: self.sharer(self.layer, attn.to_v(x))
        return self.processor(_WithSharedV(attn, to_v), hidden_states, *args, **kwargs)


def attention_layers(gen: FrozenGenerator) -> list[str]:
    """The processor names value sharing may act on, in the denoiser's order: every attention layer of a
    transformer, the self-attention layers (attn1) of a UNet."""
    names = list(gen.denoiser.attn_processors)
    return names if gen.prediction_type == "flow" else [n for n in names if ".attn1." in n]


def chosen_layers(gen: FrozenGenerator, blocks: list[int] | None) -> list[str]:
    """`blocks` (indices into attention_layers, negative from the end; None: the last half) as processor names."""
    names = attention_layers(gen)
    if blocks is None:
        return names[len(names) // 2:]
    bad = [b for b in blocks if not -len(names) <= int(b) < len(names)]
    if bad:
        raise ValueError(f"technique.share_blocks: {bad} out of range; this {gen.family} denoiser has {len(names)} "
                         f"attention layers value sharing can use (indices {-len(names)}..{len(names) - 1})")
    return [names[int(b)] for b in blocks]


@contextlib.contextmanager
def sharing(denoiser: nn.Module, sharer: ValueSharer | None, mode: str):
    """Within the block the sharer's layers run through SharedValueProcessor in `mode` (store | share); the
    original processors are put back afterwards, also on error. `sharer=None` changes nothing."""
    if sharer is None:
        yield None
        return
    original = denoiser.attn_processors
    for name in sharer.layers:
        module = denoiser.get_submodule(name.rsplit(".", 1)[0])
        kind = type(original[name]).__name__
        if kind not in SHARING_PROCESSORS or getattr(module, "fused_projections", False):
            fused = " with fused projections" if kind in SHARING_PROCESSORS else ""
            raise ValueError(f"value sharing needs the V projection attn.to_v ({', '.join(SHARING_PROCESSORS)}, "
                             f"unfused); {name} runs {kind}{fused}: set technique.share_steps=0")
    shared = lambda n, p: SharedValueProcessor(p, sharer, n) if n in sharer.layers else p
    with swapped_processors(denoiser, shared):
        sharer.mode = mode
        try:
            yield sharer
        finally:
            sharer.mode = "off"


# ---------------------------------------------------------------------------- the technique
class RFSolver(FlowEditor):
    """RF-Solver inversion + RF-Edit as the edit method `rfsolver` of an inversion technique (DDIM/Euler
    inversion's methods beside it). Settings: rf_solver_spec.py."""

    own = "rfsolver"

    def __init__(self, generator: FrozenGenerator, steps: int | None = None, order: int = 2, share_steps: int = 2,
                 share_blocks: list[int] | None = None, source_guidance: float = 1.0, target_guidance: float = 2.0,
                 **kw):
        super().__init__(generator, **kw)
        self.steps = int(steps) if steps is not None else self.sampling_steps
        self.order, self.share_steps = int(order), int(share_steps)
        if self.steps < 1 or self.order not in (1, 2) or not 0 <= self.share_steps <= self.steps:
            raise ValueError(f"RF-Solver needs steps >= 1, order 1 or 2 and 0 <= share_steps <= steps, got steps="
                             f"{self.steps}, order={self.order}, share_steps={self.share_steps}")
        self.share_blocks = None if share_blocks is None else [int(b) for b in share_blocks]
        self.layers = chosen_layers(generator, self.share_blocks) if self.share_steps else []
        self.source_guidance = Guidance(scale=float(source_guidance))
        self.target_guidance = Guidance(scale=float(target_guidance))
        self.solver_latents = nn.Parameter(torch.zeros(0, *generator.latent_shape()), requires_grad=False)
        self.sharers: dict[int, ValueSharer] = {}   # batch start -> the source V of its images

    def inversion_seconds(self, method: str) -> float:
        if method != self.own:
            return super().inversion_seconds(method)
        return self.seconds.get("rf_solver_invert", 0.0) / max(1, len(self.images) if self.images is not None else 1)

    def levels(self, like: torch.Tensor) -> Levels:
        gen = self.generator
        view = FlowView(gen.schedule_for(self.steps, like))
        return Levels(view, None if view.flow else gen.scheduler.alphas_cumprod)

    def velocity(self, levels: Levels, cond: torch.Tensor, guidance: Guidance,
                 sharer: ValueSharer | None = None) -> Velocity:
        """v(z, level, i, stage) of the conditionings `cond` at `guidance` (the empty prompt as the uncond branch;
        none under distilled guidance), telling the sharer which evaluation runs."""
        gen, T = self.generator, self.steps
        uncond = None if gen.distilled_guidance else self.empty.expand(len(cond), -1, -1).to(gen.device, gen.dtype)

        def v(z, level, i, stage):
            if sharer is not None:
                sharer.at(i, stage)
            fn = lambda x, t, _: gen.model_output(x, t.to(gen.device), cond, uncond, guidance, i, T)
            return levels.velocity(fn, z, level)
        return v

    def sharer(self, like: torch.Tensor) -> ValueSharer | None:
        if not self.share_steps:
            return None
        p = self.generator.latent_patch
        return ValueSharer(self.layers, self.share_steps, (like.shape[-2] // p) * (like.shape[-1] // p))

    def rf_invert(self) -> None:
        """RF-Solver inversion of every target with the source prompt (stored as `solver_latents`), keeping the
        source V of the sharing window."""
        gen, out = self.generator, []
        start = time.process_time()
        with torch.no_grad():
            for sl in self.batches():
                x0 = self.x0[sl]
                levels, sharer = self.levels(x0), self.sharer(x0)
                v = self.velocity(levels, self.cond[sl], self.source_guidance, sharer)
                with sharing(gen.denoiser, sharer, "store"):
                    out.append(rf_solve(v, x0 / levels.end_scale.to(x0), levels, self.order, inverse=True))
                self.sharers[sl.start] = sharer
        self.solver_latents = nn.Parameter(torch.cat(out).detach().float().cpu(), requires_grad=False)
        self.seconds["rf_solver_invert"] = time.process_time() - start

    def compute(self) -> None:
        self.rf_invert()     # (the DDIM / Euler inversion of the methods beside rfsolver runs when one is asked for)

    def inverted(self, method: str | None) -> None:
        """Also RF-Solver's own inversion, where deltas were loaded without it or without the source's stored V."""
        if (method or self.own) == self.own and self.x0 is not None:
            if len(self.solver_latents) == 0 or (self.share_steps and not self.sharers):
                self.rf_invert()
            return
        super().inverted(method)

    def run_own(self, prompts: list[str] | None) -> torch.Tensor:
        if self.x0 is None:
            raise RuntimeError("the targets are not loaded yet: call prepare() first")
        if len(self.solver_latents) == 0 or (prompts is not None and self.share_steps and not self.sharers):
            self.inverted(self.own)   # (deltas loaded without the source V: invert again)
        gen, out = self.generator, []
        with torch.no_grad():
            target = self.cond if prompts is None else gen.encode_prompt(prompts)
            guidance = self.source_guidance if prompts is None else self.target_guidance
            for sl in self.batches():
                levels = self.levels(self.x0[sl])
                sharer = self.sharers.get(sl.start) if prompts is not None else None
                v = self.velocity(levels, target[sl], guidance, sharer)
                with sharing(gen.denoiser, sharer, "share"):
                    z = rf_solve(v, self.solver_latents[sl].to(gen.device, gen.dtype), levels, self.order)
                out.append(gen.decode_latents(levels.end_scale.to(z) * z).float().cpu())
        return torch.cat(out)

    def diagnostics(self) -> dict[str, float]:
        return {"steps": self.steps, "order": self.order, "share_steps": self.share_steps,
                "shared_layers": len(self.layers), "model_calls_per_image": 2 * self.order * self.steps,
                "seconds_per_image": self.inversion_seconds(self.own)}
