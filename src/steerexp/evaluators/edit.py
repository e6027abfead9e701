"""edit: success and preservation of a prompt-swap edit after inversion, per method.

The technique edits each inverted target with its edit prompt ("a red circle on the left" ->
"a blue circle on the left"). For every method (`ddim_w1`, `ddim_w<w>`, `npi`, `nti`):

  edit/success/<m>        the judge reads the new attribute (`head` = `target`); the judge is a
                          scorer of the run by name (`judge`; null: the analytic judge on the
                          shapes world, see evaluators/base.py)
  edit/kept/<h>/<m>       the judge's reading of head h (shape, size, position) equals
                          its reading of the original image
  edit/kept_all/<m>       all kept heads unchanged; edit/success_and_kept/<m> both at once
  edit/bg_rms/<m>         per-pixel RMS between edit and original outside the object
  edit/bg_rms_recon/<m>   the same for the method's own reconstruction (its floor)
  edit/kept_all_recon/<m> kept_all for the reconstruction (how far the classifier's reading
                          survives inversion at all, before any edit)

The object mask is exact for world targets (the scene is known: shape, centre, radius),
dilated by `dilate` pixels; for image files it is every pixel more than `bg_tolerance` away
from the original's border colour (median of the border pixels), dilated the same way.
Grid `samples/edit`: original | each method's edit.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.evaluators.inversion import pick_methods, require_inversion
from steerexp.images import hw, image_grid, image_grid_labels
from steerexp.worlds.shapes import world


def scene_mask(scene: world.Scene, res, pol=None) -> torch.Tensor:
    """[H, W] bool (res: one side, or (height, width)): pixels the scene's shape touches (the world's own
    anti-aliased coverage > 0), fitted as the run's world images are (targets.fit_world, per the run's image
    policy `pol`)."""
    from steerexp.targets import fit_world

    cx, cy = world.centre(scene.size, scene.position)
    side = max(hw(res))
    cov = world.coverage(scene.shape, cx + scene.dx, cy + scene.dy, world.SIZES[scene.size], side) > 0
    return torch.from_numpy(fit_world(cov, res, pol))


def border_mask(image: torch.Tensor, tolerance: float) -> torch.Tensor:
    """[H, W] bool: pixels far from the median border colour (the object of a plain-background image)."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=-1)
    bg = border.median(dim=-1).values[:, None, None]
    return (image - bg).abs().amax(0) > tolerance


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    if pixels <= 0:
        return mask
    k = 2 * pixels + 1
    return F.max_pool2d(mask[None, None].float(), k, stride=1, padding=pixels)[0, 0] > 0


def background_rms(images: torch.Tensor, originals: torch.Tensor, background: torch.Tensor) -> np.ndarray:
    """Per-image RMS over the background pixels (background [N, H, W] bool)."""
    sq = (images - originals).pow(2).mean(1)                       # [N, H, W]
    bg = background.float()
    return (sq * bg).sum((1, 2)).div(bg.sum((1, 2)).clamp(min=1)).sqrt().numpy()


class Edit:
    name = "edit"

    def __init__(self, methods: list[str] | None = None, head: str = "colour", target: str = "blue",
                 keep: list[str] | None = None, dilate: int = 1, bg_tolerance: float = 0.1, grid_rows: int = 8,
                 judge: str | None = None):
        self.methods, self.head, self.target = methods, head, target
        self.judge = judge  # who reads the attributes, a scorer of the run by name (null: see evaluators/base.py)
        self.keep = list(keep or ["shape", "size", "position"])
        if head in self.keep:
            raise ValueError(f"evaluator.edit.keep lists the edited head {head!r}; it cannot also be preserved")
        self.dilate, self.bg_tolerance, self.grid_rows = dilate, bg_tolerance, grid_rows

    def background(self, tech) -> torch.Tensor:
        images = tech.images
        if tech.scenes is not None:
            pol = getattr(tech, "image_policy", None)  # the run's: its world images were fitted by it
            objects = [scene_mask(s, tuple(images.shape[-2:]), pol) for s in tech.scenes]
        else:
            objects = [border_mask(im, self.bg_tolerance) for im in images]
        return ~torch.stack([dilate(o, self.dilate) for o in objects])

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        tech = ctx.technique
        require_inversion(tech)
        judging = ctx.judging(self.name, self.judge, self.head, self.target)
        clf = judging.scorer  # the judge (the analytic one on the shapes world by default)
        clf.class_index(self.head, self.target)  # a clear error for an unknown head or class
        for h in self.keep:
            if h not in clf.heads:
                raise ValueError(f"evaluator.edit.keep: unknown classifier head {h!r}; choose from {sorted(clf.heads)}")
        originals = tech.images
        with torch.no_grad():
            before = clf.predict(originals)
        background = self.background(tech)
        methods = pick_methods(tech, self.methods, exclude=("vae",))
        m: dict[str, float] = {**judging.metrics(), "edit/images": len(originals),
                               "edit/background_fraction": float(background.float().mean()),
                               "edit/success/original": float(np.mean([p == self.target for p in before[self.head]]))}
        rows, edits = [], []
        prompts = tech.target_prompts()
        for method in methods:
            edited = tech.edit(method)
            edits.append(edited)
            with torch.no_grad():
                after = clf.predict(edited)
            success = np.array([p == self.target for p in after[self.head]])
            kept = {h: np.array([a == b for a, b in zip(after[h], before[h])]) for h in self.keep}
            kept_all = np.logical_and.reduce(list(kept.values()))
            rms = background_rms(edited, originals, background)
            rec = tech.reconstruct(method)
            rms_rec = background_rms(rec, originals, background)
            with torch.no_grad():
                read_rec = clf.predict(rec)
            kept_rec = np.logical_and.reduce(
                [np.array([a == b for a, b in zip(read_rec[h], before[h])]) for h in self.keep]
            )
            m[f"edit/success/{method}"] = float(success.mean())
            m.update({f"edit/kept/{h}/{method}": float(k.mean()) for h, k in kept.items()})
            m[f"edit/kept_all/{method}"] = float(kept_all.mean())
            m[f"edit/success_and_kept/{method}"] = float((success & kept_all).mean())
            m[f"edit/bg_rms/{method}"] = float(rms.mean())
            m[f"edit/bg_rms_recon/{method}"] = float(rms_rec.mean())
            m[f"edit/kept_all_recon/{method}"] = float(kept_rec.mean())
            rows += [
                [tech.names[i], method, prompts[i], after[self.head][i], bool(kept_all[i]), float(rms[i])]
                for i in range(len(originals))
            ]
        grid = image_grid([originals] + edits, self.grid_rows)
        return EvalResult(
            metrics=m,
            grids={"samples/edit": grid},
            grid_labels={"samples/edit": image_grid_labels(
                [originals] + edits, self.grid_rows, [f"{n}: {p}" for n, p in zip(tech.names, prompts)],
                ["original", *methods], what="rows: target images and their edit prompts; columns: the original, "
                "then each method's edit")},
            tables={"edit/per_image": (["image", "method", "prompt", self.head, "kept_all", "bg_rms"], rows)},
        )
