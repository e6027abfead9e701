"""The generator's environment checks, before any model loads and without torch (validate.py calls them).

    check_generator(c)          generator.path / embedded / device / dtype -> GeneratorInfo (folder, timesteps)
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
from steerexp.generators import EMBEDDED, embedded_path

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
    def tokenizer_folder(self) -> Path | None:
        return self.folder / "tokenizer" if self.folder is not None and (self.folder / "tokenizer").is_dir() else None


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
    return GeneratorInfo(folder)


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
    if family == "sd":
        return
    target = _target(c, "technique")
    if not target:
        return
    from hydra.utils import get_class

    why = generators.inapplicable(get_class(target), c.get("technique") or {}, family)
    if why:
        raise ConfigError("technique", why)


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
    for name, component in index.items():
        if name.startswith("_") or not isinstance(component, list) or len(component) != 2 or component[0] is None:
            continue
        sub = folder / name
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
        conf = read_json(folder / name / "config.json", "generator.path", required=False)
        conf = conf.get("text_config", conf) if isinstance(conf, dict) else None
        width = conf.get("hidden_size", conf.get("d_model")) if isinstance(conf, dict) else None
        if not _is_int(width):
            return None
        widths[name] = width
    return widths or None
