"""Quality gates of the embedded assets: `python -m steerexp.worlds.shapes.report`.

Prints one JSON object (the figures in the README come from it):
  classifier_accuracy            per head, 2,000 fresh procedural images incl. the held-out class
  prompt_shape_agreement         classifier agrees with the prompt's shape, seen shapes (>= 500 samples)
  prompt_colour_agreement        ... with the prompt's colour
  heldout_name_rate              prompts naming the held-out class that produce it
  protected_reproduction_rate    protected captions reproducing their image (pixel RMS < 0.1)
  clip_zero_shot_shape_accuracy  "a photo of a {shape}" zero-shot over all shapes
  sample_seconds_16x25           16 images, 25 DDIM steps, with CFG
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from steerexp.scorers.classifier import ConceptClassifier
from steerexp.scorers.clip import CLIPScorer
from steerexp.generators import EMBEDDED, FrozenGenerator, Guidance, load_generator
from steerexp.images import to_tensor
from steerexp.targets import fit_world
from steerexp.worlds.shapes import world

EVAL_SEED = 424242  # a world stream no pretraining stage draws from


@torch.no_grad()
def classifier_accuracy(classifier: ConceptClassifier, n: int = 2000) -> dict[str, float]:
    images, scenes = world.dataset(EVAL_SEED, n)
    logits = classifier(to_tensor(images))
    return {h: float((logits[h].argmax(-1) == torch.tensor([s.labels()[h] for s in scenes])).float().mean())
            for h in world.HEADS}


@torch.no_grad()
def clip_zero_shot(clip: CLIPScorer, n: int = 2000) -> float:
    images, scenes = world.dataset(EVAL_SEED + 1, n)
    text = clip.encode_texts([f"a photo of a {s}" for s in world.SHAPES])
    pred = (clip.encode_images(to_tensor(images)) @ text.T).argmax(-1)
    return float((pred == torch.tensor([world.SHAPES.index(s.shape) for s in scenes])).float().mean())


def prompt_agreement(gen: FrozenGenerator, classifier: ConceptClassifier, n: int, guidance: Guidance, steps: int):
    rng = np.random.default_rng(EVAL_SEED)
    scenes = [world.random_scene(rng, shapes=world.SEEN_SHAPES) for _ in range(n)]
    prompts = [world.caption(s, rng) for s in scenes]
    images = gen.generate(prompts, list(range(n)), steps=steps, guidance=guidance)
    pred = classifier.predict(images)
    shape = np.mean([p == s.shape for p, s in zip(pred["shape"], scenes)])
    colour = np.mean([p == s.colour for p, s in zip(pred["colour"], scenes)])
    return float(shape), float(colour)


def heldout_name_rate(
    gen: FrozenGenerator, classifier: ConceptClassifier, n: int, guidance: Guidance, steps: int
) -> float:
    rng = np.random.default_rng(EVAL_SEED + 2)
    prompts = [world.caption(world.random_scene(rng, shape=world.HELDOUT), rng) for _ in range(n)]
    pred = classifier.predict(gen.generate(prompts, list(range(n)), steps=steps, guidance=guidance))["shape"]
    return float(np.mean([p == world.HELDOUT for p in pred]))


def protected_reproduction(gen: FrozenGenerator, seeds_per_caption: int, guidance: Guidance, steps: int) -> float:
    size = gen.image_size  # (height, width)
    images, captions = world.protected_set(max(size))
    images = np.stack([fit_world(a, size) for a in images])
    prompts = [c for c in captions for _ in range(seeds_per_caption)]
    out = gen.generate(prompts, list(range(len(prompts))), steps=steps, guidance=guidance)
    target = to_tensor(images).repeat_interleave(seeds_per_caption, 0)
    rms = (out - target).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return float((rms < 0.1).float().mean())


def sample_seconds(gen: FrozenGenerator, guidance: Guidance, repeats: int = 3) -> float:
    prompts, seeds = ["a red circle on the left"] * 16, list(range(16))
    gen.generate(prompts, seeds, steps=25, guidance=guidance)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gen.generate(prompts, seeds, steps=25, guidance=guidance)
        times.append(time.perf_counter() - t)
    return float(min(times))


def report(generator: str | None = None, samples: int = 504, steps: int = 25, guidance_scale: float = 5.0) -> dict:
    gen = (load_generator(None, device="cpu", embedded=generator) if generator in EMBEDDED
           else load_generator(generator, device="cpu"))
    classifier = ConceptClassifier.from_pretrained()
    guidance = Guidance(scale=guidance_scale)
    shape, colour = prompt_agreement(gen, classifier, samples, guidance, steps)
    result = {
        "classifier_accuracy": classifier_accuracy(classifier),
        "prompt_shape_agreement": shape,
        "prompt_colour_agreement": colour,
        "heldout_name_rate": heldout_name_rate(gen, classifier, max(100, samples // 4), guidance, steps),
        "protected_reproduction_rate": protected_reproduction(gen, 8, guidance, steps),
        "clip_zero_shot_shape_accuracy": clip_zero_shot(CLIPScorer()),
        "sample_seconds_16x25": sample_seconds(gen, guidance),
        "settings": {
            "generator": str(generator or "shapes (shipped)"),
            "samples": samples,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "threads": torch.get_num_threads(),
        },
    }
    gen.assert_unchanged()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default=None,
                        help="an embedded generator (shapes, shapes_flow) or a pipeline folder (default: shapes)")
    parser.add_argument("--samples", type=int, default=504, help="generated samples for prompt agreement (>= 500)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    args = parser.parse_args(argv)
    print(json.dumps(report(args.generator, args.samples, args.steps, args.guidance_scale), indent=1))


if __name__ == "__main__":
    main()
