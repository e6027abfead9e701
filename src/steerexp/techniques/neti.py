"""NeTI (Alaluf et al. 2023, "A Neural Space-Time Representation for Text-to-Image Personalization"): the token
embedding is a function of the denoising timestep t and the cross-attention layer l, given by a small neural mapper
trained in place of the token.

The paper's space-time conditioning space (P*) and its mapper, as built here:

    v*_{t,l}  = M(t, l)                                                   the token at timestep t, layer l
    loss      = E_{x, eps, t} || eps - eps_theta(x_t, t, {E(p with M(t, l))}_l) ||^2      (textual inversion's loss)
    f(t, l)   = [sin(B (t, l)^T) ; cos(B (t, l)^T)] / ||.||,    B in R^{F x 2}, B[:, 0] ~ N(0, sigma_t^2),
                B[:, 1] ~ N(0, sigma_l^2)        (random Fourier features; the paper: F = 1024, sigma_t = 0.03,
                                                  sigma_l = 2, fixed, not trained)
    h         = LeakyReLU(LN(W2 LeakyReLU(LN(W1 (A f(t, l) + a)))))     A's rows start as f at the anchor grid
                t in {0, T/n_a, ..., }, l in {0..n_layers-1} (n_a = time_anchors: A f is a similarity to the anchors),
                W1, W2 of width `hidden` (128)
    h         <- h[:k] (the rest zeroed), k ~ U{1..hidden}, with probability `nested_dropout` in training only
                (the paper's nested dropout; here one k per optimizer step, drawn from the step's seed; k
                reaches `hidden`, where nothing is dropped, while NeTI's code draws 0..hidden-1)
    M(t, l)   = s * u / ||u||,   u = W_o h + b_o       rescaled to the norm s of the initializer word's embedding
                (per text encoder: each encoder's slice of the packed token to that encoder's norm)

Not built: the paper's textual bypass (a second output added to the text encoder's output) and its
truncation-at-inference knob; the mapper alone is the token. l is the index of the layer GROUP (technique.layers,
as in XTI: per_layer is the paper's setting), t the model time the UNet is called with (0..999).

The mapper is the only trainable part: its nn.Parameters (A, a, W1, W2, the LayerNorms, W_o, b_o) are the deltas;
B and the norms s are buffers (in the checkpoint, never trained). It reuses XTI entirely: the per-layer
conditioning stacked on the sequence axis, the processors that route it (techniques/xti.py), textual inversion's
targets, prompts, loss and Lightning training and resume; only the conditioning is a function of t: in training
the denoising objective calls it with each example's drawn t, in sampling FrozenGenerator.sample at every step.

Export: neti_mapper.safetensors (no convention exists), read back by `load_neti`:
    keys      the mapper's state dict: "frequencies" (B, [F, 2]), "norms" (s, [n_encoders]), "anchor.weight" /
              "anchor.bias" (A, a), "net.0.*", "net.1.*" (W1, LN), "net.3.*", "net.4.*" (W2, LN), "out.*" (W_o, b_o)
    metadata  format "steerexp-neti/1", placeholder, config (JSON: NeTIMapper's constructor arguments), groups (JSON:
              the diffusers module names of the cross-attention layers of each layer index l)
`load_neti(path)` returns (mapper, metadata); mapper(t, l) gives the [n, num_vectors, token_dim] tokens, the same
values as the run's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from steerexp.generators import FrozenGenerator
from steerexp.spec import check_settings
from steerexp.techniques.neti_spec import NeTISpec
from steerexp.techniques.xti import XTI, read_export

NETI_FORMAT = "steerexp-neti/1"


class NeTIMapper(nn.Module):
    """M(t, l) -> [n, num_vectors, token_dim] token embeddings (the module docstring's equations)."""

    def __init__(self, layers: int, widths: list[int], num_vectors: int = 1, hidden: int = 128, time_anchors: int = 10,
                 features: int = 1024, sigma_t: float = 0.03, sigma_l: float = 2.0, timesteps: int = 1000,
                 seed: int = 0):
        super().__init__()
        self.config = dict(layers=layers, widths=list(widths), num_vectors=num_vectors, hidden=hidden,
                           time_anchors=time_anchors, features=features, sigma_t=sigma_t, sigma_l=sigma_l,
                           timesteps=timesteps, seed=seed)
        self.widths, self.num_vectors = list(widths), num_vectors
        with torch.random.fork_rng(devices=[]):  # the same start whatever the global RNG's state
            torch.manual_seed(seed)
            frequencies = torch.randn(features, 2) * torch.tensor([sigma_t, sigma_l])
            self.register_buffer("frequencies", frequencies)
            self.register_buffer("norms", torch.ones(len(widths)))
            step = max(1, timesteps // time_anchors)
            grid = torch.tensor([[t, l] for t in range(0, timesteps, step)[:time_anchors] for l in range(layers)],
                                dtype=torch.float32)
            self.anchor = nn.Linear(2 * features, len(grid))
            self.net = nn.Sequential(nn.Linear(len(grid), hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                                     nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU())
            self.out = nn.Linear(hidden, num_vectors * sum(widths))
            with torch.no_grad():
                self.anchor.weight.copy_(self.encode(grid[:, 0], grid[:, 1]))

    def encode(self, t: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        """f(t, l): [n, 2F] unit-norm random Fourier features."""
        x = torch.stack([t.float(), l.float()], dim=-1).to(self.frequencies)
        z = x @ self.frequencies.T
        v = torch.cat([z.sin(), z.cos()], dim=-1)
        return v / v.norm(dim=-1, keepdim=True)

    def forward(self, t: torch.Tensor, l: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """Tokens [n, num_vectors, token_dim] at timesteps t [n] and layer indices l [n]; `keep`: nested dropout
        (only the first `keep` hidden units)."""
        h = self.net(self.anchor(self.encode(t, l)))
        if keep is not None and keep < h.shape[-1]:
            h = torch.cat([h[:, :keep], torch.zeros_like(h[:, keep:])], dim=-1)
        u = self.out(h).view(len(h), self.num_vectors, -1)
        parts = [s * p / p.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                 for s, p in zip(self.norms, u.split(self.widths, dim=-1))]
        return torch.cat(parts, dim=-1)


def load_neti(path: str | Path) -> tuple[NeTIMapper, dict]:
    """neti_mapper.safetensors -> (the mapper, in eval mode, its metadata with config and groups parsed from JSON).
    See the module docstring for the layout."""
    state, meta = read_export(path, NETI_FORMAT, "a NeTI")
    meta["config"], meta["groups"] = json.loads(meta["config"]), json.loads(meta["groups"])
    mapper = NeTIMapper(**meta["config"])
    mapper.load_state_dict(state)
    return mapper.eval(), meta


class NeTI(XTI):
    """XTI whose per-layer tokens are M(t, l), the mapper's output, at every timestep (module docstring)."""

    spec = NeTISpec

    def __init__(self, generator: FrozenGenerator, hidden: int = 128, time_anchors: int = 10, features: int = 1024,
                 sigma_t: float = 0.03, sigma_l: float = 2.0, nested_dropout: float = 0.5, **kwargs):
        check_settings(NeTISpec, locals() | kwargs)
        self._mapper_cfg = dict(hidden=hidden, time_anchors=time_anchors, features=features, sigma_t=sigma_t,
                                sigma_l=sigma_l)
        super().__init__(generator, **kwargs)
        self.nested_dropout = nested_dropout

    def make_deltas(self) -> None:
        del self.embeddings  # no token table: the mapper is the only trainable part
        gen = self.generator
        self.mapper = NeTIMapper(len(self.groups), [e.width for e in gen.encoders], self.num_vectors,
                                 timesteps=int(gen.scheduler.config.num_train_timesteps), seed=int(self.seed),
                                 **self._mapper_cfg)

    def structure(self) -> dict:
        return super().structure() | dict(self._mapper_cfg)

    def start_from(self, init: torch.Tensor) -> None:
        """The mapper starts from its own (seeded) initialisation; the initializer word gives its output norms."""
        self.mapper.norms.copy_(torch.stack([p.norm() for p in init[0].split(self.mapper.widths)]))

    def budgeted(self) -> dict[str, torch.Tensor]:
        return {}  # bounded by construction: every token has the initializer's norm

    # ------------------------------------------------------------------ the conditioning at t
    def vectors_at(self, t: torch.Tensor, strength: float = 1.0, keep: int | None = None) -> torch.Tensor:
        """[len(t), G, num_vectors, token_dim]: M(t_b, g) for every t_b and group g (interpolated from v_init by
        `strength`, the magnitude evaluator's knob)."""
        G, n = self.num_groups, len(t)
        dev = self.mapper.frequencies.device
        tt = t.float().reshape(-1).to(dev).repeat_interleave(G)
        ll = torch.arange(G, device=dev).repeat(n)
        v = self.mapper(tt, ll, keep).view(n, G, self.num_vectors, -1)
        return v if strength == 1.0 else self.initial + strength * (v - self.initial)

    def training_cond(self, prompts: list[str]):
        keep = None
        if self.nested_dropout > 0:  # one draw per optimizer step, from the step's seed (exact resume)
            rng = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.global_step) + 7)
            if float(torch.rand((), generator=rng)) < self.nested_dropout:
                keep = int(torch.randint(1, self.mapper.config["hidden"] + 1, (), generator=rng))
        return lambda t: self.stacked(prompts, self.tables(self.vectors_at(t, keep=keep)))

    def edited_cond(self, prompts: list[str]):
        """The edited conditioning as a callable of the step's model time: the mapper's tokens at t, encoded for every
        layer group. The text encoder runs on B x G prompts at every sampling step (not cached by t: at SD 1.5
        per_layer, 16 x B encodings a step)."""
        def cond(t: torch.Tensor, i: int) -> torch.Tensor:
            return self.stacked(prompts, self.tables(self.vectors_at(t.reshape(1), self.strength)[0]).detach())

        return cond

    # ------------------------------------------------------------------ export
    def per_layer_vectors(self, t: float = 500.0) -> dict[str, torch.Tensor]:
        """{layer module name: [num_vectors, token_dim]}: the tokens at one timestep t."""
        with torch.no_grad():
            v = self.vectors_at(torch.tensor([t]))[0].cpu()
        return {name: v[g].clone().contiguous() for g, names in enumerate(self.groups) for name in names}

    def export(self, run_dir) -> list[str]:
        meta = {"format": NETI_FORMAT, "placeholder": self.placeholder, "config": json.dumps(self.mapper.config),
                "groups": json.dumps(self.groups)}
        state = {k: v.detach().cpu().contiguous() for k, v in self.mapper.state_dict().items()}
        save_file(state, str(Path(run_dir) / "neti_mapper.safetensors"), metadata=meta)
        return ["neti_mapper.safetensors"]
