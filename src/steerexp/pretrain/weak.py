"""Autoguidance's weak models (guider=autoguidance, steerexp/guiders.py): a generator's denoiser early in its own
seeded training run, saved beside the generator as `<name>_weak/`.

The pretraining stages call these at `generator_weak.fraction` of their steps (conf/pretrain.yaml): the denoiser's
EMA weights then, in fp16 (`save_weights`), and at the end a model_index.json copied from the generator with a
shared.json that borrows every other component from it (`write_index`): the weak denoiser is guided with the
generator's own final text encoders, tokenizers, VAE and scheduler (generators.shared_components follows a borrowed
component the generator itself borrows, e.g. shapes_flow's VAE from shapes).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def early_step(cfg, steps: int) -> int | None:
    """The step (1-based) after which the weak model is saved: generator_weak.fraction of `steps`, at least 1."""
    weak = cfg.get("generator_weak")
    fraction = weak.get("fraction") if weak is not None else None
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"generator_weak.fraction must be in (0, 1] (or null: no weak model), got {fraction!r}")
    return max(1, round(float(fraction) * int(steps)))


def save_weights(model: torch.nn.Module, weights: dict, folder: Path, name: str, stage: str) -> None:
    """`model`'s config and these weights ({name: tensor}, its parameters') in fp16, as diffusers saves a
    component: folder/name/config.json + diffusion_pytorch_model.safetensors."""
    from safetensors.torch import save_file

    copy = type(model).from_config(model.config)
    missing, unexpected = copy.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=False)
    if unexpected or any(k in dict(copy.named_parameters()) for k in missing):
        raise RuntimeError(f"{stage}: the weak {name}'s weights do not fit it: missing {missing}, unexpected "
                           f"{unexpected}")
    (folder / name).mkdir(parents=True, exist_ok=True)
    copy.save_config(folder / name)
    save_file({k: v.to(torch.float16).contiguous() for k, v in copy.state_dict().items()},
              folder / name / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    print(f"[{stage}] the {name}'s EMA weights saved (fp16) -> {folder}", flush=True)


def write_index(weak: Path, generator: Path, denoiser: str) -> None:
    """The weak folder's model_index.json (the generator's) and shared.json: every component but the denoiser
    borrowed from the generator's folder, which lies beside it."""
    index = json.loads((generator / "model_index.json").read_text())
    (weak / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    borrowed = {name: {"from": f"{generator.name}/{name}", "config": {}} for name, entry in sorted(index.items())
                if not name.startswith("_") and name != denoiser and isinstance(entry, list) and entry[0] is not None}
    (weak / "shared.json").write_text(json.dumps(borrowed, indent=1))
