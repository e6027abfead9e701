"""`${steerexp_unique_dir:<path>}`: a directory that no other run or sweep has, created on first use.

`outputs/multirun/<date>/<time>` collides when two sweeps (or two single runs) start in the same
second. This resolver claims the directory with an atomic mkdir and, if it is taken, tries
`<path>_1`, `<path>_2`, ...

Claimed once per sweep, wherever its jobs run. A sweep's dir must be claimed exactly once, in the
process that starts the sweep; a job process that resolved the expression again would claim a second
dir (`<time>_1`: hydra-core 1.4 prereleases did this with submitit). Two things make sure it cannot:

1. The claim is remembered in the config's own resolver cache (keyed by the requested path), which
   Hydra copies into every job's config (`load_sweep_config`) and which pickles along with it.
2. When `hydra.sweep.dir` is claimed, the claimed path is pinned as a Hydra override
   (`hydra.sweep.dir='<claimed>'` appended to `hydra.overrides.hydra` of the sweep's config).
   Every launcher composes each job's config from those overrides (`load_sweep_config`, in this
   process or, like submitit, in the job's process), so a job's config holds the literal path and
   never contains the resolver at all: no cache, process boundary or Hydra version can make a job
   claim a new dir. The pin shows in each job's `.hydra/hydra.yaml` (`overrides.hydra`).

Only the dir the app runs in is claimed: `hydra.run.dir` when hydra.mode is RUN, `hydra.sweep.dir`
when it is MULTIRUN. Otherwise (the run dir of a sweep's job, the sweep dir of a single run, `--cfg
all --resolve` and the compose API, where hydra.mode is unset, the text of `hydra.overrides` read back
resolved) the resolver gives the requested path and creates nothing, so code that resolves the whole
Hydra config leaves no stray directories. Outside `hydra.*` it always claims.

The resolver takes `_node_`/`_root_`, which OmegaConf does not allow together with use_cache=True;
it keeps its cache itself, in the same per-config resolver cache OmegaConf would use.
"""
from __future__ import annotations

import os

from omegaconf import OmegaConf

NAME = "steerexp_unique_dir"


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


def _is_whole_interpolation(raw) -> bool:
    """True if the node's value is exactly one `${steerexp_unique_dir:...}` (nothing around it)."""
    if not isinstance(raw, str) or not raw.startswith("${" + NAME + ":") or not raw.endswith("}"):
        return False
    depth = 0
    for i, ch in enumerate(raw):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i == len(raw) - 1
    return False


def _override_value(path: str) -> str | None:
    """`path` as a quoted Hydra override value; None for paths the override grammar would alter."""
    if any(c in path for c in "'\\") or "${" in path:
        return None
    return f"'{path}'"


def _pin(root, node, claimed: str) -> None:
    """Append `hydra.sweep.dir='<claimed>'` to the sweep's Hydra overrides (see the module docstring)."""
    from omegaconf import ListConfig, read_write

    value = _override_value(claimed)
    overrides = OmegaConf.select(root, "hydra.overrides.hydra", default=None)
    if value is None or not isinstance(overrides, ListConfig) or not _is_whole_interpolation(node._value()):
        return  # a composite expression or an odd path: the resolver cache alone carries the claim
    with read_write(overrides):
        overrides.append(f"hydra.sweep.dir={value}")


def _mode(root) -> str | None:
    try:
        mode = OmegaConf.select(root, "hydra.mode", default=None, throw_on_missing=False)
    except Exception:
        return None
    return getattr(mode, "name", None if mode is None else str(mode))


def _resolve(path, _node_, _root_) -> str:
    path = str(path)
    key = _node_._get_full_key(None) if _node_ is not None else ""
    mode = _mode(_root_)
    in_use = {"hydra.run.dir": mode == "RUN", "hydra.sweep.dir": mode == "MULTIRUN"}.get(
        key, not key.startswith("hydra.")
    )
    if not in_use:  # not the dir this invocation runs in (or --cfg, compose, an override's text): claim nothing
        return path.rstrip("/") or "."
    cache = OmegaConf.get_cache(_root_)
    claims = cache.setdefault(NAME, {})
    if path in claims:
        return claims[path]
    claimed = unique_dir(path)
    claims[path] = claimed
    if key == "hydra.sweep.dir":
        _pin(_root_, _node_, claimed)
    return claimed


def register_resolvers() -> None:
    if not OmegaConf.has_resolver(NAME):
        OmegaConf.register_new_resolver(NAME, _resolve)
    if not OmegaConf.has_resolver("steerexp_suffix"):  # `_<name>` after a run dir's time, or nothing
        OmegaConf.register_new_resolver("steerexp_suffix", lambda name: f"_{name}" if name else "")
