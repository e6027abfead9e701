"""Benchmark: seconds per image of each flow editor (FlowEdit, RF-Inversion, RF-Solver + RF-Edit) and of the
inversion-based rows beside them (Euler/DDIM inversion + prompt swap, SDEdit), batched and one image at a time.

    python benchmarks/flow_edit_speed.py [--generator shapes_flow] [--images 8] [--steps 25] [--scale 7.5]
                                         [--batches 1,8] [--threads 1]

`--generator`: an embedded generator (shapes, shapes_flow) or a pipeline folder; the flow editors run as their
papers have them on flow families and in their epsilon form on the UNets. Same world images (stream seed 2, red
objects, edited to blue: "a {size} red {shape} ..." -> "... blue ...") for every method and batch size; each
technique is built per batch size (`batch_size`), prepared (targets loaded and encoded, not timed), then its own
inversion (`compute`: RF-Inversion's controlled ODE, RF-Solver's second-order inversion with the stored values;
FlowEdit has none) and its edit are timed. The swap row pays the DDIM / Euler inversion, SDEdit none. Times are CPU
seconds of this process (time.process_time: other jobs on a shared machine do not count) and wall seconds, per
image; loading is not timed. Prints JSON and markdown table rows.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

TEMPLATE = "a {size} {colour} {shape} {position} on a {background} background"


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def techniques(gen, images: int, steps: int, scale: float, batch: int):
    """(label, technique, own method) for each flow editor, at the world_edit_bench rows' settings."""
    from steerexp.techniques.flow_edit import FlowEdit
    from steerexp.techniques.rf_inversion import RFInversion
    from steerexp.techniques.rf_solver import RFSolver

    common = dict(targets={"k": images, "seed": 2, "fixed": {"colour": "red"}, "prompt_template": TEMPLATE},
                  sampling={"steps": steps, "guidance_scale": scale}, batch_size=batch,
                  edit={"replace": {"red": "blue"}, "control": None})
    return [("FlowEdit (n_max 2/3, n_avg 1)", FlowEdit(gen, target_guidance=scale, **common), "flowedit"),
            ("RF-Inversion (gamma 0.5, eta 0.9)", RFInversion(gen, **common), "rfinv"),
            ("RF-Solver + RF-Edit (2nd order)", RFSolver(gen, target_guidance=scale, **common), "rfsolver")]


def measure(gen, images: int, steps: int, scale: float, batch: int) -> list[dict]:
    rows = []

    def row(method, batch, edit, inversion):
        (cpu, wall), (icpu, iwall) = edit, inversion
        return {"method": method, "batch": batch, "edit_cpu": cpu / images, "edit_wall": wall / images,
                "inversion_cpu": icpu / images, "inversion_wall": iwall / images,
                "total_cpu": (cpu + icpu) / images, "total_wall": (wall + iwall) / images}

    for k, (label, tech, own) in enumerate(techniques(gen, images, steps, scale, batch)):
        tech.prepare()
        _, cpu_inv, wall_inv = timed(tech.compute)
        _, cpu, wall = timed(lambda: tech.edit(own))
        rows.append(row(label, batch, (cpu, wall), (cpu_inv, wall_inv)))
        if k == 0:  # the rows every editor offers beside its own: on the first technique's targets
            _, cpu_inv, wall_inv = timed(tech.invert)
            _, cpu, wall = timed(lambda: tech.edit(f"ddim_w{scale:g}"))
            rows.append(row(f"Euler / DDIM inversion + swap (w {scale:g})", batch, (cpu, wall), (cpu_inv, wall_inv)))
            _, cpu, wall = timed(lambda: tech.edit("sdedit_s0.7"))
            rows.append(row("SDEdit, strength 0.7", batch, (cpu, wall), (0.0, 0.0)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", default="shapes_flow", help="shapes, shapes_flow or a pipeline folder")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scale", type=float, default=7.5, help="the edit's guidance (the swap's, FlowEdit's and "
                                                               "RF-Solver's target guidance)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from steerexp.generators import EMBEDDED, load_generator

    embedded = args.generator in EMBEDDED
    gen = load_generator(None if embedded else args.generator, device="cpu",
                         embedded=args.generator if embedded else "shapes")
    rows = [r for b in args.batches.split(",") for r in measure(gen, args.images, args.steps, args.scale, int(b))]
    assert gen.unchanged()
    info = {"generator": args.generator, "family": gen.family, "images": args.images, "steps": args.steps,
            "guidance": args.scale, "threads": torch.get_num_threads(), "rows": rows}
    print(json.dumps(info, indent=1))
    print("| method | batch | inversion CPU s / img | edit CPU s / img | total CPU s / img | total wall s / img |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['batch']} | {r['inversion_cpu']:.3f} | {r['edit_cpu']:.3f} | "
              f"{r['total_cpu']:.3f} | {r['total_wall']:.3f} |")


if __name__ == "__main__":
    main()
