"""RF-Inversion (Rout, Chen, Ruiz, Kumar, Caramanis, Shakkottai, Chu, "Semantic Image Inversion and Editing using
Rectified Stochastic Differential Equations", ICLR 2025), behind the inversion techniques' edit interface.

Time runs as in the sampler's sigma: 0 is the clean image, 1 pure noise (the paper's forward time t of Algorithm 1;
its reverse time is 1 - sigma). v(z, sigma) is the model's velocity dz/dsigma (flow families: the output itself;
the UNets: in the ε form of flow_edit.FlowView).

Inversion, the controlled forward ODE (paper Eq. 8, Algorithm 1), from Y_0 = y_0 (the VAE latent) toward a noise
sample y_1 ~ N(0, I), over the schedule's sigmas in increasing order s_0 = 0 < s_1 < ... < s_S (the top):

    u       = v(Y_{s_k}, s_k; prompt)                  (the unconditional field: the empty prompt, `invert_prompt`)
    u_cond  = (y_1 - Y_{s_k}) / (1 - s_k)               (the straight path's velocity to y_1)
    Y_{s_{k+1}} = Y_{s_k} + (s_{k+1} - s_k) [u + gamma (u_cond - u)]

gamma = 0 is the plain flow-ODE inversion read at the current level; gamma = 1 reaches y_1 itself.

Editing, the controlled reverse ODE (paper Eq. 17 / Algorithm 2: reverse time t = 1 - sigma), from X = Y_top with
the edit prompt at `guidance_scale`, for the sampling steps i = 0 .. S-1 (sigma_i > sigma_{i+1}):

    w       = -v(X, sigma_i; edit prompt)               (the reverse-time field)
    w_cond  = (y_0 - X) / sigma_i                       (= (y_0 - X) / (1 - t): the straight path back to y_0)
    eta_i   = eta if int(start S) <= i < int(stop S) else 0      (the diffusers community pipeline's interval)
    X      <- X + (sigma_i - sigma_{i+1}) [w + eta_i (w_cond - w)]

eta = 0 is plain Euler sampling from the inverted latent. "Reconstructing" with `rfinv` is the same reverse with the
source prompt. The forward's y_1 is drawn per image from its own stream (seed, j). The inversion's latents are kept
as deltas (`rf_latents`, [N, C, h, w]) beside DDIM inversion's `latents_T`.

Equation numbers are the paper's arXiv version's (Eq. 8: the controlled forward ODE; Eq. 17: the controlled reverse
ODE). Both ODEs here step over the sampler's own sigmas (shift included) and read the model at the sigma of the
current level, as the ODEs are written.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from steerexp.generators import FrozenGenerator, Guidance
from steerexp.techniques.flow_edit import FlowEditor, FlowView, Velocity, noise_streams


def levels(view: FlowView) -> list[torch.Tensor]:
    """The forward ODE's sigmas, increasing: the clean end (after the last step), then the steps' from last to first."""
    T = len(view)
    return [view.sigma(T - 1, prev=True)] + [view.sigma(T - 1 - k) for k in range(T)]


def rf_forward(u: Velocity, u_end: Callable[[torch.Tensor], torch.Tensor], y0: torch.Tensor, y1: torch.Tensor,
               view: FlowView, gamma: float) -> torch.Tensor:
    """The controlled forward ODE (module docstring) from y0 to the top level; `u(z, i)` reads the field at step i's
    level, `u_end(z)` at the clean end. Returns Y at the top (in the view's z: x for flow)."""
    T, s = len(view), levels(view)
    y = y0.clone()
    for k in range(T):
        sk = s[k].to(y)
        field = u_end(y) if k == 0 else u(y, T - k)     # level s_k is step T - k's sigma (k >= 1)
        cond = (y1 - y) / (1 - sk)
        y = y + (s[k + 1].to(y) - sk) * (field + gamma * (cond - field))
    return y


def controlled_steps(steps: int, start: float, stop: float) -> range:
    """The steps eta acts on: int(start S) <= i < min(int(stop S), S)."""
    return range(int(start * steps), min(int(stop * steps), steps))


def rf_reverse(v: Velocity, x_top: torch.Tensor, y0: torch.Tensor, view: FlowView, eta: float,
               controlled: range) -> torch.Tensor:
    """The controlled reverse ODE (module docstring) from the inverted latent to a clean one (in x)."""
    T, x = len(view), x_top.clone()
    for i in range(T):
        s, s_next = view.sigma(i).to(x), view.sigma(i, prev=True).to(x)
        w = -v(x, i)
        eta_i = eta if i in controlled else 0.0
        w_cond = (y0 - x) / s
        x = x + (s - s_next) * (w + eta_i * (w_cond - w))
    return view.scale(T - 1, prev=True).to(x) * x


class RFInversion(FlowEditor):
    """RF-Inversion as the edit method `rfinv` of an inversion technique (DDIM/Euler inversion's methods beside it).
    Settings: rf_inversion_spec.py."""

    own = "rfinv"

    def __init__(self, generator: FrozenGenerator, gamma: float = 0.5, eta: float = 0.9, start: float = 0.0,
                 stop: float = 0.25, invert_prompt: str = "empty", seed: int = 0, **kw):
        super().__init__(generator, **kw)
        if not (0 <= gamma <= 1 and 0 <= eta <= 1 and 0 <= start <= stop <= 1):
            raise ValueError(f"RF-Inversion needs gamma and eta in [0, 1] and 0 <= start <= stop <= 1, got gamma="
                             f"{gamma}, eta={eta}, start={start}, stop={stop}")
        if invert_prompt not in ("empty", "source"):
            raise ValueError(f"technique.invert_prompt must be empty or source, got {invert_prompt!r}")
        self.gamma, self.eta, self.start, self.stop = float(gamma), float(eta), float(start), float(stop)
        self.invert_prompt, self.seed = invert_prompt, int(seed)
        self.rf_latents = nn.Parameter(torch.zeros(0, *generator.latent_shape()), requires_grad=False)

    def inversion_seconds(self, method: str) -> float:
        if method != self.own:
            return super().inversion_seconds(method)
        return self.seconds.get("rf_invert", 0.0) / max(1, len(self.images) if self.images is not None else 1)

    def field(self, view: FlowView, cond: torch.Tensor, guidance: Guidance):
        """(v(z, i), v_end(z)) of the conditionings `cond` at `guidance` (the empty prompt as the uncond branch)."""
        gen, T = self.generator, len(view)
        uncond = None if gen.distilled_guidance else self.empty.expand(len(cond), -1, -1).to(gen.device, gen.dtype)
        fn = lambda x, t, i: gen.model_output(x, t.to(gen.device), cond, uncond, guidance, i, T)
        return (lambda z, i: view.velocity(fn, z, i)), (lambda z: view.velocity_at_end(fn, z))

    def rf_invert(self) -> None:
        """The controlled forward ODE of every target (stored as `rf_latents`)."""
        gen, out = self.generator, []
        start = time.process_time()
        with torch.no_grad():
            for sl in self.batches():
                y0 = self.x0[sl]
                view = FlowView(gen.schedule_for(self.sampling_steps, y0))
                cond = self.cond[sl] if self.invert_prompt == "source" else self.empty.expand(len(y0), -1, -1)
                u, u_end = self.field(view, cond, self.invert_guidance)
                y1 = noise_streams(range(sl.start, sl.stop), self.seed, y0)()
                out.append(rf_forward(u, u_end, y0, y1, view, self.gamma))
        self.rf_latents = nn.Parameter(torch.cat(out).detach().float().cpu(), requires_grad=False)
        self.seconds["rf_invert"] = time.process_time() - start

    def compute(self) -> None:
        self.rf_invert()     # (the DDIM / Euler inversion of the methods beside rfinv runs when one is asked for)

    def run_own(self, prompts: list[str] | None) -> torch.Tensor:
        if len(self.rf_latents) == 0:
            raise RuntimeError("the targets are not inverted yet: call prepare() and compute() first")
        gen, out, S = self.generator, [], self.sampling_steps
        with torch.no_grad():
            target = self.cond if prompts is None else gen.encode_prompt(prompts)
            for sl in self.batches():
                y0 = self.x0[sl]
                view = FlowView(gen.schedule_for(S, y0))
                v, _ = self.field(view, target[sl], self.guidance)
                z = rf_reverse(v, self.rf_latents[sl].to(gen.device, gen.dtype), y0, view, self.eta,
                               controlled_steps(S, self.start, self.stop))
                out.append(gen.decode_latents(z).float().cpu())
        return torch.cat(out)

    def diagnostics(self) -> dict[str, float]:
        c = controlled_steps(self.sampling_steps, self.start, self.stop)
        return {"gamma": self.gamma, "eta": self.eta, "controlled_steps": len(c),
                "seconds_per_image": self.inversion_seconds(self.own)}
