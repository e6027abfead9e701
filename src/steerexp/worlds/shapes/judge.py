"""The analytic judge of the shapes world: it reads a scene off an image with no learned
weights and no gradients, so an edit cannot be optimised to fool it.

How it reads an image (any size; it is resized to the world's 32 px):

  background  the palette background (world.BACKGROUNDS) nearest to the median border pixel
  colour      the hue of the foreground pixels, voted against the palette (world.COLOURS). Mixing
              a colour with a neutral background keeps its hue, so anti-aliased edges vote right;
              each pixel votes with its chroma, for each palette colour by a Gaussian likelihood
              of its hue distance (not normalised over the palette: a hue between two palette
              colours counts for neither, so p(colour) sums to <= 1)
  foreground  alpha = |pixel - background| / |colour - background|, clipped to [0, 1]: exactly the
              renderer's anti-aliased coverage on a clean render (world.render mixes the two)
  shape       the best soft IoU of alpha against the world's own masks (world.shape_mask), over
              every shape, a grid of scales and quarter-pixel positions around the centroid
  size        the fitted radius against world.SIZES (log distance)
  position    the fitted centre against the world's nominal centres (world.centre)
  clean       how well one rendered scene explains the image: IoU x colour purity x background
              fit. Colour purity is the share of the foreground's ink that lies on the line from
              the background to the fitted colour (the only colours a render has); background
              fit is the share of the pixels outside the fitted shape that are the palette
              background. Clean renders score about 1; noisy multicoloured blobs score low
              whatever their hue.

`AnalyticJudge` is a classifier scorer (`heads`, `probs`, `predict`, so `scorers.prob(judge,
images, head, target)` works): its probabilities are soft scores from the fits (hue votes,
softmax of IoUs, distances in scale and position), not calibrated posteriors. It also gives
`clean_score(images)` and `read(images)`, one record per image (scene fields and scores).
Asking it for a gradient is an error: it judges, it is never an objective.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from steerexp.scorers.classifier import HeadClassifier
from steerexp.worlds.shapes import world

RES = 32            # the world's resolution; every image is read at it
FINE = 4            # supersampling of the template bank: quarter-pixel positions
RADII = tuple(sorted(set(np.round(np.geomspace(0.06, 0.46, 24), 4)) | set(world.SIZES.values())))
FG_TOL = 0.15       # RGB distance from the background above which a pixel is foreground (colour votes)
PURE_TOL = 0.15     # RGB distance from the background -> colour line within which ink is "pure"
HUE_SIGMA = 10.0    # degrees: spread of a palette colour's hue (the generator's renders stay within about 10)
SHAPE_TEMPERATURE = 0.02   # softmax temperature over the shapes' best IoUs
SIZE_SIGMA = 0.15   # log-radius distance scale of the size scores
POSITION_SIGMA = 0.05      # centre distance scale (fraction of the side) of the position scores


def hue_chroma(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hue in degrees [0, 360) and chroma (max - min) of RGB values, channel dim 1 ([B, 3, ...])."""
    r, g, b = rgb.unbind(1)
    mx, mn = rgb.max(1).values, rgb.min(1).values
    c = mx - mn
    safe = c.clamp(min=1e-6)
    h = torch.where(mx == r, ((g - b) / safe) % 6, torch.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (h * 60.0) % 360.0, c


def _palette(colours: dict) -> torch.Tensor:
    return torch.tensor(list(colours.values()), dtype=torch.float32) / 255.0


def _template_bank() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coverage templates of every shape x radius x quarter-pixel phase, each with its centroid at
    pixel coordinate (RES/2 + px/FINE, RES/2 + py/FINE) for phase (py, px).

    Returns templates [P, S*R, RES*RES] (P = FINE^2 phases, phase index py * FINE + px), their squared
    norms [P, S*R] and the offset of each template's centre from its centroid [S*R, 2] (x, y, in pixels)."""
    n = (RES + 2) * FINE  # a fine canvas one pixel wider on each side than the crops
    coords = (np.arange(n) + 0.5) / FINE - 1.0 - RES / 2  # pixels of the 32 px image, relative to its centre
    x, y = np.meshgrid(coords, coords)
    unit = np.linspace(-1.5, 1.5, 601)  # each shape's centroid at radius 1 (masks scale with the radius)
    ux, uy = np.meshgrid(unit, unit)
    templates, offsets = [], []
    for shape in world.SHAPES:
        m = world.shape_mask(shape, ux, uy, 1.0)
        ox, oy = (ux * m).sum() / m.sum(), (uy * m).sum() / m.sum()  # centroid - centre, at radius 1
        rp = np.array(RADII)[:, None, None] * RES  # radii in pixels; the centroid sits at the canvas centre
        masks = torch.from_numpy(world.shape_mask(shape, x / rp + ox, y / rp + oy, 1.0)).float()
        box = F.avg_pool2d(masks[:, None], FINE, stride=1)[:, 0]  # [R, n - FINE + 1, same]: pixel coverage
        # the pixel starting py fine rows earlier puts the content py / FINE pixels lower
        templates.append(torch.stack([box[:, FINE - py :: FINE, FINE - px :: FINE][:, :RES, :RES].flatten(1)
                                      for py in range(FINE) for px in range(FINE)]))    # [P, R, RES*RES]
        offsets += [(-ox * r, -oy * r) for r in rp[:, 0, 0]]
    bank = torch.cat(templates, dim=1)  # [P, S*R, RES*RES]
    return bank, bank.pow(2).sum(-1), torch.tensor(offsets, dtype=torch.float32)


class AnalyticJudge(HeadClassifier):
    """The shapes world's analytic judge (see the module docstring). Heads: shape, colour, size, position."""

    def __init__(self):
        super().__init__()
        self.heads = {h: list(c) for h, c in world.HEADS.items()}
        bank, norms, offsets = _template_bank()
        self.register_buffer("bank", bank, persistent=False)
        self.register_buffer("norms", norms, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("colours", _palette(world.COLOURS), persistent=False)
        self.register_buffer("backgrounds", _palette(world.BACKGROUNDS), persistent=False)
        self.register_buffer("hues", hue_chroma(self.colours[:, :, None])[0][:, 0], persistent=False)
        centres = [(world.centre(s, p), world.SIZES[s], p) for s in world.SIZES for p in world.POSITIONS]
        self.register_buffer("nominal", torch.tensor([c for c, _, _ in centres], dtype=torch.float32),
                             persistent=False)
        self.nominal_position = [world.POSITIONS.index(p) for _, _, p in centres]
        self.radii = torch.tensor(RADII)
        self._memo: list[tuple[torch.Tensor, int, dict]] = []  # the last fits, by tensor (evaluators reread images)

    # ------------------------------------------------------------------ the classifier interface
    def class_index(self, head: str, name: str) -> int:
        if head not in self.heads:
            raise ValueError(f"the analytic judge reads the heads {sorted(self.heads)}, not {head!r}; to judge "
                             f"another head name a classifier as the judge (e.g. evaluator.concept.judge=user)")
        if name not in self.heads[head]:
            raise ValueError(f"the analytic judge knows no {head} {name!r}; choose one of {self.heads[head]}, or "
                             f"name a classifier that knows it as the judge (e.g. evaluator.concept.judge=user)")
        return self.heads[head].index(name)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{head: log scores [B, classes]}; `probs` gives the scores themselves."""
        fit = self.fit(images)
        return {h: fit[h].clamp(min=1e-12).log() for h in self.heads}

    def probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        fit = self.fit(images)
        return {h: fit[h] for h in self.heads}

    def clean_score(self, images: torch.Tensor) -> torch.Tensor:
        """[B] in [0, 1]: how well one rendered scene explains each image (IoU x colour purity x background fit)."""
        return self.fit(images)["clean"]

    def read(self, images: torch.Tensor) -> list[dict]:
        """One record per image: the scene read (shape, colour, size, position, background), the fitted
        centre (cx, cy, fractions of the side) and radius, and the scores (iou, colour_purity,
        background_fit, clean, and the probability of each head's reading)."""
        fit = self.fit(images)
        out = []
        for i in range(len(images)):
            rec = {h: self.heads[h][int(fit[h][i].argmax())] for h in self.heads}
            rec["background"] = list(world.BACKGROUNDS)[int(fit["background"][i])]
            rec.update({k: float(fit[k][i]) for k in ("cx", "cy", "radius", "iou", "colour_purity",
                                                       "background_fit", "clean")})
            rec.update({f"p_{h}": float(fit[h][i].max()) for h in self.heads})
            out.append(rec)
        return out

    # ------------------------------------------------------------------ the fit
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the analytic judge reads RGB images [B, 3, H, W] in [0, 1]; got {tuple(images.shape)}")
        x = images.detach().float().to(self.bank.device).clamp(0, 1)
        if x.shape[-2:] != (RES, RES):
            x = F.interpolate(x, size=(RES, RES), mode="bilinear", antialias=True, align_corners=False)
        return x

    def fit(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the judge reads, batched: per head [B, classes] scores, and per image the
        background index, centre, radius, iou, colour_purity, background_fit and clean score.
        The fits of the last few tensors are kept (the same unmodified tensor is not read twice)."""
        if images.requires_grad and torch.is_grad_enabled():
            raise ValueError("the analytic judge has no gradients: it judges, it cannot be optimised against; "
                             "give objectives and guidance a learned scorer (classifier, clip, user)")
        for ref, version, result in self._memo:
            if ref is images and version == images._version:
                return result
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # many small ops: more threads only add synchronisation (10x slower when busy)
        try:
            result = self._fit(images)
        finally:
            torch.set_num_threads(threads)
        self._memo = [(images, images._version, result)] + self._memo[:3]
        return result

    @torch.no_grad()
    def _fit(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.prepare(images)
        B = len(x)
        # background: the palette entry nearest the median border pixel
        border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=-1)  # [B, 3, nb]
        bg_idx = torch.cdist(border.median(-1).values, self.backgrounds).argmin(-1)
        bg = self.backgrounds[bg_idx][:, :, None, None]                                           # [B, 3, 1, 1]
        # colour: chroma-weighted hue votes of the foreground pixels
        dist = (x - bg).norm(dim=1)                                                                # [B, H, W]
        hue, chroma = hue_chroma(x)
        w = (chroma * (dist > FG_TOL)).flatten(1)                                                  # [B, HW]
        dh = (hue.flatten(1)[:, :, None] - self.hues).abs()
        dh = torch.minimum(dh, 360 - dh)                                                           # [B, HW, K]
        # each pixel's likelihood of each palette hue, not normalised over the palette: a hue between two
        # palette colours (or far from all) gives little to any, the rest is "no palette colour"
        votes = (w[:, :, None] * torch.exp(-(dh / HUE_SIGMA) ** 2 / 2)).sum(1)                     # [B, K]
        colour = votes / w.sum(-1, keepdim=True).clamp(min=1e-6)
        fg = self.colours[colour.argmax(-1)][:, :, None, None]
        # foreground coverage, and the share of its ink on the background -> colour line
        line = fg - bg
        alpha = (dist / line.norm(dim=1).clamp(min=1e-6)).clamp(0, 1)                              # [B, H, W]
        t = ((x - bg) * line).sum(1, keepdim=True) / line.pow(2).sum(1, keepdim=True).clamp(min=1e-6)
        off_line = (x - bg - t.clamp(0, 1) * line).norm(dim=1)
        ink = dist * (dist > FG_TOL)
        colour_purity = torch.where(ink.sum((1, 2)) > 0, (ink * (off_line < PURE_TOL)).sum((1, 2))
                                    / ink.sum((1, 2)).clamp(min=1e-6), torch.zeros(B))
        iou, fitted = self.fit_templates(alpha)
        outside = fitted["mask"] == 0  # the background of the fitted scene: it should be the palette colour
        background_fit = (outside & (dist < FG_TOL)).sum((1, 2)) / outside.sum((1, 2)).clamp(min=1)
        clean = iou["best"] * colour_purity * background_fit
        shape = (iou["per_shape"] / SHAPE_TEMPERATURE).softmax(-1)
        radius, cx, cy = fitted["radius"], fitted["cx"], fitted["cy"]
        sizes = torch.tensor(list(world.SIZES.values()))
        size = (-((radius[:, None].log() - sizes.log()) / SIZE_SIGMA) ** 2 / 2).softmax(-1)
        d2 = (torch.stack([cx, cy], -1)[:, None] - self.nominal).pow(2).sum(-1)                   # [B, 10]
        logits = torch.full((B, len(world.POSITIONS)), -1e9)
        for j, p in enumerate(self.nominal_position):
            logits[:, p] = torch.maximum(logits[:, p], -d2[:, j] / (2 * POSITION_SIGMA ** 2))
        position = logits.softmax(-1)
        return {"shape": shape, "colour": colour, "size": size, "position": position, "background": bg_idx,
                "cx": cx, "cy": cy, "radius": radius, "iou": iou["best"], "colour_purity": colour_purity,
                "background_fit": background_fit, "clean": clean}

    def fit_templates(self, alpha: torch.Tensor) -> tuple[dict, dict]:
        """Best soft IoU (the Tanimoto form <a, t> / (|a|^2 + |t|^2 - <a, t>): 1 for identical maps,
        the IoU for binary ones) of each image's alpha [B, H, W] against every template, over the 3 x 3
        quarter-pixel positions around its centroid. Returns ({per_shape [B, S], best [B]}, {radius, cx, cy
        and mask [B, H, W] of the best template})."""
        B = len(alpha)
        S, R = len(world.SHAPES), len(RADII)
        mass, sq = alpha.sum((1, 2)), alpha.pow(2).sum((1, 2))
        ys, xs = torch.meshgrid(torch.arange(RES) + 0.5, torch.arange(RES) + 0.5, indexing="ij")
        m = mass.clamp(min=1e-6)
        c = torch.stack([(alpha * xs).sum((1, 2)) / m, (alpha * ys).sum((1, 2)) / m], -1)       # [B, 2] px
        c = torch.where(mass[:, None] > 0, c, torch.full_like(c, RES / 2))
        # the centroid goes to RES/2 + q/FINE: integer shift n and quarter-pixel phase q, per axis
        quarters = torch.round((RES / 2 - c) * FINE).long()                                      # shift in quarters
        best = torch.full((B, S), -1.0)
        arg, phase_at = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
        where, shift_at = torch.zeros(B, S, 2), torch.zeros(B, S, 2, dtype=torch.long)
        padded = F.pad(alpha, (RES, RES, RES, RES))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                total = quarters + torch.tensor([dx, dy])              # wanted shift of the image, in quarters
                n = -torch.div(-total, FINE, rounding_mode="floor")    # whole pixels it moves (ceil)
                q = FINE * n - total                                   # the template's phase makes up the rest
                rows = torch.arange(RES)[None] - n[:, 1:2] + RES       # shifted[i] = alpha[i - n] (zero fill)
                cols = torch.arange(RES)[None] - n[:, 0:1] + RES
                shifted = padded[torch.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]].flatten(1)
                phase = q[:, 1] * FINE + q[:, 0]
                inter, norms = torch.empty(B, S * R), self.norms[phase]
                for p in phase.unique().tolist():
                    sel = phase == p
                    inter[sel] = shifted[sel] @ self.bank[p].T
                iou = (inter / (sq[:, None] + norms - inter).clamp(min=1e-6)).view(B, S, R)
                v, r_idx = iou.max(-1)
                better = v > best
                best = torch.where(better, v, best)
                arg = torch.where(better, r_idx, arg)
                # the template's centroid sits at RES/2 + q/FINE after the shift: at that - n in the image
                centroid = RES / 2 + q.float() / FINE - n.float()      # [B, 2] px
                where = torch.where(better[..., None], centroid[:, None, :].expand(B, S, 2), where)
                phase_at = torch.where(better, phase[:, None], phase_at)
                shift_at = torch.where(better[..., None], n[:, None, :], shift_at)
        shape_idx = best.argmax(-1)
        rows = torch.arange(B)
        k = shape_idx * R + arg[rows, shape_idx]
        centre = (where[rows, shape_idx] + self.offsets[k]) / RES
        # the best template back in image coordinates: shifted by -n (zero fill)
        n = shift_at[rows, shape_idx]
        template = F.pad(self.bank[phase_at[rows, shape_idx], k].view(B, RES, RES), (RES, RES, RES, RES))
        ys = torch.arange(RES)[None] + n[:, 1:2] + RES
        xs = torch.arange(RES)[None] + n[:, 0:1] + RES
        mask = template[rows[:, None, None], ys[:, :, None], xs[:, None, :]]
        fitted = {"radius": self.radii[arg[rows, shape_idx]], "cx": centre[:, 0], "cy": centre[:, 1], "mask": mask}
        return {"per_shape": best.clamp(min=0), "best": best.max(-1).values.clamp(min=0)}, fitted
