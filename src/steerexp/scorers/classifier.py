"""Classifier scorers: a model with named heads, each a softmax over class names.

`HeadClassifier` is what every classifier scorer is (the shipped concept classifier, a user's
model): `heads` ({head: [class names]}) and `forward(images) -> {head: logits}`; `probs`,
`predict` and `class_index` follow from them. `log_prob` and `prob` are the one way to read
"p(target) under a head", for objectives, techniques and evaluators alike.

The external concept classifier: one small CNN with a head per attribute of the world.
A model is data: `config.json` (heads and widths) plus `model.safetensors`. Inputs are RGB
images in [0, 1] of any size; they are resized to the classifier's resolution, so the same
classifier scores the embedded generator's 32 px samples and a real generator's 512 px ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from steerexp import ASSETS

DEFAULT_PATH = ASSETS / "classifier"


class HeadClassifier(nn.Module):
    """A classifier scorer: `heads` names each head's classes; forward gives {head: logits}."""

    heads: dict[str, list[str]]
    any_head = False  # a single-head model (a user's) answers whichever head a caller names

    def head_name(self, head: str) -> str:
        if head in self.heads:
            return head
        if self.any_head and len(self.heads) == 1:
            return next(iter(self.heads))
        raise ValueError(f"unknown classifier head {head!r}; choose one of {sorted(self.heads)}")

    def class_index(self, head: str, name: str) -> int:
        classes = self.heads[self.head_name(head)]
        if name not in classes:
            raise ValueError(f"unknown {head} {name!r}; choose one of {classes}")
        return classes.index(name)

    def probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: logits.softmax(-1) for name, logits in self(images).items()}

    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The predicted class name per head for each image."""
        return {n: [self.heads[n][i] for i in l.argmax(-1).tolist()] for n, l in self(images).items()}


def log_prob(classifier: HeadClassifier, images: torch.Tensor, head: str, target: str) -> torch.Tensor:
    """log p(head = target | image) per image [B]; differentiable in the images."""
    idx = classifier.class_index(head, target)
    return classifier(images)[classifier.head_name(head)].log_softmax(-1)[:, idx]


def prob(classifier: HeadClassifier, images: torch.Tensor, head: str, target: str | list[str]) -> torch.Tensor:
    """p(head = target | image) per image [B]; for a list of classes, p(any of them)."""
    probs = classifier.probs(images)[classifier.head_name(head)]
    if isinstance(target, str):
        return probs[:, classifier.class_index(head, target)]
    return probs[:, [classifier.class_index(head, c) for c in target]].sum(-1)


def named_class(prompt: str, classes: list[str]) -> int | None:
    """The index of the one class of `classes` the prompt names as a word ("a red {}" names red); None if it names
    none or several. What the objectives hold and the evaluators check a prompt's other attributes against."""
    words = set(prompt.lower().replace("{}", " ").replace(",", " ").split())
    named = [i for i, c in enumerate(classes) if c in words]
    return named[0] if len(named) == 1 else None


class ConceptClassifier(HeadClassifier):
    def __init__(self, heads: dict[str, list[str]], width: int = 32, resolution: int = 32):
        super().__init__()
        self.heads = {name: list(classes) for name, classes in heads.items()}
        self.width, self.resolution = width, resolution
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * w * (resolution // 8) ** 2, 128), nn.ReLU(),
        )
        self.out = nn.ModuleDict({name: nn.Linear(128, len(c)) for name, c in self.heads.items()})

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the classifier takes RGB images [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            images = F.interpolate(images, size=(self.resolution,) * 2, mode="bilinear", antialias=True,
                                   align_corners=False)
        return images * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the offline perceptual space of the evaluators."""
        return self.body(self._prepare(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {name: head(h) for name, head in self.out.items()}

    def save_pretrained(self, folder: str | Path) -> None:
        save_folder(self, folder, {"kind": "classifier", "heads": self.heads, "width": self.width,
                                   "resolution": self.resolution})

    @classmethod
    def from_pretrained(cls, folder: str | Path = DEFAULT_PATH) -> "ConceptClassifier":
        return load_folder(cls, folder, "classifier", what="concept classifier", build="`steerexp-pretrain`",
                           other="a timestep-aware classifier (it reads noisy latents, not images)")


# ---------------------------------------------------------------------- a model is data: config.json + weights
def save_folder(model: nn.Module, folder: str | Path, config: dict) -> None:
    """Write a scorer folder: config.json (with its "kind") and model.safetensors (no pickle)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def load_folder(cls, folder: str | Path, kind: str, what: str, build: str, other: str):
    """Read a scorer folder written by `save_folder` as `cls` (frozen, eval mode). A missing folder or one of
    another kind is one error that says what to do."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no {what} at {folder} (expected config.json and model.safetensors); run {build} "
                                "to build the shipped one, or pass a folder that has them")
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.pop("kind", "classifier") != kind:
        as_kind = "noisy" if kind == "classifier" else "classifier"
        raise ValueError(f"{folder} holds {other}; load it as kind: {as_kind}")
    model = cls(**cfg)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval().requires_grad_(False)
