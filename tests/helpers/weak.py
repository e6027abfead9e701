"""The weak-only pretraining stages (autoguidance's weak models, steerexp/pretrain/weak.py) rerun in smoke mode."""
from __future__ import annotations

import shutil
from pathlib import Path


def rebuild_weak(generator: Path, out: Path, stage: str, denoiser: str) -> dict:
    """Copy the generator folder into `out`, run the smoke `stage` (generator_weak / generator_flow_weak) there and
    return the weak denoiser's weights it wrote ({name: tensor})."""
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from steerexp import conf_dir
    from steerexp.pretrain.cli import run

    shutil.copytree(generator, out / generator.name)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["smoke=true", f"out={out}", f"stages=[{stage}]"])
    run(cfg)
    return load_file(out / f"{generator.name}_weak" / denoiser / "diffusion_pytorch_model.safetensors")
