"""Frozen generators: one interface (`FrozenGenerator`, frozen.py) and one file per family.

    sd     Stable Diffusion 1.x/2.x and the embedded shapes generator   (sd.py)
    sdxl   SDXL: two CLIP text encoders, pooled embeddings, time ids     (sdxl.py)
    sd3    SD3: MMDiT, flow matching, CLIP-L/G and optional T5            (sd3.py)
    flux   FLUX: flow matching with distilled guidance, CLIP pooled + T5  (flux.py)

`load_generator` reads the family from the pipeline folder's model_index.json (`_class_name`). This module
is light (no torch until a generator loads): config validation reads the family table below, and
checks.py holds the generator's checks before loading (folder, safetensors headers, device), torch-free.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from steerexp import ASSETS, built_assets

_FROM_FROZEN = ("DTYPES", "FrozenGenerator", "GeneratorChangedError", "Guidance", "resolve_device")


def __getattr__(name: str):
    """The interface's names (FrozenGenerator, Guidance, ...) import torch and diffusers on first use."""
    if name in _FROM_FROZEN:
        from steerexp.generators import frozen

        return getattr(frozen, name)
    raise AttributeError(f"module 'steerexp.generators' has no attribute {name!r}")


SHAPES_PATH = ASSETS / "shapes"
EMBEDDED = ("shapes", "shapes_flow")  # generator.embedded: shapes is shipped, shapes_flow built (embedded_path)
SHIPPED = ("shapes",)
SHARED_FILE = "shared.json"  # a pipeline folder's components borrowed from a sibling folder (shared_components)
CONFIG_FILES = ("config.json", "scheduler_config.json", "tokenizer_config.json")  # the keys shared.json may override
LIBRARIES = ("diffusers", "transformers")  # the only libraries a component's class (model_index.json) may come from

# pipeline class (model_index.json's _class_name) -> (family, "module:class")
FAMILIES = {
    "StableDiffusionPipeline": ("sd", "steerexp.generators.sd:SDGenerator"),
    "StableDiffusionXLPipeline": ("sdxl", "steerexp.generators.sdxl:SDXLGenerator"),
    "StableDiffusion3Pipeline": ("sd3", "steerexp.generators.sd3:SD3Generator"),
    "FluxPipeline": ("flux", "steerexp.generators.flux:FluxGenerator"),
}


# generator.proof: how a run proves the frozen weights unchanged (FrozenGenerator.proof_record says what each
# catches): fast (identity, version counters and an on-device checksum) or full (SHA-256 of every byte)
PROOFS = ("fast", "full")

# what each family offers the techniques (Technique.requirements names these)
CAPABILITIES = {
    "sd": frozenset({"cfg", "cross_attention", "vp"}),    # classifier-free guidance, a cross-attention UNet, DDPM noise
    "sdxl": frozenset({"cfg", "cross_attention", "vp"}),
    "sd3": frozenset({"cfg"}),                            # joint attention, flow matching
    "flux": frozenset(),                                  # distilled guidance: no unconditional branch
}


def family_of(path: str | Path | None, embedded: str = "shapes") -> str:
    """The family of a pipeline folder or hub id (an embedded generator when None), from model_index.json."""
    pipeline_class = pipeline_class_of(path or embedded_path(embedded))
    family_class(pipeline_class)  # unsupported: the one-line error naming the supported classes
    return FAMILIES[pipeline_class][0]


def inapplicable(technique_cls, technique_cfg, family: str) -> str | None:
    """Why a technique so configured cannot run on the family (None: it can)."""
    for capability, why in technique_cls.requirements(technique_cfg).items():
        if capability not in CAPABILITIES[family]:
            return f"{technique_cls.__name__} does not apply to the {family} generator family: {why}"
    return None


