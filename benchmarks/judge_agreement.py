"""Benchmark: the analytic judge against the shipped classifier, and clean renders against blobs.

    python benchmarks/judge_agreement.py                      # 256 generator samples from world captions
    python benchmarks/judge_agreement.py --run-dir <run dir>  # + the edited samples of a run (its deltas)

1. Accuracy of the analytic judge and of the classifier on fresh world renders (a world stream no
   pretraining stage drew from), per head.
2. On generator samples (seen shapes, captions from the world's templates, seeds 0..n-1, 25 DDIM steps,
   CFG 5): per head, how often the analytic judge and the classifier agree, and how often each reads
   the class the caption names (captions name shape and colour always, size and position sometimes).
3. The clean-render score (how well one rendered scene explains an image) on fresh renders, on the
   generator samples, and, with --run-dir, on a run's baseline and edited samples (its eval prompts x
   seeds, regenerated from its .hydra/config.yaml and deltas.safetensors): quantiles and the share >= 0.6.
4. Seconds to judge 256 images.

Prints markdown tables (and --json for the raw figures).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def named(caption: str, head: str, value: str) -> bool:
    from steerexp.worlds.shapes import world

    if head == "position":
        return world.POSITION_PHRASES[value] in caption
    return value in caption.split()


def quantiles(scores: np.ndarray) -> dict:
    q = np.quantile(scores, [0.05, 0.25, 0.5, 0.75])
    return {"n": len(scores), "q05": q[0], "q25": q[1], "median": q[2], "q75": q[3], "mean": float(scores.mean()),
            "share_clean": float((scores >= 0.6).mean())}


def run_samples(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline and edited samples of a run's eval prompts x seeds, from its config and deltas."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from steerexp import safety, scorers
    from steerexp.images import ImagePolicy

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    for group in ("generator", "technique"):  # only what samples (an older run's trainer may no longer exist)
        safety.check_targets(OmegaConf.create({group: cfg[group]}))
    technique = instantiate(cfg.technique, generator=instantiate(cfg.generator), _recursive_=False,
                            sampling=OmegaConf.to_container(cfg.sampling, resolve=True))
    technique.bind(scorers.build(cfg.get("scorers")), ImagePolicy.from_config(cfg.get("images")))  # as run.build
    technique.load_deltas(load_file(str(run_dir / "deltas.safetensors")))
    prompts = [p for p in cfg.eval.prompts for _ in cfg.eval.seeds]
    seeds = [s for _ in cfg.eval.prompts for s in cfg.eval.seeds]
    with torch.no_grad():
        return technique.generate(prompts, seeds, edited=False), technique.generate(prompts, seeds, edited=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--renders", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--run-dir", type=Path, default=None, help="a run whose edited samples to score")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from steerexp.generators import Guidance, load_generator
    from steerexp.images import to_tensor
    from steerexp.scorers import load_classifier
    from steerexp.scorers.analytic import load_analytic
    from steerexp.worlds.shapes import world
    from steerexp.worlds.shapes.report import EVAL_SEED

    run_images = run_samples(args.run_dir) if args.run_dir else None  # first: a bad run dir fails early
    judge, clf = load_analytic(), load_classifier()
    out: dict = {"settings": vars(args) | {"run_dir": str(args.run_dir) if args.run_dir else None,
                                          "threads": torch.get_num_threads()}}

    images, scenes = world.dataset(EVAL_SEED, args.renders)
    renders = to_tensor(images)
    with torch.no_grad():
        pj, pc = judge.predict(renders), clf.predict(renders)
    out["renders"] = {h: {"analytic": float(np.mean([p == getattr(s, h) for p, s in zip(pj[h], scenes)])),
                          "classifier": float(np.mean([p == getattr(s, h) for p, s in zip(pc[h], scenes)]))}
                      for h in world.HEADS}

    rng = np.random.default_rng(EVAL_SEED)
    sample_scenes = [world.random_scene(rng, shapes=world.SEEN_SHAPES) for _ in range(args.samples)]
    captions = [world.caption(s, rng) for s in sample_scenes]
    gen = load_generator(device="cpu")
    start = time.perf_counter()
    samples = gen.generate(captions, list(range(args.samples)), steps=args.steps,
                           guidance=Guidance(scale=args.guidance_scale))
    out["sample_seconds"] = time.perf_counter() - start
    judge._memo.clear()
    start = time.perf_counter()
    pj = judge.predict(samples)
    out["judge_seconds"] = time.perf_counter() - start
    with torch.no_grad():
        pc = clf.predict(samples)
    table = {}
    for h in world.HEADS:
        sel = [i for i, (c, s) in enumerate(zip(captions, sample_scenes)) if named(c, h, getattr(s, h))]
        table[h] = {"agreement": float(np.mean([a == b for a, b in zip(pj[h], pc[h])])), "named": len(sel),
                    "analytic_vs_caption": float(np.mean([pj[h][i] == getattr(sample_scenes[i], h) for i in sel])),
                    "classifier_vs_caption": float(np.mean([pc[h][i] == getattr(sample_scenes[i], h) for i in sel]))}
    out["samples"] = table
    clean = {"fresh renders": quantiles(judge.clean_score(renders[: args.samples]).numpy()),
             "generator samples": quantiles(judge.clean_score(samples).numpy())}
    if run_images is not None:
        base, edit = run_images
        clean["run baseline"] = quantiles(judge.clean_score(base).numpy())
        clean["run edited"] = quantiles(judge.clean_score(edit).numpy())
    out["clean_score"] = clean

    if args.json:
        print(json.dumps(out, indent=1, default=float))
        return
    print(f"Fresh world renders (n={args.renders}, world seed {EVAL_SEED}): accuracy per head\n")
    print("| head | analytic judge | classifier |\n|---|---|---|")
    for h, r in out["renders"].items():
        print(f"| {h} | {r['analytic']:.3f} | {r['classifier']:.3f} |")
    print(f"\nGenerator samples (n={args.samples}, world captions of seen shapes, {args.steps} DDIM steps, "
          f"CFG {args.guidance_scale:g})\n")
    print("| head | analytic = classifier | captions naming it | analytic = caption | classifier = caption |")
    print("|---|---|---|---|---|")
    for h, r in table.items():
        print(f"| {h} | {r['agreement']:.3f} | {r['named']} | {r['analytic_vs_caption']:.3f} | "
              f"{r['classifier_vs_caption']:.3f} |")
    print("\nClean-render score (1 = one rendered scene explains the image)\n")
    print("| images | n | 5% | 25% | median | 75% | share >= 0.6 |\n|---|---|---|---|---|---|---|")
    for name, q in clean.items():
        print(f"| {name} | {q['n']} | {q['q05']:.2f} | {q['q25']:.2f} | {q['median']:.2f} | {q['q75']:.2f} | "
              f"{q['share_clean']:.2f} |")
    print(f"\nJudging {args.samples} images: {out['judge_seconds']:.2f} s "
          f"(sampling them: {out['sample_seconds']:.1f} s, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
