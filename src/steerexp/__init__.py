"""steerexp: steer frozen generative models by learning small edits on their inputs."""
import os
from pathlib import Path

__version__ = "0.1.0"

ASSETS = Path(__file__).parent / "assets"  # the shipped models (kept under 50 MB)


def built_assets() -> Path:
    """Where `steerexp-pretrain` puts the models it builds but the package does not ship (shapes_flow and its weak
    model): $STEEREXP_BUILT, else $XDG_CACHE_HOME/steerexp, else ~/.cache/steerexp. Outside the package, so a build
    never grows the shipped models."""
    if os.environ.get("STEEREXP_BUILT"):
        return Path(os.environ["STEEREXP_BUILT"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "steerexp"


def conf_dir() -> Path:
    """The Hydra config folder: shipped inside the wheel, or the repository's conf/."""
    for candidate in (Path(__file__).parent / "conf", Path(__file__).parents[2] / "conf"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("steerexp's conf/ folder was not found; reinstall with `pip install -e .`")