def check_edit_methods(evaluators, family: str) -> None:
    """The edit evaluators' +p2p methods (Prompt-to-Prompt) need a family with cross-attention maps: one line,
    naming the key and the methods that remain, before any model loads."""
    from steerexp.errors import ConfigError

    if "cross_attention" in CAPABILITIES[family]:
        return
    for name, ev in (evaluators or {}).items():
        methods = ev.get("methods") if hasattr(ev, "get") else None
        p2p = [str(m) for m in methods or () if "+p2p" in str(m)]
        if p2p:
            rest = ",".join(str(m) for m in methods if "+p2p" not in str(m))
            maps = f" evaluator.{name}.attention_maps=null" if ev.get("attention_maps") else ""
            raise ConfigError(f"evaluator.{name}.methods", f"{', '.join(p2p)} use Prompt-to-Prompt, which edits a "
                              f"UNet's cross-attention maps, and the {family} family's transformer has joint "
                              f"attention instead", f"drop the +p2p methods: evaluator.{name}.methods=[{rest}]{maps}")


def family_class(pipeline_class: str):
    if pipeline_class not in FAMILIES:
        supported = ", ".join(f"{k} ({v[0]})" for k, v in FAMILIES.items())
        raise ValueError(f"generator.path holds a {pipeline_class} pipeline, which steerexp does not support; "
                         f"supported pipeline classes: {supported}")
    module, name = FAMILIES[pipeline_class][1].split(":")
    return getattr(importlib.import_module(module), name)


def pipeline_class_of(path: str | Path) -> str:
    """model_index.json's _class_name of a local pipeline folder or a hub id (which fetches only that file)."""
    return pipeline_index(path)["_class_name"]


def pipeline_index(path: str | Path) -> dict:
    """model_index.json of a local pipeline folder or a hub id (which fetches only that file)."""
    path_str = str(path)
    local = Path(path_str).expanduser()
    looks_like_hub_id = path_str.count("/") == 1 and not path_str.startswith((".", "/", "~"))
    if not local.exists() and not looks_like_hub_id:
        raise FileNotFoundError(f"generator folder not found: {local}. Set generator.path to a diffusers pipeline "
                                "folder (with model_index.json) or a hub id such as org/name")
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{local} is not a diffusers pipeline folder: model_index.json is missing")
        return json.loads(index.read_text())
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path_str))
    except OSError as err:
        raise FileNotFoundError(f"could not load the generator from {path_str!r} (no local folder, and the hub "
                                f"is unreachable or has no such model): {err}") from err


def from_pretrained(path: str | Path, device: str = "auto", dtype: str = "fp32", height: int | None = None,
                    width: int | None = None):
    """The generator of a diffusers pipeline folder or hub id, its family read from model_index.json, sampling at
    height x width pixels (None: the model's default side; FrozenGenerator.set_size)."""
    from steerexp.generators.frozen import DTYPES, resolve_device

    if dtype not in DTYPES:
        raise ValueError(f"generator.dtype must be one of {list(DTYPES)}, got {dtype!r}")
    dev = resolve_device(device)
    if dev.type == "cpu" and dtype == "fp16":
        raise ValueError("generator.dtype=fp16 does not run on the CPU; use dtype=fp32 (or bf16) or a CUDA device")
    cls = family_class(pipeline_class_of(path))
    return cls.from_pipeline(cls.load(path, dtype), dev, DTYPES[dtype]).set_size(height, width)


def embedded_path(name: str = "shapes") -> Path:
    """The folder of an embedded generator: assets/<name> if shipped, else where steerexp-pretrain builds it."""
    if name not in EMBEDDED:
        raise ValueError(f"generator.embedded must be one of {list(EMBEDDED)}, got {name!r}")
    return (ASSETS if name in SHIPPED else built_assets()) / name


def weak_path(name: str = "shapes") -> Path:
    """The folder of an embedded generator's weak model (autoguidance's, pretrain/weak.py): <name>_weak beside it
    (shapes_weak shipped, shapes_flow_weak built with shapes_flow)."""
    folder = embedded_path(name)
    return folder.with_name(f"{folder.name}_weak")


