"""The README table of a noise_optimisation sweep: one row for plain sampling (the baseline side of the
runs, the same prompts and seeds in every run) and one per run.

    python experiments/noise_optimisation/table.py outputs/multirun/<date>/<time>

Calls per image: reno and noise_search count their own (technique/calls_per_image: forward denoiser
calls + 2 per backward pass); latent priming's are its ranking pass (candidates x ranking prompts x
sampling.steps) shared by the evaluated outputs, plus each output's own sample; plain sampling's are
sampling.steps. Seconds per image: the technique's own timers (reno, noise_search: each batch's wall time
per output; plain: generate(edited=False) per image, measured in the first run of the sweep); latent
priming: its ranking pass's seconds per evaluated output plus a plain sample's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

COLUMNS = ["method", "target rate (judge)", "target rate (objective)", "shape agr.", "colour agr.", "clean score",
           "calls / image", "s / image"]


def fmt(v, digits=2):
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def row(name, m, side, calls, seconds):
    get = lambda k: m.get(f"concept/{k}/{side}")  # noqa: E731
    objective = m.get(f"concept/objective/target_rate/{side}", m.get(f"concept/classifier/target_rate/{side}"))
    return [name, fmt(get("target_rate")), fmt(objective), fmt(get("attribute_agreement/shape")),
            fmt(get("attribute_agreement/colour")), fmt(get("clean_score")), fmt(calls, 0), fmt(seconds)]


def label(cfg: dict) -> str:
    tech = cfg["technique"]
    name = tech["_target_"].split(".")[-2]
    if name == "noise_search":
        n, evals = tech["candidates"], tech["max_calls"] // cfg["sampling"]["steps"]
        name = f"noise_search (best-of-{n}" + (f" + {evals - n} local)" if evals > n else ")")
    elif name == "latent_priming":
        name = f"latent_priming ({tech['candidates']} candidates, top {tech['top_k']}, mix {tech['mix']})"
    elif name == "reno":
        name = f"reno (lr {tech['lr']}, {tech['opt_sampling_steps'] or cfg['sampling']['steps']}-step path)"
    rewards = {k: v for k, v in (tech.get("rewards") or {tech.get("scorer", "classifier"): 1.0}).items() if v}
    return f"{name} vs {'+'.join(rewards)}"


def main(sweep: str) -> None:
    rows, plain, plain_seconds = [], None, None
    for run in sorted(p for p in Path(sweep).iterdir() if (p / "metrics.json").is_file()):
        m = json.loads((run / "metrics.json").read_text())
        cfg = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=True)
        steps, tech = cfg["sampling"]["steps"], cfg["technique"]
        n_images = len(cfg["eval"]["prompts"]) * len(cfg["eval"]["seeds"])
        if plain is None:
            plain_seconds = m.get("technique/plain_seconds_per_image")
            plain = row("plain sampling (best-of-1)", m, "baseline", steps, plain_seconds)
        if "technique/calls_per_image" in m:
            calls, seconds = m["technique/calls_per_image"], m.get("technique/seconds_per_image")
        else:  # latent priming: the ranking pass, shared by the evaluated outputs, + each output's own sample
            calls = m.get("technique/ranking_calls", tech["candidates"] * len(tech["prompts"]) * steps) / n_images
            calls += steps
            seconds = (m["technique/ranking_seconds"] / n_images + plain_seconds
                       if "technique/ranking_seconds" in m and plain_seconds else None)
        rows.append(row(label(cfg), m, "edited", calls, seconds))
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in [plain, *rows]:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
