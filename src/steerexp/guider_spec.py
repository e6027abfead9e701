"""The `guider` config group's settings (conf/guider/*.yaml), declared once; torch-free.

A guider is diffusers' implementation of one guidance method (diffusers.guiders, 0.42), chosen for every
technique's sampling: `guider=apg`. Each option's spec names the diffusers class (`_target_`, allowlisted by exact
name in steerexp/safety.py) and declares the constructor arguments it exposes, with diffusers' defaults. The scale is
not a guider setting: it is the run's `sampling.guidance_scale` (or the guidance technique's `technique.scale`), so
every technique's paired baseline and edit keep one scale whatever the guider. steerexp/guiders.py calls them.

No `guider` (the default) keeps the project's own classifier-free guidance (generators.frozen.Guidance), unchanged.
Options whose method cannot run on the project's sampler yet are refused here, in one line, before anything loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from steerexp.errors import ConfigError
from steerexp.spec import Facts, Spec, register

SUPPORTED = ("cfg", "apg", "cfg_zero_star", "tcfg", "pag", "slg", "autoguidance")
TESTED_WITH = (0, 42)   # the diffusers release whose guiders steerexp tests (older ones lack or differ in them)


def _diffusers_version() -> tuple[int, int] | None:
    """The installed diffusers' (major, minor), read from its metadata (nothing imported); None if unreadable."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = version("diffusers").split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except (PackageNotFoundError, ValueError):
        return None
_CHOOSE = f"choose guider={', guider='.join(SUPPORTED)}, or no guider (the project's own CFG)"


@dataclass
class GuiderSpec(Spec):
    """What every guider that combines a conditional and an unconditional prediction has (diffusers' names)."""

    group: ClassVar[str] = "guider"
    elsewhere: ClassVar[dict] = {
        "guidance_scale": "sampling.guidance_scale (or technique.scale with technique=guidance): the guider's scale",
        "enabled": "no guider (the project's CFG) or sampling.guidance_scale=1 (no guidance)",
    }
    guidance_rescale: float = 0.0           # phi of "Common diffusion noise schedules are flawed" (0 = off)
    use_original_formulation: bool = False  # true: cond + w (cond - uncond) (w = 0: no guidance) instead of
                                            # uncond + w (cond - uncond)
    start: float = 0.0                      # guidance only on steps in [start, stop) of the run (fractions)
    stop: float = 1.0

    def check(self, key: str) -> None:
        found = _diffusers_version()
        if found is not None and found < TESTED_WITH:
            raise ConfigError(key, f"needs diffusers >= {'.'.join(map(str, TESTED_WITH))} (its guiders module, as "
                              f"steerexp tests it), found {'.'.join(map(str, found))}",
                              "pip install 'diffusers>=0.42,<0.43', or run without a guider")
        self.fraction(key, "guidance_rescale", 0.7)
        self.fraction(key, "start", 0.0)
        self.fraction(key, "stop", 1.0)
        if not self.start < 1.0:
            raise ConfigError(f"{key}.start", f"must be below 1, got {self.start}", f"set e.g. {key}.start=0.0")
        if not self.start <= self.stop:
            raise ConfigError(f"{key}.stop", f"must be at least {key}.start ({self.start}), got {self.stop}",
                              f"set e.g. {key}.start=0.0 {key}.stop=1.0")

    def check_generator(self, key: str, facts: Facts) -> None:
        if facts.family == "flux":
            raise ConfigError(key, f"{self._target_.rsplit('.', 1)[-1]} combines a conditional and an unconditional "
                              "prediction, and FLUX's guidance is distilled (the scale is a model input, one "
                              "conditional pass, no unconditional branch)",
                              "drop the guider on FLUX (no guider= override): tune sampling.guidance_scale")


@register("guider", "cfg")
@dataclass
class CFGSpec(GuiderSpec):
    """Classifier-free guidance (Ho & Salimans 2022), diffusers' implementation."""
    _target_: str = "diffusers.guiders.ClassifierFreeGuidance"


