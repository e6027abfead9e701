"""steerexp: steer frozen generative models by learning small edits on their inputs."""
from pathlib import Path

__version__ = "0.1.0"

ASSETS = Path(__file__).parent / "assets"  # the shipped models (kept under 80 MB)


def conf_dir() -> Path:
    """The Hydra config folder: shipped inside the wheel, or the repository's conf/."""
    for candidate in (Path(__file__).parent / "conf", Path(__file__).parents[2] / "conf"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("steerexp's conf/ folder was not found; reinstall with `pip install -e .`")
