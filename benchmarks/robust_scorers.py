"""Benchmark: the robust scorers against the plain concept classifier (issue 15, section 3).

    python benchmarks/robust_scorers.py [accuracy] [gradients] [noisy] [guidance_leakage] [--robust DIR]

accuracy   clean accuracy per head on fresh world renders (seed 424242, never a training
           image: the scorers train on the stream of seed 1000), and robust accuracy under a PGD
           attack on each head alone with 20 steps (training used 5), random start, in the robust
           classifier's training ball (norm and eps as assets/recipe.json records them) at eps and
           2 * eps, for the plain (assets/classifier) and the robust (assets/classifier_robust)
           classifier.
gradients  perceptually aligned gradients: from four blue shapes (each on another background),
           L2-normalised gradient ascent on log p(colour = red), step 0.5 (L2 over the [0, 1]
           pixels), with each classifier: 10 steps, and until p(red) >= 0.9 (at most 60 steps).
           Per classifier: p(red), the RMS pixel change, the mean change of the shape's pixels in
           R, G, B (x255), the mean absolute change of the background pixels (x255), the cosine
           between the change and the exact edit (the world's render of the same scene in red minus
           the blue one), and the analytic judge's colour and clean-render score. Saves the grid
           experiments/robust_scorers/gradients.png (rows: the four images; columns: start | plain
           10 steps | its change x4 (grey = none) | robust 10 steps | its change x4 | plain until
           p(red) >= 0.9 | robust until p(red) >= 0.9 | the exact red render).
guidance_leakage  energy guidance toward "large" (classifier:5, robust:5, noisy:10 by default) on the
           world's unrelated suite, held-out seeds 100-115: the analytic judge's agreement with each
           prompt's shape and colour, baseline vs guided, and whether the leakage flips move onto
           the prompt (a baseline misreading fixed) or off it.
noisy      the timestep-aware classifier (assets/classifier_noisy): per-head accuracy on the same
           fresh renders encoded by the shipped VAE and noised by the shipped scheduler, in 10
           ranges of t, and at the 25 timesteps of the default DDIM sampling.

Torch runs on one thread. Prints JSON and writes experiments/robust_scorers/results.json (merged
with the sections already there). `--robust <folder>` (with `--norm`, `--eps`) measures another
robust classifier instead, e.g. a trial of the eps choice built by

    steerexp-pretrain stages=[classifier_robust] out=/tmp/trial threads=1 classifier_robust.steps=800 \
        classifier_robust.eps_warmup=200 classifier_robust.norm=linf classifier_robust.eps=0.0313725

and only prints (the shipped results stay as they are).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "experiments" / "robust_scorers"
SEED = 424242


def fresh(n: int):
    from steerexp.pretrain.scorers import fresh_pool

    x, _, labels = fresh_pool(SEED, n, 32)
    return x, labels


def training_ball() -> tuple[str, float]:
    """The robust classifier's PGD ball (norm, eps) as the shipped recipe records it."""
    from steerexp import ASSETS

    cfg = json.loads((ASSETS / "recipe.json").read_text())["config"]["classifier_robust"]
    return cfg.get("norm", "linf"), float(cfg["eps"])


def accuracy(n: int, n_robust: int, robust: Path, norm: str | None = None, eps: float | None = None) -> dict:
    from steerexp.pretrain.robust import accuracy as acc
    from steerexp.scorers import load_classifier

    shipped_norm, shipped_eps = training_ball()
    norm, eps = norm or shipped_norm, eps or shipped_eps
    x, labels = fresh(n)
    sub = {h: v[:n_robust] for h, v in labels.items()}
    out = {}
    for name, folder in (("plain", None), ("robust", robust)):
        clf = load_classifier(folder)
        t = time.time()
        row = {"clean": acc(clf, x, labels)}
        for mult in (1, 2):
            row[f"pgd20_{mult}eps"] = acc(clf, x[:n_robust], sub, mult * eps, 20, norm=norm)
        row["seconds"] = round(time.time() - t, 1)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return {"n_clean": n, "n_robust": n_robust, "norm": norm, "eps": eps, **out}


