"""A shipped pipeline folder to break one file of (tests and benchmarks/time_to_error.py)."""
from pathlib import Path

from steerexp import ASSETS

SHAPES = ASSETS / "shapes"


def pipeline_copy(dst: Path) -> Path:
    """The shipped pipeline folder with every file symlinked, so one file can be replaced cheaply."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in SHAPES.rglob("*"):
        target = dst / p.relative_to(SHAPES)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(p)
    return dst
