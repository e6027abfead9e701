"""The generator's environment checks, before any model loads and without torch (validate.py calls them).

    check_generator(c)          generator.path / embedded / device / dtype / height / width / proof -> GeneratorInfo
    check_size, size_rule       generator.height / width against the folder's VAE factor and family limits
    check_family(c, gen)        a pipeline class steerexp supports, and a technique its family can run
    check_pipeline_folder       model_index.json and component configs parse, weights present and complete
    read_safetensors_header     a safetensors file's JSON header, checked against the file's size (no tensor read)
    check_safetensors           the same, as one ConfigError naming the config key
    read_json                   a JSON file, or one ConfigError naming the config key
    looks_like_hub_id, hub_snapshot   org/name ids and their local Hugging Face cache snapshot
    gpu_count, check_device     CUDA GPUs found from /proc and /dev (and CUDA_VISIBLE_DEVICES), not from torch
    text_encoder_widths         each text encoder's token-embedding width, from the folder's configs

Nothing here imports torch, diffusers or transformers (steerexp.generators itself is torch-free at import).
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from steerexp.errors import ConfigError
from steerexp.generators import EMBEDDED, PROOFS, SHARED_FILE, embedded_path, shared_components

DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_TRAIN_TIMESTEPS = 1000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _target(c: dict, group: str) -> str:
    node = c.get(group)
    return str(node.get("_target_", "")) if isinstance(node, dict) else ""


class GeneratorInfo:
    """What the checks after this one need: the local pipeline folder (None for an unresolved
    hub id), its scheduler's num_train_timesteps, and the tokenizer folder."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.train_timesteps = DEFAULT_TRAIN_TIMESTEPS
        if folder is not None:
            sched = read_json(folder / "scheduler" / "scheduler_config.json", "generator.path", required=False)
            if isinstance(sched, dict) and _is_int(sched.get("num_train_timesteps")):
                self.train_timesteps = sched["num_train_timesteps"]

    @property
    def tokenizer(self) -> tuple[Path, dict] | None:
        """(the tokenizer's folder, its borrowed config overrides) or None (no local tokenizer folder)."""
        if self.folder is None:
            return None
        folder, overrides = component(self.folder, "tokenizer")
        return (folder, overrides) if folder.is_dir() else None


def component(folder: Path, name: str) -> tuple[Path, dict]:
    """(the folder of a pipeline folder's component, the config keys it overrides): its own subfolder, or the
    sibling's copy it borrows (generators.shared_components; an invalid shared.json is check_pipeline_folder's
    error, so here it falls back to the subfolder)."""
    try:
        borrowed = shared_components(folder)
    except (ValueError, OSError, AttributeError):
        borrowed = {}
    return borrowed.get(name, (folder / name, {}))


def component_config(folder: Path, name: str, file: str, key: str) -> Any:
    """A component's config file (config.json, tokenizer_config.json, ...) as the loader reads it: borrowed
    components with their overrides applied. None when missing."""
    where, overrides = component(folder, name)
    conf = read_json(where / file, key, required=False)
    return conf | overrides if isinstance(conf, dict) else conf


def read_json(path: Path, key: str, required: bool = True) -> Any:
    if not path.is_file():
        if required:
            raise ConfigError(key, f"{path} is missing", "point the setting at a complete folder")
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(
            key, f"{path} is not valid JSON ({err})", "restore that file (re-download or re-export the pipeline)"
        ) from None
    except OSError as err:
        raise ConfigError(key, f"cannot read {path} ({err.strerror or err})", "check the file's permissions") from None


def looks_like_hub_id(value: str) -> bool:
    return (
        value.count("/") == 1
        and not value.startswith((".", "/", "~"))
        and re.fullmatch(r"[\w.\-]+/[\w.\-]+", value) is not None
    )


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub model in the Hugging Face cache, if one was downloaded."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        cache = str(Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
    repo = Path(cache).expanduser() / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snap = repo / "snapshots" / commit
    return snap if (snap / "model_index.json").is_file() else None


