"""The embedded procedural shapes world."""
from steerexp.worlds.shapes.world import *  # noqa: F401,F403
from steerexp.worlds.shapes.world import (  # noqa: F401
    BACKGROUNDS, COLOURS, HEADS, HELDOUT, POSITIONS, PROTECTED_CAPTIONS, SEEN_SHAPES, SHAPES, SIZES,
    UNRELATED_PROMPTS, Scene, caption, dataset, generator_caption, protected_set, render, sample,
)
