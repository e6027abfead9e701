"""FrozenGenerator: the one interface techniques talk to, whatever the generator family.

A family (sd.py, sdxl.py, sd3.py, flux.py) wraps one kind of diffusers pipeline and says only what
differs: how its text encoders' outputs make the conditioning, how its denoiser is called, its noise
schedule and its VAE's latent scaling. Everything else lives here, once:

- prompt encoding with token injection into every text encoder (`add_tokens`, `added_embeddings`) and
  prompt-embedding deltas;
- the conditioning is one tensor [B, L, D] per prompt, whatever the family: the text encoders' hidden
  states as the denoiser reads them, then (for families with pooled embeddings) the pooled vector in
  extra rows. So a delta on the conditioning covers the pooled embedding too, and cat/expand/+ work as on
  SD 1.x. Added-token embeddings are packed the same way: one row per token, the encoders' widths side by side;
- classifier-free guidance (cond and uncond in one batch) or distilled guidance (a model input: FLUX);
- one sampler for every family (sampling.py: DDIM for epsilon/v prediction, Euler for flow matching, the
  same step rule), with or without gradients and checkpointing, and its inversion;
- VAE encode/decode; the fingerprint. No parameter ever requires grad, every module stays in eval mode,
  and the fingerprint proves the weights unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from steerexp import progress
from steerexp.generators import sampling
from steerexp.techniques.guidance_spec import NEGATIVE_MODES, SCHEDULES  # the guidance settings' values (torch-free)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class GeneratorChangedError(RuntimeError):
    pass


@dataclass
class Guidance:
    """Classifier-free guidance knobs shared by every technique's sampling.

    scale            CFG weight w (1 = no guidance)
    rescale          guidance rescale phi (0 = off): match the guided prediction's std to the cond one
    schedule         constant | interval (w inside [interval_start, interval_end) of the steps, 1 outside)
                     | weak_strong_weak (1 at both ends, w in the middle, a sine bump)
    negative_prompt  with negative_mode=uncond it replaces the empty prompt as the uncond branch;
                     with negative_mode=subtract it is an extra term -negative_weight * (eps_neg - eps_uncond)
    """
    scale: float = 7.5
    rescale: float = 0.0
    schedule: str = "constant"
    interval_start: float = 0.0
    interval_end: float = 1.0
    negative_prompt: str = ""
    negative_mode: str = "uncond"
    negative_weight: float = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"guidance schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.negative_mode not in NEGATIVE_MODES:
            raise ValueError(f"guidance negative_mode must be one of {NEGATIVE_MODES}, got {self.negative_mode!r}")
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"guidance rescale (phi) must be in [0, 1], got {self.rescale}")
        if not 0 <= self.interval_start < self.interval_end <= 1:
            raise ValueError("guidance interval needs 0 <= interval_start < interval_end <= 1, got "
                             f"{self.interval_start}, {self.interval_end}")

    @property
    def subtracts_negative(self) -> bool:
        return self.negative_mode == "subtract" and bool(self.negative_prompt) and self.negative_weight != 0

    def scale_at(self, i: int, steps: int) -> float:
        frac = (i + 0.5) / steps
        if self.schedule == "interval":
            return self.scale if self.interval_start <= frac < self.interval_end else 1.0
        if self.schedule == "weak_strong_weak":
            return 1.0 + (self.scale - 1.0) * math.sin(math.pi * frac)
        return self.scale

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, i: int = 0, steps: int = 1,
                negative: torch.Tensor | None = None) -> torch.Tensor:
        guided = uncond + self.scale_at(i, steps) * (cond - uncond)
        if negative is not None:
            guided = guided - self.negative_weight * (negative - uncond)
        if self.rescale > 0:
            dims = list(range(1, cond.ndim))
            factor = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp(min=1e-8)
            guided = self.rescale * guided * factor + (1 - self.rescale) * guided
        return guided



# recent diffusers name the loading argument `dtype` (torch_dtype is deprecated); older ones only know torch_dtype
_DTYPE_KWARG = "dtype" if 'pop("dtype"' in inspect.getsource(DiffusionPipeline.from_pretrained) else "torch_dtype"


@contextlib.contextmanager
def _no_loading_bars():
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars off while a pipeline
    loads (the run draws its own progress: steerexp.progress); each library's setting is restored after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in restore:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in restore:
            lib.enable_progress_bar()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_pipeline(cls, path: str | Path, dtype: str = "fp32", **kwargs):
    """A diffusers pipeline of class `cls` from a local folder or a hub id, in `dtype`, with a clear error."""
    path_str = str(path)
    local = Path(path_str).expanduser()
    try:
        with _no_loading_bars():
            return cls.from_pretrained(str(local) if local.exists() else path_str, **{_DTYPE_KWARG: DTYPES[dtype]},
                                       **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"could not load the generator from {path_str!r} (no local folder, and the hub "
                                f"is unreachable or has no such model): {err}") from err


@dataclass
class TextEncoder:
    """One text encoder of a family and its tokenizer.

    name       the key its added-token rows carry in an exported embedding file (clip_l, clip_g, t5)
    offset     where its hidden states sit in the conditioning's sequence (None: it gives only a pooled vector)
    """
    name: str
    tokenizer: object
    model: torch.nn.Module
    offset: int | None = 0
    added_ids: list[int] = field(default_factory=list)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def embedding(self) -> torch.nn.Embedding:
        """The token embedding the forward pass calls (T5's encoder has its own module sharing `shared`'s weight)."""
        stack = getattr(self.model, "encoder", None)
        return getattr(stack, "embed_tokens", None) or self.model.get_input_embeddings()

    @property
    def width(self) -> int:
        return self.embedding.embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.embedding.num_embeddings

    def word_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def ids(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                              truncation=True).input_ids


class FrozenGenerator:
    """The generator interface (see the module docstring). A family sets the class attributes below and
    implements `_encode` (encoders' outputs -> conditioning rows), `denoise`, `schedule` and, where its VAE
    or latents differ from SD's, `latent_shape`, `encode_images`, `decode_latents`."""

    family = "base"
    distilled_guidance = False         # guidance is a model input (FLUX): no uncond branch, no negative prompt
    capabilities: frozenset[str] = frozenset()   # cfg, cross_attention (a UNet with cross-attention), vp
    pooled_dim = 0                     # width of the pooled embedding packed after the hidden states (0: none)

    def __init__(self, encoders: list[TextEncoder], denoiser: torch.nn.Module, vae: torch.nn.Module, scheduler,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 denoiser_name: str = "unet"):
        self.encoders, self.denoiser, self.vae, self.scheduler = list(encoders), denoiser, vae, scheduler
        self.denoiser_name = denoiser_name
        self.device, self.dtype = torch.device(device), dtype
        for m in self.modules:
            # loaded in `dtype` already (from_pretrained): only components handed over in another dtype are cast
            if any(p.dtype != dtype for p in m.parameters()):
                m.to(dtype=dtype)
            m.to(self.device).eval().requires_grad_(False)
        self.added_tokens: list[str] = []
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._fingerprint = self.fingerprint()

    @classmethod
    def from_pretrained(cls, path, device: str = "auto", dtype: str = "fp32") -> "FrozenGenerator":
        """The generator of a pipeline folder or hub id, of the family its model_index.json names."""
        from steerexp.generators import from_pretrained

        return from_pretrained(path, device, dtype)

    # ------------------------------------------------------------------ components
    @property
    def tokenizer(self):
        """The first text encoder's tokenizer (the one word positions and attention maps are read with)."""
        return self.encoders[0].tokenizer

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.encoders[0].model

    @property
    def named_modules(self) -> list[tuple[str, torch.nn.Module]]:
        names = ["text_encoder" if i == 0 else f"text_encoder_{i + 1}" for i in range(len(self.encoders))]
        return [*zip(names, (e.model for e in self.encoders)), (self.denoiser_name, self.denoiser), ("vae", self.vae)]

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [m for _, m in self.named_modules]

    @property
    def prediction_type(self) -> str:
        return self.schedule(1).prediction_type

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    # ------------------------------------------------------------------ freezing
    def fingerprint(self) -> str:
        """SHA-256 over every parameter and buffer of the text encoders, the denoiser and the VAE."""
        h = hashlib.sha256()
        for name, module in self.named_modules:
            for key, t in sorted(module.state_dict().items()):
                h.update(f"{name}.{key}:{tuple(t.shape)}:{t.dtype}".encode())  # next: the buffer itself, no bytes copy
                h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
        return h.hexdigest()

    def is_frozen(self) -> bool:
        frozen = all(not p.requires_grad for m in self.modules for p in m.parameters())
        return frozen and not any(m.training for m in self.modules)

    def unchanged(self) -> bool:
        """True when the weights hash as they did at load time and nothing requires grad."""
        return self.is_frozen() and self.fingerprint() == self._fingerprint

    def assert_unchanged(self) -> None:
        if not self.unchanged():
            raise GeneratorChangedError(
                "the frozen generator changed during the run (fingerprint or requires_grad/eval "
                "state differs from load time); a technique must only learn input deltas"
            )

    def num_parameters(self) -> int:
        return sum(p.numel() for m in self.modules for p in m.parameters())

    # ------------------------------------------------------------------ text
    @property
    def cond_shape(self) -> tuple[int, int]:
        """(L, D) of one prompt's conditioning (hidden-state rows, then the pooled rows)."""
        if not hasattr(self, "_cond_shape"):
            with torch.no_grad():
                self._cond_shape = tuple(self.encode_prompt([""]).shape[1:])
        return self._cond_shape

    @property
    def embed_dim(self) -> int:
        """D, the width of the conditioning (what a prompt-embedding delta row has)."""
        return self.cond_shape[1]

    @property
    def token_dim(self) -> int:
        """The width of an added token's packed embedding: every text encoder's width side by side."""
        return sum(e.width for e in self.encoders)

    def _split_tokens(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return list(rows.split([e.width for e in self.encoders], dim=-1))

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add placeholder tokens to every tokenizer (no embedding table is resized); returns their rows in
        the added-token table (`added_embeddings` of encode_prompt)."""
        for tok in tokens:
            for enc in self.encoders:
                vocab = enc.tokenizer.get_vocab()
                if tok in vocab or f"{tok}</w>" in vocab or tok.lower() + "</w>" in vocab or tok in self.added_tokens:
                    raise ValueError(
                        f"placeholder token {tok!r} is already in the tokenizer's vocabulary; choose a "
                        f"string the vocabulary lacks, such as '<{tok.strip('<>')}-new>'"
                    )
        for enc in self.encoders:
            enc.tokenizer.add_tokens(list(tokens))
            enc.added_ids += enc.tokenizer.convert_tokens_to_ids(list(tokens))
        first = len(self.added_tokens)
        self.added_tokens += list(tokens)
        self._ids = {}
        return list(range(first, len(self.added_tokens)))

    def initializer_embedding(self, word: str) -> torch.Tensor:
        """[token_dim]: the packed embedding of a one-token word (each encoder's row of it; an encoder that
        splits the word into pieces gives their mean). Raises when the first tokenizer splits it."""
        rows = []
        for k, enc in enumerate(self.encoders):
            ids = enc.word_ids(word)
            if k == 0 and len(ids) != 1:
                raise ValueError(
                    f"technique.initializer {word!r} must be a single token for this tokenizer "
                    f"(it splits into {len(ids)}); pick a one-token word such as 'object'"
                )
            table = enc.embedding.weight
            rows.append(table[torch.as_tensor(ids, device=table.device)].float().mean(0))
        return torch.cat(rows).detach().cpu()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, T]: every tokenizer's ids side by side (what encode_prompt reads), cached per prompt:
        training asks for the same few prompts at every step, and tokenizing them again cost ~15% of a
        textual-inversion step on the shapes generator."""
        if getattr(self, "_ids", None) is None or len(self._ids) > 10_000:
            self._ids = {}
        new = [p for p in dict.fromkeys(prompts) if p not in self._ids]
        if new:
            per_encoder = [enc.ids(new) for enc in self.encoders]
            for j, p in enumerate(new):
                self._ids[p] = [i for ids in per_encoder for i in ids[j]]
        return torch.tensor([self._ids[p] for p in prompts], dtype=torch.long, device=self.device)

    def _split_ids(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return list(ids.split([e.max_length for e in self.encoders], dim=1))

    def word_length(self, word: str) -> int:
        """How many conditioning rows a word's tokens take (over the encoders whose hidden states are rows)."""
        return sum(len(e.word_ids(word)) for e in self._row_encoders())

    def _row_encoders(self) -> list[TextEncoder]:
        seen, out = set(), []
        for e in self.encoders:  # encoders sharing an offset (SDXL's two CLIPs side by side in D) count once
            if e.offset is not None and e.offset not in seen:
                seen.add(e.offset)
                out.append(e)
        return out

    def word_positions(self, ids: torch.Tensor, word: str) -> list[torch.Tensor | None]:
        """Per prompt (ids from `tokenize`), the conditioning rows of the word's tokens (None: the prompt lacks it)."""
        parts = dict(zip(map(id, self.encoders), self._split_ids(ids.cpu())))
        out = []
        for b in range(len(ids)):
            found = []
            for enc in self._row_encoders():
                row, wid = parts[id(enc)][b].tolist(), enc.word_ids(word)
                starts = [i for i in range(len(row) - len(wid) + 1) if row[i : i + len(wid)] == wid] if wid else []
                if not starts:
                    found = None
                    break
                found.append(torch.arange(starts[0], starts[0] + len(wid)) + enc.offset)
            out.append(torch.cat(found) if found else None)
        return out

    @contextlib.contextmanager
    def _injected(self, added: torch.Tensor | None):
        """Within the block, every encoder embeds the added placeholder tokens as its slice of `added` rows."""
        handles = []
        columns = self._split_tokens(added) if added is not None else [None] * len(self.encoders)
        for enc, cols in zip(self.encoders, columns):
            if not enc.added_ids:
                continue
            handles += _inject(enc.embedding, torch.tensor(enc.added_ids), cols)
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def encode_prompt(
        self,
        prompts: list[str] | torch.Tensor,
        added_embeddings: torch.Tensor | None = None,
        delta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The conditioning [B, L, D] of the prompts (see the module docstring).

        added_embeddings: [n_added, token_dim] rows for tokens added with `add_tokens` (in their order);
        delta: a prompt-embedding delta added to the conditioning (broadcast over the batch).
        """
        ids = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        with self._injected(added_embeddings):
            cond = self._encode(self._split_ids(ids.to(self.device)))
        return cond if delta is None else cond + delta.to(cond.dtype)

    def _encode(self, ids: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def pack(self, hidden: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """[B, L, D] hidden states and a [B, P] pooled vector -> [B, L + ceil(P / D), D] conditioning rows."""
        if pooled is None:
            return hidden
        B, _, D = hidden.shape
        rows = -(-pooled.shape[-1] // D)
        padded = torch.nn.functional.pad(pooled, (0, rows * D - pooled.shape[-1])).to(hidden.dtype)
        return torch.cat([hidden, padded.view(B, rows, D)], dim=1)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inverse of `pack`: (hidden states, pooled vector)."""
        if not self.pooled_dim:
            return cond, None
        rows = -(-self.pooled_dim // cond.shape[-1])
        return cond[:, :-rows], cond[:, -rows:].flatten(1)[:, : self.pooled_dim]

    # ------------------------------------------------------------------ images
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        size = self.denoiser.config.sample_size
        h = (height // self.vae_scale_factor) if height else size
        w = (width // self.vae_scale_factor) if width else size
        return (self.vae.config.latent_channels, h, w)

    @property
    def resolution(self) -> int:
        """The image side the generator samples at by default (latent side x VAE scale factor)."""
        return self.latent_shape()[-1] * self.vae_scale_factor

    def _latent_affine(self) -> tuple[float, float]:
        """(scale, shift): latents = (VAE latent - shift) * scale."""
        shift = getattr(self.vae.config, "shift_factor", None)
        return self.vae.config.scaling_factor, (shift or 0.0)

    def encode_images(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """[0, 1] RGB images -> scaled latents (the posterior mean unless `sample`)."""
        scale, shift = self._latent_affine()
        dist = self.vae.encode(images.to(self.device, self.dtype) * 2 - 1).latent_dist
        z = dist.sample() if sample else dist.mean
        return (z - shift) * scale if shift else z * scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> [0, 1] RGB images (differentiable)."""
        scale, shift = self._latent_affine()
        z = latents / scale + shift if shift else latents / scale
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1)

    def initial_latents(self, seeds: list[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
        """x_T for each seed: the same seed always gives the same noise, whatever the batch."""
        shape = self.latent_shape(height, width)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
            self.device, self.dtype
        )

    # ------------------------------------------------------------------ denoising
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                guidance_scale: float | None = None) -> torch.Tensor:
        """The denoiser's raw output for latents x at model time t under conditioning `cond` (one branch;
        guidance_scale is read only by distilled-guidance families)."""
        raise NotImplementedError

    def schedule(self, steps: int) -> sampling.Schedule:
        raise NotImplementedError

    def training_pair(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(noisy latents, model time, target) for the denoising loss at integer training times t in
        [0, num_train_timesteps): the noise (epsilon), the velocity (v_prediction) or eps - x0 (flow)."""
        sched = self.scheduler
        if self.prediction_type == "flow":
            sigma = (t.float() / sched.config.num_train_timesteps).view(-1, *[1] * (latents.ndim - 1)).to(latents)
            return (1 - sigma) * latents + sigma * noise, t.float(), noise - latents
        noisy = sched.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        return noisy, t, target

    def model_output(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        guidance: Guidance,
        i: int = 0,
        steps: int = 1,
        negative: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Guided model output; cond, uncond (and a subtractive negative) run as one batch. Distilled
        guidance (FLUX) is one conditional pass with the scale as a model input."""
        if self.distilled_guidance:
            return self.denoise(x, t, cond, guidance.scale_at(i, steps))
        if uncond is None or (guidance.scale == 1.0 and negative is None):  # w = 1 under every schedule
            return self.denoise(x, t, cond)
        branches = [cond, uncond] + ([negative] if negative is not None else [])
        out = self.denoise(torch.cat([x] * len(branches)), t, torch.cat(branches))
        parts = out.chunk(len(branches))
        return guidance.combine(parts[0], parts[1], i, steps, parts[2] if negative is not None else None)

    def sample(self, cond: torch.Tensor, latents: torch.Tensor, uncond: torch.Tensor | None = None, steps: int = 25,
               guidance: Guidance | None = None, grad: bool = False, checkpoint: bool = False, callback=None,
               negative: torch.Tensor | None = None) -> torch.Tensor:
        """From `latents` (x_T) to clean latents, guided by `cond` vs `uncond` conditionings."""
        guidance = guidance or Guidance()
        expand = lambda e: e.expand(cond.shape[0], -1, -1) if e is not None and e.shape[0] != cond.shape[0] else e
        uncond, negative = expand(uncond), expand(negative)
        fn = lambda x, t, i: self.model_output(x, t.to(self.device), cond, uncond, guidance, i, steps, negative)
        with torch.set_grad_enabled(grad):
            return sampling.sample(fn, latents, self.schedule(steps), checkpoint, callback)

    def guidance_embeddings(self, guidance: Guidance) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(uncond, negative) conditionings for a set of guidance knobs (None, None under distilled guidance)."""
        if self.distilled_guidance:
            if guidance.negative_prompt:
                raise ValueError(f"sampling.negative_prompt has no effect on the {self.family} family: its guidance "
                                 "is distilled (one conditional pass, no uncond branch); remove the negative prompt")
            return None, None
        if guidance.negative_mode == "uncond":
            return self.encode_prompt([guidance.negative_prompt]), None
        negative = self.encode_prompt([guidance.negative_prompt]) if guidance.subtracts_negative else None
        return self.encode_prompt([""]), negative

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int = 25,
        guidance: Guidance | None = None,
        added_embeddings: torch.Tensor | None = None,
        delta: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] for prompts[i] with seeds[i] (no gradients).

        delta: a prompt-embedding delta, [L, D] / [1, L, D] for all prompts or [N, L, D] per prompt."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate needs one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
        out = []
        with torch.no_grad():
            guidance = guidance or Guidance()
            uncond, negative = self.guidance_embeddings(guidance)
            for i in range(0, len(prompts), batch_size):
                p, s = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
                d = (
                    delta[i : i + batch_size]
                    if delta is not None and delta.ndim == 3 and len(delta) == len(prompts)
                    else delta
                )
                cond = self.encode_prompt(p, added_embeddings, d)
                x = self.initial_latents(s) if latents is None else latents[i : i + batch_size]
                tick = lambda *_, n=len(p): progress.advance(n / steps)  # the open phase's bar, per denoising step
                z = self.sample(cond, x, uncond, steps, guidance, negative=negative, callback=tick)
                out.append(self.decode_latents(z).float().cpu())
        return torch.cat(out)

    def invert(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None, steps: int = 25,
               guidance: Guidance | None = None) -> list[torch.Tensor]:
        """Inversion of clean latents (guidance 1 unless given): DDIM inversion, or the flow-ODE inversion for
        flow-matching families; see sampling.invert."""
        guidance = guidance or Guidance(scale=1.0)
        fn = lambda x, t, i: self.model_output(x, t.to(self.device), cond, uncond, guidance, i, steps)
        with torch.no_grad():
            return sampling.invert(fn, latents, self.schedule(steps))

    # ------------------------------------------------------------------ export
    def embedding_file(self, placeholder: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of an exported textual-inversion file for [n, token_dim] vectors: one key per text
        encoder (clip_l, clip_g, t5: the layout diffusers' SDXL load_textual_inversion examples read)."""
        return {e.name: v.contiguous() for e, v in zip(self.encoders, self._split_tokens(vectors))}


def _inject(emb: torch.nn.Embedding, added_ids: torch.Tensor, rows: torch.Tensor | None) -> list:
    """Hooks on an embedding table: ids in `added_ids` embed as the matching `rows` (nothing is resized)."""
    state: dict[str, torch.Tensor] = {}

    def pre(_mod, args):
        ids = args[0]
        hit = (ids.unsqueeze(-1) == added_ids.to(ids.device))
        state["hit"] = hit
        if bool(hit.any()) and rows is None:
            raise ValueError("the prompt uses added placeholder tokens but no learned embeddings were given")
        return (torch.where(hit.any(-1), torch.zeros_like(ids), ids),)

    def post(_mod, _args, out):
        hit = state.pop("hit")
        mask = hit.any(-1)
        if rows is None or not bool(mask.any()):
            return out
        if len(rows) < len(added_ids):
            raise ValueError(f"{len(added_ids)} placeholder tokens were added but only {len(rows)} learned "
                             "embeddings were given")
        picked = rows.to(out.device, out.dtype)[hit.float().argmax(-1)]
        return torch.where(mask.unsqueeze(-1), picked, out)

    return [emb.register_forward_pre_hook(pre), emb.register_forward_hook(post)]
