"""The settings of the PIE-Bench-protocol evaluator (evaluators/pie_bench.py), declared once. Torch-free.

Every path is checked here, before anything heavy loads: a missing or invalid one is refused in one line that
names its key and the fix.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.evaluators.base_spec import EvaluatorSpec, needs
from steerexp.evaluators.edit_bench_spec import TYPES, _fields, _short
from steerexp.spec import register

CATEGORIES = tuple(str(i) for i in range(10))   # PIE-Bench's editing_type_id values (0: random ... 9: style)
MAPPING_KEYS = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")


def edited_folders(edited: Any) -> dict[str, str]:
    """`edited` as {method name: folder}: a dict as given; a folder or a list of folders named by the folder (by
    its parent when the folder is `annotation_images`, as in PnPInversion's output/<method>/annotation_images)."""
    if isinstance(edited, Mapping):   # a dict, or the DictConfig Hydra hands the evaluator
        return {str(k): str(v) for k, v in edited.items()}
    folders = [edited] if isinstance(edited, str) else list(edited or [])
    named = {}
    for f in folders:
        p = Path(str(f))
        name = p.parent.name if p.name == "annotation_images" and p.parent.name else p.name or str(f)
        if name in named:
            raise ConfigError("evaluator.pie_bench.edited", f"{named[name]} and {f} would both be the method {name!r}",
                              f"name them: evaluator.pie_bench.edited='{{{name}_a: {named[name]}, {name}_b: {f}}}'")
        named[name] = str(f)
    return named


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@register("evaluator", "pie_bench")
@dataclass
class PieBenchSpec(EvaluatorSpec):
    _target_: str = "steerexp.evaluators.pie_bench.PieBench"
    # folder mode: a PIE-Bench folder (mapping_file.json + annotation_images/) and the edits to evaluate
    data: Optional[str] = None            # null: world mode (the run's inversion technique edits world scenes)
    mapping_file: str = "mapping_file.json"       # inside `data`
    images: str = "annotation_images"             # inside `data`: the source images (image_path is relative to it)
    edited: Any = None      # folder(s) laid out like `images` (PnPInversion: output/<method>/annotation_images), or
                            # {method: folder}; a non-square edit keeps its bottom-right square (their crop)
    categories: Any = None  # editing_type_id values to evaluate ("0" ... "9"); null: all
    # the learned metrics' weights, by local path (nothing downloads): required in folder mode; in world mode
    # null means a stand-in, named in the output key
    dino: Optional[str] = None            # a transformers ViTModel folder of DINO ViT-B/8 (facebook/dino-vitb8)
    clip: Optional[str] = None            # a transformers CLIPModel folder with its processor (clip-vit-large-patch14)
    lpips_backbone: Optional[str] = None  # torchvision's squeezenet1_1 weights as .safetensors (from its .pth, once)
    device: str = "auto"                  # auto: cuda when available, else cpu
    # world mode (data: null), as evaluator.edit_bench
    methods: Any = None     # <inversion>[+p2p[+blend]] or sdedit_s<strength>; null: every inversion method
    types: Any = field(default_factory=lambda: list(TYPES))
    prompt_template: str = "a {size} {colour} {shape} {position} on a {background} background"
    seed: int = 0
    dilate: int = 1         # pixels added around the world's exact edit region
    border: bool = True     # PIE-Bench's mask_decode: the outermost pixel rows and columns count as edit region

    def applies(self, technique) -> str | None:
        if self.data is not None:   # folder mode reads the edits from disk: any technique
            return None
        return needs("invertible", "an inversion technique (or evaluator.pie_bench.data: a PIE-Bench folder)",
                     technique)

    def check(self, key: str) -> None:
        if self.data is not None:
            self.check_folder(key)
        else:
            self.check_world(key)
        self.check_weights(key, required=self.data is not None)
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"{key}.device", f"must be auto, cpu or cuda[:i], got {self.device!r}",
                              f"set {key}.device=auto")

    def check_folder(self, key: str) -> None:
        root = Path(str(self.data)).expanduser()
        mapping = root / str(self.mapping_file)
        if not root.is_dir():
            raise ConfigError(f"{key}.data", f"{_short(str(root))} is not a folder",
                              f"set {key}.data to a PIE-Bench folder (mapping_file.json, annotation_images/), "
                              "or null for world mode")
        if not mapping.is_file():
            raise ConfigError(f"{key}.mapping_file", f"{_short(str(mapping))} does not exist",
                              f"put PIE-Bench's mapping_file.json in {key}.data, or set {key}.mapping_file")
        if not (root / str(self.images)).is_dir():
            raise ConfigError(f"{key}.images", f"{_short(str(root / str(self.images)))} is not a folder",
                              f"set {key}.images to the source images' folder inside {key}.data")
        folders = edited_folders(self.edited)
        if not folders:
            raise ConfigError(f"{key}.edited", "folder mode needs the edited images, got none",
                              f"set {key}.edited=output/<method>/annotation_images (laid out like {key}.images)")
        for name, folder in folders.items():
            if not Path(folder).expanduser().is_dir():
                raise ConfigError(f"{key}.edited", f"{name}: {_short(folder)} is not a folder",
                                  "give folders laid out like the PIE-Bench annotation_images folder")
        cats = self.categories
        if cats is not None:
            cats = [str(c) for c in cats] if isinstance(cats, list) else None
            if not cats or any(c not in CATEGORIES for c in cats):
                raise ConfigError(f"{key}.categories", f"must be null or a list of PIE-Bench editing_type_id values "
                                  f"(0-9), got {self.categories!r}", f"set e.g. {key}.categories=[0,1]")

    def check_world(self, key: str) -> None:
        if self.edited is not None:
            raise ConfigError(f"{key}.edited", "is read in folder mode only (evaluator.pie_bench.data is null)",
                              f"set {key}.data to the PIE-Bench folder, or drop {key}.edited")
        types = self.types
        bad = [t for t in types if t not in TYPES] if isinstance(types, list) else [types]
        if bad or not types:
            raise ConfigError(f"{key}.types", f"must be a non-empty list of edit types, got {types!r}",
                              f"choose from {list(TYPES)}, e.g. {key}.types=[colour,shape]")
        missing = [t for t in types if t not in (_fields(self.prompt_template) or [])]
        if missing:
            raise ConfigError(f"{key}.prompt_template", f"{_short(self.prompt_template)} has no {{{missing[0]}}}",
                              f"add {{{missing[0]}}} to it, or drop the type")
        self.methods_list(key, "methods", "[ddim_w7.5,di+p2p]")
        self.at_least(key, "dilate", 0, 1)

    def check_weights(self, key: str, required: bool) -> None:
        fix_dl = "download it on a machine with network access (see evaluators/pie_bench.py) and give its local path"
        for name, model_type, what in (("dino", "vit", "a transformers ViTModel folder of DINO ViT-B/8 "
                                        "(facebook/dino-vitb8)"),
                                       ("clip", "clip", "a transformers CLIPModel folder with its processor "
                                        "(openai/clip-vit-large-patch14)")):
            path = getattr(self, name)
            if path is None:
                if required:
                    raise ConfigError(f"{key}.{name}", f"folder mode needs {what}; nothing is downloaded here",
                                      f"set {key}.{name}=<folder>; {fix_dl}")
                continue
            folder = Path(str(path)).expanduser()
            config = _json(folder / "config.json")
            if config is None:
                raise ConfigError(f"{key}.{name}", f"{_short(str(folder))} is not {what} (no readable config.json)",
                                  f"set {key}.{name} to such a folder; {fix_dl}")
            if config.get("model_type") != model_type:
                raise ConfigError(f"{key}.{name}", f"{_short(str(folder))} holds a {config.get('model_type')!r} "
                                  f"model, not {model_type!r}", f"set {key}.{name} to {what}")
            if not any((folder / w).is_file() for w in ("model.safetensors", "model.safetensors.index.json")):
                raise ConfigError(f"{key}.{name}", f"{_short(str(folder))} has no model.safetensors",
                                  f"save the model with save_pretrained (safetensors: no pickle) and set {key}.{name}")
            if name == "clip" and not any((folder / f).is_file() for f in ("preprocessor_config.json",
                                                                          "processor_config.json")):
                raise ConfigError(f"{key}.clip", f"{_short(str(folder))} has no preprocessor_config.json",
                                  "save the CLIPProcessor beside the model (processor.save_pretrained(folder))")
            if name == "dino" and config.get("patch_size") != 8:
                raise ConfigError(f"{key}.dino", f"the protocol's DINO is ViT-B/8; {_short(str(folder))} has patch "
                                  f"size {config.get('patch_size')!r}", f"set {key}.dino to a patch-8 ViT (dino-vitb8)")
        path = self.lpips_backbone
        if path is None:
            if required:
                raise ConfigError(f"{key}.lpips_backbone", "folder mode needs LPIPS' SqueezeNet backbone weights; "
                                  "torchmetrics would download them", f"set {key}.lpips_backbone=<torchvision's "
                                  "squeezenet1_1 weights as .safetensors>")
            return
        p = Path(str(path)).expanduser()
        if not p.is_file() or p.suffix != ".safetensors":
            raise ConfigError(f"{key}.lpips_backbone", f"{_short(str(p))} is not a .safetensors file (weights load "
                              "without pickle)", f"set {key}.lpips_backbone to torchvision's squeezenet1_1 weights "
                              "saved as .safetensors (save_file(torch.load(squeezenet1_1-b8a52dc0.pth, "
                              "weights_only=True), ...), once)")
