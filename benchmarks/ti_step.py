"""Benchmark: textual-inversion training step vs the floor (a plain forward+backward of the
same frozen UNet at the same batch), on the embedded generator or any SD pipeline folder.

    python benchmarks/ti_step.py [--batch 4] [--steps 50]
    python benchmarks/ti_step.py --generator DIR --resolution 256 --batch 1 --steps 5 --warmup 2 --threads 2 \
        --repeat 3 --check-vocab

--generator: a Stable Diffusion pipeline folder (default: the embedded shapes generator), e.g. the
real-architecture SD 1.5 with random weights of benchmarks/make_random_pipeline.py; --resolution: the image side
to train at (default: the generator's own), set on the loaded UNet's config (sample_size; no weight changes).

Each measurement runs in its own process so peak RSS is its own: `peak_rss_mb` is the process's high-water mark
(loading, the fingerprint, TI's target encoding included), `step_peak_rss_mb` the high-water mark of the timed
steps alone (Linux: VmHWM, reset through /proc/self/clear_refs after the set-up; else null). `--check-vocab`
also records, with a TorchDispatchMode over one TI step (forward, backward, optimizer step), every tensor an
op produces with a dimension of the frozen vocabulary's size or as many elements as its embedding table:
the step must allocate none (only the new rows and their optimizer state). `--interleaved` adds a third
process that alternates floor and TI steps (same load for both: the fairer ratio on a shared machine).
Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def load(path: str | None, resolution: int | None, dtype: str = "fp32"):
    """The frozen generator (the embedded one when path is None) in `dtype`, sampling/training at `resolution`
    px."""
    from steerexp.generators import load_generator

    gen = load_generator(path, device="cpu", dtype=dtype)
    if resolution:
        if resolution % gen.vae_scale_factor:
            raise ValueError(f"--resolution must be a multiple of {gen.vae_scale_factor}, got {resolution}")
        gen.denoiser.register_to_config(sample_size=resolution // gen.vae_scale_factor)  # config only, no weights
    return gen


def _hwm_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_mib(key: str = "VmHWM") -> float | None:
    """A memory figure of this process from /proc/self/status (VmHWM: peak RSS; VmRSS: now), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _hwm_mb() -> float | None:
    return proc_status_mib("VmHWM")


