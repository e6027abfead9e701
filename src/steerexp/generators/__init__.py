"""Frozen generators: one adapter over diffusers components (`FrozenGenerator`)."""
from pathlib import Path

from steerexp.generators.frozen import FrozenGenerator, GeneratorChangedError, Guidance  # noqa: F401
from steerexp import ASSETS

SHAPES_PATH = ASSETS / "shapes"


def load_generator(path: str | None = None, device: str = "auto", dtype: str = "fp32") -> FrozenGenerator:
    """The embedded shapes generator (path None) or any Stable Diffusion pipeline folder / hub id.
    `world` says what it draws: "shapes" for the embedded one or any pipeline `steerexp-pretrain` built
    (a recipe.json beside it), else None (the evaluators then judge with a learned scorer)."""
    generator = FrozenGenerator.from_pretrained(path or SHAPES_PATH, device=device, dtype=dtype)
    generator.world = "shapes" if not path or (Path(path).expanduser().parent / "recipe.json").is_file() else None
    return generator
