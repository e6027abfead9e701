"""Benchmark: the cost of evaluating 8 prompts x 8 seeds, paired (baseline + edited), on the
embedded generator with the default evaluators (concept, leakage, clip, memorisation).

    python benchmarks/eval_cost.py

Uses a textual-inversion technique with its initial embedding (no training): the cost of
evaluation does not depend on what was learned. Prints JSON with seconds per stage.
"""
from __future__ import annotations

import json
import time

import torch


def main() -> None:
    from steerexp.evaluators.base import EvalContext
    from steerexp.evaluators.clip import Clip
    from steerexp.evaluators.concept import Concept
    from steerexp.evaluators.leakage import Leakage
    from steerexp.evaluators.memorisation import Memorisation
    from steerexp.generators import load_generator
    from steerexp.techniques.textual_inversion import TextualInversion
    from hydra import compose, initialize_config_dir

    from steerexp import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config")
    gen = load_generator(device="cpu")
    ti = TextualInversion(gen, sampling=cfg.sampling)
    ti.prepare()
    prompts, seeds = list(cfg.eval.prompts), list(cfg.eval.seeds)
    assert len(prompts) == 8 and len(seeds) == 8
    timings = {}
    start = time.perf_counter()
    ctx = EvalContext(ti, prompts, seeds)
    t = time.perf_counter()
    ctx.paired()
    timings["paired_samples_8x8"] = time.perf_counter() - t
    for ev in (Concept(), Leakage(), Clip(), Memorisation()):
        t = time.perf_counter()
        ev.evaluate(ctx)
        timings[ev.name] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    timings["threads"] = torch.get_num_threads()
    timings["sampling_steps"] = cfg.sampling.steps
    print(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
