"""edit_bench: an edit benchmark with ground truth, from the shapes world (PIE-Bench's metrics, exact).

World mode (the technique's targets are world scenes). Each source scene gets one edit of every
type in `types` (colour, shape, size, background, position): the target scene is the source with
that attribute changed to another value (drawn per scene and type from `seed`; shapes from the
generator's seen ones), its prompt is `prompt_template` filled with the target scene (the source
prompt with the attribute's words swapped: P2P's word swap), and the world gives the ground truth:
the exact target render (world.render) and the object masks of source and target
(world.coverage). Every method edits every source to every target prompt. Per edit type and
method (`edit_bench/<type>/<metric>/<method>`, and `all` = the mean over types):

  success          the judge reads the edited attribute as the target value
  kept             the judge reads every other attribute (shape, colour, size, position, background)
                   as it reads the source image; success_and_kept: both
  kept_vae         ... as it reads the source's VAE round trip: what a latent editor can at best keep
                   (the VAE alone blurs small shapes into other shapes for the judge)
  vae_ok/<m>       success, kept, success_and_kept and bg_psnr over the sources the VAE keeps (the judge
                   reads their round trip exactly as the source); vae_ok/images: how many
  iou_source       IoU of the edit's object mask (pixels more than `fg_tolerance` from the median
  iou_target       border colour) with the exact source / target object mask (coverage >= 0.5)
  bg_psnr, bg_ssim the edit vs the source outside the union of the two object masks (dilated by
                   `dilate` px); background edits change that region on purpose
  gt_psnr          the whole edit vs the exact target render (PSNRs are capped at 100 dB: an exact match)
  perceptual       1 - cosine similarity of the concept classifier's penultimate features
                   (ConceptClassifier.features, the offline stand-in for LPIPS), edit vs target render
  seconds          CPU seconds per image (time.process_time: other jobs on a shared machine do not count):
                   the edit, plus the method's inversion (technique.inversion_seconds)

Two reference rows come with every type: `ground_truth` (the exact target render: the ceiling of
success and kept) and `vae` (the source through the VAE, no edit: the ceiling of kept and of the
background a latent editor can keep). The judge (`judge`; null: the analytic judge on the shapes
world) reads shape, colour, size and position; the background is read by the judge when it can
(the analytic judge's `read`) and otherwise as the palette background nearest the median border
pixel (the analytic judge's own rule).

User mode (the technique's targets come from a manifest of the user's images: no scenes, no ground
truth): per method, under the type `user`: bg_psnr / bg_ssim outside the manifest's masks (when it
has them), psnr_source (the whole image vs the source), perceptual_source, clip_target (CLIP cosine
of the edit to its target prompt) and clip_gain (that minus the source image's), seconds.

Grids: `samples/edit_bench_<type>` (source | target render | each method) and, with
`attention_maps`, `samples/attention_<type>`: per image, the source with its source-prompt tokens'
cross-attention maps, then the edit with its target-prompt tokens' maps, of that P2P method.
"""
from __future__ import annotations

import string
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from steerexp import progress
from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.evaluators.edit import border_mask, dilate, scene_mask
from steerexp.evaluators.edit_bench_spec import TYPES  # the edit types (its settings' rules read them too)
from steerexp.evaluators.inversion import pick_methods, require_inversion
from steerexp.generators.attention import token_grid
from steerexp.images import GridLabels, hw, image_grid, image_grid_labels, to_tensor
from steerexp.targets import fit_world
from steerexp.techniques.protocols import AttentionMaps, EditMasks, TimedInversion
from steerexp.worlds.shapes import world

HEADS = ("shape", "colour", "size", "position", "background")
METRICS = ("success", "kept", "success_and_kept", "kept_vae", "iou_source", "iou_target", "bg_psnr", "bg_ssim",
           "gt_psnr", "perceptual", "seconds")
REFERENCES = ("ground_truth", "vae")


def timed_edit(tech, method: str, prompts: list[str], n: int) -> tuple[torch.Tensor, float]:
    """(the edits, CPU seconds per image): the edit timed alone (a lazy inversion is run first, outside the timing)
    plus the inversion it reads (TimedInversion.inversion_seconds), so no inversion is counted twice."""
    timed = isinstance(tech, TimedInversion)
    if timed:
        tech.inverted(method)
    start = time.process_time()
    images = tech.edit(method, prompts)
    return images, (time.process_time() - start) / n + (tech.inversion_seconds(method) if timed else 0.0)


# ---------------------------------------------------------------------------- edits with ground truth
def values(kind: str) -> tuple[str, ...]:
    """The values an edit of this type may set (shapes: those the generator saw)."""
    if kind == "shape":
        return world.SEEN_SHAPES
    if kind == "background":
        return tuple(world.BACKGROUNDS)
    return world.HEADS[kind]