def vocab_sized_tensors(step, vocab: int, table_numel: int) -> list[dict]:
    """Shapes of the tensors the ops of `step()` produce that have a vocab-sized dim or >= table_numel elements."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[dict] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and (vocab in t.shape or t.numel() >= table_numel):
                    found.append({"op": str(func), "shape": list(t.shape), "dtype": str(t.dtype)})
            return out

    with Watch():
        step()
    return found


def make_step(kind: str, gen, batch: int, steps: int):
    """(step function, extra info, optimizer or None) of one measurement kind on a loaded generator."""
    import torch

    if kind == "ti":
        from steerexp.techniques.textual_inversion import TextualInversion

        ti = TextualInversion(gen, batch_size=batch, steps=steps)
        ti.prepare()
        opt = ti.configure_optimizers()
        batch_idx = (torch.arange(batch) % len(ti.latents),)

        def step():
            loss = ti.training_loss(batch_idx)
            opt.zero_grad()
            loss.backward()
            opt.step()

        trainable = [p for p in ti.parameters() if p.requires_grad]
        return step, {"trainable_shapes": [list(p.shape) for p in trainable]}, opt
    # the floor: the same denoiser, same batch, same conditioning length, grads to an input only
    cond = gen.encode_prompt(["a photo of a star"] * batch)
    z = torch.randn(batch, *gen.latent_shape(), dtype=gen.dtype)
    emb = torch.zeros(1, gen.embed_dim, dtype=gen.dtype, requires_grad=True)

    def step():
        t = torch.randint(0, 1000, (batch,))
        out = gen.denoise(z, t, cond + emb)
        torch.nn.functional.mse_loss(out, torch.randn_like(out)).backward()

    return step, {}, None


def interleaved(batch: int, steps: int, warmup: int = 5, generator: str | None = None,
                resolution: int | None = None, dtype: str = "fp32") -> dict:
    """Floor and TI steps alternating in one process: both see the same machine load (a shared machine's
    load drifts between processes); the ratio of their medians. No RSS figures here (one process)."""
    gen = load(generator, resolution, dtype)
    floor, _, _ = make_step("floor", gen, batch, steps)
    ti, _, _ = make_step("ti", gen, batch, steps)
    times: dict[str, list[float]] = {"floor": [], "ti": []}
    for i in range(warmup + steps):
        for kind, step in (("floor", floor), ("ti", ti)) if i % 2 == 0 else (("ti", ti), ("floor", floor)):
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[kind].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    assert gen.unchanged()
    return {"seconds_per_step_median": median, "seconds_per_step": times,
            "ti_step_cost_vs_floor": median["ti"] / median["floor"], "load_avg_after": os.getloadavg()[0]}


def measure(kind: str, batch: int, steps: int, warmup: int = 5, generator: str | None = None,
            resolution: int | None = None, check_vocab: bool = False, dtype: str = "fp32") -> dict:
    import torch

    gen = load(generator, resolution, dtype)
    step, extra, opt = make_step(kind, gen, batch, steps)
    hwm = _hwm_reset()
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    res = {"steps_per_s": steps / seconds, "seconds_per_step": seconds / steps,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "step_peak_rss_mb": _hwm_mb() if hwm else None} | extra
    if check_vocab and kind == "ti":
        vocab = gen.encoders[0].vocab_size
        res["vocab_size"] = vocab
        res["vocab_sized_tensors_in_step"] = vocab_sized_tensors(step, vocab, vocab * gen.encoders[0].width)
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        res["optimizer_state_shapes"] = [list(v.shape) for v in state]
    assert gen.unchanged()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--generator", default=None, help="a Stable Diffusion pipeline folder (default: embedded)")
    p.add_argument("--resolution", type=int, default=None, help="image side in px (default: the generator's)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="weights and activations of both kinds (generator.dtype; this benchmark runs on the CPU, "
                   "where fp16 has no fast kernels)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--check-vocab", action="store_true", help="record vocabulary-sized tensors of a TI step")
    p.add_argument("--repeat", type=int, default=1, help="processes per kind, alternating floor/ti (the machine "
                   "is shared: figures are the fastest run of each kind; every run is listed under runs)")
    p.add_argument("--interleaved", action="store_true", help="also time floor and TI steps alternating in one "
                   "process (robust to drifting machine load)")
    p.add_argument("--kind", default=None)
    a = p.parse_args()
    if a.kind:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        if a.kind == "interleaved":
            res = interleaved(a.batch, a.steps, a.warmup, a.generator, a.resolution, a.dtype)
        else:
            res = measure(a.kind, a.batch, a.steps, a.warmup, a.generator, a.resolution, a.check_vocab, a.dtype)
        print(json.dumps(res | {"threads": torch.get_num_threads()}))
        return
    def child(kind: str) -> dict:
        cmd = [sys.executable, __file__, "--kind", kind, "--batch", str(a.batch), "--steps", str(a.steps),
               "--warmup", str(a.warmup)]
        for flag, value in (("--generator", a.generator), ("--resolution", a.resolution), ("--threads", a.threads),
                            ("--dtype", a.dtype)):
            if value:
                cmd += [flag, str(value)]
        out = subprocess.run(cmd + (["--check-vocab"] if a.check_vocab else []), capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1]) | {"load_avg_after": os.getloadavg()[0]}

    runs: dict[str, list[dict]] = {"floor": [], "ti": []}
    for _ in range(a.repeat):
        for kind in ("floor", "ti"):
            runs[kind].append(child(kind))
    res: dict = {kind: min(r, key=lambda x: x["seconds_per_step"]) for kind, r in runs.items()}
    res["ti_step_cost_vs_floor"] = res["floor"]["steps_per_s"] / res["ti"]["steps_per_s"]
    res["peak_rss_ti_vs_floor"] = res["ti"]["peak_rss_mb"] / res["floor"]["peak_rss_mb"]
    if res["ti"]["step_peak_rss_mb"] and res["floor"]["step_peak_rss_mb"]:
        res["step_peak_rss_ti_vs_floor"] = res["ti"]["step_peak_rss_mb"] / res["floor"]["step_peak_rss_mb"]
    res |= {"batch": a.batch, "steps": a.steps, "warmup": a.warmup, "generator": a.generator or "shapes (embedded)",
            "resolution": a.resolution, "repeat": a.repeat, "dtype": a.dtype}
    if a.interleaved:
        res["interleaved"] = child("interleaved")
    if a.repeat > 1:
        median = {k: statistics.median(x["seconds_per_step"] for x in r) for k, r in runs.items()}
        res["ti_step_cost_vs_floor_median"] = median["ti"] / median["floor"]
        res["runs"] = runs
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
