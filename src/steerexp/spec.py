"""Specs: each part's settings declared once, torch-free, beside its code.

A technique, objective term or evaluator declares its settings in a dataclass, a `Spec`, in a module of its own
next to its code (`techniques/textual_inversion_spec.py` beside `techniques/textual_inversion.py`). The spec is
registered in Hydra's ConfigStore (`@register("technique", "textual_inversion")` stores it as
`schema/technique/textual_inversion`), and the part's yaml extends it:

    # conf/technique/textual_inversion.yaml
    defaults:
      - /schema/technique/textual_inversion@_here_
      - _self_

So the defaults live in the spec (the yaml only overrides or documents them), Hydra checks the types when it
composes (`technique.lr=abc` is refused, naming the key), and the spec's methods hold the rules:

- `check(key)`: ranges and cross-field rules, on the composed values (raise `ConfigError(f"{key}.lr", ...)`);
- `check_generator(key, facts)`: rules that need the generator's facts (its family, folder, tokenizer);
- what the part is, for the others to read (class attributes, never settings): a technique's `trainable`,
  `has_targets`, `invertible`, its `default_objective`; an evaluator's `applies(technique_spec)`.

`validate.py` runs every spec of the composed config before torch is imported (`check_parts`), and refuses a
key the spec does not have (`+technique.wieght=2`) with the closest valid one. A part with no spec gets
the generic checks only. Nothing here imports torch, and every `*_spec.py` must not either
(tests/test_specs.py checks).
"""
from __future__ import annotations

import difflib
import importlib
import math
import pkgutil
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

from steerexp.errors import ConfigError

SPEC_PACKAGES = ("steerexp.techniques", "steerexp.objectives", "steerexp.evaluators")
# a group whose code is one module (conf/trainer/: steerexp/trainer.py; conf/guider/: steerexp/guiders.py)
SPEC_MODULES = ("steerexp.trainer_spec", "steerexp.guider_spec")

_REGISTERED: dict[tuple[str, str], type] = {}


@dataclass
class Facts:
    """What a spec may know beyond its own node before anything loads: the generator's facts (validate.py reads them
    from its folder) and the run's scorers."""
    family: str | None = None        # sd | sdxl | sd3 | flux (the embedded shapes generator: sd)
    folder: Path | None = None       # the local pipeline folder (None: an unresolved hub id)
    embedded: str | None = None      # shapes | shapes_flow for the embedded generators, else None
    num_train_timesteps: int | None = None
    # the run's scorers by name (conf/config.yaml: scorers, over the ones every run has: steerexp/scorer_kinds.py):
    # what a judge, an objective's scorer or a technique's scorer may name
    scorers: dict = field(default_factory=dict)
    # the run's shared settings a part's rules may need (validate.py fills them)
    sampling_steps: int | None = None    # sampling.steps


@dataclass
class Spec:
    """The settings of one part; subclasses add fields (with their defaults) and rules."""

    _target_: str = "???"

    # what the part is (class attributes, not settings)
    label: ClassVar[str] = ""                       # e.g. "textual_inversion" (set by @register)
    group: ClassVar[str] = ""                       # technique | objective | evaluator
    renamed: ClassVar[dict] = {}                    # retired setting -> its new name (a clearer error than "unknown")
    elsewhere: ClassVar[dict] = {}                  # a key another setting decides -> that setting

    def check(self, key: str) -> None:
        """Ranges and cross-field rules; `key` is where the node sits (technique, evaluator.concept, ...)."""

    def check_generator(self, key: str, facts: Facts) -> None:
        """Rules that need the generator's facts."""

    # ------------------------------------------------------------------ small rules, one line each
    def positive(self, key: str, name: str, example: Any) -> None:
        v = getattr(self, name)
        if v is None or not _number(v) or not math.isfinite(v) or v <= 0:
            problem = "must be a finite number" if _number(v) and not math.isfinite(v) else "must be > 0"
            raise ConfigError(f"{key}.{name}", f"{problem}, got {v!r}", f"set e.g. {key}.{name}={example}")

    def at_least(self, key: str, name: str, lo: float, example: Any, optional: bool = False) -> None:
        v = getattr(self, name)
        if v is None and optional:
            return
        if v is None or not _number(v) or not math.isfinite(v) or v < lo:
            raise ConfigError(f"{key}.{name}", f"must be a number >= {lo}, got {v!r}",
                              f"set e.g. {key}.{name}={example}")

    def fraction(self, key: str, name: str, example: Any, optional: bool = False) -> None:
        v = getattr(self, name)
        if v is None and optional:
            return
        if v is None or not _number(v) or not 0 <= v <= 1:
            raise ConfigError(f"{key}.{name}", f"must be in [0, 1], got {v!r}", f"set e.g. {key}.{name}={example}")

    def one_of(self, key: str, name: str, options: tuple, optional: bool = False) -> None:
        v = getattr(self, name)
        if v is None and optional:
            return
        if v not in options:
            near = closest(str(v), [str(o) for o in options])
            raise ConfigError(f"{key}.{name}", f"must be one of {', '.join(map(str, options))}, got {v!r}",
                              f"set {key}.{name}={near}" if near else f"set e.g. {key}.{name}={options[0]}")

    def word(self, key: str, name: str, example: str) -> None:
        v = getattr(self, name)
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{key}.{name}", f"must be a non-empty word, got {v!r}",
                              f"set e.g. {key}.{name}={example}")

    def strings(self, key: str, name: str, what: str, example: str, optional: bool = True) -> None:
        """`name` is null (optional) or a non-empty list of non-empty strings."""
        v = getattr(self, name)
        if v is None and optional:
            return
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
            raise ConfigError(f"{key}.{name}", f"must be {'null or ' if optional else ''}a non-empty list of {what}, "
                              f"got {v!r}", f"set e.g. {key}.{name}={example}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


SCHEMA = "schema"   # specs live in Hydra's ConfigStore under schema/<group>/<name>, not among a group's options


def register(group: str, name: str):
    """Class decorator: store the spec in Hydra's ConfigStore as `schema/<group>/<name>`, which
    conf/<group>/<name>.yaml extends (`defaults: [/schema/<group>/<name>@_here_, _self_]`). Under `schema/`, a spec
    is never listed as an option of its group (`technique=...`)."""
    def wrap(cls):
        cls.label, cls.group = name, group
        _REGISTERED[(group, name)] = cls
        _store(group, name, cls)
        return cls
    return wrap


def register_node(group: str, name: str, make) -> None:
    """A spec that is not a dataclass (a node `make()` builds, e.g. objective=auto's open `terms`)."""
    _NODES[(group, name)] = make
    _store(group, name, make())


_NODES: dict[tuple[str, str], Any] = {}


def _store(group: str, name: str, node: Any) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=f"{SCHEMA}/{group}", name=name, node=node)


