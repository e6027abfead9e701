"""Write a real-architecture (or tiny) diffusers pipeline folder with random weights, offline.

    python benchmarks/make_random_pipeline.py --arch sd15 --out /tmp/sd15-real --size real
    python benchmarks/make_random_pipeline.py --arch flux --out /tmp/flux --size real --dtype bf16 \
        --depth 0.25 --t5-layers 4
    python benchmarks/make_random_pipeline.py --arch sd3 --out /tmp/sd3 --size real --no-t5

A thin CLI over steerexp.generators.random_pipelines.make_random_pipeline (its docstring lists the configs
and what each reduction drops). Prints the folder and its parameter counts as JSON. The scheduler config it
writes mirrors the family's hub config exactly (random_pipelines.SCHEDULERS: SD 1.5's PNDMScheduler with
clip_sample false, SDXL base's EulerDiscreteScheduler, SD3's and FLUX.1-dev's FlowMatchEulerDiscreteScheduler).
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    from steerexp.generators.random_pipelines import ARCHS, DTYPES, SIZES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True, choices=ARCHS)
    ap.add_argument("--out", required=True, help="the pipeline folder to write (must not exist or be empty)")
    ap.add_argument("--size", default="tiny", choices=SIZES)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depth", type=float, default=1.0, help="fraction of the denoiser's transformer blocks kept")
    ap.add_argument("--no-t5", action="store_true", help="sd3: no text_encoder_3 (the pipeline feeds zeros)")
    ap.add_argument("--t5-layers", type=int, default=None, help="T5 encoder layers (real: 24)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()

    import torch

    from steerexp.generators.random_pipelines import make_random_pipeline

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    start = time.perf_counter()
    out = make_random_pipeline(a.arch, a.out, size=a.size, seed=a.seed, dtype=a.dtype, depth=a.depth,
                               t5=not a.no_t5, t5_layers=a.t5_layers, overwrite=a.overwrite)
    info = json.loads((out / "random_pipeline.json").read_text())
    print(json.dumps({"folder": str(out), "seconds": round(time.perf_counter() - start, 2)} | info, indent=1))


if __name__ == "__main__":
    main()
