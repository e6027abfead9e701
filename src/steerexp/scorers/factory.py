"""One factory for every scorer: objectives optimise against them, techniques rank or guide
with them, evaluators judge through them.

    scorers:                       # conf/config.yaml
      classifier: null             # null: the shipped concept classifier; a folder (config.json + model.safetensors)
      clip: {model: null, pretrained: null}   # an open_clip model name and weights; null: the shipped tiny CLIP
      user: {path: null, classes: null}   # a user's classifier: 'module:factory' or a TorchScript file, its class names

A run's scorers are addressed by name (`Scorers.get(name, device)`): the names above, plus any
further entry `<name>: {kind: classifier | clip | user, ...}`, so several judges can sit side by
side. `configure(cfg.scorers)` sets the run's scorers (as `images.configure` does for image
files); `get(name)` reads them. Loading is cached by what is loaded (folder or file, and its
modification time) and by device: a model is built once per run however many parts use it.
Callers never move a scorer to another device; they ask for it on the device they need.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from steerexp.scorers.classifier import DEFAULT_PATH as DEFAULT_CLASSIFIER, ConceptClassifier, HeadClassifier

DEFAULTS: dict[str, Any] = {"classifier": None, "clip": {"model": None, "pretrained": None},
                            "user": {"path": None, "classes": None}}


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


# ----------------------------------------------------------------------------- builders by kind
def _build_classifier(spec, device: str, key: str) -> HeadClassifier:
    path = spec.get("path") if isinstance(spec, dict) else spec
    return load_classifier(path, device)


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
    "classifier": _build_classifier, "clip": _build_clip, "user": _build_user,
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


_current = Scorers()


def configure(spec: dict | None = None) -> Scorers:
    """Set the run's scorers from its `scorers:` node (the run does this before building anything)."""
    global _current
    _current = build(spec)
    return _current


def current() -> Scorers:
    """The run's scorers (the shipped defaults until `configure` is called)."""
    return _current


def get(name: str, device="cpu"):
    """The run's scorer `name` on `device` (see `Scorers.get`)."""
    return _current.get(name, device)
