"""Embedding nudging (arXiv 2408.15450): steer a single output away from memorised or
unwanted images without blocking generation.

For each (prompt, seed) the generator first samples as usual. A list of filters checks
that initial output; when none triggers, it is returned unchanged. When one triggers, a
latent L (the initial noise z_T by default, or the prompt embedding c) is optimised with
Adam through differentiable DDIM sampling, VAE decoding and the CLIP image encoder E:

    loss(L) = -alpha * mean_p cos(E(x(L)), preferred_p)
              + beta * mean_u cos(E(x(L)), undesired_u)
              + gamma * ||L - L0||

    preferred  the CLIP text embedding of the prompt and/or CLIP image embeddings of exemplars
    undesired  CLIP image embeddings of the protected set (`undesired=all`), or only of the
               protected image nearest in CLIP space to the initial output (`undesired=nearest`)

With `keep: {heads: [colour, shape], weight: w, scorer: robust}` the loss adds
    + w * sum_h KL( p(h | initial output) || p(h | x(L)) )
(objectives/concept_score.py: attribute_keep, read by a classifier of the run): the nudge then
leaves memorisation by changing what the kept heads do not read (layout, size, background) and
keeps the content the memorised output showed. The run records that classifier as optimised against.

Adaptive rounds: after each round of `opt_steps` Adam steps the output is regenerated
(at the full sampling steps) and re-filtered; while still triggered, beta is multiplied by
`beta_growth` and another round runs, up to `rounds` rounds.

Filters (`filters`, a list; any that triggers counts):
    {kind: memorisation, threshold: 0.1}   per-pixel RMS to the nearest protected image < threshold
    {kind: clip, tau: 0.9}                 max CLIP cosine to the undesired embeddings > tau
    {kind: classifier, head: colour, classes: [red], threshold: 0.5}
                                           the concept classifier gives P(any listed class) >= threshold
Any object with `__call__(images, nudging) -> (triggered [N] bool, score [N])` also works.

Modes (the baselines run through the same filter and rounds, only the mitigation differs):
    nudge  the objective above
    noise  Somepalli et al.: c + lambda * N(0, I) on the prompt embedding, fresh noise each round
    wen    Wen et al.: minimise ||eps(z_T, c + d) - eps(z_T, empty)||_2 over d at the first step

Per output the technique records: triggered or not, rounds, the final nearest-protected
RMS and CLIP cosine, seconds, and the optimised offset (z_T offset or prompt delta).
Nudging is per output, so it runs lazily in `generate(..., edited=True)`; `compute()`
pre-runs `prompts` x `seeds` when given, and those records are the run's deltas
(deltas.safetensors rows in the order of nudges.json, written by `export`).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from steerexp.generators import FrozenGenerator
from steerexp.images import ImagePolicy, hw, image_files_in, load_folder, nn_rms, rms_distances, to_tensor
from steerexp.targets import fit_world
from steerexp.techniques.base import TrainingFree
from steerexp.techniques.nudging_spec import LATENTS, MODES, PREFERRED, UNDESIRED
from steerexp.techniques.protocols import OutputRecord
from steerexp.worlds.shapes import world


def load_images(source, what: str, resolution, pol: ImagePolicy | None = None) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] from a tensor or a folder of PNG/JPG files (an empty folder gives N = 0), fitted to
    `resolution` (one side, or (height, width)) per the image policy `pol` (None: the shipped defaults)."""
    if isinstance(source, torch.Tensor):
        return source.float()
    folder = Path(source).expanduser()
    if folder.is_dir() and not image_files_in(folder):
        return torch.zeros(0, 3, *hw(resolution))
    return load_folder(folder, resolution, f"technique.{what}", pol)[0]


