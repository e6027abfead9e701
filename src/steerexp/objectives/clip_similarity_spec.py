"""The settings of the CLIP similarity loss (objectives/clip_similarity.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from steerexp.errors import ConfigError
from steerexp.objectives.base_spec import TermSpec
from steerexp.spec import register


@register("objective", "clip_similarity")
@dataclass
class ClipSimilaritySpec(TermSpec):
    _target_: str = "steerexp.objectives.clip_similarity.ClipSimilarity"
    weight: float = 1.0
    text: Optional[str] = "a red circle"    # exactly one of text / image
    image: Optional[str] = None             # a PNG/JPG file
    model: Optional[str] = None             # an open_clip model name; null: the shipped tiny CLIP
    pretrained: Optional[str] = None

    def check(self, key: str) -> None:
        super().check(key)
        if (self.text is None) == (self.image is None):
            raise ConfigError(key, f"needs exactly one target, text or image; got text={self.text!r}, "
                              f"image={self.image!r}", f"set {key}.text='a red circle' {key}.image=null, or "
                              f"{key}.text=null {key}.image=<a PNG/JPG file>")
        if self.text is not None and not self.text.strip():
            raise ConfigError(f"{key}.text", "is empty", f"set e.g. {key}.text='a red circle'")
