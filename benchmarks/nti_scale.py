"""Benchmark: null-text inversion at real scale (issue 32 section 4): seconds per image against its floor (the
UNet forward and forward+backward passes it does), and peak memory against plain sampling, each in a fresh process.

    python benchmarks/nti_scale.py --generator /tmp/sd15-real --resolution 256 [--images 1] [--steps 5] [--inner 3]
        [--threads 2] [--reps 3] [--out experiments/nti_scale/run.json]

Process "nti": load, NTI (world targets, early stopping off so every timestep takes exactly --inner Adam steps),
with every UNet call counted (a forward hook; a backward is counted when a gradient reaches the UNet's output);
before and after it, in the same process and on the same shapes NTI uses (batch = images; one branch per call: NTI
runs the conditional branch once per timestep without gradients and the null branch with them), the time of one
UNet forward (no grad) and of one forward+backward w.r.t. the null embedding only (--reps each side after a
warm-up; the median of both sides: a shared machine's load drifts).
floor = #forwards x t_fwd + #fwd+bwd x t_fwdbwd. An inner step (NTI's optimise_step: K x (forward, backward,
Adam)) is timed against K x t_fwdbwd. After the run: no generator parameter requires grad or holds a .grad.
Process "sample": load, then plain guided sampling (cond+uncond as one batch of 2 x images) of the same image
count and steps, decoded.
Peak memory: VmHWM of /proc/self/status, read after loading, then reset (clear_refs 5) and read after the work.
Wall times (perf_counter). Prints and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


from ti_step import _hwm_reset  # noqa: E402  (benchmarks/ is the script's folder: sys.path[0])
from ti_step import proc_status_mib as _status  # noqa: E402


def _load(args):
    import torch

    from steerexp.generators import load_generator

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    gen = load_generator(args.generator or None, device="cpu", dtype="fp32", height=args.resolution or None,
                         width=args.resolution or None)
    return gen, time.perf_counter() - start


class Counter:
    """Counts and times the UNet's forward calls (with / without grad) and the backward passes through it."""

    def __init__(self, module):
        self.fwd_nograd, self.fwd_grad, self.bwd, self.calls = 0, 0, 0, []
        self._t0 = None
        self.handles = [module.register_forward_pre_hook(self.pre), module.register_forward_hook(self.post)]

    def pre(self, mod, args):
        self._t0 = time.perf_counter()

    def post(self, mod, args, out):
        import torch

        sample = out.sample if hasattr(out, "sample") else out[0]
        grad = torch.is_grad_enabled() and sample.requires_grad
        self.calls.append({"grad": grad, "s": time.perf_counter() - self._t0, "batch": int(sample.shape[0])})
        if grad:
            self.fwd_grad += 1
            sample.register_hook(self.count_bwd)
        else:
            self.fwd_nograd += 1

    def count_bwd(self, g):
        self.bwd += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def floor_times(gen, tech, args) -> tuple[list[float], list[float]]:
    """Times of one UNet forward (no grad) and one forward+backward w.r.t. the null only, on NTI's shapes (batch =
    images, one branch), --reps of each after a warm-up."""
    import torch

    x = tech.x0.detach().clone()
    t = gen.schedule(args.steps).timesteps[0]
    null = tech.empty.expand(len(x), -1, -1).detach().clone()
    fwd, fwdbwd = [], []
    for r in range(args.reps + 1):
        s = time.perf_counter()
        with torch.no_grad():
            gen.denoise(x, t, null)
        d1 = time.perf_counter() - s
        n = null.clone().requires_grad_(True)
        s = time.perf_counter()
        gen.denoise(x, t, n).pow(2).mean().backward()
        d2 = time.perf_counter() - s
        if r:  # the first is a warm-up
            fwd.append(d1)
            fwdbwd.append(d2)
    return fwd, fwdbwd


