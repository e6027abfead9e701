"""FrozenGenerator: one adapter over diffusers' Stable Diffusion components.

It serves the embedded shapes generator and real SD 1.x/2.x checkpoints alike. Everything a
technique needs goes through it: prompt encoding with injected token embeddings and
embedding deltas, classifier-free-guided denoising (cond and uncond in one batch), a plain
DDIM loop with or without gradients, VAE encode/decode, and DDIM inversion. No parameter
of it ever requires grad, it stays in eval mode, and its fingerprint proves it unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from steerexp import progress
from steerexp.generators import sampling

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class GeneratorChangedError(RuntimeError):
    pass


SCHEDULES = ("constant", "interval", "weak_strong_weak")
NEGATIVE_MODES = ("uncond", "subtract")


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
_DTYPE_KWARG = "dtype" if 'pop("dtype"' in inspect.getsource(StableDiffusionPipeline.from_pretrained) else "torch_dtype"


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


class FrozenGenerator:
    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self.device, self.dtype = torch.device(device), dtype
        for m in self.modules:
            # loaded in `dtype` already (from_pretrained): only components handed over in another dtype are cast
            if any(p.dtype != dtype for p in m.parameters()):
                m.to(dtype=dtype)
            m.to(self.device).eval().requires_grad_(False)
        self.base_vocab_size = self.text_encoder.get_input_embeddings().num_embeddings
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.prediction_type = self.scheduler.config.prediction_type
        self._fingerprint = self.fingerprint()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", dtype: str = "fp32") -> "FrozenGenerator":
        """Load a StableDiffusionPipeline folder (or hub id) without its safety checker."""
        if dtype not in DTYPES:
            raise ValueError(f"generator.dtype must be one of {list(DTYPES)}, got {dtype!r}")
        dev = resolve_device(device)
        if dev.type == "cpu" and dtype == "fp16":
            raise ValueError("generator.dtype=fp16 does not run on the CPU; use dtype=fp32 (or bf16) or a CUDA device")
        path_str = str(path)
        local = Path(path_str).expanduser()
        looks_like_hub_id = path_str.count("/") == 1 and not path_str.startswith((".", "/", "~"))
        if not local.exists() and not looks_like_hub_id:
            raise FileNotFoundError(f"generator folder not found: {local}. Set generator.path to a Stable Diffusion "
                                    "pipeline folder (with model_index.json) or a hub id such as org/name")
        if local.exists() and not (local / "model_index.json").is_file():
            raise FileNotFoundError(f"{local} is not a diffusers pipeline folder: model_index.json is missing")
        try:
            with _no_loading_bars():
                pipe = StableDiffusionPipeline.from_pretrained(
                    str(local) if local.exists() else path_str, **{_DTYPE_KWARG: DTYPES[dtype]},
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        except OSError as err:
            raise FileNotFoundError(f"could not load the generator from {path_str!r} (no local folder, and the hub "
                                    f"is unreachable or has no such model): {err}") from err
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler, dev, DTYPES[dtype])

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.unet, self.vae]

    # ------------------------------------------------------------------ freezing
    def fingerprint(self) -> str:
        """SHA-256 over every parameter and buffer of the text encoder, UNet and VAE."""
        h = hashlib.sha256()
        for name, module in zip(("text_encoder", "unet", "vae"), self.modules):
            for key, t in sorted(module.state_dict().items()):
                h.update(f"{name}.{key}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
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
    def embed_dim(self) -> int:
        return self.text_encoder.get_input_embeddings().embedding_dim

    def token_embedding(self, token_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Rows of the frozen vocabulary (a copy)."""
        return (
            self.text_encoder.get_input_embeddings()
            .weight[torch.as_tensor(token_ids, device=self.device)]
            .detach()
            .clone()
        )

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add placeholder tokens to the tokenizer (the frozen embedding table is not resized)."""
        vocab = self.tokenizer.get_vocab()
        for tok in tokens:
            if tok in vocab or f"{tok}</w>" in vocab or tok.lower() + "</w>" in vocab:
                raise ValueError(
                    f"placeholder token {tok!r} is already in the tokenizer's vocabulary; choose a "
                    f"string the vocabulary lacks, such as '<{tok.strip('<>')}-new>'"
                )
        self.tokenizer.add_tokens(list(tokens))
        return self.tokenizer.convert_tokens_to_ids(list(tokens))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, max length], cached per prompt (and per vocabulary size: added tokens start afresh):
        training asks for the same few prompts at every step, and tokenizing them again cost ~15% of a
        textual-inversion step on the shapes generator."""
        size = len(self.tokenizer)
        if getattr(self, "_ids_vocab", None) != size or len(self._ids) > 10_000:
            self._ids, self._ids_vocab = {}, size
        new = [p for p in dict.fromkeys(prompts) if p not in self._ids]
        if new:
            ids = self.tokenizer(new, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True).input_ids
            self._ids.update(zip(new, ids))
        return torch.tensor([self._ids[p] for p in prompts], dtype=torch.long, device=self.device)

    @contextlib.contextmanager
    def _injected(self, added: torch.Tensor | None):
        """Within the block, token ids past the frozen vocabulary embed as rows of `added`."""
        emb = self.text_encoder.get_input_embeddings()
        vocab = self.base_vocab_size
        state: dict[str, torch.Tensor] = {}

        def pre(_mod, args):
            ids = args[0]
            state["ids"] = ids
            if int(ids.max()) >= vocab and added is None:
                raise ValueError("the prompt uses added placeholder tokens but no learned embeddings were given")
            return (ids.clamp(max=vocab - 1),)

        def post(_mod, _args, out):
            ids = state["ids"]
            mask = ids >= vocab
            if added is None or not bool(mask.any()):
                return out
            if int(ids.max()) - vocab >= len(added):
                raise ValueError(f"token id {int(ids.max())} has no learned embedding (only {len(added)} given)")
            rows = added.to(out.dtype)[(ids - vocab).clamp(min=0)]
            return torch.where(mask.unsqueeze(-1), rows, out)

        handles = [emb.register_forward_pre_hook(pre), emb.register_forward_hook(post)]
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
        """Text-encoder hidden states [B, L, D] of the prompts.

        added_embeddings: [n_added, D] rows for tokens added with `add_tokens` (in id order);
        delta: a prompt-embedding delta added to the output (broadcast over the batch).
        """
        ids = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        with self._injected(added_embeddings):
            hidden = self.text_encoder(ids)[0]
        return hidden if delta is None else hidden + delta.to(hidden.dtype)

    # ------------------------------------------------------------------ images
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h = (height // self.vae_scale_factor) if height else size
        w = (width // self.vae_scale_factor) if width else size
        return (self.unet.config.in_channels, h, w)

    @property
    def resolution(self) -> int:
        """The image side the generator samples at by default (latent side x VAE scale factor)."""
        return self.latent_shape()[-1] * self.vae_scale_factor

    def encode_images(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """[0, 1] RGB images -> scaled latents (the posterior mean unless `sample`)."""
        dist = self.vae.encode(images.to(self.device, self.dtype) * 2 - 1).latent_dist
        return (dist.sample() if sample else dist.mean) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> [0, 1] RGB images (differentiable)."""
        return ((self.vae.decode(latents / self.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)

    def initial_latents(self, seeds: list[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
        """x_T for each seed: the same seed always gives the same noise, whatever the batch."""
        shape = self.latent_shape(height, width)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
            self.device, self.dtype
        )

    # ------------------------------------------------------------------ denoising
    def unet_output(
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
        """Guided model output; cond, uncond (and a subtractive negative) run as one batch."""
        if uncond is None or (guidance.scale == 1.0 and negative is None):  # w = 1 under every schedule
            return self.unet(x, t, cond).sample
        branches = [cond, uncond] + ([negative] if negative is not None else [])
        out = self.unet(torch.cat([x] * len(branches)), t, torch.cat(branches)).sample
        parts = out.chunk(len(branches))
        return guidance.combine(parts[0], parts[1], i, steps, parts[2] if negative is not None else None)

    def schedule(self, steps: int) -> sampling.Schedule:
        return sampling.Schedule.from_scheduler(self.scheduler, steps)

    def sample(self, cond: torch.Tensor, latents: torch.Tensor, uncond: torch.Tensor | None = None, steps: int = 25,
               guidance: Guidance | None = None, grad: bool = False, checkpoint: bool = False, callback=None,
               negative: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM from `latents` (x_T) to clean latents, guided by `cond` vs `uncond` embeddings."""
        guidance = guidance or Guidance()
        expand = lambda e: e.expand(cond.shape[0], -1, -1) if e is not None and e.shape[0] != cond.shape[0] else e
        uncond, negative = expand(uncond), expand(negative)
        schedule = self.schedule(steps)
        fn = lambda x, t, i: self.unet_output(x, t.to(self.device), cond, uncond, guidance, i, steps, negative)
        with torch.set_grad_enabled(grad):
            return sampling.ddim_sample(fn, latents, schedule, self.prediction_type, checkpoint, callback)

    def guidance_embeddings(self, guidance: Guidance) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(uncond, negative) embeddings for a set of guidance knobs."""
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
        """DDIM inversion of clean latents (guidance 1 unless given); see sampling.ddim_invert."""
        guidance = guidance or Guidance(scale=1.0)
        fn = lambda x, t, i: self.unet_output(x, t.to(self.device), cond, uncond, guidance, i, steps)
        with torch.no_grad():
            return sampling.ddim_invert(fn, latents, self.schedule(steps), self.prediction_type)
