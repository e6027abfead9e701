"""One factory for every scorer: objectives optimise against them, techniques rank or guide
with them, evaluators judge through them.

    scorers:                       # conf/config.yaml
      classifier: null             # null: the shipped concept classifier; a folder (config.json + model.safetensors)
      clip: {model: null, pretrained: null}   # an open_clip model name and weights; null: the shipped tiny CLIP
      user: {path: null, classes: null}   # a user's classifier: 'module:factory' or a TorchScript file, its class names
      robust: {kind: classifier, asset: classifier_robust}   # the adversarially trained classifier
      noisy: {kind: noisy, asset: classifier_noisy}          # timestep-aware: reads noisy latents z_t and t
      analytic: null               # the shapes world's analytic judge: no weights, no gradients (scorers/analytic.py)

A classifier or noisy scorer is a folder: `path` (any folder) or `asset` (the name of a folder
shipped in steerexp/assets, e.g. classifier_robust); neither: the shipped default of its kind.

A run's scorers are addressed by name (`Scorers.get(name, device)`): the names above, plus any
further entry `<name>: {kind: classifier | noisy | clip | user, ...}`, so several judges can sit side by
side. `build(cfg.scorers)` makes a run's Scorers: run.build makes ONE per run and passes it to what
uses it (the technique, its objective, the evaluators); no module holds a run's scorers. Loading is
cached by what is loaded (folder or file, and its modification time) and by device, and a Scorers
keeps what it built: a model is built once per run however many parts use it.
Callers never move a scorer to another device; they ask for it on the device they need.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from steerexp import ASSETS
from steerexp.scorer_kinds import DEFAULTS  # the scorers every run has (torch-free: the specs read them too)
from steerexp.scorers.classifier import DEFAULT_PATH as DEFAULT_CLASSIFIER, ConceptClassifier, HeadClassifier



def _device(device) -> str:
    return str(torch.device(device if device is not None else "cpu"))


def _stamp(*files: Path) -> tuple:
    """(mtime, size) of each file that exists: a rewritten file is loaded again."""
    return tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files)


# ----------------------------------------------------------------------------- cached loaders
@lru_cache(maxsize=16)
def _classifier(folder: str, device: str, stamp: tuple) -> ConceptClassifier:
    return ConceptClassifier.from_pretrained(folder).to(device)


def load_classifier(path: str | Path | None = None, device="cpu") -> ConceptClassifier:
    """The concept classifier in `path` (a folder with config.json + model.safetensors; None or '':
    the shipped one), frozen, on `device`; one instance per folder and device."""
    folder = Path(path).expanduser() if path else DEFAULT_CLASSIFIER
    return _classifier(str(folder.resolve()), _device(device),
                       _stamp(folder / "config.json", folder / "model.safetensors"))


@lru_cache(maxsize=8)
def _clip(model: str, pretrained: str | None, device: str, stamp: tuple):
    from steerexp.scorers.clip import CLIPScorer

    return CLIPScorer(model, pretrained, device=device)


def load_clip(model: str | None = None, pretrained: str | Path | None = None, device="cpu"):
    """A CLIPScorer: open_clip `model` with `pretrained` (a weights file or an open_clip tag);
    model=None: the shipped tiny CLIP (with its weights unless `pretrained` names others)."""
    from steerexp.scorers.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED

    if not model:
        model, pretrained = DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED
    pretrained = str(pretrained) if pretrained else None
    stamp = _stamp(Path(pretrained)) if pretrained else ()
    return _clip(model, pretrained, _device(device), stamp)


@lru_cache(maxsize=8)
def _noisy(folder: str, device: str, stamp: tuple):
    from steerexp.scorers.noisy import NoisyClassifier

    return NoisyClassifier.from_pretrained(folder).to(device)


def load_noisy(path: str | Path | None = None, device="cpu"):
    """The timestep-aware classifier in `path` (None or '': the shipped one), frozen, on `device`."""
    from steerexp.scorers.noisy import DEFAULT_PATH

    folder = Path(path).expanduser() if path else DEFAULT_PATH
    return _noisy(str(folder.resolve()), _device(device), _stamp(folder / "config.json", folder / "model.safetensors"))


def asset_folder(spec, key: str) -> str | None:
    """The folder of a classifier-like spec: its `path`, or `asset` (a folder shipped in
    steerexp/assets) resolved; None: the kind's shipped default."""
    if not isinstance(spec, dict):
        return spec
    if spec.get("path") and spec.get("asset"):
        raise ValueError(f"{key}: give either path (a folder) or asset (a shipped one), not both")
    if spec.get("asset"):
        folder = ASSETS / str(spec["asset"])
        if not (folder / "config.json").is_file():
            shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())
            raise FileNotFoundError(f"{key}.asset: no shipped model {spec['asset']!r}; choose one of {shipped}")
        return str(folder)
    return spec.get("path")


