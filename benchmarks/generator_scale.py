"""Benchmark: technique costs on a real-size generator: null-text inversion seconds per image (the approach of
benchmarks/nti.py: pivot inversion + optimisation, NPI's DDIM inversion beside it) and sampling images per
second (the frozen generator's own guided DDIM loop and VAE decode), at a chosen resolution.

    python benchmarks/make_random_pipeline.py --arch sd15 --size real --out /tmp/sd15-real
    python benchmarks/generator_scale.py --generator /tmp/sd15-real --resolution 256 --threads 2

--generator: a Stable Diffusion pipeline folder (default: the embedded shapes generator); --resolution: the
image side (default: the generator's own; set on the loaded UNet's config, no weight changes). Time covers the
work only (not loading; loading and the fingerprint are timed apart). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", default=None)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance for sampling and NTI")
    ap.add_argument("--images", type=int, default=2, help="images sampled (one batch)")
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--nti-images", type=int, default=1)
    ap.add_argument("--nti-steps", type=int, default=5, help="DDIM steps of the inversion")
    ap.add_argument("--inner", type=int, default=5, help="NTI inner (Adam) steps per timestep at most")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: sampling, npi, nti")
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from nti import measure as inversion_cost  # benchmarks/nti.py
    from ti_step import load  # benchmarks/ti_step.py

    from steerexp.generators import Guidance
    from steerexp.techniques.negative_prompt_inversion import NegativePromptInversion
    from steerexp.techniques.null_text_inversion import NullTextInversion

    skip = set(filter(None, a.skip.split(",")))
    start = time.perf_counter()
    gen = load(a.generator, a.resolution)
    res: dict = {"generator": a.generator or "shapes (embedded)", "resolution": gen.resolution,
                 "threads": torch.get_num_threads(), "guidance": a.scale,
                 "parameters": gen.num_parameters(), "load_and_fingerprint_s": time.perf_counter() - start}

    if "sampling" not in skip:
        prompts = [f"a photo of a red star number {i}" for i in range(a.images)]
        gen.generate(prompts[:1], [0], steps=1, guidance=Guidance(scale=a.scale))  # warm-up
        start = time.perf_counter()
        images = gen.generate(prompts, list(range(a.images)), steps=a.sample_steps, guidance=Guidance(scale=a.scale),
                              batch_size=a.images)
        seconds = time.perf_counter() - start
        assert images.shape[-1] == gen.resolution and torch.isfinite(images).all()
        res["sampling"] = {"images": a.images, "steps": a.sample_steps, "batch": a.images, "seconds": seconds,
                           "images_per_s": a.images / seconds,
                           "seconds_per_step": seconds / a.sample_steps}
    for name, cls, kw in (("npi", NegativePromptInversion, {}),
                          ("nti", NullTextInversion, {"inner_steps": a.inner, "early_stopping": True})):
        if name not in skip:
            res[name] = inversion_cost(gen, cls, a.nti_images, a.nti_steps, a.scale, a.nti_images, **kw) | {
                "images": a.nti_images, "steps": a.nti_steps} | ({"inner_steps": a.inner} if kw else {})
    assert gen.unchanged()
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