def check_generator(c: dict) -> GeneratorInfo:
    gen = c.get("generator")
    if not isinstance(gen, dict):
        return GeneratorInfo(None)
    path = gen.get("path")
    embedded = gen.get("embedded") or "shapes"
    if embedded not in EMBEDDED:
        raise ConfigError("generator.embedded", f"must be shapes or shapes_flow, got {embedded!r}",
                          "set generator=shapes or generator=shapes_flow (or generator.path to a pipeline folder)")
    if path is None or path == "":
        folder: Path | None = embedded_path(embedded)
    elif not isinstance(path, str):
        raise ConfigError("generator.path", f"must be a folder or a hub id, got {path!r}",
                          "set generator.path=/models/sd-v1-5 or org/name (null: the shipped shapes generator)")
    else:
        local = Path(path).expanduser()
        if local.exists():
            folder = local
        elif looks_like_hub_id(path):
            folder = hub_snapshot(path)  # None: the loader downloads it (or says the hub is unreachable)
        else:
            raise ConfigError(
                "generator.path",
                f"generator folder not found: {local}",
                "set generator.path to a Stable Diffusion pipeline folder (with model_index.json) "
                "or a hub id such as org/name",
            )
    if path is None and not (folder / "model_index.json").is_file():
        stage = {"shapes": "generator", "shapes_flow": "generator_flow"}.get(str(embedded), "generator")
        raise ConfigError("generator.embedded", f"the embedded generator {embedded} is not built: {folder} is missing",
                          f"build it with steerexp-pretrain 'stages=[{stage}]' threads=1 (shapes_flow is not shipped: "
                          "the shipped models stay under 50 MB; it is built into $STEEREXP_BUILT or ~/.cache/steerexp)")
    if folder is not None and (path is None or Path(str(path)).expanduser().exists()):
        check_pipeline_folder(folder)
    device = gen.get("device", "auto")
    check_device(device)
    dtype = gen.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise ConfigError(
            "generator.dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}", "set generator.dtype=fp32"
        )
    on_cpu = device == "cpu" or device == "auto" and gpu_count() == 0
    if dtype == "fp16" and on_cpu:
        why = "generator.device=auto found no GPU" if device == "auto" else "generator.device=cpu"
        raise ConfigError("generator.dtype", f"fp16 does not run on the CPU ({why})",
                          "set generator.dtype=fp32 (or bf16), or run on a CUDA device")
    check_size(gen, folder)
    check_proof(gen.get("proof", "fast"))
    return GeneratorInfo(folder)


def check_proof(proof: Any) -> None:
    """generator.proof: how the run proves the frozen weights unchanged (FrozenGenerator.proof_record)."""
    if proof not in PROOFS:
        raise ConfigError("generator.proof", f"must be one of {', '.join(PROOFS)}, got {proof!r}",
                          "set generator.proof=fast (identity, version counters and a checksum on the device) or "
                          "generator.proof=full (SHA-256 of every weight, for audited runs)")


# ---------------------------------------------------------------------------- the image size
SIZE_KEYS = ("height", "width")
MAX_SIZE_FACTOR = 4  # a side at most 4x the model's default side, where the model sets no limit of its own


