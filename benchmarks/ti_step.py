"""Benchmark: textual-inversion training step vs the floor (a plain forward+backward of the
same frozen UNet at the same batch), on the embedded generator.

    python benchmarks/ti_step.py [--batch 4] [--steps 50]

Each measurement runs in its own process so peak RSS is its own. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(kind: str, batch: int, steps: int) -> dict:
    import torch

    from steerexp.generators import load_generator

    gen = load_generator(device="cpu")
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
    else:  # the floor: the same UNet, same batch, same sequence length, grads to an input only
        cond = gen.encode_prompt(["a photo of a star"] * batch)
        z = torch.randn(batch, *gen.latent_shape())
        emb = torch.zeros(1, gen.embed_dim, requires_grad=True)

        def step():
            t = torch.randint(0, 1000, (batch,))
            out = gen.unet(z, t, cond + emb).sample
            torch.nn.functional.mse_loss(out, torch.randn_like(out)).backward()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"steps_per_s": steps / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--kind", default=None)
    a = p.parse_args()
    if a.kind:
        print(json.dumps(measure(a.kind, a.batch, a.steps)))
        return
    res = {}
    for kind in ("floor", "ti"):
        out = subprocess.run(
            [sys.executable, __file__, "--kind", kind, "--batch", str(a.batch), "--steps", str(a.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    res["ti_step_cost_vs_floor"] = res["floor"]["steps_per_s"] / res["ti"]["steps_per_s"]
    res["batch"] = a.batch
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
