"""diffusers' guiders (diffusers.guiders) in the project's sampler: the smallest adapter.

Why an adapter: diffusers 0.42's guiders are written for its modular pipelines, which run the denoiser once per
"condition" the guider asks for and hand the guider BlockStates; the project's sampler (generators/sampling.py,
FrozenGenerator.model_output) runs cond and uncond in one batch and needs one combined output per step, with or
without gradients. So each step this module does what a modular pipeline's denoise loop does, with the guider's own
API and none of its math: `set_state(step, steps, t)`, ask `num_conditions` (1: the guider skips guidance at this
step, so the unconditional branch is not run), `prepare_inputs` on the predictions (which also resets per-run
state at step 0), and call the guider, whose `forward(pred_cond, pred_uncond)` is the combination.

The guider object is configured by the `guider` group (conf/guider/, settings in steerexp/guider_spec.py) and
travels in `Guidance.guider` (generators/frozen.py), so every technique that samples with its `self.guidance` uses
it, for the baseline and the edit alike.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

# diffusers warns "Guiders are currently an experimental feature..." at every guider it builds (each job, each
# `new`); steerexp says so once, in the README's "Guiders" section, and refuses diffusers < 0.42 (guider_spec.py)
logging.getLogger("diffusers.guiders.guider_utils").addFilter(lambda r: "experimental feature" not in r.getMessage())


def refused(*_args, **_kwargs):
    """The _target_ of the guider options the project refuses (guider_spec.RefusedGuiderSpec): validate refuses
    them before anything is built; built from Python anyway, they fail here."""
    raise ValueError("guider: this guider is not supported (see steerexp/guider_spec.py for the reason)")


def with_scale(guider, scale: float):
    """The guider at this guidance scale: itself when it has it already, else diffusers' `new(guidance_scale=...)`
    (with autoguidance's weak model, which diffusers' config does not hold)."""
    if float(guider.guidance_scale) == float(scale):
        return guider
    new = guider.new(guidance_scale=float(scale))
    if hasattr(guider, "weak_model"):
        new.weak_model = guider.weak_model
    return new


def _state(guider, i: int, steps: int, t) -> None:
    guider.set_state(step=i, num_inference_steps=steps, timestep=t)


PAIR = ["pred_cond", "pred_uncond"]   # the predictions a guider that only combines cond and uncond asks for


def combines_pair(guider) -> bool:
    """The guider only combines the conditional and unconditional predictions: it asks for those two (its class's
    `_input_predictions`, the list diffusers' guiders declare) and puts no hooks on the denoiser (it keeps
    BaseGuidance's `prepare_models`). Otherwise (PAG, SLG, SEG, AutoGuidance) it needs passes of its own through a
    hooked denoiser."""
    from diffusers.guiders.guider_utils import BaseGuidance

    return (list(getattr(type(guider), "_input_predictions", None) or []) == PAIR
            and type(guider).prepare_models is BaseGuidance.prepare_models)


def combine(guider, cond: torch.Tensor, uncond: torch.Tensor | None, i: int, steps: int, t=None) -> torch.Tensor:
    """The guided prediction at step i of `steps` from the conditional (and unconditional) predictions: diffusers'
    guider decides (its `forward`). `uncond` may be None only at a step where the guider asks for one condition."""
    if not combines_pair(guider):
        raise ValueError(f"guider: {type(guider).__name__} needs its own passes through the denoiser, and this "
                         "technique combines the cond and uncond predictions itself; choose a guider that only "
                         "combines them (cfg, apg, cfg_zero_star, tcfg)")
    _state(guider, i, steps, t)
    want = guider.num_conditions
    if want == 1:
        preds = (cond,)
    elif want == 2 and uncond is not None:
        preds = (cond, uncond)
    else:
        raise ValueError(f"guider: {type(guider).__name__} asks for {want} predictions at step {i}; the project's "
                         "sampler gives the conditional and the unconditional ones only")
    return guider(guider.prepare_inputs({"noise_pred": preds})).pred


# the guiders whose own passes run through diffusers' hooks on the denoiser (`hooked_output`)
HOOKED = ("PerturbedAttentionGuidance", "SkipLayerGuidance")


def model_output(guider, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 cond: torch.Tensor, uncond: torch.Tensor | None, i: int, steps: int, t=None,
                 denoiser: torch.nn.Module | None = None, blocks: str | None = None,
                 denoise_by: Callable | None = None) -> torch.Tensor:
    """One guided step as FrozenGenerator.model_output runs it: `denoise(x, cond)` is one forward pass; cond and
    uncond go in one batch (as the project's CFG does) when the guider wants both at this step, else cond alone.
    A hooked guider (PAG) runs its passes one by one (`hooked_output`) on `denoiser`, whose stack of transformer
    blocks `blocks` names (FrozenGenerator.attention_blocks). Autoguidance's second pass is the weak model's
    (`weak_output`): `denoise_by(module, x, cond)` is the generator's forward pass with another denoiser."""
    if type(guider).__name__ == WEAK and hasattr(guider, "weak_model"):   # steerexp's autoguidance (a weak model)
        return weak_output(guider, denoise, denoise_by, x, cond, uncond, i, steps, t, denoiser)
    hooked = type(guider).__name__ in HOOKED
    if not combines_pair(guider) and not hooked:
        raise ValueError(f"guider: {type(guider).__name__} needs passes of its own through a hooked denoiser, which "
                         "the sampler does not run; choose cfg, apg, cfg_zero_star, tcfg, pag, slg or autoguidance "
                         "(steerexp/guider_spec.py)")
    if uncond is None:  # no unconditional branch given (guidance off): the conditional output, as the project's CFG
        return denoise(x, cond)
    if hooked:
        return hooked_output(guider, denoise, x, cond, uncond, i, steps, t, denoiser, blocks)
    _state(guider, i, steps, t)
    if guider.num_conditions == 1:
        return combine(guider, denoise(x, cond), None, i, steps, t)
    out_cond, out_uncond = denoise(torch.cat([x, x]), torch.cat([cond, uncond])).chunk(2)
    return combine(guider, out_cond, out_uncond, i, steps, t)


def hooked_output(guider, denoise, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, i: int, steps: int,
                  t, denoiser: torch.nn.Module | None, blocks: str | None) -> torch.Tensor:
    """A step of a guider with a pass of its own (PAG: the conditional pass with the self-attention scores of the
    chosen blocks replaced by the identity; SLG: with those blocks skipped). The guider names the predictions it
    wants at this step (prepare_inputs: pred_cond, pred_uncond, pred_cond_skip, within their step ranges); each is
    one forward pass, not batched, since diffusers' hooks act on whole passes; the guider combines them (its
    `forward`). The perturbed pass runs with diffusers' own layer-skip hook (hooks.layer_skip) on the guider's
    layer configs, put on for that pass and removed whatever happens.

    Why not the guider's prepare_models / cleanup_models, which put the hooks on in diffusers' modular pipelines:
    they decide by counting passes (hooks on the third), and in 0.42 both PAG and SLG get the two-prediction case
    wrong (guidance scale 1, or a step outside the CFG range: the perturbed prediction is made from the
    unconditional inputs and without the hook, which silently turns it into CFG at the perturbed scale). Here the
    perturbed pass always gets the conditional inputs and the hook.

    The layer configs with fqn "auto" (diffusers finds block stacks only in DiT transformers) get the family's stack
    (`blocks`: a UNet's mid-block transformer blocks, as diffusers' PAG pipelines' "mid")."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.layer_skip import _apply_layer_skip_hook

    if denoiser is None or blocks is None:
        raise ValueError(f"guider: {type(guider).__name__} perturbs the denoiser's attention blocks, and this "
                         "generator family names none (FrozenGenerator.attention_blocks)")
    for config in guider.skip_layer_config:
        if config.fqn == "auto":
            config.fqn = blocks
    _state(guider, i, steps, t)
    batches = guider.prepare_inputs({"cond": (cond, uncond)})
    for batch in batches:
        which = getattr(batch, guider._identifier_key)  # pred_cond, pred_uncond or pred_cond_skip
        if which != "pred_cond_skip":
            batch.noise_pred = denoise(x, uncond if which == "pred_uncond" else cond)
            continue
        names = [f"steerexp_perturbed_{k}" for k in range(len(guider.skip_layer_config))]
        try:
            for name, config in zip(names, guider.skip_layer_config):
                _apply_layer_skip_hook(denoiser, config, name=name)
            batch.noise_pred = denoise(x, cond)
        finally:
            registry = HookRegistry.check_if_exists_or_initialize(denoiser)
            for name in names:
                registry.remove_hook(name, recurse=True)
    return guider(batches).pred



# ---------------------------------------------------------------------------- autoguidance: a weak model's pass
WEAK = "AutoGuidance"
_WEAK_MODELS: dict = {}   # (folder, device, dtype, file time) -> the weak denoiser: the last one loaded


def autoguidance(weak_model: str = "embedded", guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0):
    """diffusers' AutoGuidance guider (Karras et al., NeurIPS 2024, "Guiding a diffusion model with a bad version
    of itself") with a real weak model, as the paper guides: D = D_weak + w (D - D_weak), both conditional.

    diffusers 0.42's AutoGuidance stands in for the weak model by skipping or dropping out layers of the same
    denoiser (its auto_guidance_config hooks, on the unconditional inputs). Here it is built with no hooks, and
    its second prediction is the weak model's conditional one (`weak_output`); its `forward` (the combination),
    its step window (start / stop) and rescale are diffusers'. The weak model: "embedded" (the embedded
    generator's early denoiser, generators.weak_path: steerexp-pretrain's generator_weak and generator_flow_weak;
    from Python, shapes') or a pipeline folder of the generator's family. It is guided
    with the generator's own conditioning (its final text encoders), so every technique's edited conditioning (a
    learned token, a prompt delta) reaches both passes."""
    from diffusers.guiders import AutoGuidance

    guider = AutoGuidance(guidance_scale=guidance_scale, auto_guidance_config=[], guidance_rescale=guidance_rescale,
                          use_original_formulation=use_original_formulation, start=start, stop=stop)
    guider.weak_model = weak_folder(weak_model)
    return guider


def weak_folder(weak_model: str, embedded: str = "shapes"):
    """The pipeline folder of a weak model setting ("embedded": the weak model of the embedded generator `embedded`,
    generators.weak_path; run.build passes the run's)."""
    from pathlib import Path

    from steerexp.generators import weak_path

    return weak_path(embedded) if weak_model == "embedded" else Path(str(weak_model)).expanduser()


def weak_denoiser(folder, like: torch.nn.Module) -> torch.nn.Module:
    """The weak model's denoiser (the folder's unet or transformer, safetensors only), on `like`'s device and in its
    dtype, frozen; loaded once while the same one is asked for (the last one loaded is kept)."""
    import json

    from steerexp.generators.checks import component
    from steerexp.generators.frozen import component_class

    p = next(like.parameters())
    index = json.loads((folder / "model_index.json").read_text())
    name = "transformer" if "transformer" in index else "unet"
    where = component(folder, name)[0]
    stamp = max((f.stat().st_mtime_ns for f in where.iterdir() if f.is_file()), default=0)
    key = (str(folder), str(p.device), str(p.dtype), stamp)   # a rebuilt weak model is loaded again
    if key not in _WEAK_MODELS:
        cls = component_class(index, name, folder)
        if cls is not type(like):
            raise ValueError(f"guider.weak_model: {folder}'s {name} is a {cls.__name__} and the generator's denoiser a "
                             f"{type(like).__name__}; give a weak model of the generator's family")
        model = cls.from_pretrained(str(where), torch_dtype=p.dtype, use_safetensors=True)
        _WEAK_MODELS.clear()   # one weak model held at a time (a sweep's jobs share the process)
        _WEAK_MODELS[key] = model.to(p.device).eval().requires_grad_(False)
    return _WEAK_MODELS[key]


def weak_output(guider, denoise, denoise_by, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                i: int, steps: int, t, denoiser: torch.nn.Module | None) -> torch.Tensor:
    """A step of autoguidance: the generator's conditional prediction and the weak model's, combined by diffusers'
    AutoGuidance (`forward`: weak + w (cond - weak)). Outside its window, or at scale 1, the guider asks for one
    prediction and the weak model is not run. The unconditional branch is never used; given none (guidance off, as
    for every guider), the step is the conditional output."""
    if denoise_by is None or denoiser is None:
        raise ValueError("guider: autoguidance needs the generator's forward pass with another denoiser, which this "
                         "caller does not give")
    if uncond is None:  # guidance off (as for every guider): the conditional output
        return denoise(x, cond)
    _state(guider, i, steps, t)
    out_cond = denoise(x, cond)
    if guider.num_conditions == 1:
        return guider(guider.prepare_inputs({"noise_pred": (out_cond,)})).pred
    out_weak = denoise_by(weak_denoiser(guider.weak_model, denoiser), x, cond)
    return guider(guider.prepare_inputs({"noise_pred": (out_cond, out_weak)})).pred