@register("guider", "apg")
@dataclass
class APGSpec(GuiderSpec):
    """Adaptive Projected Guidance (Sadat et al., ICLR 2025): the guidance update split into its parts parallel and
    orthogonal to the conditional prediction, the parallel part (the oversaturating one) weighted by eta, the update's
    norm capped."""
    _target_: str = "diffusers.guiders.AdaptiveProjectedGuidance"
    adaptive_projected_guidance_rescale: float = 15.0       # the cap r on the update's norm (0 = no cap)
    eta: float = 1.0                                        # weight of the parallel part (0 = orthogonal only)
    adaptive_projected_guidance_momentum: Optional[float] = None   # refused unless null (see check)

    def check(self, key: str) -> None:
        super().check(key)
        self.at_least(key, "adaptive_projected_guidance_rescale", 0.0, 15.0)
        self.at_least(key, "eta", 0.0, 0.0)
        if self.adaptive_projected_guidance_momentum is not None:
            raise ConfigError(f"{key}.adaptive_projected_guidance_momentum", "is not supported: diffusers keeps the "
                              "momentum in the guider between calls, and the project's sampler evaluates a step "
                              "again (gradient checkpointing, null-text inversion's inner loop), which would count "
                              "it twice", f"set {key}.adaptive_projected_guidance_momentum=null")


@register("guider", "cfg_zero_star")
@dataclass
class CFGZeroStarSpec(GuiderSpec):
    """CFG-Zero* (Fan et al. 2025, for flow matching): the unconditional prediction scaled by its optimal projection
    on the conditional one, and the first `zero_init_steps` steps' predictions zeroed."""
    _target_: str = "diffusers.guiders.ClassifierFreeZeroStarGuidance"
    zero_init_steps: int = 1

    def check(self, key: str) -> None:
        super().check(key)
        self.at_least(key, "zero_init_steps", 0, 1)


@register("guider", "tcfg")
@dataclass
class TCFGSpec(GuiderSpec):
    """Tangential CFG (Kwon et al. 2025): the unconditional prediction projected on the conditional and
    unconditional predictions' first singular vector before CFG."""
    _target_: str = "diffusers.guiders.TangentialClassifierFreeGuidance"


# ---------------------------------------------------------------------------- refused, with the reason
@dataclass
class RefusedGuiderSpec(Spec):
    """A guider diffusers ships that the project's sampler cannot run yet: `guider=<name>` is refused in one line,
    before anything loads, saying why."""
    group: ClassVar[str] = "guider"
    diffusers_class: ClassVar[str] = ""
    why: ClassVar[str] = ""
    _target_: str = "steerexp.guiders.refused"   # never built: the check refuses it first

    def check(self, key: str) -> None:
        raise ConfigError(key, f"{self.label} (diffusers.guiders.{self.diffusers_class}) is not supported: {self.why}",
                          _CHOOSE)


@register("guider", "pag")
@dataclass
class PAGSpec(GuiderSpec):
    """Perturbed-Attention Guidance (Ahn et al., ECCV 2024): a third, conditional prediction with the self-attention
    scores of some transformer blocks replaced by the identity (each token attends to itself), guided away from:
    uncond + w (cond - uncond) + s (cond - cond_perturbed), s = perturbed_guidance_scale, on the steps strictly
    inside (perturbed_guidance_start, perturbed_guidance_stop). diffusers' hooks do the perturbation
    (steerexp/guiders.py: hooked_output). The blocks: `perturbed_guidance_layers`, indices into the family's stack
    (FrozenGenerator.attention_blocks): a UNet's mid-block transformer blocks (diffusers' PAG pipelines' "mid").
    The UNet families only: on SD3 diffusers' layer-skip hook would replace the joint attention over image and text
    tokens, not the image-to-image part that SD3's PAG perturbs (refused in one line)."""
    _target_: str = "diffusers.guiders.PerturbedAttentionGuidance"
    perturbed_guidance_scale: float = 2.8
    perturbed_guidance_start: float = 0.0   # the paper perturbs every step (diffusers' guider defaults to SLG's
    perturbed_guidance_stop: float = 1.0    #   window, 0.01-0.2; its PAG pipelines perturb every step)
    perturbed_guidance_layers: list = field(default_factory=lambda: [0])

    def check(self, key: str) -> None:
        super().check(key)
        self.at_least(key, "perturbed_guidance_scale", 0.0, 3.0)
        self.fraction(key, "perturbed_guidance_start", 0.0)
        self.fraction(key, "perturbed_guidance_stop", 1.0)
        if not self.perturbed_guidance_start <= self.perturbed_guidance_stop:
            raise ConfigError(f"{key}.perturbed_guidance_stop", f"must be at least {key}.perturbed_guidance_start "
                              f"({self.perturbed_guidance_start}), got {self.perturbed_guidance_stop}",
                              f"set e.g. {key}.perturbed_guidance_start=0.0 {key}.perturbed_guidance_stop=1.0")
        check_indices(f"{key}.perturbed_guidance_layers", self.perturbed_guidance_layers)

    def check_generator(self, key: str, facts: Facts) -> None:
        super().check_generator(key, facts)
        if facts.family == "sd3":
            raise ConfigError(key, "diffusers' layer-skip hook would make SD3's whole joint sequence attend to itself "
                              "(image tokens lose the text too), while SD3's PAG perturbs image-to-image attention "
                              "only (diffusers' PAGJointAttnProcessor2_0)", "use guider=cfg, apg, cfg_zero_star or "
                              "tcfg on SD3")
        check_window(key, "perturbed_guidance", self.perturbed_guidance_start, self.perturbed_guidance_stop, facts)
        check_blocks(f"{key}.perturbed_guidance_layers", self.perturbed_guidance_layers, facts)