# ----------------------------------------------------------------------------- filters
class MemorisationFilter:
    """Triggers when the nearest protected image is closer than `threshold` (per-pixel RMS)."""

    def __init__(self, threshold: float = 0.1):
        if not threshold > 0:
            raise ValueError(f"memorisation filter threshold must be > 0, got {threshold}")
        self.threshold = threshold

    def __call__(self, images, nudging):
        rms = nn_rms(images, nudging.protected)
        return rms < self.threshold, rms


class ClipFilter:
    """Triggers when the CLIP cosine to any undesired embedding exceeds `tau`."""

    def __init__(self, tau: float = 0.9):
        if not -1 <= tau <= 1:
            raise ValueError(f"clip filter tau must be in [-1, 1], got {tau}")
        self.tau = tau

    def __call__(self, images, nudging):
        cos = (nudging.clip.encode_images(images) @ nudging.undesired_embeddings.T).max(-1).values
        return cos > self.tau, cos


class ClassifierFilter:
    """Triggers when the concept classifier's P(any of `classes` of `head`) >= threshold."""

    def __init__(self, head: str = "colour", classes: list[str] | None = None, threshold: float = 0.5):
        if not classes:
            raise ValueError("classifier filter needs `classes`, e.g. {kind: classifier, head: colour, classes: [red]}")
        self.head, self.classes, self.threshold = head, list(classes), threshold

    def __call__(self, images, nudging):
        from steerexp import scorers

        clf = nudging.scorers.get("classifier", images.device)  # the run's classifier (scorers.classifier)
        p = scorers.prob(clf, images, self.head, self.classes)
        return p >= self.threshold, p


FILTERS = {"memorisation": MemorisationFilter, "clip": ClipFilter, "classifier": ClassifierFilter}


def build_filter(spec):
    if callable(spec):
        return spec
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in FILTERS:
        raise ValueError(f"technique.filters: unknown filter kind {kind!r}; choose one of {list(FILTERS)}")
    return FILTERS[kind](**spec)


