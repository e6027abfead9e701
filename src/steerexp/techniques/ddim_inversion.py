"""DDIM inversion of real images (Song et al. 2021; as used by Mokady et al. 2023).

An image I is encoded to x*_0 = E(I) (the VAE posterior mean), then the deterministic DDIM
update is run backwards with the source prompt c, at guidance 1 (the conditional prediction
only), from t = 0 up to T:

    eps_t       = eps_theta(x*_t, t, c)
    x0_hat      = (x*_t - sqrt(1 - a_t) eps_t) / sqrt(a_t)
    x*_{t+1}    = sqrt(a_{t+1}) x0_hat + sqrt(1 - a_{t+1}) eps_t

This gives the pivot trajectory x*_0 .. x*_T. Reconstruction samples DDIM from x*_T with
(c, null, w): eps = eps(null) + w (eps(c) - eps(null)). At w = 1 the step nearly undoes the
inversion (it assumes eps(x_t) ~ eps(x_{t+1})); at w = 7.5 the guidance amplifies that error
and the reconstruction drifts, which is what null-text inversion (null_text_inversion.py)
and negative-prompt inversion (negative_prompt_inversion.py) repair.

Editing is a prompt swap from the same x*_T: "a red circle on the left" -> "a blue circle
on the left" (`edit.replace: {red: blue}`), sampled with the target prompt.

Targets are image files (a folder or a list of paths; each must be RGB at the generator's
resolution, or `targets.resize` / `targets.convert` say to fix them; decoded per the `images:`
policy of steerexp.images, so 16-bit, alpha, EXIF and size limits are handled) with source prompts, or
K world samples (procedural images by seed, captioned from their scene). The deltas saved to
deltas.safetensors are the inverted `latents_T` [N, C, h, w], one per image: the computed
input that reconstruction starts from.

Methods every inversion technique can report (`reconstruct(method)`, `edit(method)`):
`vae` (the VAE round trip D(E(I)), the upper bound), `ddim_w<w>` (x*_T, empty null, guidance
w), `npi` (null := c; see negative_prompt_inversion.py), and `nti` on the NTI technique.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from steerexp.generators import FrozenGenerator, Guidance, sampling
from steerexp.images import image_files_in, read_image, to_tensor
from steerexp.techniques.base import TrainingFree
from steerexp.worlds.shapes import world

WORLD_PROMPT = "a {colour} {shape} {position}"


# ---------------------------------------------------------------------------- targets
def image_files(files: str | list[str]) -> list[Path]:
    """A folder (its PNG/JPG files, sorted) or an explicit list of paths; every path must exist."""
    if isinstance(files, (str, Path)):
        folder = Path(files).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"technique.targets.files: no such folder or file: {folder}")
        if folder.is_file():
            return [folder]
        paths = image_files_in(folder)
        if not paths:
            raise ValueError(f"technique.targets.files: no PNG/JPG images in {folder}")
        return paths
    paths = [Path(f).expanduser() for f in files]
    if not paths:
        raise ValueError("technique.targets.files is an empty list; give image paths or a folder")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"technique.targets.files: image file not found: {p}")
    return paths


def world_prompt(scene: world.Scene, template: str = WORLD_PROMPT) -> str:
    return template.format(shape=scene.shape, colour=scene.colour, size=scene.size,
                           position=world.POSITION_PHRASES[scene.position], background=scene.background)


def swap_words(prompt: str, replace: dict[str, str]) -> str:
    """Word-level replacement; the prompt must change."""
    words = [replace.get(w, w) for w in prompt.split()]
    out = " ".join(words)
    if out == prompt:
        raise ValueError(f"technique.edit.replace {dict(replace)} changes no word of the source prompt {prompt!r}; "
                         "name a word the prompt uses (e.g. {red: blue}) or give technique.edit.prompts")
    return out


# ---------------------------------------------------------------------------- sampling
def sample_with_nulls(gen: FrozenGenerator, cond: torch.Tensor, latents: torch.Tensor, uncond: torch.Tensor,
                      steps: int, guidance: Guidance) -> torch.Tensor:
    """DDIM from x_T with a null embedding per image and per step: uncond [N, S, L, D] or [N, L, D]."""
    schedule = gen.schedule(steps)
    per_step = uncond.ndim == 4

    def fn(x, t, i):
        u = uncond[:, i] if per_step else uncond
        u = u.expand(cond.shape[0], -1, -1) if u.shape[0] != cond.shape[0] else u
        return gen.unet_output(x, t.to(gen.device), cond, u.to(gen.device, gen.dtype), guidance, i, steps)

    with torch.no_grad():
        return sampling.ddim_sample(fn, latents, schedule, gen.prediction_type)


class DDIMInversion(TrainingFree):
    """Invert target images at w = `invert_guidance` (1), reconstruct or edit at `guidance_scale`
    (null: sampling.guidance_scale), in `sampling.steps` DDIM steps."""

    def __init__(self, generator: FrozenGenerator, targets: dict | None = None, edit: dict | None = None,
                 invert_guidance: float = 1.0, guidance_scale: float | None = None, batch_size: int = 16,
                 sampling: dict | None = None):
        super().__init__(generator, sampling)
        if self.sampling_steps < 1:
            raise ValueError(f"sampling.steps (the DDIM inversion steps) must be >= 1, got "
                             f"{self.sampling_steps}; zero steps would leave the image un-inverted (try 25)")
        if batch_size < 1:
            raise ValueError(f"technique.batch_size must be >= 1, got {batch_size}")
        if guidance_scale is not None:
            self.guidance = Guidance(scale=guidance_scale)  # this technique's own reconstruction / edit scale
        self.batch_size = batch_size  # images inverted and sampled together
        self.targets_cfg = dict(files=None, prompts=None, k=16, seed=0, shapes=None, fixed={},
                                prompt_template=WORLD_PROMPT, resize=False, convert=False) | dict(targets or {})
        self.edit_cfg = dict(replace={"red": "blue"}, prompts=None) | dict(edit or {})
        if self.targets_cfg["files"] is None and int(self.targets_cfg["k"]) < 1:
            raise ValueError(f"technique.targets.k must be >= 1 world images, got {self.targets_cfg['k']}")
        self.invert_guidance = Guidance(scale=invert_guidance)
        self.latents_T = nn.Parameter(torch.zeros(0, *generator.latent_shape()), requires_grad=False)
        self.images: torch.Tensor | None = None          # [N, 3, R, R] in [0, 1], the originals
        self.names: list[str] = []
        self.scenes: list[world.Scene] | None = None      # world targets only
        self.source_prompts: list[str] = []
        self.x0: torch.Tensor | None = None               # [N, C, h, w] VAE latents
        self.cond: torch.Tensor | None = None             # [N, L, D] source-prompt embeddings
        self.empty: torch.Tensor | None = None            # [1, L, D] the empty prompt's embedding
        self.pivots: list[torch.Tensor] | None = None     # [x*_0 .. x*_T], each [N, C, h, w]
        self._cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ targets
    @property
    def target_images(self) -> torch.Tensor | None:
        """The originals, under the name the memorisation evaluator reads."""
        return self.images

    @property
    def resolution(self) -> int:
        return self.generator.resolution

    def load_targets(self) -> None:
        tc, r = self.targets_cfg, self.resolution
        if tc["files"]:
            paths = image_files(tc["files"])
            arrays = [read_image(p, "technique.targets.files", r, switches="technique.targets",
                                 resize=tc["resize"], convert=tc["convert"]) for p in paths]
            prompts = tc["prompts"]
            if prompts is None:
                raise ValueError("technique.targets.prompts: image files need source prompts (one per image, or one "
                                 "string for all), e.g. technique.targets.prompts='a red circle on the left'")
            prompts = [prompts] * len(paths) if isinstance(prompts, str) else list(prompts)
            if len(prompts) != len(paths):
                raise ValueError(f"technique.targets.prompts has {len(prompts)} prompts for {len(paths)} images; "
                                 "give one per image (in sorted file order) or a single string")
            self.images, self.names, self.scenes = to_tensor(np.stack(arrays)), [p.name for p in paths], None
            self.source_prompts = prompts
        else:
            shapes, fixed = tuple(tc["shapes"] or world.SEEN_SHAPES), dict(tc["fixed"] or {})
            choices = dict(world.HEADS, background=tuple(world.BACKGROUNDS))
            for key, value in fixed.items():
                if key not in choices or value not in choices[key]:
                    raise ValueError(f"technique.targets.fixed: {key}={value!r} is not a world attribute value; "
                                     f"choose from {({k: list(v) for k, v in choices.items()})}")
            arrays, scenes = world.dataset(int(tc["seed"]), int(tc["k"]), shapes=shapes, res=r, **fixed)
            self.images, self.scenes = to_tensor(arrays), scenes
            self.names = [f"world{tc['seed']}_{i}" for i in range(len(scenes))]
            self.source_prompts = [world_prompt(s, tc["prompt_template"]) for s in scenes]

    def target_prompts(self) -> list[str]:
        prompts = self.edit_cfg["prompts"]
        if prompts is not None:
            prompts = [prompts] * len(self.source_prompts) if isinstance(prompts, str) else list(prompts)
            if len(prompts) != len(self.source_prompts):
                raise ValueError(f"technique.edit.prompts has {len(prompts)} prompts "
                                 f"for {len(self.source_prompts)} images")
            return prompts
        return [swap_words(p, dict(self.edit_cfg["replace"] or {})) for p in self.source_prompts]

    def prepare(self) -> None:
        self.load_targets()
        gen = self.generator
        with torch.no_grad():
            self.x0 = torch.cat([gen.encode_images(b) for b in self.images.split(self.batch_size)])
            self.cond = gen.encode_prompt(self.source_prompts)
            self.empty = gen.encode_prompt([""])
        self._cache.clear()

    # ------------------------------------------------------------------ inversion
    def invert(self) -> None:
        """The pivot trajectories x*_0 .. x*_T of every target (guidance `invert_guidance`, empty null)."""
        gen, trajectories = self.generator, []
        for sl in self.batches():
            empty = self.empty.expand(len(self.x0[sl]), -1, -1)
            trajectories.append(
                gen.invert(self.x0[sl], self.cond[sl], empty, self.sampling_steps, self.invert_guidance)
            )
        self.pivots = [torch.cat(step) for step in zip(*trajectories)]
        self.latents_T = nn.Parameter(self.pivots[-1].detach().float().cpu().clone(), requires_grad=False)

    def compute(self) -> None:
        self.invert()

    def batches(self) -> list[slice]:
        n = len(self.x0)
        return [slice(i, min(n, i + self.batch_size)) for i in range(0, n, self.batch_size)]

    def load_deltas(self, deltas: dict[str, torch.Tensor], source: str = "deltas", structure: dict | None = None):
        for name, value in deltas.items():  # shapes depend on the number of targets
            setattr(self, name, nn.Parameter(value.clone(), requires_grad=False))

    # ------------------------------------------------------------------ reconstruction and editing
    def methods(self) -> list[str]:
        w = self.guidance.scale
        return ["vae", "ddim_w1"] + ([f"ddim_w{w:g}"] if w != 1 else []) + ["npi"]

    def nulls(self, method: str, sl: slice) -> tuple[torch.Tensor, Guidance]:
        """The uncond input and guidance a method samples with (for images `sl`)."""
        if method.startswith("ddim_w"):
            try:
                w = float(method[len("ddim_w") :])
            except ValueError:
                raise ValueError(f"unknown inversion method {method!r}; ddim methods are named ddim_w<scale>") from None
            return self.empty, Guidance(scale=w)
        if method == "npi":
            return self.cond[sl], self.guidance
        raise ValueError(
            f"inversion method {method!r} is not available for {type(self).__name__}; choose from {self.methods()}"
        )

    def _run(self, method: str, prompts: list[str] | None) -> torch.Tensor:
        """Decoded images of every target for a method: reconstruction (prompts None) or edit."""
        if self.pivots is None and len(self.latents_T) == 0:
            raise RuntimeError("the targets are not inverted yet: call prepare() and compute() first")
        gen, out = self.generator, []
        with torch.no_grad():
            if method == "vae":
                if prompts is not None:
                    raise ValueError("the VAE round trip has no prompt, so it cannot edit")
                return torch.cat([gen.decode_latents(self.x0[sl]).float().cpu() for sl in self.batches()])
            target = None if prompts is None else gen.encode_prompt(prompts)
            for sl in self.batches():
                uncond, guidance = self.nulls(method, sl)
                cond = self.cond[sl] if target is None else target[sl]
                z = sample_with_nulls(
                    gen, cond, self.latents_T[sl].to(gen.device, gen.dtype), uncond, self.sampling_steps, guidance
                )
                out.append(gen.decode_latents(z).float().cpu())
        return torch.cat(out)

    def reconstruct(self, method: str | None = None) -> torch.Tensor:
        method = method or self.own_method()
        key = ("rec", method)
        if key not in self._cache:
            self._cache[key] = self._run(method, None)
        return self._cache[key]

    def edit(self, method: str | None = None, prompts: list[str] | None = None) -> torch.Tensor:
        method, prompts = method or self.own_method(), prompts or self.target_prompts()
        key = ("edit", method, tuple(prompts))
        if key not in self._cache:
            self._cache[key] = self._run(method, prompts)
        return self._cache[key]

    def own_method(self) -> str:
        return f"ddim_w{self.guidance.scale:g}"

    # ------------------------------------------------------------------ the run flow's paired samples
    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        """Seeds index the target images; '{}' in a prompt is the image's source prompt (baseline: the
        reconstruction) or its edit prompt (edited); a prompt without '{}' is the edit prompt itself."""
        n = len(self.source_prompts)
        if any(not 0 <= s < n for s in seeds):
            raise ValueError(
                f"inversion techniques read eval.seeds as target indices; got {sorted(set(seeds))} "
                f"for {n} targets. Set eval.seeds to a subset of 0..{n - 1}"
            )
        rec = self.reconstruct()
        if not edited:
            return rec[list(seeds)]
        edits = self.target_prompts()
        if all("{}" in p for p in prompts):
            return self.edit()[list(seeds)]
        # a literal prompt edits every target with it (cached per prompt); pick the pair's image
        return torch.stack([self.edit(prompts=edits if "{}" in p else [p] * n)[s] for p, s in zip(prompts, seeds)])