class SizeRule:
    """What sizes a pipeline folder samples at (from its configs alone; FrozenGenerator.set_size applies the same
    rule to a loaded generator):

    multiple   every side is divisible by it: the VAE's scale factor 2**(levels - 1), times the transformer's
               patch side where the denoiser reads patches (SD3: patch_size; FLUX: its 2x2 latent packing).
               A UNet needs no more: diffusers' UNet2DConditionModel upsamples to its skip connections' sizes,
               so any latent side runs (checked down to odd sides on the shipped shapes UNet)
    default    (height, width) the model samples at when generator.height / width are null
    max_side   the largest side: SD3's position embedding covers pos_embed_max_size patches a side (a hard
               limit), else MAX_SIZE_FACTOR x the default side (memory and quality fall far off before)"""

    def __init__(self, family: str, factor: int, multiple: int, why: str, default: tuple[int, int],
                 max_side: int, limit_why: str):
        self.family, self.factor, self.multiple, self.why = family, factor, multiple, why
        self.default, self.max_side, self.limit_why = default, max_side, limit_why

    def problem(self, side: int) -> tuple[str, str] | None:
        """(problem, fix) for one side in pixels, or None when it is allowed (`fix` holds KEY for the setting)."""
        m = self.multiple
        if side % m:
            lo, hi = side - side % m, side - side % m + m
            near = f"{lo} or {hi}" if lo else f"{hi}"
            return f"is {side} px, not divisible by {m} ({self.why})", f"set KEY={near}"
        if side > self.max_side:
            return (f"is {side} px, above the {self.max_side} px this model allows ({self.limit_why})",
                    f"set KEY to at most {self.max_side} (null: the model's default {self.default[0]}x"
                    f"{self.default[1]})")
        return None