def _change_figures(clf, judge, x0: torch.Tensor, x: torch.Tensor, exact: torch.Tensor, fg: torch.Tensor) -> dict:
    from steerexp.scorers import prob

    d = x - x0
    row = {
        "p_red": prob(clf, x, "colour", "red").tolist(),
        "rms_change": d.pow(2).mean((1, 2, 3)).sqrt().tolist(),
        "shape_mean_change_rgb_x255": ((d * fg).sum((2, 3)) / fg.sum((2, 3)) * 255).round().tolist(),
        "background_mean_abs_change_x255": ((d.abs() * (1 - fg)).sum((1, 2, 3)) / (1 - fg).sum((1, 2, 3)) / 3
                                            * 255).tolist(),
        "cosine_to_exact_edit": torch.nn.functional.cosine_similarity(d.flatten(1), exact.flatten(1)).tolist(),
    }
    if judge is not None:
        with torch.no_grad():
            row["judge_colour"] = judge.predict(x)["colour"]
            row["judge_clean"] = judge.clean_score(x).tolist()
    return row


def gradients(robust: Path, png: Path | None, steps: int = 10, step_size: float = 0.5, until: float = 0.9,
              max_steps: int = 60) -> dict:
    from steerexp.images import image_grid, save_png, to_tensor
    from steerexp.pretrain.robust import gradient_ascent
    from steerexp.scorers import load_classifier, prob
    from steerexp.worlds.shapes import world

    starts = [("circle", "gray"), ("square", "black"), ("triangle", "white"), ("ring", "gray")]
    scenes = [world.Scene(s, "blue", "large", "center", bg) for s, bg in starts]
    x0 = to_tensor(np.stack([world.render(s) for s in scenes]))
    red = to_tensor(np.stack([world.render(world.Scene(s.shape, "red", s.size, s.position, s.background))
                              for s in scenes]))
    exact = red - x0
    fg = (exact.abs().sum(1, keepdim=True) > 0).float()
    try:
        from steerexp.worlds.shapes.judge import AnalyticJudge

        judge = AnalyticJudge()
    except ImportError:
        judge = None
    out = {"steps": steps, "step_size": step_size, "until": until, "max_steps": max_steps,
           "images": [f"blue {s} on {bg}" for s, bg in starts]}
    fixed, convinced = [], []
    for name, folder in (("plain", None), ("robust", robust)):
        clf = load_classifier(folder)
        x, _ = gradient_ascent(clf, x0, "colour", "red", steps, step_size)
        xu, taken = gradient_ascent(clf, x0, "colour", "red", max_steps, step_size, until=until)
        out[name] = {"p_red_before": prob(clf, x0, "colour", "red").tolist(),
                     f"after_{steps}_steps": _change_figures(clf, judge, x0, x, exact, fg),
                     f"until_p_{until}": {"steps": taken.tolist(), **_change_figures(clf, judge, x0, xu, exact, fg)}}
        fixed += [x, (0.5 + 4 * (x - x0)).clamp(0, 1)]
        convinced.append(xu)
        print(name, json.dumps(out[name]), flush=True)
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        save_png(png, image_grid([x0, *fixed, *convinced, red], len(scenes)), upscale=4)
    return out


def noisy(n: int) -> dict:
    from steerexp import ASSETS
    from steerexp.generators.sampling import Schedule
    from steerexp.pretrain.noisy import accuracy_by_t, add_noise, encode, load_vae_and_schedule
    from steerexp.scorers import load_noisy

    model = load_noisy()
    vae, alphas = load_vae_and_schedule(ASSETS / "shapes")
    x, labels = fresh(n)
    z0, _ = encode(vae, x)
    buckets = accuracy_by_t(model, z0, labels, alphas)
    for row in buckets:
        print(json.dumps(row), flush=True)
    from diffusers import DDIMScheduler

    schedule = Schedule.from_ddim(DDIMScheduler.from_pretrained(ASSETS / "shapes" / "scheduler"), 25)
    gen = torch.Generator().manual_seed(1)
    at_steps = []
    with torch.no_grad():
        for t in schedule.timesteps.tolist():
            tt = torch.full((len(z0),), t)
            logits = model(add_noise(z0, tt, alphas, torch.randn(z0.shape, generator=gen)), tt)
            at_steps.append({"t": t, **{h: float((logits[h].argmax(-1) == labels[h]).float().mean()) for h in logits}})
    print(json.dumps(at_steps), flush=True)
    return {"n": n, "by_t_range": buckets, "at_ddim25_timesteps": at_steps}