# ----------------------------------------------------------------------------- builders by kind
def _build_classifier(spec, device: str, key: str) -> HeadClassifier:
    return load_classifier(asset_folder(spec, key), device)


def _build_noisy(spec, device: str, key: str):
    return load_noisy(asset_folder(spec, key), device)


def _build_analytic(spec, device: str, key: str):
    from steerexp.scorers.analytic import build as build_analytic  # the shapes world's judge (no weights)

    return build_analytic(spec, device, key)


def _build_clip(spec, device: str, key: str):
    spec = spec or {}
    return load_clip(spec.get("model"), spec.get("pretrained"), device)


def _build_user(spec, device: str, key: str) -> HeadClassifier:
    from steerexp.scorers.user import load_user_classifier

    if not spec or not spec.get("path"):
        raise ValueError(f"{key} is not set: give {key}.path ('module.path:factory' or a TorchScript file) "
                         f"and {key}.classes (the names of its outputs)")
    model = load_user_classifier(str(spec["path"]), spec.get("classes"), key=f"{key}.path")
    return model if device == "cpu" else model.to(device)


KINDS: dict[str, Callable[[Any, str, str], Any]] = {
    "classifier": _build_classifier, "clip": _build_clip, "user": _build_user, "noisy": _build_noisy,
    "analytic": _build_analytic,
}


class Scorers:
    """The scorers of one run, by name; each built on first use, once per device."""

    def __init__(self, spec: dict | None = None):
        spec = dict(spec or {})
        self.spec = {**DEFAULTS, **spec}
        self._built: dict[tuple[str, str], Any] = {}

    def configured(self, name: str) -> bool:
        """Whether the run has a scorer `name` (a user's classifier only once its path is set)."""
        if name not in self.spec:
            return False
        spec = self.spec[name]
        return self.kind(name) != "user" or bool(isinstance(spec, dict) and spec.get("path"))

    def kind(self, name: str) -> str:
        spec = self.spec.get(name)
        if isinstance(spec, dict) and spec.get("kind"):
            return spec["kind"]
        if name in KINDS:
            return name
        raise ValueError(f"scorers.{name}: unknown scorer; give scorers.{name}.kind (one of {sorted(KINDS)}) "
                         f"or use one of {sorted(self.spec)}")

    def get(self, name: str, device="cpu"):
        if name not in self.spec:
            raise ValueError(f"no scorer named {name!r}; the run has {sorted(self.spec)} (conf/config.yaml: scorers)")
        key = (name, _device(device))
        if key not in self._built:
            spec = self.spec[name]
            if isinstance(spec, dict):
                spec = {k: v for k, v in spec.items() if k != "kind"}
            kind = self.kind(name)
            if kind not in KINDS:
                raise ValueError(f"scorers.{name}.kind: unknown kind {kind!r}; choose one of {sorted(KINDS)}")
            self._built[key] = KINDS[kind](spec, key[1], f"scorers.{name}")
        return self._built[key]

    def classifier(self, device="cpu") -> HeadClassifier:
        return self.get("classifier", device)

    def clip(self, device="cpu"):
        return self.get("clip", device)


def build(spec: dict | None = None) -> Scorers:
    """The scorers of a `scorers:` config node (a DictConfig or a dict)."""
    if spec is not None and not isinstance(spec, dict):
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(spec, resolve=True)
    return Scorers(spec)