def _side(value: Any) -> tuple[int, int] | None:
    """A config's sample_size (an int, or [height, width]) as (height, width)."""
    if _is_int(value) and value > 0:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def size_rule(folder: Path, key: str = "generator.path") -> SizeRule | None:
    """The SizeRule of a pipeline folder, read from model_index.json and the VAE's and denoiser's config.json
    (None when the folder is not a supported pipeline: check_family says so)."""
    from steerexp import generators

    index = read_json(folder / "model_index.json", key, required=False)
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in generators.FAMILIES:
        return None
    family = generators.FAMILIES[name][0]
    vae = component_config(folder, "vae", "config.json", key)
    blocks = vae.get("block_out_channels") if isinstance(vae, dict) else None
    if not isinstance(blocks, list) or not blocks:
        where = component(folder, "vae")[0] / "config.json"
        raise ConfigError(key, f"{where} has no block_out_channels, so the VAE's scale "
                          "factor (and the sizes generator.height / width may take) is unknown", "restore that file")
    factor = 2 ** (len(blocks) - 1)
    vae_why = f"the VAE's scale factor: its {len(blocks)} levels halve the image {len(blocks) - 1} times"
    denoiser = "transformer" if family in ("sd3", "flux") else "unet"
    conf = read_json(folder / denoiser / "config.json", key, required=False)
    conf = conf if isinstance(conf, dict) else {}
    limit_why = f"{MAX_SIZE_FACTOR}x its default side; steerexp's limit"
    if family == "flux":
        latent = (vae.get("sample_size") // factor) if _is_int(vae.get("sample_size")) else 128  # as flux.py
        default = (latent * factor,) * 2
        multiple, why = 2 * factor, f"{vae_why} ({factor}), and FLUX packs the latent in 2x2 patches"
        return SizeRule(family, factor, multiple, why, default, MAX_SIZE_FACTOR * max(default), limit_why)
    side = _side(conf.get("sample_size")) or (64, 64)
    default = (side[0] * factor, side[1] * factor)
    if family == "sd3":
        patch = conf.get("patch_size") if _is_int(conf.get("patch_size")) else 2
        multiple = factor * patch
        why = f"{vae_why} ({factor}), times the transformer's {patch}x{patch} patches"
        pos = conf.get("pos_embed_max_size")
        if _is_int(pos) and pos > 0:
            return SizeRule(family, factor, multiple, why, default, pos * patch * factor,
                            f"the transformer's position embedding covers at most {pos} patches a side")
        return SizeRule(family, factor, multiple, why, default, MAX_SIZE_FACTOR * max(default), limit_why)
    return SizeRule(family, factor, factor, vae_why, default, MAX_SIZE_FACTOR * max(default), limit_why)


def check_size(gen: dict, folder: Path | None) -> None:
    """generator.height / width (null: the model's default side): positive whole pixels, divisible by the
    folder's SizeRule multiple and within its limit. A hub id not yet downloaded gets the first check only (the
    loader's set_size checks the rest)."""
    values = {k: gen.get(k) for k in SIZE_KEYS}
    for k, v in values.items():
        if v is not None and (not _is_int(v) or v < 1):
            raise ConfigError(f"generator.{k}", f"must be a positive whole number of pixels, or null (the model's "
                              f"default size), got {v!r}", f"set generator.{k}=null or e.g. generator.{k}=512")
    if all(v is None for v in values.values()) or folder is None:
        return
    rule = size_rule(folder)
    if rule is None:
        return
    for k, v in values.items():
        why = None if v is None else rule.problem(v)
        if why:
            raise ConfigError(f"generator.{k}", why[0], why[1].replace("KEY", f"generator.{k}"))


def check_family(c: dict, gen: GeneratorInfo) -> None:
    """A pipeline class steerexp supports, and a technique its family can run: one line, before any model loads.
    The sd family (the shapes generator among it) runs every technique, so only other families import the
    technique's class to ask what it needs."""
    if gen.folder is None or _target(c, "generator") != "steerexp.generators.load_generator":
        return
    from steerexp import generators

    index = read_json(gen.folder / "model_index.json", "generator.path", required=False)
    pipeline_class = index.get("_class_name") if isinstance(index, dict) else None
    if pipeline_class not in generators.FAMILIES:
        supported = ", ".join(generators.FAMILIES)
        raise ConfigError("generator.path", f"holds a {pipeline_class} pipeline, which steerexp does not support",
                          f"use a pipeline of a supported class: {supported}")
    family = generators.FAMILIES[pipeline_class][0]
    check_scheduler(gen.folder, family)
    if family == "sd":
        return
    target = _target(c, "technique")
    if not target:
        return
    from hydra.utils import get_class

    why = generators.inapplicable(get_class(target), c.get("technique") or {}, family)
    if why:
        raise ConfigError("technique", why)


# ---------------------------------------------------------------------------- the scheduler config
# The scheduler classes each family samples with steerexp's own sampler (sampling.py): sd and sdxl run DDIM over the
# class's noise schedule (sd.ddim_for), sd3 and flux the Euler flow step over FlowMatchEulerDiscreteScheduler's sigmas.
VP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                 "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "DEISMultistepScheduler", "UniPCMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
SCHEDULER_CLASSES = {"sd": VP_SCHEDULERS, "sdxl": VP_SCHEDULERS, "sd3": FLOW_SCHEDULERS, "flux": FLOW_SCHEDULERS}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VP_PREDICTIONS = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # what DDIMScheduler builds
# settings that pick other noise levels than DDIM's timesteps (a VP family samples DDIM at timestep_spacing's
# timesteps): (setting, the value that is followed)
VP_REFUSED = (("use_karras_sigmas", False), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
              ("use_lu_lambdas", False), ("timestep_type", "discrete"))
# FlowMatchEulerDiscreteScheduler settings that change the Euler step itself (the rest shape the sigmas, which
# sampling.Schedule.from_flow takes from the scheduler's own set_timesteps)
FLOW_REFUSED = (("stochastic_sampling", False), ("invert_sigmas", False))


def check_scheduler(folder: Path, family: str, key: str = "generator.path") -> None:
    """The folder's scheduler config is one the family's sampler and inversion follow, or one ConfigError naming the
    setting and the fix (README "Scheduler settings"). Torch-free: reads scheduler/scheduler_config.json only."""
    path = folder / "scheduler" / "scheduler_config.json"
    sched = read_json(path, key, required=False)
    if not isinstance(sched, dict):
        return  # no scheduler config: check_pipeline_folder / the loader say what is missing
    # diffusers loads the class model_index.json names (the config's own _class_name only when it names none)
    index = read_json(folder / "model_index.json", key, required=False)
    entry = index.get("scheduler") if isinstance(index, dict) else None
    listed = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else None
    cls = listed or sched.get("_class_name")
    classes = SCHEDULER_CLASSES[family]
    if cls not in classes:
        kind = "flow-matching" if family in ("sd3", "flux") else "DDPM-family (variance-preserving)"
        where = folder / "model_index.json" if listed else path
        raise ConfigError(key, f"{where} names the scheduler class {cls!r}, which steerexp does not sample the "
                          f"{family} family with (it needs a {kind} scheduler)",
                          f'set the scheduler class in that file to one of {", ".join(classes[:3])}, ...')

    def refuse(setting: str, value, why: str, fix_value) -> None:
        raise ConfigError(key, f"the scheduler setting {setting}={json.dumps(value)} ({path}) {why}",
                          f'set "{setting}": {json.dumps(fix_value)} in that file, or use a folder whose scheduler '
                          "does not set it")

    if family in ("sd3", "flux"):
        for setting, followed in FLOW_REFUSED:
            if setting in sched and sched[setting] not in (None, followed):
                refuse(setting, sched[setting], "changes the Euler step, which steerexp's sampler and inversion "
                       "do not follow", followed)
        shift_type = sched.get("time_shift_type", "exponential")
        if shift_type not in ("exponential", "linear"):
            refuse("time_shift_type", shift_type, "is not a time shift diffusers knows (exponential or linear)",
                   "exponential")
        chosen = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if sched.get(k)]
        if len(chosen) > 1:
            refuse(chosen[1], True, f"and {chosen[0]}=true are both set; diffusers allows one", False)
        return
    for setting, followed in VP_REFUSED:
        if setting in sched and sched[setting] not in (None, followed):
            refuse(setting, sched[setting], f"picks other noise levels than DDIM's timesteps, and the {family} "
                   "family samples and inverts DDIM over the scheduler's alphas (timestep_spacing sets its steps)",
                   followed)
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in VP_PREDICTIONS:
        refuse("prediction_type", prediction, f"is not a prediction steerexp samples the {family} family with "
               f"({' or '.join(VP_PREDICTIONS)})", "epsilon")
    spacing = sched.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        refuse("timestep_spacing", spacing, f"is not one of {', '.join(TIMESTEP_SPACINGS)} (DDIMScheduler's)",
               "leading")
    betas = sched.get("beta_schedule", "linear")
    if sched.get("trained_betas") is None and betas not in BETA_SCHEDULES:
        refuse("beta_schedule", betas, f"is not one DDIMScheduler builds ({', '.join(BETA_SCHEDULES)})",
               "scaled_linear")
    for setting in ("clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value"):
        v = sched.get(setting)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                              or (setting == "dynamic_thresholding_ratio" and v > 1)):
            refuse(setting, v, "must be a positive number" + (" <= 1" if setting == "dynamic_thresholding_ratio"
                                                              else ""), {"clip_sample_range": 1.0,
                                                                         "dynamic_thresholding_ratio": 0.995,
                                                                         "sample_max_value": 1.0}[setting])