def register_all() -> None:
    """Import every `*_spec` module of steerexp's part packages (they register themselves), and store every spec
    in the ConfigStore Hydra uses now (a launcher that restores Hydra's singletons may have replaced it). Torch-free;
    Hydra calls this whenever it builds a config search path (hydra_plugins/steerexp_launchers/specs.py), so every
    compose sees the specs."""
    from hydra.core.config_store import ConfigStore

    for package in SPEC_PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.iter_modules(module.__path__):
            if info.name.endswith("_spec"):
                importlib.import_module(f"{package}.{info.name}")
    for name in SPEC_MODULES:
        importlib.import_module(name)
    schema = ConfigStore.instance().repo.get(SCHEMA, {})
    for (group, name), cls in _REGISTERED.items():
        if f"{name}.yaml" not in schema.get(group, {}):
            _store(group, name, cls)
    for (group, name), make in _NODES.items():
        if f"{name}.yaml" not in schema.get(group, {}):
            _store(group, name, make())


def spec_of(node: Any) -> type | None:
    """The Spec class a composed node was built from (its yaml extends it), or None."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig):
        return None
    cls = OmegaConf.get_type(node)
    return cls if isinstance(cls, type) and is_dataclass(cls) and issubclass(cls, Spec) else None


def closest(name: str, options) -> str | None:
    found = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


def build(node: Any, key: str) -> Spec | None:
    """The spec object of a composed node (values resolved), after refusing keys it does not declare; None when the
    node has no spec."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cls = spec_of(node)
    if cls is None:
        return None
    _refuse_unknown(node, key, cls, f"{cls.group} {cls.label}", cls.label)
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        sub = getattr(err, "full_key", None) or key
        msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
        raise ConfigError(sub, f"cannot be read: {msg}", "fix the value or the ${...} interpolation") from None


def _refuse_unknown(node: Any, key: str, cls: type, label: str, name: str) -> None:
    """Refuse a key the dataclass `cls` does not declare, in the node and in its nested dataclass nodes (e.g. an
    inversion's technique.edit), naming the closest valid key. (OmegaConf.to_object would drop it silently.)"""
    from omegaconf import DictConfig, OmegaConf

    names = [f.name for f in fields(cls)]
    for k in node.keys():
        renamed = getattr(cls, "renamed", {})
        if k in renamed and renamed[k] in names:
            new = f"{key}.{renamed[k]}"
            raise ConfigError(f"{key}.{k}", f"was renamed: it is now {new}", f"set {new}={node._get_node(k)._value()} "
                              "instead")
        if k in getattr(cls, "elsewhere", {}):
            raise ConfigError(f"{key}.{k}", f"is set by the run, not in {key}", f"drop it; use {cls.elsewhere[k]}")
        if k not in names:
            near = closest(str(k), [n for n in names if not n.startswith("_")])
            fix = (f"did you mean {key}.{near}?" if near else
                   f"the settings of {name} are: {', '.join(n for n in names if not n.startswith('_'))}")
            raise ConfigError(f"{key}.{k}", f"is not a setting of {label}", fix)
        sub = node._get_node(k)
        if isinstance(sub, DictConfig) and not sub._is_none() and not sub._is_missing() \
                and not sub._is_interpolation():
            sub_cls = OmegaConf.get_type(sub)
            if isinstance(sub_cls, type) and is_dataclass(sub_cls):
                _refuse_unknown(sub, f"{key}.{k}", sub_cls, label, f"{key}.{k}")


def registered(group: str) -> dict[str, type]:
    """The specs registered for a group (after register_all()), by option name."""
    return {name: cls for (g, name), cls in _REGISTERED.items() if g == group}


def check_settings(cls: type, settings: dict, key: str = "technique") -> None:
    """The spec's rules for a part built from Python instead of a config (pass its constructor's `locals()`): the
    same rules, as the same one-line ConfigError, that validate runs on a config, so a constructor keeps no rules
    of its own. Arguments the spec does not declare (the generator, an objective object) are not its business, and
    None for a setting that cannot be null (a constructor's "use the default") leaves the spec's default in place."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    nullable = {f.name: "Optional" in str(f.type) or "None" in str(f.type) for f in fields(cls)}
    plain = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig))
             else list(v) if isinstance(v, tuple) else v
             for k, v in settings.items() if k in nullable and (v is not None or nullable[k])}
    cls(**plain).check(key)


def check_node(node: Any, key: str, facts: Facts | None = None) -> Spec | None:
    """Every rule of the node's spec (None: the node has no spec)."""
    spec = build(node, key)
    if spec is not None:
        spec.check(key)
        if facts is not None:
            spec.check_generator(key, facts)
    return spec