def guidance_leakage(settings: list[str], seeds: list[int]) -> dict:
    """Where energy guidance's leakage flips go: the world's unrelated suite with and without the
    guidance toward "large" (technique.scorer:scale, 25 steps, CFG 5, end 0.8, as the preset), read
    by the analytic judge. A flip moves the reading of the prompt's shape or colour either onto the
    prompt (a baseline misreading fixed: 'to_prompt') or off it ('off_prompt')."""
    from steerexp.generators import load_generator
    from steerexp.techniques.energy_guidance import EnergyGuidance
    from steerexp.worlds.shapes import world
    from steerexp.worlds.shapes.judge import AnalyticJudge

    gen, judge = load_generator(device="cpu"), AnalyticJudge()
    prompts = [p for p in world.UNRELATED_PROMPTS for _ in seeds]
    all_seeds = [s for _ in world.UNRELATED_PROMPTS for s in seeds]
    asked = {h: [next(w for w in p.split() if w in world.HEADS[h]) for p in prompts] for h in ("shape", "colour")}

    def reads(images):
        with torch.no_grad():
            pred = judge.predict(images)
        return {h: pred[h] for h in asked}

    out = {"seeds": seeds}
    for setting in settings:
        scorer, scale = setting.split(":")
        tech = EnergyGuidance(gen, scorer=scorer, head="size", target="large", scale=float(scale),
                              sampling={"steps": 25, "guidance_scale": 5.0})
        tech.prepare()
        base, edit = reads(tech.generate(prompts, all_seeds, False)), reads(tech.generate(prompts, all_seeds, True))
        row = {}
        for h in asked:
            row[f"{h}_agreement_baseline"] = float(np.mean([b == a for b, a in zip(base[h], asked[h])]))
            row[f"{h}_agreement_edited"] = float(np.mean([e == a for e, a in zip(edit[h], asked[h])]))
        flips = [(b, e, a) for h in asked for b, e, a in zip(base[h], edit[h], asked[h]) if b != e]
        row["flips"] = len(flips)
        row["flips_to_prompt"] = sum(e == a for _, e, a in flips)
        row["flips_off_prompt"] = sum(b == a for b, _, a in flips)
        row["pairs_flipped"] = int(sum(any(base[h][i] != edit[h][i] for h in asked) for i in range(len(prompts))))
        row["pairs"] = len(prompts)
        out[setting] = row
        print(setting, json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sections", nargs="*", default=["accuracy", "gradients", "noisy"])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--n-robust", type=int, default=500)
    parser.add_argument("--robust", type=Path, default=None,
                        help="another robust classifier folder (e.g. a trial of the eps choice); results are printed, "
                             "not saved")
    parser.add_argument("--norm", choices=["linf", "l2"], default=None, help="attack ball (default: the recipe's)")
    parser.add_argument("--eps", type=float, default=None, help="attack radius (default: the recipe's)")
    parser.add_argument("--guidance", nargs="*", default=["classifier:5", "robust:5", "noisy:10"],
                        help="guidance_leakage: technique.scorer:scale settings")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(range(100, 116)),
                        help="guidance_leakage: held-out seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from steerexp import ASSETS

    shipped = args.robust is None
    robust = ASSETS / "classifier_robust" if shipped else args.robust
    results_file = OUT / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for section in args.sections:
        t = time.time()
        if section == "accuracy":  # one entry per attack ball
            row = accuracy(args.n, args.n_robust, robust, args.norm, args.eps)
            section = f"accuracy/{row['norm']}_{row['eps']:.4g}"
            results[section] = row
        elif section == "gradients":
            results["gradients"] = gradients(robust, OUT / "gradients.png" if shipped else None)
        elif section == "noisy":
            results["noisy"] = noisy(args.n)
        elif section == "guidance_leakage":
            results["guidance_leakage"] = guidance_leakage(args.guidance, args.seeds)
        else:
            raise SystemExit(f"unknown section {section!r}; choose accuracy, gradients, noisy, guidance_leakage")
        results[section]["seconds_total"] = round(time.time() - t, 1)
    if shipped:
        OUT.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
