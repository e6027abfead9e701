"""Frozen generators: one adapter over diffusers components (`FrozenGenerator`)."""
from steerexp.generators.frozen import FrozenGenerator, GeneratorChangedError, Guidance  # noqa: F401
from steerexp import ASSETS

SHAPES_PATH = ASSETS / "shapes"


def load_generator(path: str | None = None, device: str = "auto", dtype: str = "fp32") -> FrozenGenerator:
    """The embedded shapes generator (path None) or any Stable Diffusion pipeline folder / hub id."""
    return FrozenGenerator.from_pretrained(path or SHAPES_PATH, device=device, dtype=dtype)
