"""Textual inversion (Gal et al. 2022): learn new token embeddings v* for a concept shown by
a few target images, with the generator frozen.

Only the new rows are parameters: `embeddings` [num_vectors, D] is the sole nn.Parameter,
so no optimizer state or weight decay ever touches the frozen vocabulary. The placeholder
is added to the tokenizer as in diffusers (num_vectors > 1 adds "<v*>", "<v*>_1", ...), the
targets' VAE latents are computed once (with their flipped copies when augmenting; up front, or each when a
step first draws it: `encode_targets`), and the
loss is the denoising MSE of the frozen UNet with the prompt "a photo of a <v*>"-style.
With `captioned` (world targets only), each target's training prompts also say its colour,
size and position ("a small red <v*> on the left"), so the token need only carry the shape.

Export: learned_embeds.safetensors, which `StableDiffusionPipeline.load_textual_inversion`
reads, so the token works in plain diffusers.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import save_file
import numpy as np
from torch import nn

from steerexp.generators import FrozenGenerator
from steerexp.objectives.denoising import Denoising
from steerexp.targets import load_targets
from steerexp.spec import check_settings
from steerexp.techniques.textual_inversion_spec import EAGER_MAX_SIDE, TextualInversionSpec
from steerexp.techniques.trainable import Trainable
from steerexp.worlds.shapes import world

# Prompt templates of Gal et al. (object and style), and short ones in the shapes world's idiom.
TEMPLATES = {
    "object": [
        "a photo of a {}",
        "a rendering of a {}",
        "a cropped photo of the {}",
        "the photo of a {}",
        "a photo of a clean {}",
        "a dark photo of the {}",
        "a photo of my {}",
        "a close-up photo of a {}",
        "a bright photo of the {}",
        "a photo of the {}",
        "a good photo of the {}",
        "a photo of one {}",
        "a rendition of the {}",
        "a photo of a nice {}",
        "a photo of the small {}",
        "a photo of the large {}",
    ],
    "style": [
        "a painting in the style of {}",
        "a rendering in the style of {}",
        "a cropped painting in the style of {}",
        "the painting in the style of {}",
        "a clean painting in the style of {}",
        "a dark painting in the style of {}",
        "a picture in the style of {}",
        "a close-up painting in the style of {}",
        "a bright painting in the style of {}",
        "a good painting in the style of {}",
        "a rendition in the style of {}",
        "a large painting in the style of {}",
    ],
    "shapes": ["a photo of a {}", "a picture of a {}", "a {}", "a photo of the {}"],
}


class TextualInversion(Trainable):
    def __init__(
        self,
        generator: FrozenGenerator,
        objective: Denoising | None = None,
        placeholder: str = "<v*>",
        num_vectors: int = 1,
        initializer: str = "object",
        slot_word: str = "star",
        templates: str | list[str] = "shapes",
        targets: dict | None = None,
        flip: bool = False,
        crop: bool = False,
        captioned: bool = True,
        encode_targets: str = "auto",
        seed: int = 0,
        **kwargs,
    ):
        check_settings(TextualInversionSpec, locals() | kwargs)
        super().__init__(generator, **kwargs)
        if isinstance(templates, str):
            templates = TEMPLATES[templates]
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("technique.templates must be a non-empty list of prompts that each contain '{}'")
        self.objective = objective or Denoising()
        self.placeholder, self.num_vectors, self.initializer = placeholder, num_vectors, initializer
        self.slot_word, self.templates = slot_word, list(templates)  # slot_word: the baseline's class name
        self.strength = 1.0  # generate with v_init + strength * (v* - v_init): 0 is the initializer word, 1 the token
        self.targets_cfg = dict(folder=None, k=6, shape="star", seed=0) | dict(targets or {})
        self.flip, self.crop, self.captioned, self.seed = flip, crop, captioned, seed
        self.encode_targets = encode_targets
        self.target_templates: list[list[str]] | None = None
        self.tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]
        d = generator.token_dim  # every text encoder's row side by side (SDXL: CLIP-L then CLIP-G)
        self.embeddings = nn.Parameter(torch.zeros(num_vectors, d))
        self.register_buffer("initial", torch.zeros(num_vectors, d))
        self.token_ids: list[int] = []
        self.latents: torch.Tensor | None = None       # every target's latent (eager encoding)
        self.pixels: torch.Tensor | None = None        # the targets with their crops / flips (lazy encoding)
        self.encoded: dict[int, torch.Tensor] = {}     # lazy encoding: the latents encoded so far, by target
        self.target_images: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        gen = self.generator
        init = gen.initializer_embedding(self.initializer)  # raises if the word is not one token
        size = gen.image_size  # (height, width): the run's generator.height / width
        tc = self.targets_cfg
        self.target_images, described = load_targets(tc["folder"], tc["k"], tc["shape"], tc["seed"], size,
                                                     self.image_policy)
        if self.captioned and not tc["folder"]:
            # world targets come with their scenes: describe what the token need not encode
            rng = np.random.default_rng(self.seed)
            self.target_templates = [[world.caption(sc, rng, shape_word="{}") for _ in range(8)] for sc in described]
        self.token_ids = gen.add_tokens(self.tokens)
        with torch.no_grad():
            init = init.expand(self.num_vectors, -1)
            self.initial.copy_(init)
            self.start_from(init)
            images = self.target_images
            if self.crop:  # 10% zoom-in crops, resized back
                h, w = images.shape[-2:]
                mh, mw = max(1, h // 10), max(1, w // 10)
                crops = torch.nn.functional.interpolate(
                    images[..., mh : h - mh, mw : w - mw], size=(h, w), mode="bilinear", antialias=True,
                    align_corners=False,
                )
                images = torch.cat([images, crops])
            if self.flip:
                images = torch.cat([images, images.flip(-1)])
            self.pixels, self.encoded = images, {}
            side = max(images.shape[-2:])
            if self.encode_targets == "eager" or (self.encode_targets == "auto" and side <= EAGER_MAX_SIDE):
                self.latents = gen.encode_images(images).float().cpu()  # computed once, all together

    def start_from(self, init: torch.Tensor) -> None:
        """Set the learned deltas to their start, the initializer word's embedding [num_vectors, token_dim]
        (per-layer tokens, techniques/xti.py, broadcast it; NeTI's mapper starts from its own init instead)."""
        self.embeddings.copy_(init)

    def train_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(len(self.pixels), (self.steps * self.batch_size,), generator=g)

    def target_latents(self, idx: torch.Tensor) -> torch.Tensor:
        """The latents of targets `idx`: eager, from the table prepare() encoded; lazy, each target encoded alone the
        first time a step draws it (so its latent does not depend on which targets shared its batch)."""
        if self.latents is not None:
            return self.latents[idx]
        with torch.no_grad():
            for i in dict.fromkeys(idx.tolist()):
                if i not in self.encoded:
                    self.encoded[i] = self.generator.encode_images(self.pixels[i : i + 1]).float().cpu()[0]
        return torch.stack([self.encoded[i] for i in idx.tolist()])

    def structure(self) -> dict:
        return {"num_vectors": self.num_vectors}

    # ------------------------------------------------------------------ prompts
    def fill(self, template: str, edited: bool = False) -> str:
        """'{}' is the learned token(s) in the edit, the class name (`slot_word`) in the baseline."""
        return template.replace("{}", " ".join(self.tokens) if edited else self.slot_word)

    def added_embeddings(self, strength: float = 1.0) -> torch.Tensor:
        """The table of every added token's embedding, in id order (rows for our tokens only)."""
        gen = self.generator
        vectors = self.embeddings if strength == 1.0 else self.initial + strength * (self.embeddings - self.initial)
        rows = torch.tensor(self.token_ids, device=self.embeddings.device)
        table = torch.zeros(len(gen.added_tokens), gen.token_dim, device=self.embeddings.device,
                            dtype=self.embeddings.dtype)
        return table.index_copy(0, rows, vectors)

    # ------------------------------------------------------------------ training
    def training_loss(self, batch) -> torch.Tensor:
        idx, rows = batch[0], (batch[1] if len(batch) > 1 else None)  # rows: a split step (Trainable.batch_at)
        start, stop, full = rows or (0, len(idx), len(idx))
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.global_step))
        which = torch.randint(1 << 30, (full,), generator=rng)[start:stop].tolist()
        k = len(self.target_images)
        pools = [self.target_templates[i % k] if self.target_templates else self.templates for i in idx.tolist()]
        prompts = [self.fill(pool[w % len(pool)], edited=True) for pool, w in zip(pools, which)]
        gen = self.generator
        cond = self.training_cond(prompts)
        from steerexp.objectives.composite import ObjectiveInputs

        # the denoising path (+ the learned offsets v* - v_init, which delta_l2 penalises)
        inputs = ObjectiveInputs(
            generator=gen,
            latents=self.target_latents(idx).to(gen.device, gen.dtype),
            cond=cond,
            rng=rng,
            deltas=self.budgeted(),
            rows=rows,
        )
        with self.layer_control():
            loss = self.objective(inputs)
        if self._trainer is not None:
            self.log_dict({f"train/{k}": v for k, v in getattr(self.objective, "last", {}).items()})
        return loss

    def training_cond(self, prompts: list[str]):
        """The training prompts' conditioning (a tensor, or a callable of the drawn model times: neti.py)."""
        gen = self.generator
        return gen.encode_prompt(prompts, self.added_embeddings().to(gen.device))

    def layer_control(self):
        """A context the denoiser runs in while this technique's conditioning is used: none for one token; per-layer
        tokens (xti.py) install attention processors that give each cross-attention layer its own rows."""
        return contextlib.nullcontext()

    def budgeted(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings - self.initial}

    def project(self, name: str, value: torch.Tensor) -> None:
        self.embeddings.copy_(self.initial + value)

    # ------------------------------------------------------------------ use
    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        texts = [self.fill(p, edited) for p in prompts]
        added = self.added_embeddings(self.strength).detach() if edited else None
        return self.generator.generate(
            texts, seeds, steps=self.sampling_steps, guidance=self.guidance, added_embeddings=added
        )

    def export(self, run_dir) -> list[str]:
        vectors = self.embeddings.detach().cpu().contiguous()
        save_file(self.generator.embedding_file(self.placeholder, vectors),
                  str(Path(run_dir) / "learned_embeds.safetensors"))
        return ["learned_embeds.safetensors"]