def target_scene(scene: world.Scene, kind: str, seed: int, index: int) -> world.Scene:
    """The source scene with attribute `kind` set to another value, drawn from (seed, index, kind)."""
    others = [v for v in values(kind) if v != getattr(scene, kind)]
    rng = np.random.default_rng([seed, index, TYPES.index(kind)])
    return world.Scene(**(scene.to_dict() | {kind: others[rng.integers(len(others))]}))


def object_mask(scene: world.Scene, res, pol=None) -> torch.Tensor:
    """[H, W] bool (res: one side, or (height, width)): the pixels the scene's shape covers at least half of (the
    exact object mask), fitted as the run's world images are (targets.fit_world, per the run's image policy)."""
    cx, cy = world.centre(scene.size, scene.position)
    cov = world.coverage(scene.shape, cx + scene.dx, cy + scene.dy, world.SIZES[scene.size], max(hw(res)))
    return torch.from_numpy(fit_world(cov >= 0.5, res, pol))


def fill(template: str, scene: world.Scene) -> str:
    return template.format(shape=scene.shape, colour=scene.colour, size=scene.size,
                           position=world.POSITION_PHRASES[scene.position], background=scene.background)


def psnr_where(images: torch.Tensor, refs: torch.Tensor, where: torch.Tensor) -> np.ndarray:
    """Per-image PSNR (dB, data range 1) over the pixels `where` [N, H, W] (100 dB for an exact match)."""
    sq = (images - refs).pow(2).mean(1)
    w = where.float()
    mse = (sq * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1)
    return (10 * torch.log10(1 / mse.clamp(min=1e-10))).numpy()


def ssim_where(images: torch.Tensor, refs: torch.Tensor, where: torch.Tensor) -> np.ndarray:
    """Per-image mean of the SSIM map over the pixels `where`."""
    _, full = structural_similarity_index_measure(images, refs, data_range=1.0, reduction="none",
                                                  return_full_image=True)
    w = where.float()
    return ((full.mean(1) * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1)).numpy()


