"""A user's classifier by path: 'pkg.module:factory' (called with no arguments; code, so it is
allowlisted like a config's _target_) or a TorchScript file. The model maps [0, 1] RGB images
[B, 3, H, W] to logits over `classes`; it becomes a one-head `HeadClassifier`."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from steerexp.scorers.classifier import HeadClassifier

KEY = "scorers.user"


class UserClassifier(HeadClassifier):
    """A user's single-head model; it answers whichever head a caller names (e.g. the concept
    evaluator's `head`)."""

    any_head = True

    def __init__(self, model: torch.nn.Module, classes: list[str] | None, head: str = "user"):
        super().__init__()
        self.model = model
        self.classes = list(classes or [])
        self.heads = {head: self.classes}

    def class_index(self, head: str, name: str) -> int:
        if name not in self.classes:
            raise ValueError(f"{KEY}.classes must list the target {name!r} for a user classifier; "
                             f"it lists {self.classes}")
        return self.classes.index(name)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {next(iter(self.heads)): self.model(images)}


def load_user_model(spec: str, key: str = f"{KEY}.path") -> torch.nn.Module:
    """The user's torch module of `spec` ('pkg.module:factory' or a TorchScript file), in eval mode."""
    if spec.endswith((".pt", ".ts", ".pth")):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"{key}: TorchScript file not found: {spec}")
        return torch.jit.load(spec).eval()
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"{key} {spec!r} must be 'module.path:callable' or a TorchScript file")
    from steerexp.safety import check_callable

    check_callable(f"{module}.{attr}", key)  # a shared config names code: allowlisted only, checked before import
    return getattr(importlib.import_module(module), attr)().eval()


def load_user_classifier(spec: str, classes: list[str] | None = None, key: str = f"{KEY}.path") -> UserClassifier:
    """A user's classifier as a scorer; `classes` names its outputs."""
    return UserClassifier(load_user_model(spec, key), classes).eval().requires_grad_(False)