# ----------------------------------------------------------------------------- the technique
class Nudging(TrainingFree):
    """A `Filtered` edit (steerexp.techniques.protocols): a record per output, the protected set."""

    def __init__(self, generator: FrozenGenerator, mode: str = "nudge", latent: str = "z_T",
                 filters: list | None = None, alpha: float = 1.0, beta: float = 1.0, gamma: float = 0.01,
                 preferred: str = "prompt", exemplars=None, undesired: str = "all", protected=None,
                 rounds: int = 3, beta_growth: float = 2.0, opt_steps: int = 8, opt_lr: float = 0.1,
                 opt_sampling_steps: int | None = None, noise_lambda: float = 0.1, prompts: list[str] | None = None,
                 seeds: list[int] | None = None, slot_word: str = "object", nudge_batch: int = 16,
                 keep: dict | None = None, sampling: dict | None = None):
        super().__init__(generator, sampling)
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if value < 0:
                raise ValueError(f"technique.{name} must be >= 0 (it weighs a term of the nudging objective), "
                                 f"got {value}; set e.g. technique.{name}={abs(value)}")
        checks = (("mode", mode, MODES), ("latent", latent, LATENTS), ("preferred", preferred, PREFERRED),
                  ("undesired", undesired, UNDESIRED))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"technique.{name} must be one of {allowed}, got {value!r}")
        if rounds < 1 or opt_steps < 1:
            raise ValueError(f"technique.rounds and technique.opt_steps must be >= 1, got {rounds}, {opt_steps}")
        if beta_growth < 1:
            raise ValueError(f"technique.beta_growth must be >= 1 (beta rises while triggered), got {beta_growth}")
        if mode == "nudge" and alpha == 0 and beta == 0:
            raise ValueError("technique.alpha and technique.beta are both 0: the nudging objective has nothing to "
                             "pull toward or push from; set technique.beta > 0")
        # the protected set and the exemplars: read per the run's image policy (prepare, or on first use)
        self._sources, self._image_sets = {"protected": protected, "exemplars": exemplars}, None
        if preferred != "prompt" and exemplars is None:
            raise ValueError(
                f"technique.preferred={preferred} needs exemplar images: set technique.exemplars "
                "to a folder of images, or technique.preferred=prompt"
            )
        self.filters = [build_filter(f) for f in (filters if filters is not None else [{"kind": "memorisation"}])]
        if not self.filters:
            raise ValueError(
                "technique.filters is empty: nothing would ever trigger; give at least one filter, "
                "e.g. [{kind: memorisation, threshold: 0.1}]"
            )
        self.mode, self.latent, self.alpha, self.beta, self.gamma = mode, latent, alpha, beta, gamma
        self.preferred, self.undesired = preferred, undesired
        self.rounds, self.beta_growth, self.opt_steps, self.opt_lr = rounds, beta_growth, opt_steps, opt_lr
        self.opt_sampling_steps = opt_sampling_steps or self.sampling_steps
        self.noise_lambda, self.slot_word, self.nudge_batch = noise_lambda, slot_word, nudge_batch
        self.prompts, self.seeds = list(prompts or []), list(seeds or [])
        self.keep = self.keep_term(keep, mode)
        self.records: dict[tuple[str, int], OutputRecord] = {}
        self._clip = self._undesired = None

    def bind(self, scorers=None, image_policy=None) -> None:
        super().bind(scorers, image_policy)
        self._image_sets = self._clip = self._undesired = None  # read again with the run's policy and scorers

    def prepare(self) -> None:
        """Read the protected set and the exemplars, and check the keep term against the run's scorers: a bad
        folder, head or scorer fails here, before any sampling."""
        self.image_sets()
        if self.keep is not None:
            try:
                self.keep.bind(self.scorers, self.image_policy)
            except ValueError as e:  # its messages name the objective term's keys
                raise ValueError(f"technique.keep: {e}".replace("objective attribute_keep.", "technique.keep.")) \
                    from e

    def image_sets(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(protected, exemplars) as [N, 3, H, W] in [0, 1], read once per the run's image policy."""
        if self._image_sets is None:
            res, pol, protected = self.generator.image_size, self.image_policy, self._sources["protected"]
            images = (load_images(protected, "protected", res, pol) if protected is not None else to_tensor(
                np.stack([fit_world(a, res, pol) for a in world.protected_set(max(res))[0]])))
            if len(images) == 0:
                raise ValueError(
                    f"the protected set is empty ({protected}); nudging needs images to steer away from: "
                    "put PNG/JPG files in that folder or set technique.protected=null for the world's set"
                )
            exemplars = self._sources["exemplars"]
            exemplars = load_images(exemplars, "exemplars", res, pol) if exemplars is not None else None
            if self.preferred != "prompt" and (exemplars is None or len(exemplars) == 0):
                raise ValueError(
                    f"technique.preferred={self.preferred} needs exemplar images: set technique.exemplars "
                    "to a folder of images, or technique.preferred=prompt"
                )
            self._image_sets = (images, exemplars)
        return self._image_sets

    @property
    def protected(self) -> torch.Tensor:
        return self.image_sets()[0]

    @property
    def exemplars(self) -> torch.Tensor | None:
        return self.image_sets()[1]

    @staticmethod
    def keep_term(keep: dict | None, mode: str):
        """technique.keep -> an attribute_keep term on the initial output; null (or weight 0): none. The reference is
        the output the filter caught (at the full sampling steps), so the KL pulls the nudged output's reading there."""
        if keep is None:
            return None
        from steerexp.objectives.concept_score import AttributeKeep

        if not isinstance(keep, Mapping) or not keep:  # (a DictConfig when Hydra builds the technique)
            raise ValueError(f"technique.keep must be null or {{heads, weight, scorer}}, got {keep!r}")
        unknown = sorted(set(keep) - {"heads", "weight", "scorer"})
        if unknown:
            raise ValueError(f"technique.keep: unknown key(s) {unknown}; it takes heads, weight and scorer")
        if mode != "nudge":
            raise ValueError(f"technique.keep holds the nudge's objective; mode={mode} has none: "
                             "set technique.keep=null")
        weight = float(keep.get("weight", 1.0))
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"technique.keep.weight must be a finite number >= 0, got {keep.get('weight')}")
        if weight == 0:
            return None
        try:
            return AttributeKeep(heads=list(keep.get("heads") or []), weight=weight,
                                 scorer=keep.get("scorer", "classifier"))
        except ValueError as e:  # its messages name the objective term's keys
            raise ValueError(f"technique.keep: {e}".replace("objective attribute_keep.", "technique.keep.")) from e

    # ------------------------------------------------------------------ scorers
    def optimised_against(self) -> set[str]:
        """The nudge optimises CLIP similarities (and the keep term's classifier); CLIP and classifier filters
        decide which outputs are changed."""
        kinds = {type(f) for f in self.filters}
        keep = self.keep.optimised_against() if self.keep else set()
        return ({"clip"} if self.mode == "nudge" or ClipFilter in kinds else set()) | (
            {"classifier"} if ClassifierFilter in kinds else set()) | keep

    @property
    def clip(self):
        if self._clip is None:
            self._clip = self.scorers.get("clip")  # the run's CLIP (scorers.clip)
        return self._clip

    @property
    def undesired_embeddings(self) -> torch.Tensor:
        if self._undesired is None:
            with torch.no_grad():
                self._undesired = self.clip.encode_images(self.protected)
        return self._undesired

    def check(self, images: torch.Tensor) -> torch.Tensor:
        """[N] bool: any filter triggers."""
        with torch.no_grad():
            return torch.stack([f(images, self)[0].bool().cpu() for f in self.filters]).any(0)

    # ------------------------------------------------------------------ the objective
    def preferred_embeddings(self, texts: list[str]) -> torch.Tensor:
        """[N, P, E]: per output, the embeddings to pull toward."""
        with torch.no_grad():
            parts = []
            if self.preferred in ("prompt", "both"):
                parts.append(self.clip.encode_texts(texts)[:, None])
            if self.preferred in ("exemplars", "both"):
                ex = self.clip.encode_images(self.exemplars)
                parts.append(ex[None].expand(len(texts), -1, -1))
            return torch.cat(parts, 1)

    def objective(self, images, preferred, undesired, beta, offset, start=None) -> torch.Tensor:
        """Per-output loss: -alpha mean cos(E(x), pref) + beta mean cos(E(x), undesired) + gamma ||L - L0||
        (+ the keep term's weight x its KL to `start`, the initial outputs, when technique.keep is set)."""
        e = self.clip.encode_images(images)
        pull = torch.einsum("ne,npe->np", e, preferred).mean(-1)
        push = torch.einsum("ne,nue->nu", e, undesired).mean(-1)
        dist = offset.flatten(1).pow(2).sum(-1).add(1e-12).sqrt()
        loss = -self.alpha * pull + beta * push + self.gamma * dist
        if self.keep is not None and start is not None:
            loss = loss + self.keep.weight * torch.stack(self.keep.per_head(images, start)).sum(0).to(loss)
        return loss

    def undesired_for(self, images: torch.Tensor) -> torch.Tensor:
        """[N, U, E]: all protected embeddings, or the one nearest each initial output in CLIP space."""
        und = self.undesired_embeddings
        if self.undesired == "all":
            return und[None].expand(len(images), -1, -1)
        with torch.no_grad():
            idx = (self.clip.encode_images(images) @ und.T).argmax(-1)
        return und[idx][:, None]

    # ------------------------------------------------------------------ mitigation rounds
    def _sample(self, cond, z, uncond, steps, grad=False):
        gen = self.generator
        x = gen.sample(cond, z, uncond, steps, self.guidance, grad=grad, checkpoint=grad)
        return gen.decode_latents(x)

    def _inputs(self, cond, z0, d):
        return (cond + d, z0) if self._on_prompt else (cond, z0 + d)

    @property
    def _on_prompt(self) -> bool:
        return self.mode != "nudge" or self.latent == "prompt"

    def nudge_round(self, cond, z0, uncond, d, beta, preferred, undesired, start=None) -> torch.Tensor:
        d = d.clone().requires_grad_(True)
        opt = torch.optim.Adam([d], lr=self.opt_lr)
        for _ in range(self.opt_steps):
            c, z = self._inputs(cond, z0, d)
            images = self._sample(c, z, uncond, self.opt_sampling_steps, grad=True)
            loss = self.objective(images, preferred, undesired, beta, d, start).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return d.detach()

    def wen_round(self, cond, z0, uncond, d) -> torch.Tensor:
        """Minimise the text-conditional noise magnitude at the first sampling step (Wen et al.)."""
        gen = self.generator
        t = gen.schedule(self.sampling_steps).timesteps[0].to(gen.device)
        with torch.no_grad():
            empty = uncond if uncond is not None else gen.encode_prompt([""])  # distilled guidance: no uncond
            eps_empty = gen.denoise(z0, t, empty.expand(len(z0), -1, -1))
        d = d.clone().requires_grad_(True)
        opt = torch.optim.Adam([d], lr=self.opt_lr)
        for _ in range(self.opt_steps):
            loss = (gen.denoise(z0, t, cond + d) - eps_empty).flatten(1).norm(dim=-1).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return d.detach()

    def noise_round(self, cond, seeds, r) -> torch.Tensor:
        """Somepalli et al.: Gaussian noise of scale lambda on the prompt embedding, fresh each round."""
        noise = [torch.randn(cond.shape[1:], generator=torch.Generator().manual_seed(int(s) * 1000 + r)) for s in seeds]
        return self.noise_lambda * torch.stack(noise).to(cond)

    # ------------------------------------------------------------------ one batch of outputs
    def run_batch(self, texts: list[str], seeds: list[int]) -> None:
        gen, start = self.generator, time.perf_counter()
        with torch.no_grad():
            uncond, _ = gen.guidance_embeddings(self.guidance)
            cond, z0 = gen.encode_prompt(texts), gen.initial_latents(seeds)
            initial = self._sample(cond, z0, uncond, self.sampling_steps).float().cpu()
        triggered = self.check(initial)
        t_initial = (time.perf_counter() - start) / len(texts)
        idx = torch.nonzero(triggered).flatten()
        offsets = torch.zeros_like(cond if self._on_prompt else z0)
        final, rounds = initial.clone(), torch.zeros(len(texts), dtype=torch.long)
        still = triggered.clone()
        start = time.perf_counter()
        if len(idx):
            beta = torch.full((len(texts),), float(self.beta))
            preferred = self.preferred_embeddings(texts) if self.mode == "nudge" else None
            undesired = self.undesired_for(initial) if self.mode == "nudge" else None
            for r in range(self.rounds):
                act = torch.nonzero(still).flatten()
                if not len(act):
                    break
                if self.mode == "nudge":
                    offsets[act] = self.nudge_round(
                        cond[act], z0[act], uncond, offsets[act], beta[act].to(cond), preferred[act], undesired[act],
                        initial[act] if self.keep is not None else None,
                    )
                elif self.mode == "wen":
                    offsets[act] = self.wen_round(cond[act], z0[act], uncond, offsets[act])
                else:
                    offsets[act] = self.noise_round(cond[act], [seeds[i] for i in act], r)
                with torch.no_grad():
                    c, z = self._inputs(cond[act], z0[act], offsets[act])
                    final[act] = self._sample(c, z, uncond, self.sampling_steps).float().cpu()
                rounds[act] += 1
                still[act] = self.check(final[act])
                beta[act] = torch.where(still[act], beta[act] * self.beta_growth, beta[act])
        t_nudge = (time.perf_counter() - start) / max(1, len(idx))
        with torch.no_grad():
            rms_initial = rms_distances(initial, self.protected)
            rms_before, nearest = rms_initial.min(dim=1)
            rms_after = nn_rms(final, self.protected)
            clip_after = (self.clip.encode_images(final) @ self.undesired_embeddings.T).max(-1).values
        for i, (text, seed) in enumerate(zip(texts, seeds)):
            self.records[(text, int(seed))] = OutputRecord(
                initial[i],
                final[i],
                bool(triggered[i]),
                bool(still[i]),
                int(rounds[i]),
                float(rms_before[i]),
                float(rms_after[i]),
                int(nearest[i]),
                float(clip_after[i]),
                offsets[i].detach().float().cpu(),
                t_initial + (t_nudge if triggered[i] else 0.0),
            )

    def ensure(self, texts: list[str], seeds: list[int]) -> list[OutputRecord]:
        """Records for every (text, seed), nudging the ones not seen yet."""
        todo = list(dict.fromkeys((t, int(s)) for t, s in zip(texts, seeds) if (t, int(s)) not in self.records))
        for i in range(0, len(todo), self.nudge_batch):
            chunk = todo[i : i + self.nudge_batch]
            self.run_batch([t for t, _ in chunk], [s for _, s in chunk])
        return [self.records[(t, int(s))] for t, s in zip(texts, seeds)]

    def output_records(self, prompts: list[str], seeds: list[int]) -> list[OutputRecord]:
        """The record of every (template, seed): '{}' filled, nudged where not seen yet."""
        return self.ensure([self.fill(p) for p in prompts], seeds)

    def protected_images(self) -> torch.Tensor:
        return self.protected

    # ------------------------------------------------------------------ run flow
    def compute(self) -> None:
        """Pre-run nudging on `prompts` x `seeds` (when given); their records are the run's deltas."""
        if self.prompts and self.seeds:
            self.ensure(
                [self.fill(p) for p in self.prompts for _ in self.seeds], [s for _ in self.prompts for s in self.seeds]
            )

    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        texts = [self.fill(p) for p in prompts]
        records = self.ensure(texts, seeds)  # samples each output once: its initial image is the baseline
        return torch.stack([r.final if edited else r.initial for r in records])

    def deltas(self) -> dict[str, torch.Tensor]:
        """Per output (rows in the order of nudges.json): the optimised offset, rounds, flags."""
        recs = list(self.records.values())
        if not recs:
            return {}
        name = "prompt_delta" if self._on_prompt else "z_offset"
        return {
            name: torch.stack([r.offset for r in recs]).contiguous(),
            "rounds": torch.tensor([r.rounds for r in recs]),
            "triggered": torch.tensor([r.triggered for r in recs]),
            "still_triggered": torch.tensor([r.still_triggered for r in recs]),
        }

    def load_deltas(self, deltas: dict[str, torch.Tensor], source: str = "deltas", structure: dict | None = None):
        raise NotImplementedError("nudging deltas are per output (see nudges.json); re-run the technique instead")

    def delta_norms(self) -> dict[str, float]:
        offsets = [r.offset.norm() for r in self.records.values() if r.triggered]
        return {"offset_max": float(torch.stack(offsets).max())} if offsets else {}

    def export(self, run_dir) -> list[str]:
        rows = [{"prompt": t, "seed": s, **self.summary(r)} for (t, s), r in self.records.items()]
        (Path(run_dir) / "nudges.json").write_text(json.dumps(rows, indent=1))
        return ["nudges.json"]

    @staticmethod
    def summary(r: OutputRecord) -> dict:
        return {
            "triggered": r.triggered,
            "still_triggered": r.still_triggered,
            "rounds": r.rounds,
            "rms_before": r.rms_before,
            "rms_after": r.rms_after,
            "nearest": r.nearest,
            "clip_after": r.clip_after,
            "offset_norm": float(r.offset.norm()),
            "seconds": r.seconds,
        }
