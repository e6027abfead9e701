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
on the left" (`edit.replace: {red: blue}`; by default, `edit.replace: auto`, the source prompt's word for the
run's concept.head becomes concept.target: ddim_inversion_spec.py), sampled with the target prompt. With
`edit.control: p2p` the swap runs under Prompt-to-Prompt attention control
(steerexp/generators/attention.py): the source branch (source prompt) and the target branch
sample side by side from x*_T, and the target's cross- and self-attention maps are injected
from the source's inside their step windows (`edit.cross_steps`, `edit.self_steps`), with
optional reweighting (`edit.reweight`) and local blending (`edit.blend`, mask from the
attention maps of `edit.blend_words`; null: the words the edit changes).

Targets are image files (a folder or a list of paths; each must be RGB at the run's image size,
generator.height x width, or `targets.resize` / `targets.convert` say to fix them; decoded per the `images:`
policy of steerexp.images, so 16-bit, alpha, EXIF and size limits are handled) with source prompts,
a manifest (`targets.manifest`: a CSV with the columns image, source, target[, mask] or a JSON
list of such objects; paths relative to the manifest; a mask is white where the edit may change
the image), or K world samples (procedural images by seed, captioned from their scene). The deltas saved to
deltas.safetensors are the inverted `latents_T` [N, C, h, w], one per image: the computed
input that reconstruction starts from.

Methods every inversion technique can report (`reconstruct(method)`, `edit(method)`):
`vae` (the VAE round trip D(E(I)), the upper bound), `ddim_w<w>` (x*_T, empty null, guidance
w), `npi` (null := c; see negative_prompt_inversion.py), `di` (Direct Inversion: the source
branch follows x*_t; see direct_inversion.py), and `nti` on the NTI technique. An edit method
may add `+p2p` (attention control) and `+p2p+blend` (and local blend): `nti+p2p+blend`. The
SDEdit baseline `sdedit_s<strength>` (Meng et al. 2022) needs no inversion: the VAE latent is
noised to the step `strength` of the way up (seeded by the image index) and denoised with the
prompt at the edit guidance.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from steerexp.generators import FrozenGenerator, Guidance, attention, sampling
from steerexp.images import image_files_in, read_image, to_tensor
from steerexp.targets import world_dataset
from steerexp.techniques.base import TrainingFree
from steerexp.techniques.ddim_inversion_spec import (CONTROLS, MANIFEST_COLUMNS, WORLD_PROMPT, EditSpec,
                                                     InversionTargetsSpec, check_targets, edit_prompts)
from steerexp.worlds.shapes import world

EDIT_KEYS = tuple(f.name for f in fields(EditSpec))   # technique.edit's settings (ddim_inversion_spec.EditSpec)


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


def read_manifest(path: str | Path) -> list[dict]:
    """The rows of an edit manifest (CSV with a header, or a JSON list of objects): image, source,
    target and an optional mask; image and mask paths are made absolute (relative to the manifest)."""
    path = Path(path).expanduser()
    key = "technique.targets.manifest"
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no such file: {path}; give a CSV or JSON file with the columns "
                                f"{', '.join(MANIFEST_COLUMNS)}[, mask]")
    if path.suffix.lower() == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{key}: {path} must hold a JSON list of objects with the keys "
                             f"{', '.join(MANIFEST_COLUMNS)}[, mask]")
    else:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{key}: {path} lists no edits; add one row per image ({', '.join(MANIFEST_COLUMNS)})")
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in MANIFEST_COLUMNS if not str(row.get(c) or "").strip()]
        if missing:
            raise ValueError(f"{key}: row {i + 1} of {path} has no {missing[0]!r}; every row needs "
                             f"{', '.join(MANIFEST_COLUMNS)} (mask is optional)")
        mask = str(row.get("mask") or "").strip()
        out.append({"image": path.parent / str(row["image"]).strip(), "source": str(row["source"]).strip(),
                    "target": str(row["target"]).strip(), "mask": path.parent / mask if mask else None})
    for r in out:
        for k in ("image", "mask"):
            if r[k] is not None and not r[k].is_file():
                raise FileNotFoundError(f"{key}: {k} file not found: {r[k]} (paths are relative to {path.parent})")
    return out


