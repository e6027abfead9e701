"""`steerexp-pretrain`: rebuild the shipped assets from the seeded recipe in conf/pretrain.yaml.

    steerexp-pretrain                      # full recipe into src/steerexp/assets/ (<= 60 min, 2 cores)
    steerexp-pretrain smoke=true out=/tmp/a    # a few steps per stage, for tests
    steerexp-pretrain stages=[classifier]  # one stage only
    steerexp-pretrain stages=[classifier_robust,classifier_noisy] threads=1   # the robust scorers only
    steerexp-pretrain 'stages=[generator_flow]' threads=1    # the flow-matching generator, not shipped: into
                                                             # $STEEREXP_BUILT or ~/.cache/steerexp/shapes_flow
    steerexp-pretrain 'stages=[generator_weak]'              # autoguidance's weak UNet only (12 min; the generator
    steerexp-pretrain 'stages=[generator_flow_weak]' threads=1   # stages also save them), and the weak MMDiT
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from steerexp import ASSETS, built_assets, conf_dir
from steerexp.safety import loggable_config
from steerexp.pretrain import flow_generator, noisy, robust, scorers
from steerexp.pretrain.generator import pretrain_generator

STAGES = ("generator", "generator_weak", "generator_flow", "generator_flow_weak", "classifier", "clip",
          "classifier_robust", "classifier_noisy")


def run(cfg: DictConfig) -> Path:
    if cfg.smoke:
        cfg = OmegaConf.merge(cfg, cfg.smoke_overrides)
    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown pretraining stage(s) {sorted(unknown)}; choose from {list(STAGES)}")
    out = Path(cfg.out) if cfg.out else ASSETS
    flow_out = Path(cfg.out) if cfg.out else built_assets()  # not shipped: built outside the package
    torch.set_num_threads(cfg.threads) if cfg.threads else None
    pool = None

    def eyes():  # the fresh image pool the scorer stages read, drawn once
        nonlocal pool
        if pool is None:
            pool = scorers.fresh_pool(cfg.seed + 1000, cfg.eyes_images, cfg.world.resolution)
        return pool

    stage_fns = {  # in STAGES order: generator_flow reuses the generator stage's VAE (else the shipped one)
        "generator": lambda: pretrain_generator(cfg, out / "shapes", cfg.seed),   # and shapes_weak beside it
        "generator_weak": lambda: pretrain_generator(cfg, out / "shapes", cfg.seed, weak_only=True),
        "generator_flow": lambda: flow_generator.pretrain_flow_generator(cfg, flow_out / "shapes_flow", cfg.seed,
                                                                         flow_generator.vae_folder(out)),
        "generator_flow_weak": lambda: flow_generator.pretrain_flow_generator(
            cfg, flow_out / "shapes_flow", cfg.seed, flow_generator.vae_folder(out), weak_only=True),
        "classifier": lambda: scorers.pretrain_classifier(cfg.classifier, out / "classifier", cfg.seed, eyes()),
        "clip": lambda: scorers.pretrain_clip(cfg.clip, out / "clip", cfg.seed, eyes()),
        "classifier_robust": lambda: robust.pretrain_robust_classifier(cfg.classifier_robust,
                                                                       out / "classifier_robust", cfg.seed, eyes()),
        "classifier_noisy": lambda: noisy.pretrain_noisy_classifier(cfg.classifier_noisy, out / "classifier_noisy",
                                                                    cfg.seed, eyes(), noisy.generator_folder(out)),
    }
    timings = {}
    for stage in (s for s in STAGES if s in cfg.stages):
        t = time.time()
        stage_fns[stage]()
        timings[stage] = time.time() - t
    recipe_file = out / "recipe.json"
    previous = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    config = loggable_config(cfg)   # ${oc.env:...} recorded as its text, never its value
    # a stage not rerun keeps the recipe and the time it was built with (its section of the earlier recipe)
    kept = {k: v for k, v in previous.get("config", {}).items() if k in STAGES and k not in cfg.stages}
    recipe = {"config": {**config, **kept}, "seconds": {**previous.get("seconds", {}), **timings}}
    recipe_file.write_text(json.dumps(recipe, indent=1))
    print(
        f"pretraining done in {sum(timings.values()):.0f}s: "
        f"{json.dumps({k: round(v) for k, v in timings.items()})} -> {out}"
    )
    return out


def main() -> None:
    hydra.main(config_path=str(conf_dir()), config_name="pretrain", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