@register("guider", "slg")
@dataclass
class SLGSpec(GuiderSpec):
    """Skip-Layer Guidance (SD3.5's; Hyung et al. 2024 "Spatiotemporal Skip Guidance"): a third, conditional
    prediction with whole transformer blocks skipped (attention and feed-forward), guided away from:
    uncond + w (cond - uncond) + s (cond - cond_skipped), s = skip_layer_guidance_scale, on the steps strictly inside
    (skip_layer_guidance_start, skip_layer_guidance_stop). diffusers' hooks skip the blocks (guiders.hooked_output);
    `skip_layer_config.indices` index the family's stack as PAG's layers do (a UNet's mid-block transformer blocks).
    The UNet families only: on SD3, diffusers 0.42's block-skip hook hands a joint block's text stream on as its
    image stream (refused in one line)."""
    _target_: str = "diffusers.guiders.SkipLayerGuidance"
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2
    skip_layer_config: dict = field(default_factory=lambda: {"indices": [0], "fqn": "auto"})

    def check(self, key: str) -> None:
        super().check(key)
        self.at_least(key, "skip_layer_guidance_scale", 0.0, 2.8)
        self.fraction(key, "skip_layer_guidance_start", 0.0)
        self.fraction(key, "skip_layer_guidance_stop", 1.0)
        conf = self.skip_layer_config
        if not isinstance(conf, dict) or set(conf) != {"indices", "fqn"} or conf["fqn"] != "auto":
            raise ConfigError(f"{key}.skip_layer_config", f"must be {{indices: [...], fqn: auto}} (auto: the "
                              f"family's block stack), got {conf!r}",
                              f"set {key}.skip_layer_config='{{indices: [0], fqn: auto}}'")
        check_indices(f"{key}.skip_layer_config.indices", conf["indices"])

    def check_generator(self, key: str, facts: Facts) -> None:
        super().check_generator(key, facts)
        if facts.family == "sd3":
            raise ConfigError(key, "SkipLayerGuidance's block-skip hook (diffusers 0.42) hands an SD3 joint block's "
                              "text stream on as its image stream, so the skipped prediction is wrong",
                              "use guider=cfg, apg, cfg_zero_star or tcfg on SD3")
        check_window(key, "skip_layer_guidance", self.skip_layer_guidance_start, self.skip_layer_guidance_stop,
                     facts)
        check_blocks(f"{key}.skip_layer_config.indices", self.skip_layer_config["indices"], facts)


