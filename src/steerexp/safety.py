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
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.EarlyStopping",
    "lightning.pytorch.callbacks.TQDMProgressBar",
    # the `guider` group (conf/guider/, steerexp/guider_spec.py): the diffusers guiders the sampler can run
    "diffusers.guiders.ClassifierFreeGuidance",
    "diffusers.guiders.AdaptiveProjectedGuidance",
    "diffusers.guiders.ClassifierFreeZeroStarGuidance",
    "diffusers.guiders.TangentialClassifierFreeGuidance",
    "diffusers.guiders.PerturbedAttentionGuidance",
    "diffusers.guiders.SkipLayerGuidance",
})

FIX = (f"use a steerexp class, or if you trust this config, allow it from the environment: "
       f"{ALLOW_ENV}=<prefix.>,<exact.Name> (see steerexp/safety.py)")


_FROZEN: str | None = None   # the opt-in as the user's shell gave it (freeze_environment)


def freeze_environment() -> None:
    """Read the opt-in once, from the environment the user's shell started this process with, before Hydra
    applies anything of the config (`hydra.job.env_set` is set around the job; a config must not be able to
    allow itself). The console script calls this first."""
    global _FROZEN
    _FROZEN = os.environ.get(ALLOW_ENV, "")


def user_allowed() -> tuple[str, ...]:
    """The user's opt-in entries from the environment (never from a config)."""
    raw = os.environ.get(ALLOW_ENV, "") if _FROZEN is None else _FROZEN
    return tuple(e.strip() for e in raw.split(",") if e.strip())


def user_allows(name: str) -> bool:
    """The user opted in to this name (exactly, or by a prefix ending in '.')."""
    return _by_prefix(name, user_allowed())


def _by_prefix(name: str, prefixes) -> bool:
    return any(name.startswith(p) if p.endswith(".") else name == p for p in prefixes)


def is_allowed(target: str) -> bool:
    """The target string is allowlisted (no import happens)."""
    return (target in ALLOWED_TARGETS or _by_prefix(target, ALLOWED_PACKAGES)
            or _by_prefix(target, user_allowed()))


def _resolved(node: Any, key: str):
    """(key, value) of every leaf of a config, interpolations resolved where they can be (a value that cannot be
    resolved yet, like ${hydra.job.num} before a sweep starts, gives its raw text). A dict made by an
    interpolation (${oc.decode:...}, ${oc.create:...}) is walked too: a config cannot assemble a _target_."""
    from omegaconf import DictConfig, ListConfig

    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for k in keys:
        sub = f"{key}[{k}]" if isinstance(k, int) else (f"{key}.{k}" if key else str(k))
        try:
            value = node[k]
        except Exception:
            try:
                value = node._get_node(k)._value()
            except Exception:
                value = None
        if isinstance(value, (DictConfig, ListConfig)):
            yield from _resolved(value, sub)
        else:
            yield sub, value


def targets_in(node: Any, key: str = ""):
    """(key, target) for every `_target_` in a config or plain container, depth first; a config's
    interpolations are resolved first (Hydra's own node without claiming its run directory)."""
    from omegaconf import DictConfig, ListConfig, open_dict, read_write

    if isinstance(node, (DictConfig, ListConfig)):
        if isinstance(node, DictConfig) and "hydra" in node and not key:
            node = node.copy()
            with read_write(node), open_dict(node):
                node.hydra.mode = None   # resolving hydra.run.dir must not claim it
        for sub, value in _resolved(node, key):
            if sub.rsplit(".", 1)[-1] == "_target_":
                yield sub, value
        return
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


def check_target(key: str, target: Any) -> None:
    if not isinstance(target, str):
        raise ConfigError(key, f"_target_ must be a dotted name, got {type(target).__name__}", FIX)
    if not is_allowed(target):
        raise ConfigError(key, f"_target_ {target!r} is not allowlisted and was not run", FIX)


def check_targets(cfg: Any, root: str = "") -> None:
    """Raise a ConfigError for the first `_target_` that is not allowlisted (after interpolation); imports
    nothing."""
    for key, target in targets_in(cfg, root):
        check_target(key, target)


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


ENV_READERS = ("${oc.env:", "${env:")   # interpolations that read the process environment


def loggable_config(cfg: Any) -> dict:
    """The config as plain data for W&B and other records: every interpolation resolved, except those that read
    the environment (`${oc.env:VAR}`, and every value built from one), which are recorded as their text
    ("${oc.env:VAR}"), never as the value: a preset cannot copy a secret into what is uploaded."""
    from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

    copy = cfg.copy()

    def redact(node) -> None:
        keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
        for k in keys:
            child = node._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)):
                if not child._is_none() and not child._is_missing() and not child._is_interpolation():
                    redact(child)
                    continue
            raw = child._value() if child is not None else None
            if isinstance(raw, str) and any(r in raw for r in ENV_READERS):
                node[k] = raw.replace("${", "\\${")   # the text itself, escaped: it resolves to "${oc.env:VAR}"

    with read_write(copy), open_dict(copy):
        redact(copy)
    return OmegaConf.to_container(copy, resolve=True)