def iou(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    inter, union = (a & b).sum((1, 2)).float(), (a | b).sum((1, 2)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).numpy()


def nearest_background(images: torch.Tensor) -> list[str]:
    """The palette background nearest to each image's median border pixel."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=-1)
    palette = torch.tensor(list(world.BACKGROUNDS.values()), dtype=torch.float32) / 255
    idx = torch.cdist(border.median(-1).values, palette).argmin(-1)
    return [list(world.BACKGROUNDS)[i] for i in idx.tolist()]


class EditBench:
    name = "edit_bench"

    def __init__(self, methods: list[str] | None = None, types: list[str] | None = None,
                 prompt_template: str = "a {size} {colour} {shape} {position} on a {background} background",
                 seed: int = 0, judge: str | None = None, dilate: int = 1, fg_tolerance: float = 0.15,
                 grid_rows: int = 8, attention_maps: str | bool | None = None):
        self.methods, self.types = methods, list(types or TYPES)
        unknown = [t for t in self.types if t not in TYPES]
        if unknown or not self.types:
            raise ValueError(f"evaluator.edit_bench.types: {unknown or 'none'} ; choose from {list(TYPES)}")
        fields = {f for _, f, _, _ in string.Formatter().parse(prompt_template) if f}
        missing = [t for t in self.types if t not in fields]
        if missing:
            raise ValueError(f"evaluator.edit_bench.prompt_template {prompt_template!r} has no {{{missing[0]}}}, "
                             f"so a {missing[0]} edit would not change the prompt; add it or drop the type")
        self.template, self.seed, self.judge = prompt_template, seed, judge
        self.dilate, self.fg_tolerance, self.grid_rows = dilate, fg_tolerance, grid_rows
        self.attention = attention_maps

    # ------------------------------------------------------------------ reading
    def reader(self, ctx: EvalContext):
        """(name, read): read(images) -> {head: [value per image]} for shape, colour, size, position, background."""
        judging = ctx.judging(self.name, self.judge)
        judge = judging.scorer

        def read(images: torch.Tensor) -> dict[str, list[str]]:
            with torch.no_grad():
                if hasattr(judge, "read"):
                    records = judge.read(images)
                    return {h: [r[h] for r in records] for h in HEADS}
                out = {h: v for h, v in judge.predict(images).items() if h in HEADS}
            missing = [h for h in HEADS if h not in out and h != "background"]
            if missing:
                raise ValueError(f"evaluator.edit_bench.judge: {judging.name!r} does not read {missing}; "
                                 "judge with analytic or classifier")
            return out | {"background": nearest_background(images)}

        return judging, read

    def features(self, ctx: EvalContext, images: torch.Tensor) -> torch.Tensor:
        clf = ctx.scorer("classifier")
        if not hasattr(clf, "features"):
            raise ValueError("evaluator.edit_bench: the perceptual distance needs the concept classifier's features; "
                             "scorers.classifier must be a ConceptClassifier folder (null: the shipped one)")
        with torch.no_grad():
            return F.normalize(clf.features(images).float(), dim=-1)

    def objects(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([border_mask(im, self.fg_tolerance) for im in images])

    # ------------------------------------------------------------------ world mode
    def evaluate(self, ctx: EvalContext) -> EvalResult:
        tech = ctx.technique
        require_inversion(tech)
        methods = pick_methods(tech, self.methods, exclude=("vae",))
        if tech.scenes is None:
            return self.evaluate_user(ctx, methods)
        judging, read = self.reader(ctx)
        sources, scenes, res = tech.images, tech.scenes, tuple(tech.images.shape[-2:])  # (height, width)
        n = len(scenes)
        read_src = read(sources)
        pol = ctx.image_policy  # the run's (its world images were fitted by it)
        src_masks = torch.stack([scene_mask(s, res, pol) for s in scenes])      # every pixel the shape touches
        src_objects = torch.stack([object_mask(s, res, pol) for s in scenes])   # the pixels it covers at least half of
        vae = tech.reconstruct("vae")
        read_vae = read(vae)
        vae_ok = np.array([all(read_vae[h][i] == read_src[h][i] for h in HEADS) for i in range(n)])
        m: dict = {**judging.metrics(), f"{self.name}/images": n, f"{self.name}/edits": n * len(self.types),
                   f"{self.name}/vae_ok/images": int(vae_ok.sum())}
        result = EvalResult(metrics=m)
        rows, per_type = [], {}
        for kind in self.types:
            targets = [target_scene(s, kind, self.seed, i) for i, s in enumerate(scenes)]
            prompts = [fill(self.template, t) for t in targets]
            truth = to_tensor(np.stack([fit_world(world.render(t, max(res)), res, pol) for t in targets]))
            tgt_masks = torch.stack([scene_mask(t, res, pol) for t in targets])
            tgt_objects = torch.stack([object_mask(t, res, pol) for t in targets])
            union = torch.stack([dilate(a | b, self.dilate) for a, b in zip(src_masks, tgt_masks)])
            truth_features = self.features(ctx, truth)
            edits = {"ground_truth": truth, "vae": vae}
            seconds = {"ground_truth": 0.0, "vae": 0.0}
            with progress.phase(f"edit_bench: {kind} edits", total=n * len(methods)):
                for method in methods:
                    edits[method], seconds[method] = timed_edit(tech, method, prompts, n)
                    progress.advance(n)
            per_type[kind] = (prompts, truth, edits)
            for method, images in edits.items():
                got = read(images)
                success = np.array([g == getattr(t, kind) for g, t in zip(got[kind], targets)])
                kept = np.array([all(got[h][i] == read_src[h][i] for h in HEADS if h != kind) for i in range(n)])
                kept_vae = np.array([all(got[h][i] == read_vae[h][i] for h in HEADS if h != kind) for i in range(n)])
                objects = self.objects(images)
                values_ = {
                    "success": success, "kept": kept, "success_and_kept": success & kept, "kept_vae": kept_vae,
                    "iou_source": iou(objects, src_objects), "iou_target": iou(objects, tgt_objects),
                    "bg_psnr": psnr_where(images, sources, ~union), "bg_ssim": ssim_where(images, sources, ~union),
                    "gt_psnr": psnr_where(images, truth, torch.ones_like(union)),
                    "perceptual": (1 - (self.features(ctx, images) * truth_features).sum(-1)).numpy(),
                }
                for k, v in values_.items():
                    m[f"{self.name}/{kind}/{k}/{method}"] = float(np.mean(v))
                    if k in ("success", "kept", "success_and_kept", "bg_psnr") and vae_ok.any():
                        m[f"{self.name}/{kind}/vae_ok/{k}/{method}"] = float(np.mean(v[vae_ok]))
                m[f"{self.name}/{kind}/seconds/{method}"] = seconds[method]
                rows += [[tech.names[i], kind, method, prompts[i], bool(success[i]), bool(kept[i]),
                          float(values_["bg_psnr"][i]), float(values_["gt_psnr"][i])] for i in range(n)]
        for k in METRICS:  # the mean over edit types
            for method in (*REFERENCES, *methods):
                vals = [m[f"{self.name}/{t}/{k}/{method}"] for t in self.types]
                m[f"{self.name}/all/{k}/{method}"] = float(np.mean(vals))
        self.add_grids(result, tech, per_type, methods)
        result.tables[f"{self.name}/per_image"] = (
            ["image", "type", "method", "target prompt", "success", "kept", "bg_psnr", "gt_psnr"], rows)
        return result

    def add_grids(self, result: EvalResult, tech, per_type: dict, methods: list[str]) -> None:
        for kind, (prompts, truth, edits) in per_type.items():
            columns = [tech.images, truth] + [edits[mt] for mt in methods]
            key = f"samples/{self.name}_{kind}"
            result.grids[key] = image_grid(columns, self.grid_rows)
            result.grid_labels[key] = image_grid_labels(
                columns, self.grid_rows, prompts, ["source", "target render", *methods],
                what=f"{kind} edits; rows: sources and their target prompts; columns: the source, the exact "
                "target render, each method's edit")
        p2p = [mt for mt in methods if "+p2p" in mt]
        if not self.attention or not p2p or not isinstance(tech, AttentionMaps):
            return
        method = self.attention if isinstance(self.attention, str) else p2p[0]
        for kind, (prompts, _, _) in per_type.items():
            maps, src_tokens, tgt_tokens = tech.attention_maps(method, prompts)
            edited = tech.edit(method, prompts)  # cached when `method` is one of the benchmark's
            k = min(self.grid_rows, len(prompts))
            images = torch.stack([x for i in range(k) for x in (tech.images[i], edited[i])])
            rows = torch.stack([x for i in range(k) for x in (maps[0, i], maps[1, i])])
            tokens = [t for i in range(k) for t in (src_tokens[i], tgt_tokens[i])]
            key = f"samples/attention_{kind}"
            result.grids[key] = token_grid(images, rows, tokens)
            h, w, gap, width = *images.shape[-2:], 2, max(len(t) for t in tokens)
            result.grid_labels[key] = GridLabels(
                rows=[r for i in range(k) for r in (f"source {tech.names[i]}", f"edit: {prompts[i]}")],
                columns=["image"] + [f"token {j + 1}" for j in range(width)],
                row_tops=[r * (h + gap) for r in range(2 * k)], column_lefts=[c * (w + gap) for c in range(width + 1)],
                cell=(h, w), what=f"{method}, {kind} edits: cross-attention maps per token (white: most attention), "
                "averaged over steps, layers and heads; column j is the j-th token of the row's prompt")

    # ------------------------------------------------------------------ user mode
    def evaluate_user(self, ctx: EvalContext, methods: list[str]) -> EvalResult:
        """No scenes: the metrics that need no ground truth (see the module docstring)."""
        tech = ctx.technique
        sources, prompts, n = tech.images, tech.target_prompts(), len(tech.images)
        masks = tech.masks if isinstance(tech, EditMasks) else None
        clip = ctx.clip
        with torch.no_grad():
            text = clip.encode_texts(prompts)
            clip_source = (clip.encode_images(sources) * text).sum(-1).cpu().numpy()
        src_features = self.features(ctx, sources)
        m: dict = {f"{self.name}/images": n, f"{self.name}/user/masks": masks is not None}
        columns, rows = [sources], []
        for method in methods:
            with progress.phase(f"edit_bench: {method}", total=n):
                images, secs = timed_edit(tech, method, prompts, n)
                progress.advance(n)
            columns.append(images)
            with torch.no_grad():
                clip_target = (clip.encode_images(images) * text).sum(-1).cpu().numpy()
            values_ = {
                "psnr_source": peak_signal_noise_ratio(images, sources, data_range=1.0, dim=(1, 2, 3),
                                                       reduction="none").numpy(),
                "perceptual_source": (1 - (self.features(ctx, images) * src_features).sum(-1)).numpy(),
                "clip_target": clip_target, "clip_gain": clip_target - clip_source,
            }
            if masks is not None:  # outside the region the user allows to change
                outside = ~torch.stack([dilate(mk, self.dilate) for mk in masks])
                values_["bg_psnr"] = psnr_where(images, sources, outside)
                values_["bg_ssim"] = ssim_where(images, sources, outside)
            for k, v in values_.items():
                m[f"{self.name}/user/{k}/{method}"] = float(np.mean(v))
            m[f"{self.name}/user/seconds/{method}"] = secs
            rows += [[tech.names[i], method, prompts[i], float(values_["psnr_source"][i]),
                      float(values_["clip_target"][i])] for i in range(n)]
        key = f"samples/{self.name}_user"
        return EvalResult(
            metrics=m, grids={key: image_grid(columns, self.grid_rows)},
            grid_labels={key: image_grid_labels(columns, self.grid_rows, prompts, ["source", *methods],
                                                what="rows: your images and their target prompts; columns: the "
                                                "source, each method's edit")},
            tables={f"{self.name}/per_image": (["image", "method", "target prompt", "psnr_source", "clip_target"],
                                               rows)})