def check_pipeline_folder(folder: Path, key: str = "generator.path") -> None:
    """A diffusers pipeline folder: model_index.json and each listed component's config parse, each
    model component has weights, and every safetensors file is complete."""
    if not folder.is_dir():
        raise ConfigError(
            key, f"{folder} is a file, not a pipeline folder", "set it to the folder that holds model_index.json"
        )
    index = read_json(folder / "model_index.json", key, required=False)
    if index is None:
        raise ConfigError(key, f"{folder} is not a diffusers pipeline folder: model_index.json is missing",
                          "point generator.path at the folder that holds model_index.json")
    if not isinstance(index, dict):
        raise ConfigError(key, f"{folder / 'model_index.json'} is not a JSON object", "restore that file")
    try:
        borrowed = shared_components(folder)
    except (ValueError, OSError, AttributeError) as err:
        raise ConfigError(key, f"{folder / SHARED_FILE} is invalid: {err}", "restore that file") from None
    for name, component in index.items():
        if name.startswith("_") or not isinstance(component, list) or len(component) != 2 or component[0] is None:
            continue
        sub = borrowed[name][0] if name in borrowed else folder / name
        if not sub.is_dir():
            raise ConfigError(key, f"{sub} is missing (model_index.json lists the component {name!r})",
                              "restore the folder (re-download or re-export the pipeline)")
        for cfg_file in ("config.json", "scheduler_config.json", "tokenizer_config.json", "special_tokens_map.json"):
            read_json(sub / cfg_file, key, required=False)
        files = [p for p in sub.iterdir() if p.is_file()]
        if (sub / "config.json").is_file() and not any(
            p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json") for p in files
        ):
            raise ConfigError(key, f"{sub} has a config.json but no weights file", "restore its weights")
        for p in files:
            if p.suffix == ".safetensors":
                check_safetensors(p, key)


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file; ValueError says what is wrong (no tensor is read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is {size} bytes, too short for a safetensors file (truncated)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: its header claims {n} bytes, the file has {size}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise ValueError(f"{path} has a corrupt safetensors header (tensor {name!r} has no data_offsets)")
        end = max(end, offs[1])
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: its header says {8 + n + end} bytes, the file has {size}")
    return header


def check_safetensors(path: Path, key: str) -> dict:
    try:
        return read_safetensors_header(path)
    except ValueError as err:
        raise ConfigError(key, str(err), "re-download or re-export that file") from None
    except OSError as err:
        raise ConfigError(key, f"cannot read {path} ({err.strerror or err})", "check the file") from None


# ---------------------------------------------------------------------------- GPUs without torch
def gpu_count() -> int | None:
    """CUDA GPUs this process can use, found without importing torch: 0 when there surely is none,
    None when it cannot tell (e.g. a ROCm device)."""
    physical = None
    proc = Path("/proc/driver/nvidia/gpus")
    try:
        if proc.is_dir():
            physical = len(list(proc.iterdir()))
        else:
            devs = [p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
            physical = len(devs) if devs or not Path("/dev/nvidiactl").exists() else None
    except OSError:
        physical = None
    if not physical and Path("/dev/kfd").exists():  # AMD ROCm: torch.cuda runs on HIP
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = 0
        for entry in visible.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break  # CUDA stops at the first invalid entry
            n += 1
        return n if physical is None else min(n, physical)
    return physical


def check_device(device: Any) -> None:
    if not isinstance(device, str) or not re.fullmatch(r"auto|[a-z]+(:\d+)?", device):
        raise ConfigError(
            "generator.device", f"must be auto, cpu, cuda or cuda:<index>, got {device!r}", "set generator.device=auto"
        )
    if not device.startswith("cuda"):
        return
    n = gpu_count()
    if n == 0:
        hint = (
            "CUDA_VISIBLE_DEVICES hides every GPU"
            if os.environ.get("CUDA_VISIBLE_DEVICES") is not None
            else "no NVIDIA GPU or driver was found"
        )
        raise ConfigError("generator.device", f"is {device} but this machine has no usable GPU ({hint})",
                          "set generator.device=cpu (or auto: a GPU when there is one)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if n is not None and index >= n:
        raise ConfigError("generator.device", f"is {device} but only {n} GPU(s) are visible (cuda:0..cuda:{n - 1})",
                          "set generator.device=cuda:0 (or auto)")


def text_encoder_widths(folder: Path) -> dict[str, int] | None:
    """The token-embedding width of each text encoder of a pipeline folder, from its configs (CLIP: hidden_size,
    T5: d_model); None when one cannot be read. Added tokens are packed as these widths side by side."""
    index = read_json(folder / "model_index.json", "generator.path", required=False)
    if not isinstance(index, dict):
        return None
    widths = {}
    for name, component in sorted(index.items()):
        if not re.fullmatch(r"text_encoder(_\d+)?", name) or not isinstance(component, list) or component[:1] == [None]:
            continue
        conf = component_config(folder, name, "config.json", "generator.path")
        conf = conf.get("text_config", conf) if isinstance(conf, dict) else None
        width = conf.get("hidden_size", conf.get("d_model")) if isinstance(conf, dict) else None
        if not _is_int(width):
            return None
        widths[name] = width
    return widths or None