def shared_components(folder: str | Path, depth: int = 0) -> dict[str, tuple[Path, dict]]:
    """The components a local pipeline folder borrows instead of holding a copy: {name: (folder, overrides)}.

    `shared.json` beside model_index.json maps a component to a sibling folder's copy and the config keys that
    differ, e.g. shapes_flow's {"vae": {"from": "shapes/vae", "config": {"shift_factor": 0.0}}}: the flow
    generator decodes with the shapes VAE's weights and tokenizes with its tokenizer files, so the package ships
    them once (steerexp-pretrain writes the file: pretrain/flow_generator.share_with_sibling). A borrowed folder
    must lie inside the folder's parent (no "..", no absolute path), so a pipeline folder cannot make the loader
    read files elsewhere. A borrowed component that the sibling itself borrows is followed once, with the sibling's
    overrides under this folder's. ValueError names what is wrong."""
    folder = Path(folder)
    manifest = folder / SHARED_FILE
    if not manifest.is_file():
        return {}
    entries = json.loads(manifest.read_text())
    root = folder.parent.resolve()
    out = {}
    for name, entry in entries.items():
        source = str(entry.get("from", "")) if isinstance(entry, dict) else ""
        target = (root / source).resolve()
        if not source or Path(source).is_absolute() or ".." in Path(source).parts or root not in target.parents:
            raise ValueError(f"{manifest}: component {name!r} must borrow a folder beside {folder.name} "
                             f"(like \"shapes/vae\"), got {source!r}")
        overrides = entry.get("config") or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"{manifest}: component {name!r} has a config that is not a mapping of config keys")
        overrides = dict(overrides)
        if not target.is_dir() and depth < 1 and target.parent.parent.resolve() == root:
            # the sibling borrows it too (a weak model beside shapes_flow, whose VAE is shapes'): follow it once
            theirs = shared_components(target.parent, depth + 1).get(target.name)
            if theirs is not None:
                target, overrides = theirs[0], {**theirs[1], **overrides}
        if not target.is_dir():
            raise ValueError(f"{manifest}: component {name!r} borrows {target}, which is missing; restore it")
        known = set()
        for file in CONFIG_FILES:  # an override sets a key of the component's own config, never a loader argument
            conf = json.loads((target / file).read_text()) if (target / file).is_file() else {}
            known |= {k for k in conf if not k.startswith("_")} if isinstance(conf, dict) else set()
        if unknown := sorted(set(overrides) - known):
            raise ValueError(f"{manifest}: component {name!r} overrides {unknown[0]!r}, which is not a key of its "
                             f"config ({', '.join(CONFIG_FILES)} in {target.name})")
        out[name] = (target, overrides)
    return out


def load_generator(path: str | None = None, device: str = "auto", dtype: str = "fp32", embedded: str = "shapes",
                   height: int | None = None, width: int | None = None, proof: str = "fast"):
    """An embedded generator (path None: `embedded`, the shapes UNet or shapes_flow) or any supported pipeline
    folder / hub id, sampling at height x width pixels (None: the model's default side). `world` says what it
    draws: "shapes" for the embedded ones or any pipeline `steerexp-pretrain` built (a recipe.json beside it),
    else None (the evaluators then judge with a learned scorer). `proof`: how the run proves the weights
    unchanged, fast or full (FrozenGenerator.proof_record)."""
    if proof not in PROOFS:
        raise ValueError(f"generator.proof must be one of {', '.join(PROOFS)}, got {proof!r}")
    generator = from_pretrained(path or embedded_path(embedded), device=device, dtype=dtype, height=height,
                                width=width)
    if proof != generator.proof:
        generator.set_proof(proof)  # records the load-time state with that proof
    generator.world = "shapes" if not path or (Path(path).expanduser().parent / "recipe.json").is_file() else None
    return generator
