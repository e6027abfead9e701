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
- VAE encode/decode; the unchanged-proof. No parameter ever requires grad, every module stays in eval mode,
  and a proof taken at load and at the end of the run shows the weights unchanged (`proof_record`: fast, each
  tensor's identity and version counter plus a checksum on its device; or full, SHA-256 of every byte).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from steerexp import guiders, progress
from steerexp.generators import PROOFS, sampling  # PROOFS: generator.proof's values (checks.py refuses others)
from steerexp.techniques.guidance_spec import NEGATIVE_MODES, SCHEDULES  # the guidance settings' values (torch-free)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class GeneratorChangedError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- the unchanged-proof's pieces
CHUNK = 4096  # int32 words per chunk of the fast proof's checksum
# what each entry of a proof record holds (FrozenGenerator.proof_record), to say what changed
_PROOF_FIELDS = {
    "fast": ("data_ptr", "storage_offset", "shape", "stride", "dtype", "device", "requires_grad", "version",
             "checksum"),
    "full": ("shape", "dtype", "requires_grad", "sha256"),
}


def _words(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor's bytes, on its device, as (int32 words, the last 0-3 bytes as int32): views where it is contiguous."""
    flat = t.detach()
    flat = (flat if flat.is_contiguous() else flat.contiguous()).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    raw = flat.view(torch.uint8) if flat.element_size() != 4 else None
    if raw is None:
        return flat.view(torch.int32), flat.new_zeros(0, dtype=torch.int32)
    n = raw.numel() // 4 * 4
    try:
        return raw[:n].view(torch.int32), raw[n:].to(torch.int32)
    except RuntimeError:  # a 1- or 2-byte tensor starting mid-word in a shared storage: a copy, on its device
        raw = raw.clone()
        return raw[:n].view(torch.int32), raw[n:].to(torch.int32)


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """[2] int64 on the tensor's device: the sum of its int32 words' per-chunk sums (each wrapping mod 2**32)
    and those chunk sums weighted by 1 + the chunk's index (FrozenGenerator.proof_record)."""
    words, tail = _words(t)
    full = words.numel() // CHUNK * CHUNK
    chunks = words[:full].view(-1, CHUNK).sum(1, dtype=torch.int32)  # wraps; exact whatever the reduction order
    rest = words[full:].sum(dtype=torch.int32) + tail.sum(dtype=torch.int32)
    chunks = torch.cat([chunks, rest.reshape(1)]).to(torch.int64)
    weights = torch.arange(1, len(chunks) + 1, device=chunks.device, dtype=torch.int64)
    return torch.stack([chunks.sum(), (chunks * weights).sum()])


def _sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (the full proof: copied to the host first when it is on another device)."""
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


@dataclass
class Guidance:
    """Classifier-free guidance knobs shared by every technique's sampling.

    scale            CFG weight w (1 = no guidance)
    rescale          guidance rescale phi (0 = off): match the guided prediction's std to the cond one
    schedule         constant | interval (w inside [interval_start, interval_end) of the steps, 1 outside)
                     | weak_strong_weak (1 at both ends, w in the middle, a sine bump)
    negative_prompt  with negative_mode=uncond it replaces the empty prompt as the uncond branch;
                     with negative_mode=subtract it is an extra term -negative_weight * (eps_neg - eps_uncond)
    guider           None: the project's CFG above; else a diffusers guider (diffusers.guiders, the `guider` config
                     group) combines cond and uncond instead, at `scale` (steerexp/guiders.py)
    """
    scale: float = 7.5
    rescale: float = 0.0
    schedule: str = "constant"
    interval_start: float = 0.0
    interval_end: float = 1.0
    negative_prompt: str = ""
    negative_mode: str = "uncond"
    negative_weight: float = 1.0
    guider: Any = field(default=None, compare=False)

    def __post_init__(self):
        if self.guider is not None:  # the guider does the combining: the project's own knobs have no place in it
            if self.rescale or self.schedule != "constant" or self.subtracts_negative:
                raise ValueError("guidance rescale, schedule and a subtracted negative prompt act inside the "
                                 "project's CFG; with a guider use its own guidance_rescale and start/stop")
            self.guider = guiders.with_scale(self.guider, self.scale)
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
        if self.guider is not None:
            return guiders.combine(self.guider, cond, uncond, i, steps)
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
            if local.exists():  # components a local folder borrows from a sibling (shared.json), loaded from there
                kwargs = {**borrowed_components(local, dtype, skip=set(kwargs)), **kwargs}
            return cls.from_pretrained(str(local) if local.exists() else path_str, **{_DTYPE_KWARG: DTYPES[dtype]},
                                       **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"could not load the generator from {path_str!r} (no local folder, and the hub "
                                f"is unreachable or has no such model): {err}") from err


def borrowed_components(folder: str | Path, dtype: str = "fp32", skip: set | frozenset = frozenset()) -> dict:
    """The components a local pipeline folder borrows (generators.shared_components), each loaded from the
    sibling's folder with its class from model_index.json and its config overrides, as from_pretrained kwargs."""
    from steerexp.generators import pipeline_index, shared_components

    borrowed = shared_components(folder)
    if not borrowed:
        return {}
    index, out = pipeline_index(folder), {}
    for name, (where, overrides) in borrowed.items():
        if name in skip:
            continue
        cls = component_class(index, name, folder)
        model = {_DTYPE_KWARG: DTYPES[dtype], "use_safetensors": True} if issubclass(cls, torch.nn.Module) else {}
        out[name] = cls.from_pretrained(str(where), **overrides, **model)
    return out


def component_class(index: dict, name: str, folder) -> type:
    """The class model_index.json names for component `name`: from diffusers or transformers only (a folder cannot
    make the loader import another module). ValueError names what is wrong."""
    from steerexp.generators import LIBRARIES

    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[0] not in LIBRARIES:
        raise ValueError(f"{folder}/model_index.json: component {name!r} must name a class of "
                         f"{' or '.join(LIBRARIES)}, got {entry!r}")
    cls = getattr(importlib.import_module(entry[0]), str(entry[1]), None)
    if not isinstance(cls, type):
        raise ValueError(f"{folder}/model_index.json: {entry[0]} has no class {entry[1]!r} (component {name!r})")
    return cls


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
    attention_blocks: str | None = None  # the denoiser's stack of transformer blocks a hooked guider perturbs (PAG)

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
        self._loaded = self.proof_record()  # the load-time record every later proof compares with

    @classmethod
    def from_pretrained(cls, path, device: str = "auto", dtype: str = "fp32", height: int | None = None,
                        width: int | None = None) -> "FrozenGenerator":
        """The generator of a pipeline folder or hub id, of the family its model_index.json names."""
        from steerexp.generators import from_pretrained

        return from_pretrained(path, device, dtype, height, width)

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
    # How the run proves the weights unchanged (generator.proof; set_proof): "fast" or "full" (proof_record says
    # what each compares, catches and misses).
    proof = "fast"

    def set_proof(self, proof: str) -> "FrozenGenerator":
        """Prove the weights unchanged with `proof` ("fast" or "full") from now on. The load-time record is taken
        anew with it, so call it right after loading (load_generator does)."""
        if proof not in PROOFS:
            raise ValueError(f"generator.proof must be one of {', '.join(PROOFS)}, got {proof!r}")
        self.proof = proof
        self._loaded = self.proof_record()
        return self

    def frozen_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) for every parameter and persistent buffer of the text encoders, the denoiser and the VAE,
        as the modules hold them (state_dict(keep_vars=True): the Parameter objects, not detached copies)."""
        return [(f"{name}.{key}", t) for name, module in self.named_modules
                for key, t in module.state_dict(keep_vars=True).items()]

    def proof_record(self, proof: str | None = None) -> dict[str, tuple]:
        """What the proof compares, per frozen tensor (frozen_tensors), with the load-time record.

        fast (the default): each tensor's identity and a checksum computed on its device. No weight leaves the
          device: two int64 per tensor come back, in one transfer per device. At SD 1.5 scale (1.07 B fp32
          parameters, 4.3 GB) it reads the weights once, in place, on one CPU thread (benchmarks/fixed_cost.py,
          README).
          - identity: data_ptr (the memory the tensor reads), storage offset, shape, strides, dtype, device,
            requires_grad, and the version counter `_version`, which every in-place op on the tensor or on
            a view of it bumps: autograd-tracked ops, ops under torch.no_grad(), copy_, load_state_dict, optimiser
            steps, `p.detach().add_()`.
          - checksum: the tensor's bytes read as int32 words (the last 1-3 bytes of an odd-sized tensor as
            bytes), summed per chunk of CHUNK words with wrap-around; kept: the sum of the chunk sums and their
            sum weighted by the chunk's index. Integer sums do not depend on the order of the reduction, so the same
            bytes give the same checksum with any thread count or device (a float32 or float64 sum changes in its
            last bits between 1 and 2 CPU threads, and the run sets its thread count after loading).
          Caught: any in-place write that bumps `_version`; a replaced tensor (`module.weight = Parameter(...)`,
          `p.data = t`, `.to()`/`.half()`: new data_ptr, dtype or device); a requires_grad flip. Writes that
          bypass the version counter (through `p.data`, whose in-place ops do not bump `p._version`; a numpy or
          DLPack view; a raw pointer or a kernel of one's own) are caught only by the checksum: any change
          within one chunk changes that chunk's sum unless its words' changes cancel mod 2**32 (one changed
          word always shows), and changes in several chunks are caught unless both sums cancel too.
          Missed: a write that bypasses `_version` and keeps both sums, e.g. two words swapped within one chunk,
          or changes made to cancel.
        full (generator.proof=full, for audited runs): each tensor's SHA-256 over its bytes (copied to the host:
          on a GPU every weight crosses to the CPU; ~2.4 s of hashing per 4.3 GB on this CPU, at load and at
          the end) with its shape, dtype and requires_grad. Caught: any change of any value, whatever wrote it
          (up to SHA-256 collisions). Missed: a tensor replaced by another with the same values, dtype and
          shape (the results cannot tell either apart).
        Either way `unchanged` also needs is_frozen: no parameter requires grad, every module in eval mode."""
        proof = proof or self.proof
        tensors = self.frozen_tensors()
        if proof == "full":
            return {name: (tuple(t.shape), str(t.dtype), t.requires_grad, _sha256(t)) for name, t in tensors}
        if proof != "fast":
            raise ValueError(f"generator.proof must be one of {', '.join(PROOFS)}, got {proof!r}")
        sums: dict[torch.device, list[torch.Tensor]] = {}
        threads = torch.get_num_threads()
        # memory-bound sums: on the CPU one thread reads as fast, and never waits for a core another process holds
        # (SD 1.5, shared 2-core machine: 0.20-0.51 s on 1 thread, 2.2-3.3 s on 2; README, benchmarks/fixed_cost.py)
        torch.set_num_threads(1)
        try:
            for _, t in tensors:
                sums.setdefault(t.device, []).append(_checksum(t))
            host = {dev: iter(torch.stack(s).tolist()) for dev, s in sums.items()}  # one transfer per device
        finally:
            torch.set_num_threads(threads)
        record = {}
        for name, t in tensors:
            try:
                version = t._version
            except RuntimeError:  # an inference tensor has no version counter (the checksum still reads it)
                version = None
            record[name] = (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), str(t.dtype),
                            str(t.device), t.requires_grad, version, tuple(next(host[t.device])))
        return record

    def fingerprint(self, proof: str | None = None) -> str:
        """A digest of proof_record: equal strings, same record ("fast:<hex>" or "full:<hex>"). The fast one also
        changes when a tensor moves in memory, so compare it only within one process."""
        proof = proof or self.proof
        digest = hashlib.sha256(repr(sorted(self.proof_record(proof).items())).encode()).hexdigest()
        return f"{proof}:{digest}"

    def is_frozen(self) -> bool:
        frozen = all(not p.requires_grad for m in self.modules for p in m.parameters())
        return frozen and not any(m.training for m in self.modules)

    def changes(self) -> list[str]:
        """What differs from load time, one line each (empty: unchanged): modules in training mode, parameters
        requiring grad, and every frozen tensor whose proof record (proof_record) differs, with what differs."""
        out = [f"{name} is in training mode" for name, m in self.named_modules if m.training]
        now = self.proof_record()
        fields = _PROOF_FIELDS[self.proof]
        proven = []
        for name in sorted(set(now) | set(self._loaded)):
            before, after = self._loaded.get(name), now.get(name)
            if before is None or after is None:
                proven.append(f"{name} {'appeared' if before is None else 'is gone'}")
            elif before != after:
                what = [f"{f} {b} -> {a}" if f not in ("checksum", "sha256") else f"{f} differs"
                        for f, b, a in zip(fields, before, after) if b != a]
                proven.append(f"{name}: {', '.join(what)}")
        named = {line.split(":")[0] for line in proven}   # a flip the proof reports is not reported twice
        out += [f"{name}.{key} requires grad" for name, m in self.named_modules
                for key, p in m.named_parameters() if p.requires_grad and f"{name}.{key}" not in named]
        return out + proven

    def unchanged(self) -> bool:
        """True when every frozen tensor passes the proof (proof_record) against load time and nothing requires
        grad or trains."""
        return not self.changes()

    def assert_unchanged(self, changes: list[str] | None = None) -> None:
        """Raise GeneratorChangedError naming what changed (`changes`: a changes() already taken, not taken again)."""
        changes = self.changes() if changes is None else changes
        if changes:
            more = f"; and {len(changes) - 3} more" if len(changes) > 3 else ""
            raise GeneratorChangedError(
                f"the frozen generator changed during the run ({self.proof} proof, generator.proof): "
                f"{'; '.join(changes[:3])}{more}. A technique must only learn input deltas"
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

        added_embeddings: [n_added, token_dim] rows for tokens added with `add_tokens` (in their order), or
        [B, n_added, token_dim]: one table per prompt (per-layer / per-timestep tokens: techniques/xti.py, neti.py);
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
    # the run's image size in pixels (generator.height / width, set by set_size; None: the model's default side)
    height: int | None = None
    width: int | None = None
    latent_patch = 1  # the denoiser reads latent_patch x latent_patch patches of the latent (a UNet: 1)

    @property
    def size_multiple(self) -> int:
        """Every image side is divisible by this: the VAE's scale factor times the denoiser's latent patch side."""
        return self.vae_scale_factor * self.latent_patch

    def max_side(self) -> int | None:
        """The largest image side the denoiser can take (None: no limit of its own)."""
        return None

    def size_rule(self):
        """The sizes this generator samples at (checks.SizeRule, the rule the config check reads from a folder):
        sides divisible by size_multiple, at most max_side(), or MAX_SIZE_FACTOR x the default side."""
        from steerexp.generators.checks import MAX_SIZE_FACTOR, SizeRule

        f, p = self.vae_scale_factor, self.latent_patch
        saved, (self.height, self.width) = (self.height, self.width), (None, None)
        try:
            _, h, w = self.latent_shape()  # the model's default side
        finally:
            self.height, self.width = saved
        default = (h * f, w * f)
        why = f"the VAE's scale factor {f} x the denoiser's {p}x{p} latent patches"
        top = self.max_side()
        if top is None:
            return SizeRule(self.family, f, self.size_multiple, why, default, MAX_SIZE_FACTOR * max(default),
                            f"{MAX_SIZE_FACTOR}x its default side; steerexp's limit")
        return SizeRule(self.family, f, self.size_multiple, why, default, top, "the denoiser's position embedding")

    def set_size(self, height: int | None = None, width: int | None = None) -> "FrozenGenerator":
        """Sample, invert and train at height x width pixels from now on (None: the model's default side), by the
        same rule the config check applies before loading (checks.check_size)."""
        from steerexp.errors import ConfigError

        rule = self.size_rule()
        for key, v in (("height", height), ("width", width)):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"generator.{key}", f"must be a positive whole number of pixels or null, got {v!r}",
                                  f"set generator.{key}=null or e.g. generator.{key}=512")
            why = rule.problem(v)
            if why:
                raise ConfigError(f"generator.{key}", why[0], why[1].replace("KEY", f"generator.{key}"))
        self.height, self.width = height, width
        return self

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a height x width image (default: the run's size, set_size)."""
        size = self.denoiser.config.sample_size
        height, width = height or self.height, width or self.width
        h = (height // self.vae_scale_factor) if height else size
        w = (width // self.vae_scale_factor) if width else size
        return (self.vae.config.latent_channels, h, w)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the run's images: what it samples, inverts and trains at, and what image
        files and target folders are fitted to (generator.height / width; null: the model's default)."""
        _, h, w = self.latent_shape()
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def resolution(self) -> int:
        """The image side of a square run; a non-square run raises (read image_size, (height, width), instead)."""
        h, w = self.image_size
        if h != w:
            raise ValueError(f"this run's images are {h}x{w} (height x width), not square: read the generator's "
                             "image_size instead of its resolution")
        return h

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

    def denoise_by(self, module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """`denoise` with another denoiser of the same architecture in place of the generator's (autoguidance's weak
        model, guiders.weak_output), the generator's own put back whatever happens."""
        own = self.denoiser
        self.denoiser = module
        try:
            return self.denoise(x, t, cond)
        finally:
            self.denoiser = own

    def schedule(self, steps: int, height: int | None = None, width: int | None = None) -> sampling.Schedule:
        raise NotImplementedError

    def schedule_for(self, steps: int, latents: torch.Tensor) -> sampling.Schedule:
        """The schedule to sample or invert these latents with: a family whose schedule depends on the image size
        (SD3 and FLUX with dynamic shifting) takes it from the latents' size; the others ignore it."""
        f = self.vae_scale_factor
        return self.schedule(steps, latents.shape[-2] * f, latents.shape[-1] * f)

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
            if guidance.guider is not None:
                raise ValueError(f"guider: the {self.family} family's guidance is distilled (one conditional pass, no "
                                 "unconditional branch) and a guider combines cond and uncond; drop the guider")
            return self.denoise(x, t, cond, guidance.scale_at(i, steps))
        if guidance.guider is not None:  # diffusers' guider combines the branches (steerexp/guiders.py)
            return guiders.model_output(guidance.guider, lambda xs, cs: self.denoise(xs, t, cs), x, cond, uncond,
                                        i, steps, t, self.denoiser, self.attention_blocks,
                                        lambda module, xs, cs: self.denoise_by(module, xs, t, cs))
        if uncond is None or (guidance.scale == 1.0 and negative is None):  # w = 1 under every schedule
            return self.denoise(x, t, cond)
        branches = [cond, uncond] + ([negative] if negative is not None else [])
        out = self.denoise(torch.cat([x] * len(branches)), t, torch.cat(branches))
        parts = out.chunk(len(branches))
        return guidance.combine(parts[0], parts[1], i, steps, parts[2] if negative is not None else None)

    def sample(self, cond: torch.Tensor, latents: torch.Tensor, uncond: torch.Tensor | None = None, steps: int = 25,
               guidance: Guidance | None = None, grad: bool = False, checkpoint: bool = False, callback=None,
               negative: torch.Tensor | None = None) -> torch.Tensor:
        """From `latents` (x_T) to clean latents, guided by `cond` vs `uncond` conditionings.

        cond may also be a callable (t, i) -> conditioning [B, L, D], evaluated at every step (model time t, step
        index i): a conditioning that depends on the timestep (NeTI, techniques/neti.py)."""
        guidance = guidance or Guidance()
        batch = len(latents) if callable(cond) else cond.shape[0]
        expand = lambda e: e.expand(batch, -1, -1) if e is not None and e.shape[0] != batch else e
        uncond, negative = expand(uncond), expand(negative)
        at = cond if callable(cond) else (lambda t, i: cond)
        fn = lambda x, t, i: self.model_output(x, t.to(self.device), at(t, i), uncond, guidance, i, steps, negative)
        with torch.set_grad_enabled(grad):
            return sampling.sample(fn, latents, self.schedule_for(steps, latents), checkpoint, callback)

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
            return sampling.invert(fn, latents, self.schedule_for(steps, latents))

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
        if rows.shape[-2] < len(added_ids):
            raise ValueError(f"{len(added_ids)} placeholder tokens were added but only {rows.shape[-2]} learned "
                             "embeddings were given")
        index = hit.float().argmax(-1)
        if rows.ndim == 3:  # one table per prompt ([B, n_added, width]: encode_prompt's per-prompt rows)
            picked = rows.to(out.device, out.dtype)[torch.arange(len(index), device=out.device)[:, None], index]
        else:
            picked = rows.to(out.device, out.dtype)[index]
        return torch.where(mask.unsqueeze(-1), picked, out)

    return [emb.register_forward_pre_hook(pre), emb.register_forward_hook(post)]
