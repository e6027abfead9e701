"""inversion: how well an inversion technique reconstructs its target images.

For every method the technique offers (`vae` round trip = the upper bound, `ddim_w1`,
`ddim_w<w>`, `npi`, and `nti` on the null-text technique), PSNR and SSIM (torchmetrics,
data range 1, per image then averaged) of the reconstruction against the original:
`inversion/psnr/<method>`, `inversion/ssim/<method>`. Paired per-image PSNR differences of
each method against the technique's own one come with a bootstrap CI (`inversion/psnr_diff/...`).
It also reports the technique's own `diagnostics()` as `inversion/<its method>/<name>`: for
null-text inversion the optimisation (mean per-step latent MSE with the empty null vs the
optimised one, inner steps taken) and where the nulls went: the mean over steps of
||null_t - c|| / ||null_empty - c|| (below 1: the nulls moved toward the source prompt c,
NPI's premise). Grid `samples/inversion`: original | each method, one row per image.
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.evaluators.stats import bootstrap_ci
from steerexp.images import image_grid, image_grid_labels
from steerexp.techniques.protocols import Diagnosable, Invertible


def psnr_ssim(images: torch.Tensor, originals: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of [0, 1] RGB images."""
    p = peak_signal_noise_ratio(images, originals, data_range=1.0, dim=(1, 2, 3), reduction="none")
    s = structural_similarity_index_measure(images, originals, data_range=1.0, reduction="none")
    return p.numpy(), s.numpy()


def require_inversion(technique) -> None:
    if not isinstance(technique, Invertible):
        raise ValueError(f"this evaluator needs an inversion technique (ddim_inversion, null_text_inversion, "
                         f"negative_prompt_inversion); got {type(technique).__name__}")


def pick_methods(technique, methods: list[str] | None, exclude: tuple[str, ...] = ()) -> list[str]:
    available = technique.methods()
    chosen = [m for m in (list(methods) if methods else available) if m not in exclude]
    for m in chosen:  # an edit method may add +p2p[+blend]; ddim_w<w> and sdedit_s<s> take any value
        base = m.split("+")[0]
        if base not in available and not base.startswith(("ddim_w", "sdedit_s")):
            raise ValueError(f"evaluator method {m!r} is not offered by {type(technique).__name__}; it offers "
                             f"{available} (nti needs technique=null_text_inversion)")
    return chosen


class Inversion:
    name = "inversion"

    def __init__(self, methods: list[str] | None = None, grid_rows: int = 8):
        self.methods, self.grid_rows = methods, grid_rows

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        tech = ctx.technique
        require_inversion(tech)
        originals, own = tech.images, tech.own_method()
        methods = pick_methods(tech, self.methods)
        m: dict[str, float] = {"inversion/images": len(originals)}
        psnrs, rows, recs = {}, [], []
        for method in methods:
            rec = tech.reconstruct(method)
            recs.append(rec)
            p, s = psnr_ssim(rec, originals)
            psnrs[method] = p
            m[f"inversion/psnr/{method}"] = float(p.mean())
            m[f"inversion/ssim/{method}"] = float(s.mean())
            m[f"inversion/psnr_min/{method}"] = float(p.min())
            rows += [[tech.names[i], method, float(p[i]), float(s[i])] for i in range(len(p))]
        if own in psnrs:
            strata = np.zeros(len(originals))
            for method, p in psnrs.items():
                if method != own:
                    d = psnrs[own] - p
                    lo, hi = bootstrap_ci(d, strata)
                    m[f"inversion/psnr_diff/{own}_minus_{method}/mean"] = float(d.mean())
                    m[f"inversion/psnr_diff/{own}_minus_{method}/ci_low"] = lo
                    m[f"inversion/psnr_diff/{own}_minus_{method}/ci_high"] = hi
        if isinstance(tech, Diagnosable):  # e.g. inversion/nti/step_mse_optimised
            m.update({f"inversion/{own}/{k}": v for k, v in tech.diagnostics().items()})
        grid = image_grid([originals] + recs, self.grid_rows)
        labels = image_grid_labels([originals] + recs, self.grid_rows, tech.names, ["original", *methods],
                                   what="rows: target images; columns: the original, then each method's reconstruction")
        return EvalResult(metrics=m, grids={"samples/inversion": grid}, grid_labels={"samples/inversion": labels},
                          tables={"inversion/per_image": (["image", "method", "psnr", "ssim"], rows)})
