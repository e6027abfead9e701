"""Optimised input deltas: a prompt-embedding delta delta_text and/or an initial-latent offset
delta_z, learned through the frozen generator's differentiable DDIM path (the primer's core
formulation):

    min   L( D( DDIM_k( e(p) + delta_text , z_s + delta_z ) ) )  +  chi * chi_nll(||z_s + delta_z||)
    s.t.  ||delta_text|| <= eps_text,  ||delta_z|| <= eps_z
          (budget.joint: (||delta_text|| / eps_text)^2 + (||delta_z|| / eps_z)^2 <= 1, one shared budget;
          with one delta enabled it is that delta's own ball)

e(p) is the frozen text encoder's output [L, D] for a training prompt p, z_s the seed's
Gaussian x_T, DDIM_k the k-step deterministic sampler (`train_sampling_steps`, with gradient
checkpointing per step), D the VAE decoder and L an image objective (a `Composite` of
conf/objective/ terms: concept_score, clip_similarity, reconstruction, delta_l2, proximity; an L2
penalty on the deltas is the delta_l2 term).
Only the deltas are parameters; no weight of G is touched.

- delta_text (`text: true`): [L, D] on every token position (`tokens: all`), or [n, D] on the
  tokens of one word of the prompts (`tokens: blue`: the delta follows the word wherever it
  appears, prompts without it are untouched), or on fixed token indices (`tokens: [2, 3]`).
- delta_z (`latent: true`): one offset per training seed [S, C, h, w] (`latent_mode: per_seed`,
  usable only on those seeds, ReNO-style) or one shared by all seeds [C, h, w]
  (`latent_mode: shared`, trained on `train_seeds`, meant for new seeds).
- Budgets: after every optimizer step each delta is projected (Euclidean projection, i.e.
  rescaled) onto its ball. The norm is over the whole tensor: all of delta_text (or per token
  with `text_norm: token`), each seed's delta_z. With `joint` both are rescaled together in
  the normalised coordinates (delta_text/eps_text, delta_z/eps_z), the projection onto one
  ball of radius 1 there.
- `strength` scales both deltas at generation (the magnitude evaluator's sweep).

The budgets themselves (balls, the joint ball, chi) are steerexp.techniques.budgets.DeltaBudget.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from steerexp.generators import FrozenGenerator
from steerexp.objectives.composite import Composite, ObjectiveInputs
from steerexp.objectives.regularisers import chi_penalty
from steerexp.techniques.trainable import Trainable
from steerexp.techniques.budgets import DeltaBudget
from steerexp.spec import check_settings
from steerexp.techniques.input_delta_spec import InputDeltaSpec


class InputDelta(Trainable):
    def __init__(self, generator: FrozenGenerator, objective: Composite | None = None, text: bool = True,
                 latent: bool = False, tokens: str | list[int] = "all", latent_mode: str = "shared",
                 prompts: list[str] | None = None, slot_word: str = "circle", train_seeds: list[int] | None = None,
                 train_sampling_steps: int = 10, checkpoint: bool = True, budget: dict | DeltaBudget | None = None,
                 seed: int = 0, **kwargs):
        train_seeds = list(train_seeds if train_seeds is not None else range(100, 108))
        settings = locals() | kwargs | {"budget": None if isinstance(budget, DeltaBudget) else budget}
        check_settings(InputDeltaSpec, settings)
        super().__init__(generator, **kwargs)  # the base budget stays off: DeltaBudget acts instead
        self.strength = 1.0  # generate with strength * delta_text and strength * delta_z
        if self.sampling_steps < 1:
            raise ValueError(f"sampling.steps must be >= 1 (the DDIM steps to sample through), got "
                             f"{self.sampling_steps}")
        self.budget_cfg = DeltaBudget.from_config(budget)
        self.prompts = list(prompts or ["a blue circle"])
        self.train_seeds = [int(s) for s in train_seeds]
        self.objective, self.use_text, self.use_latent = objective, bool(text), bool(latent)
        self.latent_mode, self.slot_word, self.seed = latent_mode, slot_word, seed
        self.train_sampling_steps, self.checkpoint = int(train_sampling_steps), bool(checkpoint)
        self.tokens = (
            tokens if isinstance(tokens, str) else [int(i) for i in ([tokens] if isinstance(tokens, int) else tokens)]
        )
        self.word_rows = self._token_spec()
        if self.use_text:
            n = generator.cond_shape[0] if self.tokens == "all" else (self.word_rows or len(self.tokens))
            self.text_delta = nn.Parameter(torch.zeros(n, generator.embed_dim))
        if self.use_latent:
            shape = generator.latent_shape()
            rows = (len(self.train_seeds),) if latent_mode == "per_seed" else ()
            self.latent_delta = nn.Parameter(torch.zeros(*rows, *shape))
        self._cache: dict[str, torch.Tensor] = {}
        self._start: dict[int, torch.Tensor] = {}  # pair index -> zero-delta image

    # ------------------------------------------------------------------ validation
    def _token_spec(self) -> int | None:
        """How many conditioning rows the word of `tokens: <word>` takes (None for `all` or explicit indices)."""
        L = self.generator.cond_shape[0]
        if isinstance(self.tokens, list):
            if not self.tokens or any(not 0 <= i < L for i in self.tokens) or len(set(self.tokens)) != len(self.tokens):
                raise ValueError(f"technique.tokens indices must be distinct and in [0, {L}), got {self.tokens}")
            return None
        if self.tokens == "all":
            return None
        n = self.generator.word_length(self.tokens) if self.tokens.strip() else 0
        if not n:
            raise ValueError(f"technique.tokens {self.tokens!r} is empty; use all, a word of the prompts, or indices")
        return n

    # ------------------------------------------------------------------ deltas as applied
    def positions(self, ids: torch.Tensor) -> list[torch.Tensor | None]:
        """Per prompt, the token positions delta_text writes to (None: the prompt lacks the word)."""
        if self.tokens == "all":
            return [torch.arange(self.generator.cond_shape[0])] * len(ids)
        if self.word_rows is None:
            return [torch.tensor(self.tokens)] * len(ids)
        return self.generator.word_positions(ids, self.tokens)

    def text_delta_for(self, ids: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """[B, L, D]: delta_text scattered onto each prompt's positions, zero elsewhere (differentiable)."""
        B, L = len(ids), self.generator.cond_shape[0]
        if self.tokens == "all":
            return strength * self.text_delta.expand(B, L, -1)
        full = self.text_delta.new_zeros(B, L, self.text_delta.shape[-1])
        rows = [(b, p) for b, p in enumerate(self.positions(ids.cpu())) if p is not None]
        if rows:
            b_idx = torch.cat([torch.full((len(p),), b) for b, p in rows]).to(full.device)
            p_idx = torch.cat([p for _, p in rows]).to(full.device)
            values = torch.cat([self.text_delta] * len(rows))
            full = full.index_put((b_idx, p_idx), strength * values)
        return full

    def seed_rows(self, seeds: list[int]) -> list[int]:
        index = {s: i for i, s in enumerate(self.train_seeds)}
        unknown = [s for s in seeds if s not in index]
        if unknown:
            raise ValueError(
                f"per-seed latent offsets exist only for technique.train_seeds={self.train_seeds}, not for "
                f"seeds {sorted(set(unknown))}; set eval.seeds to a subset of them, or use latent_mode=shared"
            )
        return [index[s] for s in seeds]

    def latent_delta_for(self, seeds: list[int], strength: float = 1.0) -> torch.Tensor:
        """[B, C, h, w] offsets of these seeds (the shared one broadcast)."""
        if self.latent_mode == "shared":
            return strength * self.latent_delta.expand(len(seeds), *self.latent_delta.shape)
        return strength * self.latent_delta[torch.tensor(self.seed_rows(seeds), device=self.latent_delta.device)]

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        if not getattr(self.objective, "on_images", False):
            raise ValueError(
                f"technique {type(self).__name__} scores decoded images, so it needs an image objective, "
                f"e.g. objective=[concept_score,delta_l2] "
                f"(got objective=[{','.join(getattr(self.objective, 'terms', {}))}]; "
                "objective=denoising is for textual_inversion)"
            )
        gen = self.generator
        ids = gen.tokenize(self.prompts)
        if self.use_text and self.word_rows is not None:
            missing = [p for p, pos in zip(self.prompts, self.positions(ids.cpu())) if pos is None]
            if missing:
                raise ValueError(f"technique.tokens {self.tokens!r} does not occur in training prompt(s) {missing}")
        with torch.no_grad():
            self._cache = {
                "ids": ids,
                "cond": gen.encode_prompt(ids).float(),
                "uncond": _float(gen.guidance_embeddings(self.guidance)[0]),  # None: distilled guidance
                "z": gen.initial_latents(self.train_seeds).float(),
            }

    def pairs(self) -> list[tuple[int, int]]:
        """(prompt index, seed index) training pairs."""
        return [(p, s) for p in range(len(self.prompts)) for s in range(len(self.train_seeds))]

    def train_order(self) -> torch.Tensor:
        """Shuffled passes over all (prompt, seed) pairs, `batch_size` pairs per optimisation step."""
        g = torch.Generator().manual_seed(self.seed)
        n, need = len(self.pairs()), max(1, self.steps) * self.batch_size
        return torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])[:need]

    def structure(self) -> dict:
        return {
            "text": self.use_text,
            "latent": self.use_latent,
            "latent_mode": self.latent_mode,
            "tokens": self.tokens,
            "train_seeds": self.train_seeds,
        }

    # ------------------------------------------------------------------ training
    def render(self, pair_idx: list[int], with_deltas: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded images and initial latents of training pairs, through the k-step DDIM path."""
        gen, c = self.generator, self._cache
        pairs = [self.pairs()[i] for i in pair_idx]
        p_idx, s_idx = [p for p, _ in pairs], [s for _, s in pairs]
        cond, z = c["cond"][p_idx], c["z"][s_idx]
        if with_deltas and self.use_text:
            cond = cond + self.text_delta_for(c["ids"][p_idx])
        if with_deltas and self.use_latent:
            z = z + self.latent_delta_for([self.train_seeds[s] for s in s_idx])
        dtype = gen.dtype
        x = gen.sample(
            cond.to(dtype),
            z.to(dtype),
            c["uncond"].to(dtype) if c["uncond"] is not None else None,
            self.train_sampling_steps,
            self.guidance,
            grad=torch.is_grad_enabled(),
            checkpoint=self.checkpoint,
        )
        return gen.decode_latents(x).float(), z

    def start_images(self, pair_idx: list[int]) -> torch.Tensor:
        """The zero-delta images of training pairs (cached): the `proximity` term's anchor."""
        todo = [i for i in pair_idx if i not in self._start]
        if todo:
            with torch.no_grad():
                images, _ = self.render(todo, with_deltas=False)
            self._start.update({i: im for i, im in zip(todo, images)})
        return torch.stack([self._start[i] for i in pair_idx])

    def applied_deltas(self, pair_idx: list[int]) -> dict[str, torch.Tensor]:
        """The deltas as this batch used them (per-seed offsets: only the batch's rows)."""
        out = {}
        if self.use_text:
            out["text"] = self.text_delta
        if self.use_latent:
            seeds = [self.train_seeds[self.pairs()[i][1]] for i in pair_idx]
            out["latent"] = self.latent_delta if self.latent_mode == "shared" else self.latent_delta_for(seeds)
        return out

    def training_loss(self, batch) -> torch.Tensor:
        pair_idx = batch[0].tolist()  # (a split step's rows: no random draws here to align)
        if not self._cache:
            self.prepare()
        images, z = self.render(pair_idx)
        deltas = self.applied_deltas(pair_idx)
        start = self.start_images(pair_idx) if self.objective.needs_start else None
        pairs = self.pairs()
        prompts = [self.prompts[pairs[i][0]] for i in pair_idx]
        inputs = ObjectiveInputs(images=images, deltas=deltas, start_images=start, initial_latents=z,
                                 prompts=prompts)  # the image path
        loss = self.objective(inputs)
        b = self.budget_cfg
        if b.chi > 0 and self.use_latent:
            loss = loss + b.chi * chi_penalty(z)
        if self._trainer is not None:
            self.log_dict({f"train/{k}": v for k, v in self.objective.last.items()})
        return loss

    def diagnostics(self) -> dict[str, float]:
        """The training objective over every (prompt, training seed) pair with the final deltas, and each term's
        part (no gradients; the total also holds the chi penalty when budget.chi > 0, the parts do not): what
        restarts of a run with other seeds are compared by (the lowest wins). It looks at the training seeds only,
        which are the evaluation seeds themselves when per-seed offsets train on ${eval.seeds}."""
        n = len(self.pairs())
        if not n or not self._cache:
            return {}
        total, terms = 0.0, {}
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                idx = torch.arange(start, min(n, start + self.batch_size))
                total += float(self.training_loss((idx,))) * len(idx)
                for k, v in self.objective.last.items():
                    terms[k] = terms.get(k, 0.0) + v * len(idx)
        return {"train_objective": total / n, **{f"train_objective/{k}": v / n for k, v in terms.items()}}

    # ------------------------------------------------------------------ budget
    def budgeted(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.use_text:
            out["text"] = self.text_delta
        if self.use_latent:
            out["latent"] = self.latent_delta
        return out

    def norms(self) -> dict[str, torch.Tensor]:
        """The budget's norms: ||delta_text|| (whole, or per token row) and ||delta_z|| (per seed, or shared)."""
        return self.budget_cfg.norms(self.budgeted(), per_seed=self.latent_mode == "per_seed")

    def apply_budget(self) -> None:
        """After every optimizer step (the base class calls it): project every delta onto its ball
        (or both onto the joint ball)."""
        self.budget_cfg.project(self.budgeted(), per_seed=self.latent_mode == "per_seed")

    def delta_norms(self) -> dict[str, float]:
        return self.budget_cfg.report(self.budgeted(), per_seed=self.latent_mode == "per_seed")

    # ------------------------------------------------------------------ use
    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        gen = self.generator
        texts = [self.fill(p) for p in prompts]
        if not edited:
            return gen.generate(texts, seeds, steps=self.sampling_steps, guidance=self.guidance)
        with torch.no_grad():
            delta = (
                self.text_delta_for(gen.tokenize(texts), self.strength).to(gen.device, gen.dtype)
                if self.use_text
                else None
            )
            latents = gen.initial_latents(seeds)
            if self.use_latent:
                latents = latents + self.latent_delta_for(list(seeds), self.strength).to(latents)
        return gen.generate(
            texts, seeds, steps=self.sampling_steps, guidance=self.guidance, delta=delta, latents=latents
        )


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None else None
