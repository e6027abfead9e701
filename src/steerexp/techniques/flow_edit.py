"""FlowEdit (Kulikov, Kleiner, Huberman-Spiegelglas, Michaeli, "FlowEdit: Inversion-Free Text-Based Editing
Using Pre-Trained Flow Models", ICCV 2025), behind the inversion techniques' edit interface.

Notation of the paper: the noisy latent of a rectified flow is Z_t = (1 - t) X_0 + t N, the model's velocity
V(Z_t, t) = dZ_t/dt (= N - X_0 on the straight path), and the timesteps t_T > ... > t_1 > t_0 = 0 are the
sampler's (here the schedule's sigmas, shift included). Algorithm 1 of the paper, which `flow_edit` follows line
by line (step number n counts from the clean end, n = T - i for the schedule's step i):

    Z^FE_{t_{n_max}} = X^src
    for n = n_max .. n_min + 1:                                  (the FlowEdit ODE, Euler)
        for k = 1 .. n_avg:
            N_k ~ N(0, I)
            Z^src_{t_n,k} = (1 - t_n) X^src + t_n N_k            (the source, noised afresh)
            Z^tar_{t_n,k} = Z^FE_{t_n} + Z^src_{t_n,k} - X^src    (the target: the same noise, shifted by the edit)
            V^Δ_k = V^tar(Z^tar_{t_n,k}, t_n) - V^src(Z^src_{t_n,k}, t_n)
        Z^FE_{t_{n-1}} = Z^FE_{t_n} + (t_{n-1} - t_n) mean_k V^Δ_k
    if n_min > 0:                                                (then plain sampling with the target prompt)
        Z^tar_{t_{n_min}} = Z^FE_{t_{n_min}} + (1 - t_{n_min}) X^src + t_{n_min} N - X^src
        for n = n_min .. 1: Z^tar_{t_{n-1}} = Z^tar_{t_n} + (t_{n-1} - t_n) V^tar(Z^tar_{t_n}, t_n)
    return Z^FE_0 (n_min = 0) or Z^tar_0

V^src is the model's (guided) velocity with the source prompt at `source_guidance`, V^tar with the edit prompt at
`target_guidance`; the noise is drawn afresh at every step and draw (image j from its own seeded stream, so an
image's edit does not depend on its batch). FlowEdit needs no inversion: `compute()` does nothing and
`inversion_seconds("flowedit")` is 0 (the DDIM/Euler inversion that the methods beside it read runs only when one of
them is asked for).
"Reconstructing" with it is FlowEdit with the source prompt as the target (equal scales and n_min = 0 return the
VAE latent exactly: every V^Δ is 0).

The ε form (the variance-preserving UNets: sd, sdxl, the embedded shapes). A latent x_t = a_t x_0 + b_t eps is the
rectified-flow latent z = x / (a + b) = (1 - sigma) x_0 + sigma eps at sigma = b / (a + b), whose velocity is
v = eps_hat - x0_hat (split from the model's eps or v prediction at x = (a + b) z): DDIM is exactly the Euler step
in (z, sigma) (Song et al. 2021, Eq. 14's ODE; Karras et al. 2022, Sec. 3). `FlowView` reads any schedule so, and
FlowEdit (and RF-Inversion, rf_inversion.py) run in those coordinates on every family; for flow families the view
is the identity (z = x, sigma = the schedule's sigma, v = the model output). DDIM's x0 clipping/thresholding is not
applied in this view.

This module also holds `FlowView`, which rf_inversion.py uses.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from steerexp.generators import FrozenGenerator, Guidance, sampling
from steerexp.techniques.ddim_inversion import DDIMInversion
from steerexp.techniques.flow_edit_spec import default_n_max

Velocity = Callable[[torch.Tensor, int], torch.Tensor]   # v(z, i): the velocity at the schedule's step i


# ---------------------------------------------------------------------------- any schedule as a rectified flow
@dataclass(frozen=True)
class FlowView:
    """A sampling schedule read as a rectified flow (see the module docstring): the sigma of each step and of the
    step after it, and the model's velocity there."""

    schedule: sampling.Schedule

    @property
    def flow(self) -> bool:
        return self.schedule.prediction_type == "flow"

    def __len__(self) -> int:
        return len(self.schedule)

    def scale(self, i: int, prev: bool = False) -> torch.Tensor:
        """a + b at step i (or at the step after it): x = scale z (1 for flow)."""
        s = self.schedule
        return (s.signal_prev[i] + s.noise_prev[i]) if prev else (s.signal[i] + s.noise[i])

    def sigma(self, i: int, prev: bool = False) -> torch.Tensor:
        """sigma at step i (or at the step after it): the schedule's own for flow, b / (a + b) otherwise."""
        s = self.schedule
        b = s.noise_prev[i] if prev else s.noise[i]
        return b if self.flow else b / self.scale(i, prev)

    def velocity(self, model_output: sampling.ModelOutput, z: torch.Tensor, i: int) -> torch.Tensor:
        """v(z, sigma_i) from `model_output(x, t, i)` (the guided output, sampling.py's signature)."""
        s = self.schedule
        if self.flow:
            return model_output(z, s.timesteps[i], i)
        x = self.scale(i).to(z) * z
        eps, x0 = s.split(model_output(x, s.timesteps[i], i), x, i)
        return eps - x0

    def velocity_at_end(self, model_output: sampling.ModelOutput, z: torch.Tensor) -> torch.Tensor:
        """v at the level after the last step (sigma ~ 0: the clean end), where RF-Inversion's forward ODE starts:
        the model read at time 0 (flow: t = sigma * num_train_timesteps = 0), split with that level's (a, b). On a UNet
        whose final alpha is not 1 (set_alpha_to_one=false) that level's sigma is slightly above 0 (the shapes UNet:
        about 0.03), and the clean latent is taken to lie on it, as DDIM's last step ends on it."""
        s, last = self.schedule, len(self.schedule) - 1
        t0 = s.timesteps[last] * 0
        if self.flow:
            return model_output(z, t0, last)
        end = dataclasses.replace(s, timesteps=t0.reshape(1), signal=s.signal_prev[last:], noise=s.noise_prev[last:],
                                  signal_prev=s.signal_prev[last:], noise_prev=s.noise_prev[last:])
        x = self.scale(last, prev=True).to(z) * z
        eps, x0 = end.split(model_output(x, t0, last), x, 0)
        return eps - x0


