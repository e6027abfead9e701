"""Only allowlisted `_target_`s instantiate.

Configs and experiment presets are shared between people, and Hydra's `_target_` can name any
callable: `builtins.open`, `torch.load`, `distutils.spawn.spawn`... Two checks keep a config from
running code:

1. `check_targets(cfg)`: before any work, every `_target_` in the composed config (Hydra's own
   node included) must be allowlisted; otherwise one ConfigError naming the key and the target.
   This is a string check: nothing is imported.
2. `install_guard()`: every instantiation, steerexp's and Hydra's own (launcher, sweeper,
   callbacks), passes through Hydra's `_resolve_target`; the guard wraps it, checks the string
   before anything is imported and, for targets allowed by package, checks that the resolved
   object really is defined in that package (so `steerexp.run.torch.load`, an alias reached
   through a steerexp module, is refused).

Allowed: steerexp's own packages, plus the few third-party classes the configs use (Hydra's
launchers and sweepers, Optuna's samplers). Anything else
runs only if the user opts in from the environment, which no shared config can set:

    STEEREXP_ALLOW_TARGETS=mypkg.models.,other.Class steerexp ...

(comma-separated; an entry ending in "." allows a package prefix, otherwise one exact name).
Nothing heavy is imported here.
"""
from __future__ import annotations

import os
from typing import Any

from steerexp.errors import ConfigError

ALLOW_ENV = "STEEREXP_ALLOW_TARGETS"

# our own code: any callable defined in these packages
ALLOWED_PACKAGES = ("steerexp.", "hydra_plugins.steerexp_launchers.")

# third-party callables the configs really use, by exact name
ALLOWED_TARGETS = frozenset({
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
    "optuna.samplers.TPESampler",
    "optuna.samplers.RandomSampler",
    "optuna.samplers.CmaEsSampler",
    "optuna.samplers.GridSampler",
    "optuna.samplers.NSGAIISampler",
    "optuna.samplers.QMCSampler",
})

FIX = (f"use a steerexp class, or if you trust this config, allow it from the environment: "
       f"{ALLOW_ENV}=<prefix.>,<exact.Name> (see steerexp/safety.py)")


def user_allowed() -> tuple[str, ...]:
    """The user's opt-in entries from the environment (never from a config)."""
    return tuple(e.strip() for e in os.environ.get(ALLOW_ENV, "").split(",") if e.strip())


def _by_prefix(name: str, prefixes) -> bool:
    return any(name.startswith(p) if p.endswith(".") else name == p for p in prefixes)


def is_allowed(target: str) -> bool:
    """The target string is allowlisted (no import happens)."""
    return (target in ALLOWED_TARGETS or _by_prefix(target, ALLOWED_PACKAGES)
            or _by_prefix(target, user_allowed()))


def targets_in(node: Any, key: str = ""):
    """(key, target) for every `_target_` in a config or plain container, depth first."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                yield sub, v
            else:
                yield from targets_in(v, sub)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from targets_in(v, f"{key}[{i}]")


def check_targets(cfg: Any, root: str = "") -> None:
    """Raise a ConfigError for the first `_target_` that is not allowlisted; imports nothing."""
    for key, target in targets_in(cfg, root):
        if not isinstance(target, str):
            raise ConfigError(key, f"_target_ must be a dotted name, got {type(target).__name__}", FIX)
        if not is_allowed(target):
            raise ConfigError(key, f"_target_ {target!r} is not allowlisted and was not run", FIX)


def check_resolved(target: str, obj: Any, key: str) -> None:
    """A target allowed by package prefix must resolve to an object defined in that package."""
    if target in ALLOWED_TARGETS or _by_prefix(target, user_allowed()):
        return
    module = getattr(obj, "__module__", None) or ""
    if not _by_prefix(module + ".", ALLOWED_PACKAGES):
        raise ConfigError(
            key or "_target_",
            f"_target_ {target!r} resolves to {module}.{getattr(obj, '__qualname__', obj)}, "
            "which is not steerexp code, and was not run",
            FIX,
        )


def install_guard() -> None:
    """Wrap Hydra's target resolution so that every instantiation is checked (idempotent)."""
    from hydra._internal.instantiate import _instantiate2 as inst

    original = inst._resolve_target
    if getattr(original, "steerexp_guard", False):
        return

    def guarded(target, full_key):
        name = target if isinstance(target, str) else None
        if name is None and callable(target):
            name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
        if name is not None and not is_allowed(name):
            raise ConfigError(full_key or "_target_", f"_target_ {name!r} is not allowlisted and was not run", FIX)
        obj = original(target, full_key)
        if name is not None:
            check_resolved(name, obj, full_key)
        return obj

    guarded.steerexp_guard = True
    inst._resolve_target = guarded


def check_callable(name: str, key: str) -> None:
    """A 'module.path:callable' setting (e.g. a user classifier factory) is code too: same allowlist."""
    if not is_allowed(name):
        raise ConfigError(key, f"{name!r} is not allowlisted and was not imported", FIX)
