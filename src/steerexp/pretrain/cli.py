"""`steerexp-pretrain`: rebuild the shipped assets from the seeded recipe in conf/pretrain.yaml.

    steerexp-pretrain                      # full recipe into src/steerexp/assets/ (<= 60 min, 2 cores)
    steerexp-pretrain smoke=true out=/tmp/a    # a few steps per stage, for tests
    steerexp-pretrain stages=[classifier]  # one stage only
    steerexp-pretrain stages=[classifier_robust,classifier_noisy] threads=1   # the robust scorers only
    steerexp-pretrain 'stages=[generator_flow]' threads=1    # the flow-matching generator (assets/shapes_flow)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from steerexp import ASSETS, conf_dir
from steerexp.pretrain import flow_generator, noisy, robust, scorers
from steerexp.pretrain.generator import pretrain_generator

STAGES = ("generator", "generator_flow", "classifier", "clip", "classifier_robust", "classifier_noisy")
POOL_STAGES = {"classifier", "clip", "classifier_robust", "classifier_noisy"}  # stages that read the fresh pool


def run(cfg: DictConfig) -> Path:
    if cfg.smoke:
        cfg = OmegaConf.merge(cfg, cfg.smoke_overrides)
    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown pretraining stage(s) {sorted(unknown)}; choose from {list(STAGES)}")
    out = Path(cfg.out) if cfg.out else ASSETS
    torch.set_num_threads(cfg.threads) if cfg.threads else None
    timings = {}
    if "generator" in cfg.stages:
        t = time.time()
        pretrain_generator(cfg, out / "shapes", cfg.seed)
        timings["generator"] = time.time() - t
    if "generator_flow" in cfg.stages:  # after `generator`: it reuses that stage's VAE (else the shipped one)
        t = time.time()
        flow_generator.pretrain_flow_generator(cfg, out / "shapes_flow", cfg.seed, flow_generator.vae_folder(out))
        timings["generator_flow"] = time.time() - t
    if POOL_STAGES & set(cfg.stages):
        pool = scorers.fresh_pool(cfg.seed + 1000, cfg.eyes_images, cfg.world.resolution)
        if "classifier" in cfg.stages:
            t = time.time()
            scorers.pretrain_classifier(cfg.classifier, out / "classifier", cfg.seed, pool)
            timings["classifier"] = time.time() - t
        if "clip" in cfg.stages:
            t = time.time()
            scorers.pretrain_clip(cfg.clip, out / "clip", cfg.seed, pool)
            timings["clip"] = time.time() - t
        if "classifier_robust" in cfg.stages:
            t = time.time()
            robust.pretrain_robust_classifier(cfg.classifier_robust, out / "classifier_robust", cfg.seed, pool)
            timings["classifier_robust"] = time.time() - t
        if "classifier_noisy" in cfg.stages:
            t = time.time()
            noisy.pretrain_noisy_classifier(cfg.classifier_noisy, out / "classifier_noisy", cfg.seed, pool,
                                            noisy.generator_folder(out))
            timings["classifier_noisy"] = time.time() - t
    recipe_file = out / "recipe.json"
    previous = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    recipe = {"config": OmegaConf.to_container(cfg, resolve=True),
              "seconds": {**previous.get("seconds", {}), **timings}}  # stages not rerun keep their time
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
