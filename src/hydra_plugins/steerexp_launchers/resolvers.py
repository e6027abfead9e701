"""`${steerexp_unique_dir:<path>}`: a directory that no other run or sweep has, created on first use.

`outputs/multirun/<date>/<time>` collides when two sweeps start in the same second. This resolver
claims the directory with an atomic mkdir and, if it is taken, tries `<path>_1`, `<path>_2`, ...
It is registered with use_cache=True: a config resolves it once, and Hydra copies that cache into
every job's config (and pickles it along to job processes), so all jobs of a sweep agree on it.
"""
from __future__ import annotations

import os

from omegaconf import OmegaConf


def unique_dir(path: str) -> str:
    """Create and return `path`, or the first free `path_<n>`; mkdir is atomic, so two processes
    that race for the same name get different ones."""
    path = str(path).rstrip("/") or "."
    for n in range(100000):
        candidate = path if n == 0 else f"{path}_{n}"
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free directory name found for {path!r} (tried {path}_1 .. {path}_99999)")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("steerexp_unique_dir"):
        OmegaConf.register_new_resolver("steerexp_unique_dir", unique_dir, use_cache=True)
