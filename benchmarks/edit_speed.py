"""Benchmark: seconds per image of each edit method on the embedded generator, batched and one image at
a time: the inversion it needs (DDIM inversion; NTI's optimisation on top) plus the edit itself.

    python benchmarks/edit_speed.py [--images 8] [--steps 25] [--scale 7.5] [--batches 1,8] [--threads 1]

Same world images (stream seed 2, colour edits) for every setting; one NullTextInversion technique per
batch size computes the pivots and the nulls, then every method edits all images once. Times are CPU
seconds of this process (time.process_time: other jobs on a shared machine do not count) and wall
seconds (time.perf_counter), per image; loading is not timed. Prints JSON and markdown table rows.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

METHODS = ("sdedit_s0.7", "ddim_w{w}", "ddim_w{w}+p2p", "npi", "npi+p2p", "nti", "nti+p2p", "nti+p2p+blend",
           "di+p2p", "di+p2p+blend")
TEMPLATE = "a {size} {colour} {shape} {position} on a {background} background"


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def measure(gen, images: int, steps: int, scale: float, batch: int) -> list[dict]:
    from steerexp.techniques.null_text_inversion import NullTextInversion

    tech = NullTextInversion(gen, targets={"k": images, "seed": 2, "fixed": {"colour": "red"},
                                           "prompt_template": TEMPLATE},
                             sampling={"steps": steps, "guidance_scale": scale}, batch_size=batch,
                             edit={"replace": {"red": "blue"}, "control": "p2p"})
    tech.prepare()
    _, cpu_inv, wall_inv = timed(tech.invert)  # DDIM inversion: what ddim, npi and di need
    _, cpu_all, wall_all = timed(tech.compute)  # NTI: the same inversion again, then the optimisation
    cpu_nti, wall_nti = cpu_all - cpu_inv, wall_all - wall_inv
    rows = []
    for name in METHODS:
        method = name.format(w=f"{scale:g}")
        _, cpu, wall = timed(lambda: tech.edit(method))
        base = method.split("+")[0]
        inv = (0.0, 0.0) if base.startswith("sdedit") else (cpu_inv, wall_inv)
        if base == "nti":
            inv = (cpu_inv + cpu_nti, wall_inv + wall_nti)
        rows.append({"method": method, "batch": batch, "edit_cpu": cpu / images, "edit_wall": wall / images,
                     "inversion_cpu": inv[0] / images, "inversion_wall": inv[1] / images,
                     "total_cpu": (cpu + inv[0]) / images, "total_wall": (wall + inv[1]) / images})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scale", type=float, default=7.5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from steerexp.generators import load_generator

    gen = load_generator(device="cpu")
    rows = [r for b in args.batches.split(",") for r in measure(gen, args.images, args.steps, args.scale, int(b))]
    assert gen.unchanged()
    info = {"images": args.images, "steps": args.steps, "guidance": args.scale, "threads": torch.get_num_threads(),
            "rows": rows}
    print(json.dumps(info, indent=1))
    print("| method | batch | inversion CPU s / img | edit CPU s / img | total CPU s / img | total wall s / img |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['batch']} | {r['inversion_cpu']:.3f} | {r['edit_cpu']:.3f} | {r['total_cpu']:.3f} "
              f"| {r['total_wall']:.3f} |")
    by = {(r["method"], r["batch"]): r for r in rows}
    for b in args.batches.split(","):
        nti, di = by.get(("nti+p2p", int(b))), by.get(("di+p2p", int(b)))
        if nti and di:
            print(f"batch {b}: NTI + P2P / DI + P2P = {nti['total_cpu'] / di['total_cpu']:.1f}x (CPU), "
                  f"{nti['total_wall'] / di['total_wall']:.1f}x (wall)")


if __name__ == "__main__":
    main()