def parse_method(method: str) -> tuple[str, bool, bool]:
    """'nti+p2p+blend' -> ('nti', p2p, blend)."""
    base, *flags = method.split("+")
    unknown = [f for f in flags if f not in ("p2p", "blend")]
    if unknown or (("blend" in flags) and "p2p" not in flags):
        raise ValueError(f"unknown edit method {method!r}: a method is <inversion>[+p2p[+blend]] "
                         f"(e.g. nti+p2p+blend; the blend mask comes from P2P's attention maps)")
    return base, "p2p" in flags, "blend" in flags


def plain(node):
    """A config node (Hydra passes the technique's nested settings as DictConfig) as plain Python."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


# ---------------------------------------------------------------------------- sampling
def sample_with_nulls(gen: FrozenGenerator, cond: torch.Tensor, latents: torch.Tensor, uncond: torch.Tensor,
                      steps: int, guidance: Guidance) -> torch.Tensor:
    """DDIM from x_T with a null embedding per image and per step: uncond [N, S, L, D] or [N, L, D]."""
    schedule = gen.schedule(steps)
    per_step = uncond.ndim == 4

    def fn(x, t, i):
        u = uncond[:, i] if per_step else uncond
        u = u.expand(cond.shape[0], -1, -1) if u.shape[0] != cond.shape[0] else u
        return gen.model_output(x, t.to(gen.device), cond, u.to(gen.device, gen.dtype), guidance, i, steps)

    with torch.no_grad():
        return sampling.sample(fn, latents, schedule)


class DDIMInversion(TrainingFree):
    """Invert target images at w = `invert_guidance` (1), reconstruct or edit at `guidance_scale`
    (null: sampling.guidance_scale), in `sampling.steps` DDIM steps."""

    @classmethod
    def requirements(cls, cfg):
        if ((cfg.get("edit") or {}).get("control") or None) == "p2p":
            return {"cross_attention": "Prompt-to-Prompt (edit.control=p2p) edits a UNet's cross-attention maps, and "
                                       "this family's transformer has joint attention instead; use edit.control=null"}
        return {}

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
            self.guidance = replace(self.guidance, scale=guidance_scale)  # own reconstruction / edit scale (the
            # run's guider kept: steerexp/guiders.py)
        self.batch_size = batch_size  # images inverted and sampled together
        self.targets_cfg = dict(files=None, prompts=None, manifest=None, k=16, seed=0, shapes=None, fixed={},
                                prompt_template=WORLD_PROMPT, resize=False, convert=False) | dict(plain(targets) or {})
        # (built directly, without the spec's defaults: a plain red -> blue swap; replace=auto needs head and target)
        self.edit_cfg = dict(replace={"red": "blue"}, head=None, target=None, prompts=None, control=None,
                             blend=False) | dict(plain(edit) or {})
        unknown = sorted(set(self.edit_cfg) - set(EDIT_KEYS))
        if unknown:
            raise ValueError(f"technique.edit has no setting {unknown[0]!r}; its settings are {', '.join(EDIT_KEYS)}")
        if self.targets_cfg["files"] is None and int(self.targets_cfg["k"]) < 1:
            raise ValueError(f"technique.targets.k must be >= 1 world images, got {self.targets_cfg['k']}")
        if self.edit_cfg["control"] not in CONTROLS:
            raise ValueError(f"technique.edit.control must be null (a bare prompt swap) or p2p (Prompt-to-Prompt "
                             f"attention control), got {self.edit_cfg['control']!r}")
        if self.edit_cfg["blend"] and self.edit_cfg["control"] != "p2p":
            raise ValueError("technique.edit.blend=true needs technique.edit.control=p2p: the local blend's mask "
                             "comes from the attention maps")
        self.control = attention.EditControl.from_config(self.edit_cfg)
        self.invert_guidance = Guidance(scale=invert_guidance)
        self.latents_T = nn.Parameter(torch.zeros(0, *generator.latent_shape()), requires_grad=False)
        self.images: torch.Tensor | None = None          # [N, 3, H, W] in [0, 1], the originals
        self.names: list[str] = []
        self.scenes: list[world.Scene] | None = None      # world targets only
        self.masks: torch.Tensor | None = None            # [N, H, W] bool: where the edit may change (manifest)
        self.source_prompts: list[str] = []
        self.manifest_targets: list[str] | None = None    # the manifest's edit prompts
        self.x0: torch.Tensor | None = None               # [N, C, h, w] VAE latents
        self.cond: torch.Tensor | None = None             # [N, L, D] source-prompt embeddings
        self.empty: torch.Tensor | None = None            # [1, L, D] the empty prompt's embedding
        self.pivots: list[torch.Tensor] | None = None     # [x*_0 .. x*_T], each [N, C, h, w]
        # CPU seconds (time.process_time: this process only, so other jobs on a shared machine do not inflate
        # them; with one torch thread they are the wall time of an idle machine) of each stage, all images
        self.seconds: dict[str, float] = {}
        self._cache: dict[tuple, torch.Tensor] = {}
        self._maps: dict[tuple, torch.Tensor] = {}           # (method, prompts) -> P2P cross-attention maps

    # ------------------------------------------------------------------ targets
    @property
    def target_images(self) -> torch.Tensor | None:
        """The originals, under the name the memorisation evaluator reads."""
        return self.images

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width) of the run's images (generator.height / width): what the targets are read at."""
        return self.generator.image_size

    def read(self, path: Path, key: str) -> np.ndarray:
        tc = self.targets_cfg
        return read_image(path, key, self.resolution, self.image_policy, switches="technique.targets",
                          resize=tc["resize"], convert=tc["convert"])

    def load_targets(self) -> None:
        tc, r = self.targets_cfg, self.resolution
        if tc["manifest"]:
            rows = read_manifest(tc["manifest"])
            key = "technique.targets.manifest"
            self.images = to_tensor(np.stack([self.read(row["image"], key) for row in rows]))
            self.names, self.scenes = [row["image"].name for row in rows], None
            self.source_prompts = [row["source"] for row in rows]
            self.manifest_targets = [row["target"] for row in rows]
            if any(row["mask"] is not None for row in rows):
                masks = [self.read(row["mask"], key).mean(-1) > 127 if row["mask"] is not None
                         else np.ones(r, bool) for row in rows]
                self.masks = torch.from_numpy(np.stack(masks))
        elif tc["files"]:
            paths = image_files(tc["files"])
            arrays = [self.read(p, "technique.targets.files") for p in paths]
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
            spec = InversionTargetsSpec(**{f.name: tc[f.name] for f in fields(InversionTargetsSpec)})
            self.source_prompts = check_targets(spec, "technique.targets")  # (the settings' rules, e.g. fixed)
            shapes, fixed = tuple(tc["shapes"] or world.SEEN_SHAPES), dict(tc["fixed"] or {})
            arrays, scenes = world_dataset(int(tc["seed"]), int(tc["k"]), r, self.image_policy, shapes=shapes,
                                           **fixed)
            self.images, self.scenes = to_tensor(arrays), scenes
            self.names = [f"world{tc['seed']}_{i}" for i in range(len(scenes))]

    def target_prompts(self) -> list[str]:
        prompts = self.edit_cfg["prompts"]
        if prompts is not None:
            prompts = [prompts] * len(self.source_prompts) if isinstance(prompts, str) else list(prompts)
            if len(prompts) != len(self.source_prompts):
                raise ValueError(f"technique.edit.prompts has {len(prompts)} prompts "
                                 f"for {len(self.source_prompts)} images")
            return prompts
        if self.manifest_targets is not None:
            return list(self.manifest_targets)
        e = self.edit_cfg
        return edit_prompts(self.source_prompts, e["replace"], e["head"], e["target"], world=self.scenes is not None)

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
        start = time.process_time()
        for sl in self.batches():
            empty = self.empty.expand(len(self.x0[sl]), -1, -1)
            trajectories.append(
                gen.invert(self.x0[sl], self.cond[sl], empty, self.sampling_steps, self.invert_guidance)
            )
        self.pivots = [torch.cat(step) for step in zip(*trajectories)]
        self.latents_T = nn.Parameter(self.pivots[-1].detach().float().cpu().clone(), requires_grad=False)
        self.seconds["invert"] = time.process_time() - start

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
        return ["vae", "ddim_w1"] + ([f"ddim_w{w:g}"] if w != 1 else []) + ["npi", "di"]

    def nulls(self, method: str, sl: slice) -> tuple[torch.Tensor, Guidance]:
        """The uncond input and guidance a method samples with (for images `sl`)."""
        if method.startswith(("ddim_w", "sdedit_s")):
            prefix = "ddim_w" if method.startswith("ddim_w") else "sdedit_s"
            try:
                value = float(method[len(prefix) :])
            except ValueError:
                raise ValueError(f"unknown inversion method {method!r}; ddim methods are named ddim_w<scale>, "
                                 "SDEdit ones sdedit_s<strength>") from None
            return self.empty, (replace(self.guidance, scale=value) if prefix == "ddim_w" else self.guidance)
        if method == "npi":
            return self.cond[sl], self.guidance
        if method == "di":
            return self.empty, self.guidance
        raise ValueError(
            f"inversion method {method!r} is not available for {type(self).__name__}; choose from {self.methods()}"
        )

    def inverted(self, method: str | None) -> None:
        """Run now the inversion `method` still needs: compute() ran it, but deltas loaded from a file hold x*_T only,
        and Direct Inversion follows the whole trajectory (flow_edit.FlowEditor runs its inversion lazily, here)."""
        if method is not None and parse_method(method)[0] == "di" and self.pivots is None and self.x0 is not None:
            self.invert()

    def inversion_seconds(self, method: str) -> float:
        """CPU seconds per image that the inversion behind a method took (0 for the VAE round trip and SDEdit)."""
        base, _, _ = parse_method(method)
        if base == "vae" or base.startswith("sdedit_s"):
            return 0.0
        n = max(1, len(self.images) if self.images is not None else 1)
        return (self.seconds.get("invert", 0.0) + (self.seconds.get("nti", 0.0) if base == "nti" else 0.0)) / n

    def sdedit(self, strength: float, cond: torch.Tensor, uncond: torch.Tensor, guidance: Guidance,
               sl: slice) -> torch.Tensor:
        """SDEdit: x0 noised to the step `strength` of the way up the schedule, then DDIM down with `cond`."""
        if not 0 < strength <= 1:
            raise ValueError(f"SDEdit strength must be in (0, 1], got {strength} (method sdedit_s<strength>)")
        gen, S = self.generator, self.sampling_steps
        schedule = gen.schedule(S)
        k = S - max(1, round(strength * S))  # the first sampling step run
        x0 = self.x0[sl]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(i))
                             for i in range(sl.start, sl.stop)]).to(x0)
        x = schedule.noised(x0, noise, k)
        part = schedule.starting_at(k)
        u = uncond.expand(len(x0), -1, -1)
        fn = lambda z, t, i: gen.model_output(z, t.to(gen.device), cond, u, guidance, i, S)
        return sampling.sample(fn, x, part)

    def _run(self, method: str, prompts: list[str] | None) -> torch.Tensor:
        """Decoded images of every target for a method: reconstruction (prompts None) or edit."""
        if self.pivots is None and len(self.latents_T) == 0:
            raise RuntimeError("the targets are not inverted yet: call prepare() and compute() first")
        base, p2p, blend = parse_method(method)
        gen, out = self.generator, []
        with torch.no_grad():
            if base == "vae" or (base == "di" and prompts is None):
                if base == "vae" and prompts is not None:
                    raise ValueError("the VAE round trip has no prompt, so it cannot edit")
                # Direct Inversion's source branch is the inversion trajectory: it ends at x*_0 = E(I)
                return torch.cat([gen.decode_latents(self.x0[sl]).float().cpu() for sl in self.batches()])
            if base == "di":
                self.inverted(method)
            target = None if prompts is None else gen.encode_prompt(prompts)
            for sl in self.batches():
                uncond, guidance = self.nulls(base, sl)
                cond = self.cond[sl] if target is None else target[sl]
                latents = self.latents_T[sl].to(gen.device, gen.dtype)
                if base.startswith("sdedit_s"):
                    if p2p:
                        raise ValueError(f"{method}: SDEdit has no source branch to take attention maps from")
                    z = self.sdedit(float(base[len("sdedit_s"):]), cond, uncond, guidance, sl)
                elif p2p and prompts is not None:
                    controller = self.controller(self.source_prompts[sl], prompts[sl])
                    trajectory = [x[sl] for x in self.pivots] if base == "di" else None
                    _, z = attention.sample_pair(gen, latents, self.cond[sl], cond, uncond, self.sampling_steps,
                                                 guidance, controller, trajectory, blend)
                    self._keep_maps(method, prompts, sl, controller)
                else:  # a bare prompt swap (Direct Inversion without P2P has no source branch to correct)
                    z = sample_with_nulls(gen, cond, latents, uncond, self.sampling_steps, guidance)
                out.append(gen.decode_latents(z).float().cpu())
        return torch.cat(out)

    def controller(self, sources: list[str], targets: list[str]) -> attention.Controller:
        gen = self.generator
        return attention.Controller(self.control, gen.tokenizer, list(sources), list(targets), self.sampling_steps,
                                    gen.latent_shape()[1:], gen.device)

    def _keep_maps(self, method: str, prompts: list[str], sl: slice, controller: attention.Controller) -> None:
        """Keep the cross-attention maps of a P2P edit (batch by batch, in image order)."""
        key, new = (method, tuple(prompts)), controller.maps().float().cpu()
        self._maps[key] = new if sl.start == 0 else torch.cat([self._maps[key], new], 1)

    def attention_maps(self, method: str | None = None, prompts: list[str] | None = None
                       ) -> tuple[torch.Tensor, list[list[str]], list[list[str]]]:
        """The cross-attention maps of a P2P edit, averaged over steps, layers and heads: maps
        [2, N, L, h, w] (source branch, target branch; token 0 is the start token) and the words of
        each source and target prompt. Runs the edit if it has not run yet."""
        method, prompts = method or self.edit_method(), list(prompts or self.target_prompts())
        if not parse_method(method)[1]:
            raise ValueError(f"attention maps come from P2P attention control; {method!r} has none (add +p2p)")
        self.edit(method, prompts)
        if (method, tuple(prompts)) not in self._maps:  # the images were cached before the maps were kept
            self._cache.pop(("edit", method, tuple(prompts)), None)
            self.edit(method, prompts)
        maps = self._maps[(method, tuple(prompts))]
        tok = self.generator.tokenizer
        return (maps, [attention.token_strings(tok, p) for p in self.source_prompts],
                [attention.token_strings(tok, p) for p in prompts])

    def reconstruct(self, method: str | None = None) -> torch.Tensor:
        method = parse_method(method or self.own_method())[0]  # the source branch: P2P does not change it
        key = ("rec", method)
        if key not in self._cache:
            self._cache[key] = self._run(method, None)
        return self._cache[key]

    def edit(self, method: str | None = None, prompts: list[str] | None = None) -> torch.Tensor:
        method, prompts = method or self.edit_method(), prompts or self.target_prompts()
        key = ("edit", method, tuple(prompts))
        if key not in self._cache:
            start = time.process_time()
            self._cache[key] = self._run(method, list(prompts))
            self.seconds[f"edit/{method}"] = time.process_time() - start
        return self._cache[key]

    def edit_seconds(self, method: str) -> float:
        """CPU seconds per image of the last edit with `method` (inversion not included)."""
        if f"edit/{method}" not in self.seconds:
            raise ValueError(f"no edit with {method!r} has run yet")
        return self.seconds[f"edit/{method}"] / max(1, len(self.images))

    def own_method(self) -> str:
        return f"ddim_w{self.guidance.scale:g}"

    def edit_method(self) -> str:
        """The method `edit()` uses by default: the own method, with P2P (and local blend) as configured."""
        suffix = ("+p2p" if self.edit_cfg["control"] == "p2p" else "") + ("+blend" if self.edit_cfg["blend"] else "")
        return self.own_method() + suffix

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