def role_nti(args) -> dict:

    from steerexp.techniques.null_text_inversion import NullTextInversion

    gen, load_s = _load(args)
    mem = {"load_hwm_mib": _status("VmHWM"), "after_load_rss_mib": _status("VmRSS"), "hwm_reset": _hwm_reset()}
    tech = NullTextInversion(gen, targets={"k": args.images, "seed": 0}, sampling={"steps": args.steps},
                             guidance_scale=args.scale, batch_size=args.images, inner_steps=args.inner,
                             early_stopping=False)
    tech.prepare()
    # the floor, on NTI's shapes, before and after NTI (a shared machine's load drifts): medians of both
    floor_before = floor_times(gen, tech, args)
    counter = Counter(gen.unet)
    timed = {"invert": 0.0, "optimise_step": 0.0, "optimise_step_calls": 0}
    invert, optimise_step = tech.invert, tech.optimise_step

    def timed_invert():
        s = time.perf_counter()
        invert()
        timed["invert"] += time.perf_counter() - s

    def timed_optimise_step(*a, **k):
        s = time.perf_counter()
        out = optimise_step(*a, **k)
        timed["optimise_step"] += time.perf_counter() - s
        timed["optimise_step_calls"] += 1
        return out

    tech.invert, tech.optimise_step = timed_invert, timed_optimise_step
    start = time.perf_counter()
    tech.compute()
    nti_s = time.perf_counter() - start
    counter.remove()
    mem["work_hwm_mib"] = _status("VmHWM")
    inner_steps = int(round(sum(tech.history["inner_steps"]) * args.images))  # history: mean over images per step
    no_grad = all((not p.requires_grad) and p.grad is None
                  for m in gen.modules for p in m.parameters())

    floor_after = floor_times(gen, tech, args)
    fwd, fwdbwd = floor_before[0] + floor_after[0], floor_before[1] + floor_after[1]
    t_fwd, t_fwdbwd = statistics.median(fwd), statistics.median(fwdbwd)
    n_fwd_only = counter.fwd_nograd + (counter.fwd_grad - counter.bwd)
    floor = n_fwd_only * t_fwd + counter.bwd * t_fwdbwd
    inner_floor = t_fwdbwd
    inner_s = timed["optimise_step"] / max(1, inner_steps)
    return {
        "role": "nti", "load_s": load_s, "nti_s": nti_s, "seconds_per_image": nti_s / args.images,
        "invert_s": timed["invert"], "optimise_step_s": timed["optimise_step"],
        "outside_inner_s": nti_s - timed["optimise_step"],
        "unet_forwards_no_grad": counter.fwd_nograd, "unet_forwards_grad": counter.fwd_grad,
        "unet_backwards": counter.bwd, "inner_steps_total": inner_steps,
        "unet_call_batch": sorted({c["batch"] for c in counter.calls}),
        "unet_fwd_s_in_nti_median": {
            "no_grad": statistics.median([c["s"] for c in counter.calls if not c["grad"]] or [0]),
            "grad": statistics.median([c["s"] for c in counter.calls if c["grad"]] or [0])},
        "t_fwd_s": t_fwd, "t_fwdbwd_s": t_fwdbwd, "t_fwd_before": floor_before[0], "t_fwdbwd_before": floor_before[1],
        "t_fwd_after": floor_after[0], "t_fwdbwd_after": floor_after[1],
        "unet_calls_in_nti": [{"grad": c["grad"], "s": round(c["s"], 3)} for c in counter.calls],
        "floor_s": floor, "ratio_to_floor": nti_s / floor,
        "inner_step_s": inner_s, "inner_step_floor_s": inner_floor, "inner_step_ratio": inner_s / inner_floor,
        "no_generator_grad": no_grad, "unchanged": bool(gen.unchanged()),
        "step_mse_optimised": tech.diagnostics().get("step_mse_optimised"),
        "step_mse_empty_null": tech.diagnostics().get("step_mse_empty_null"),
        "memory": mem, "load_avg_after": os.getloadavg()[0],
    }  # memory: the work peak includes the floor's passes before NTI (no more than NTI's own)


def role_sample(args) -> dict:
    from steerexp.generators import Guidance

    gen, load_s = _load(args)
    mem = {"load_hwm_mib": _status("VmHWM"), "after_load_rss_mib": _status("VmRSS"), "hwm_reset": _hwm_reset()}
    counter = Counter(gen.unet)
    start = time.perf_counter()
    gen.generate(["a red circle on the left"] * args.images, list(range(args.images)), steps=args.steps,
                 guidance=Guidance(scale=args.scale))
    sample_s = time.perf_counter() - start
    counter.remove()
    mem["work_hwm_mib"] = _status("VmHWM")
    return {"role": "sample", "load_s": load_s, "sample_s": sample_s, "seconds_per_image": sample_s / args.images,
            "unet_forwards_no_grad": counter.fwd_nograd, "unet_call_batch": sorted({c["batch"] for c in counter.calls}),
            "memory": mem, "load_avg_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", default="", help="a pipeline folder (default: the embedded generator)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--scale", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--roles", default="nti,sample")
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)  # internal: the work of one fresh process
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.role:
        print(json.dumps({"nti": role_nti, "sample": role_sample}[args.role](args)))
        return
    results = []
    for role in args.roles.split(","):  # each in its own fresh process
        cmd = [sys.executable, __file__, *sys.argv[1:], "--role", role]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the {role} process failed:\n{proc.stderr[-4000:]}")
        out = proc.stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    info = {"generator": args.generator, "resolution": args.resolution, "images": args.images, "steps": args.steps,
            "inner_steps": args.inner, "guidance": args.scale, "threads": args.threads, "reps": args.reps,
            "dtype": "fp32", "device": "cpu", "cpus": os.cpu_count(), "results": results}
    by = {r["role"]: r for r in results}
    if {"nti", "sample"} <= set(by):
        peak = {k: by[k]["memory"]["work_hwm_mib"] for k in ("nti", "sample")}
        info["work_peak_ratio_nti_vs_sample"] = peak["nti"] / peak["sample"]
    text = json.dumps(info, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