@register("guider", "autoguidance")
@dataclass
class AutoGuidanceSpec(GuiderSpec):
    """Autoguidance (Karras et al., NeurIPS 2024): guided away from a weaker model of the same family, both
    conditional: weak + w (cond - weak), on the steps in [start, stop). diffusers' AutoGuidance does the
    combining; the weak model's pass is steerexp's (guiders.autoguidance says why). `weak_model`: "embedded" (the
    embedded generator's early denoiser, saved by steerexp-pretrain's generator and generator_flow stages at 10 %
    of their steps: assets/shapes_weak shipped, shapes_flow_weak built beside shapes_flow) or a local pipeline
    folder of the generator's class whose denoiser takes the same latents and conditioning."""
    _target_: str = "steerexp.guiders.autoguidance"
    weak_model: str = "embedded"

    def check_generator(self, key: str, facts: Facts) -> None:
        super().check_generator(key, facts)
        from pathlib import Path

        from steerexp.generators import weak_path
        from steerexp.generators.checks import check_pipeline_folder, component_config, read_json

        wkey = f"{key}.weak_model"
        if self.weak_model == "embedded":
            if facts.embedded is None:
                raise ConfigError(wkey, f"embedded: the shipped weak models are the embedded generators' early "
                                  f"denoisers, and this generator is a {facts.family or 'loaded'} folder (no early "
                                  "checkpoint of it is shipped)", f"set {wkey}=<a weaker pipeline folder of the "
                                  "same family>, or use generator=shapes or shapes_flow")
            folder = weak_path(facts.embedded)
            if not (folder / "model_index.json").is_file():
                raise ConfigError(wkey, f"embedded: {facts.embedded}'s weak model is not built ({folder} is missing)",
                                  "build it with steerexp-pretrain 'stages=[generator_flow_weak]' threads=1 (after "
                                  "'stages=[generator_flow]'), or set it to a weaker pipeline folder")
        else:
            folder = Path(str(self.weak_model)).expanduser()
            if not (folder / "model_index.json").is_file():
                raise ConfigError(wkey, f"{folder} is not a local pipeline folder (no model_index.json)",
                                  f"set {wkey} to a folder that steerexp-pretrain or save_pretrained wrote")
        check_pipeline_folder(folder, wkey)
        if facts.folder is None:
            return
        ours = read_json(facts.folder / "model_index.json", "generator.path", required=False) or {}
        theirs = read_json(folder / "model_index.json", wkey, required=False) or {}
        if ours.get("_class_name") != theirs.get("_class_name"):
            raise ConfigError(wkey, f"is a {theirs.get('_class_name')} and the generator a {ours.get('_class_name')}:"
                              " the weak model must be of the generator's family", f"set {wkey} to a weaker "
                              f"{ours.get('_class_name')} folder")
        name = "transformer" if "transformer" in ours else "unet"
        keys = ("in_channels", "out_channels", "cross_attention_dim", "joint_attention_dim", "sample_size",
                "patch_size", "pooled_projection_dim", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim")   # the last three: SDXL's added conditioning
        a = component_config(facts.folder, name, "config.json", "generator.path") or {}
        b = component_config(folder, name, "config.json", wkey) or {}
        differ = [k for k in keys if a.get(k) != b.get(k)]
        if differ:
            raise ConfigError(wkey, f"its {name} differs from the generator's in {differ[0]} ({b.get(differ[0])} "
                              f"against {a.get(differ[0])}): it must take the same latents and conditioning",
                              f"set {wkey} to a weaker model trained on the generator's latents and text encoder")


def check_indices(key: str, layers) -> None:
    """A non-empty list of block indices >= 0."""
    if (not isinstance(layers, (list, tuple)) or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise ConfigError(key, f"must be a non-empty list of block indices >= 0, got {layers!r}", f"set e.g. {key}=[0]")


def check_window(key: str, prefix: str, start: float, stop: float, facts: Facts) -> None:
    """The perturbed pass runs on some step: diffusers runs it on the steps k with int(start S) < k < int(stop S)
    (S = sampling.steps), so a narrow window or few steps leave none, and the guider would silently be CFG."""
    steps = facts.sampling_steps
    if not isinstance(steps, int) or steps < 1:
        return
    lo, hi = int(start * steps), int(stop * steps)
    if hi - lo < 2:
        raise ConfigError(f"{key}.{prefix}_stop", f"leaves the perturbed pass no step: diffusers runs it on the steps "
                          f"strictly between {lo} and {hi} (int(start x S), int(stop x S) at sampling.steps={steps})",
                          f"widen the window, e.g. {key}.{prefix}_start=0 {key}.{prefix}_stop=1, or sample more steps")


def check_blocks(key: str, layers, facts: Facts) -> None:
    """Every index names a block of the family's stack that hooked guiders perturb (attention_block_count)."""
    blocks = attention_block_count(facts)
    if blocks is not None and max(layers) >= blocks:
        raise ConfigError(key, f"names block {max(layers)}, and this {facts.family} generator has {blocks} mid-block "
                          "transformer blocks",
                          f"set indices below {blocks}, e.g. {key}=[0]")


def attention_block_count(facts: Facts) -> int | None:
    """How many blocks the stack that PAG and SLG perturb has (FrozenGenerator.attention_blocks: a UNet's mid-block
    transformer layers), read from unet/config.json in the pipeline folder. None when unknown (no local folder)."""
    if facts.folder is None or facts.family not in ("sd", "sdxl"):
        return None
    from steerexp.generators.checks import read_json

    conf = read_json(facts.folder / "unet" / "config.json", "generator.path", required=False)
    if not isinstance(conf, dict):
        return None
    if conf.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        return 0
    per = conf.get("transformer_layers_per_block", 1)
    per = per[-1] if isinstance(per, (list, tuple)) else per  # the mid block takes the last entry (diffusers)
    return per if isinstance(per, int) else None


@register("guider", "seg")
@dataclass
class SEGSpec(RefusedGuiderSpec):
    diffusers_class: ClassVar[str] = "SmoothedEnergyGuidance"
    why: ClassVar[str] = ("its third prediction (blurred attention queries) is never made in diffusers 0.42: its "
                          "prepare_models does not count the passes (_count_prepared stays 0), so the blur hook is "
                          "never put on and the guidance would silently be CFG at a larger scale")


@register("guider", "fdg")
@dataclass
class FDGSpec(RefusedGuiderSpec):
    diffusers_class: ClassVar[str] = "FrequencyDecoupledGuidance"
    why: ClassVar[str] = ("diffusers builds its Laplacian pyramids with the kornia library, which is not a "
                          "dependency of steerexp (not installed)")


FLOW_EDITORS = ("steerexp.techniques.flow_edit.FlowEdit", "steerexp.techniques.rf_inversion.RFInversion",
                "steerexp.techniques.rf_solver.RFSolver")
HOOKED_TARGETS = ("diffusers.guiders.PerturbedAttentionGuidance", "diffusers.guiders.SkipLayerGuidance",
                  "steerexp.guiders.autoguidance")   # passes of their own: hooked blocks, or the weak model
PER_LAYER_TOKENS = ("steerexp.techniques.xti.XTI", "steerexp.techniques.neti.NeTI")  # processors on the denoiser


def check_with_technique(guider, technique, evaluators=None) -> None:
    """Across parts: the guidance technique's own CFG knobs (rescale, schedule, a subtracted negative prompt) act
    inside the project's CFG and have no place in a diffusers guider; each guider has its own (guidance_rescale,
    start/stop). A guider with passes of its own (pag, slg: hooked blocks; autoguidance: the weak model) cannot
    guide the steps that batch their branches themselves: Prompt-to-Prompt's source and target branches, null-text
    inversion's optimisation; autoguidance's weak denoiser lacks XTI's and NeTI's per-layer processors. Plain dicts
    (validate passes the resolved config). Torch-free."""
    if not isinstance(guider, dict) or not isinstance(technique, dict):
        return
    target = str(technique.get("_target_", ""))
    if target in FLOW_EDITORS:
        raise ConfigError("guider", f"{target.rsplit('.', 1)[-1]}'s own method guides its velocities with "
                          "technique.source_guidance / target_guidance (plain CFG), so a guider would reach only the "
                          "rows beside it and the paired comparison would mix two guidances",
                          "drop the guider (tune technique.source_guidance / target_guidance)")
    if guider.get("_target_") == "steerexp.guiders.autoguidance" and target in PER_LAYER_TOKENS:
        raise ConfigError("guider", f"autoguidance's weak denoiser has none of {target.rsplit('.', 1)[-1]}'s "
                          "per-layer attention processors, so it would read the per-layer conditioning as one "
                          "sequence", "use another guider (cfg, apg, cfg_zero_star, tcfg, pag, slg) or "
                          "technique=textual_inversion")
    if guider.get("_target_") in HOOKED_TARGETS:
        name = str(guider["_target_"]).rsplit(".", 1)[-1]
        edit = technique.get("edit") if isinstance(technique.get("edit"), dict) else {}
        methods = [str(m) for ev in (evaluators or {}).values() if isinstance(ev, dict)
                   for m in (ev.get("methods") or ())]
        batched = ("technique.edit.control", "p2p") if edit.get("control") == "p2p" else None
        if target.endswith("NullTextInversion"):
            batched = ("technique", "null-text inversion's optimisation")
        if batched is None and any("+p2p" in m for m in methods):
            batched = ("evaluator methods", "+p2p")
        if batched is not None:
            raise ConfigError("guider", f"{name} makes passes of its own (hooked blocks, or a weak model), and "
                              f"{batched[1]} ({batched[0]}) runs the guided branches itself in one batch",
                              "use a guider that only combines predictions (cfg, apg, cfg_zero_star, tcfg), or "
                              "no guider")
    if target != "steerexp.techniques.guidance.GuidanceTuning":
        return
    for name, default, instead in (("rescale", 0.0, "guider.guidance_rescale"),
                                   ("schedule", "constant", "guider.start / guider.stop"),
                                   ("negative_mode", "uncond", "negative_mode=uncond (the negative prompt as the "
                                                               "unconditional branch)")):
        if technique.get(name, default) != default and not (name == "negative_mode"
                                                          and not technique.get("negative_prompt")):
            raise ConfigError(f"technique.{name}", f"acts inside the project's own CFG, and a guider "
                              f"({guider.get('_target_')}) does the combining", f"set technique.{name}={default} and "
                              f"use {instead}, or drop the guider")