# ---------------------------------------------------------------------------- Algorithm 1
def flow_edit(v_source: Velocity, v_target: Velocity, x_src: torch.Tensor, view: FlowView, n_max: int, n_min: int,
              n_avg: int, noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """FlowEdit from the clean source latent `x_src` (the module docstring's Algorithm 1); returns the clean edited
    latent. `noise()` draws one N like x_src (in the order: step by step, draw by draw)."""
    T = len(view)
    if not 0 <= n_min < n_max <= T:
        raise ValueError(f"FlowEdit needs 0 <= n_min < n_max <= steps, got n_min={n_min}, n_max={n_max}, steps={T}")
    z = x_src.clone()                                   # Z^FE_{t_{n_max}} = X^src
    for i in range(T - n_max, T):                       # step i of the schedule is n = T - i
        t, t_next = view.sigma(i).to(z), view.sigma(i, prev=True).to(z)
        if T - i > n_min:                               # the FlowEdit ODE
            dv = torch.zeros_like(z)
            for _ in range(n_avg):
                n_k = noise()
                z_src = (1 - t) * x_src + t * n_k
                z_tar = z + z_src - x_src
                dv = dv + (v_target(z_tar, i) - v_source(z_src, i))
            z = z + (t_next - t) * (dv / n_avg)
        else:                                           # plain sampling with the target prompt
            if T - i == n_min:
                z = z + (1 - t) * x_src + t * noise() - x_src
            z = z + (t_next - t) * v_target(z, i)
    return view.scale(T - 1, prev=True).to(z) * z       # back to x (1 for flow)


def noise_streams(indices: range, seed: int, like: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Draws [N, ...] like `like`, image j from its own stream (seed, j): an image's noise does not depend on its
    batch."""
    gens = [torch.Generator().manual_seed(int(seed) * 1_000_003 + j) for j in indices]
    shape = like.shape[1:]
    return lambda: torch.stack([torch.randn(shape, generator=g) for g in gens]).to(like)


# ---------------------------------------------------------------------------- the technique
class FlowEditor(DDIMInversion):
    """An inversion technique whose own edit method (`own`) is not an inversion + prompt swap: it is offered beside
    the inherited methods, and attention control does not apply to it (its edit method is the bare name)."""
    own = ""

    def methods(self) -> list[str]:
        return super().methods() + [self.own]

    def own_method(self) -> str:
        return self.own

    def edit_method(self) -> str:
        return self.own

    def compute(self) -> None:
        """The own method's work (a subclass's). The DDIM / Euler inversion that the methods beside it read runs
        only when one of them is asked for (`inverted`), so a run of the own method alone never pays for it."""

    def inverted(self, method: str | None) -> None:
        """Run the DDIM / Euler inversion now if `method` reads it and it has not run (outside the edit's timing,
        which excludes the inversion: `inversion_seconds` adds it)."""
        base = (method or self.own).split("+")[0]
        if base not in (self.own, "vae") and self.pivots is None and len(self.latents_T) == 0 and self.x0 is not None:
            self.invert()

    def reconstruct(self, method: str | None = None) -> torch.Tensor:
        self.inverted(method)
        return super().reconstruct(method)

    def edit(self, method: str | None = None, prompts: list[str] | None = None) -> torch.Tensor:
        self.inverted(method)
        return super().edit(method, prompts)

    def _run(self, method: str, prompts: list[str] | None) -> torch.Tensor:
        if method == self.own:
            return self.run_own(prompts)
        if method == "vae" and self.pivots is None and len(self.latents_T) == 0:
            if prompts is not None:
                raise ValueError("the VAE round trip has no prompt, so it cannot edit")
            with torch.no_grad():   # the round trip D(E(I)) reads no inversion
                return torch.cat([self.generator.decode_latents(self.x0[sl]).float().cpu() for sl in self.batches()])
        return super()._run(method, prompts)

    def run_own(self, prompts: list[str] | None) -> torch.Tensor:
        """Decoded images of every target by the own method: reconstruction (prompts None) or edit."""
        raise NotImplementedError


class FlowEdit(FlowEditor):
    """FlowEdit as the edit method `flowedit` of an inversion technique (with DDIM/Euler inversion's methods beside
    it, on the same targets). Settings: flow_edit_spec.py."""

    own = "flowedit"

    def __init__(self, generator: FrozenGenerator, steps: int | None = None, n_max: int | None = None,
                 n_min: int = 0, n_avg: int = 1, source_guidance: float = 3.5, target_guidance: float = 13.5,
                 seed: int = 0, **kw):
        super().__init__(generator, **kw)
        self.steps = int(steps) if steps is not None else self.sampling_steps
        self.n_max = int(n_max) if n_max is not None else default_n_max(self.steps)
        self.n_min, self.n_avg, self.seed = int(n_min), int(n_avg), int(seed)
        if not 0 <= self.n_min < self.n_max <= self.steps or self.n_avg < 1:
            raise ValueError(f"FlowEdit needs 0 <= n_min < n_max <= steps and n_avg >= 1, got n_min={self.n_min}, "
                             f"n_max={self.n_max}, steps={self.steps}, n_avg={self.n_avg}")
        self.source_guidance = Guidance(scale=float(source_guidance))
        self.target_guidance = Guidance(scale=float(target_guidance))

    def inversion_seconds(self, method: str) -> float:
        return 0.0 if method == self.own else super().inversion_seconds(method)

    def velocity(self, view: FlowView, cond: torch.Tensor, guidance: Guidance) -> Velocity:
        gen, T = self.generator, len(view)
        uncond = None if gen.distilled_guidance else self.empty.expand(len(cond), -1, -1).to(gen.device, gen.dtype)
        fn = lambda x, t, i: gen.model_output(x, t.to(gen.device), cond, uncond, guidance, i, T)
        return lambda z, i: view.velocity(fn, z, i)

    def flowedit(self, sl: slice, target: torch.Tensor) -> torch.Tensor:
        """The clean edited latents of images `sl` toward the conditionings `target`."""
        gen, x_src = self.generator, self.x0[sl]
        view = FlowView(gen.schedule_for(self.steps, x_src))
        return flow_edit(self.velocity(view, self.cond[sl], self.source_guidance),
                         self.velocity(view, target, self.target_guidance), x_src, view, self.n_max, self.n_min,
                         self.n_avg, noise_streams(range(sl.start, sl.stop), self.seed, x_src))

    def run_own(self, prompts: list[str] | None) -> torch.Tensor:
        if self.x0 is None:
            raise RuntimeError("the targets are not loaded yet: call prepare() first")
        gen, out = self.generator, []
        with torch.no_grad():
            target = self.cond if prompts is None else gen.encode_prompt(prompts)
            for sl in self.batches():
                out.append(gen.decode_latents(self.flowedit(sl, target[sl])).float().cpu())
        return torch.cat(out)

    def diagnostics(self) -> dict[str, float]:
        return {"steps": self.steps, "n_max": self.n_max, "n_min": self.n_min, "n_avg": self.n_avg,
                "model_calls_per_image": 2 * self.n_avg * (self.n_max - self.n_min) + self.n_min}

