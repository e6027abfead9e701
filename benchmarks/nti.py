"""Benchmark: null-text inversion seconds per image on the embedded generator, with early
stopping on and off, one image at a time vs batched; DDIM inversion (= NPI's cost) for scale.

    python benchmarks/nti.py [--images 8] [--steps 25] [--inner 10] [--batches 1,8] [--scale 7.5]

Same world images (seed 0) for every setting; time covers the pivot inversion and the
optimisation (not loading). Prints JSON and markdown table rows.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio


def measure(gen, cls, images: int, steps: int, scale: float, batch: int, **kw) -> dict:
    tech = cls(gen, targets={"k": images, "seed": 0}, sampling={"steps": steps}, guidance_scale=scale,
               batch_size=batch, **kw)
    tech.prepare()
    start = time.perf_counter()
    tech.compute()
    seconds = time.perf_counter() - start
    rec = tech.reconstruct()
    psnr = peak_signal_noise_ratio(rec, tech.images, data_range=1.0, dim=(1, 2, 3), reduction="none").mean()
    out = {"method": tech.own_method(), "batch": batch, "seconds_per_image": seconds / images, "psnr": float(psnr)}
    if getattr(tech, "history", None):
        out["inner_steps_per_step"] = sum(tech.history["inner_steps"]) / steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--scale", type=float, default=7.5)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()

    from steerexp.generators import load_generator
    from steerexp.techniques.negative_prompt_inversion import NegativePromptInversion
    from steerexp.techniques.null_text_inversion import NullTextInversion

    gen = load_generator(device="cpu")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        rows.append(
            measure(gen, NegativePromptInversion, args.images, args.steps, args.scale, batch) | {"early_stopping": None}
        )
        for es in (True, False):
            rows.append(
                measure(
                    gen,
                    NullTextInversion,
                    args.images,
                    args.steps,
                    args.scale,
                    batch,
                    inner_steps=args.inner,
                    early_stopping=es,
                )
                | {"early_stopping": es}
            )
    assert gen.unchanged()
    info = {
        "images": args.images,
        "steps": args.steps,
        "inner_steps": args.inner,
        "guidance": args.scale,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    print(json.dumps(info, indent=1))
    print("| method | batch | early stopping | s / image | inner steps / timestep | PSNR |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        es = {None: "-", True: "on", False: "off"}[r["early_stopping"]]
        inner = f"{r['inner_steps_per_step']:.1f}" if "inner_steps_per_step" in r else "-"
        print(f"| {r['method']} | {r['batch']} | {es} | {r['seconds_per_image']:.2f} | {inner} | {r['psnr']:.2f} |")


if __name__ == "__main__":
    main()
