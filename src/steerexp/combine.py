"""Technique x objective x evaluators: what the technique's spec decides for the others. Torch-free.

Composed with its defaults, a run names no objective and the default evaluators, whatever the technique. The
technique's spec (techniques/base_spec.py) says what suits it, and two steps here make the defaults a run that works:

`expand(cfg)` changes the config in place, in one place for every caller: `run.run` calls it before it builds
anything (and records the result in the run's .hydra/config.yaml), and `validate` checks an expanded copy
(`expanded(cfg)`), so the checks see what will run. It is idempotent:

- `objective: auto` (conf/objective/auto.yaml, the default) becomes the technique's `default_objective`, composed
  from the same option files Hydra reads (so `${concept.head}` resolves as in any run); settings given under
  `objective.terms.<term>` apply on top, and `objective=[auto,proximity]` adds a term. Training-free techniques use
  no objective: theirs becomes null.
- Each evaluator decides the settings it leaves to the technique (`adapt`: memorisation's `reference: auto` becomes
  `targets` when the technique has target images, else `protected`, the world's protected set).
- With the default evaluator list (conf/config.yaml), an evaluator that cannot apply to the technique (`applies`)
  is dropped, with a line saying why.

`check(specs, facts, cfg)`, part of `validate` (validate._check_parts), refuses what cannot work, in one line:
an objective term the technique lists in `refuses_objective`, a trainable technique without an objective, and an
evaluator the run names that cannot apply to the technique (memorisation with reference=targets for a technique
without target images). It also runs the rules across objective terms (TermSpec.check_objective).

The lines `expand` returns are for the user (run.run prints them as warnings).
"""
from __future__ import annotations

import copy
import functools
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from steerexp import conf_dir, spec
from steerexp.errors import ConfigError

AUTO = "auto"   # the objective option (conf/objective/auto.yaml) whose node is {auto: true}


@functools.lru_cache(maxsize=1)
def default_evaluators() -> tuple[str, ...]:
    """The evaluator list of conf/config.yaml's defaults (read from the file: it is said once, there)."""
    defaults = OmegaConf.load(conf_dir() / "config.yaml").get("defaults") or []
    for entry in defaults:
        if isinstance(entry, DictConfig) and "evaluator" in entry:
            chosen = entry["evaluator"]
            return tuple(chosen) if not isinstance(chosen, str) else (chosen,)
    return ()


def is_default_list(cfg: DictConfig) -> bool:
    """Whether the run's evaluators are the default list (then one that cannot apply is dropped, not refused)."""
    evaluators = cfg.get("evaluator")
    return isinstance(evaluators, DictConfig) and set(evaluators.keys()) == set(default_evaluators())


def technique_spec(cfg: DictConfig):
    """The spec object of the run's technique (values resolved), or None when it has none."""
    node = cfg.get("technique")
    return spec.build(node, "technique") if node is not None else None


# ============================================================================ expand
def expand(cfg: DictConfig) -> list[str]:
    """The defaults the technique decides, written into `cfg`; returns lines for the user (one each)."""
    tech = technique_spec(cfg)
    _expand_objective(cfg, tech)
    return _adapt_evaluators(cfg, tech)


def expanded(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` expanded (validate checks what the run will run; `cfg` itself is left as composed)."""
    out = copy.deepcopy(cfg)
    expand(out)
    return out


def _is_auto(node: Any) -> bool:
    return isinstance(node, DictConfig) and node.get(AUTO) is True


def _expand_objective(cfg: DictConfig, tech) -> None:
    node = cfg.get("objective")
    if not _is_auto(node):
        return
    rest = OmegaConf.masked_copy(node, [k for k in node.keys() if k != AUTO])  # terms given beside auto
    if tech is None:   # a technique without a spec: nothing says what suits it
        value: Any = rest if rest.get("terms") else None
    elif not tech.trainable:
        value = None   # a training-free technique computes its deltas without an objective
    elif not tech.default_objective:
        raise ConfigError("objective", f"is auto, but technique {tech.label} names no default objective "
                          "(default_objective in its spec)", "name its terms: objective=[...] (conf/objective/)")
    else:
        base = _compose_options(tech.default_objective)
        OmegaConf.set_struct(base, False)  # terms given beside auto may add a term ([auto,proximity])
        try:
            value = OmegaConf.merge(base, rest)
        except OmegaConfBaseException as err:   # a setting its term's spec does not have, or of the wrong type
            from steerexp.preflight import compose_error

            raise (compose_error(err) or ConfigError("objective", str(err).splitlines()[0], "fix the value")) from None
        OmegaConf.set_struct(value, True)
    with open_dict(cfg):
        cfg.objective = value


def _compose_options(names: tuple[str, ...]) -> DictConfig:
    """The objective node of `objective=[names]`, composed from the option files as Hydra would (the app's own
    search path when Hydra is running, steerexp's conf/ otherwise). Interpolations stay, to resolve in the run."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = [f"+objective=[{','.join(names)}]"]
    try:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name=None, overrides=overrides).objective
        return copy.deepcopy(_shipped_options(tuple(names)))
    except HydraException as err:
        raise ConfigError("objective", f"is auto, and its default [{','.join(names)}] does not compose: "
                          f"{str(err).splitlines()[0]}", "name its terms: objective=[...] (conf/objective/)") from None


@functools.lru_cache(maxsize=32)
def _shipped_options(names: tuple[str, ...]) -> DictConfig:
    """The objective node of `objective=[names]` from steerexp's conf/ (composed once per process)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=None, overrides=[f"+objective=[{','.join(names)}]"]).objective


def _adapt_evaluators(cfg: DictConfig, tech) -> list[str]:
    evaluators = cfg.get("evaluator")
    if not isinstance(evaluators, DictConfig):
        return []
    notes, drop = [], []
    default = is_default_list(cfg)
    for name in list(evaluators.keys()):
        ev = spec.build(evaluators[name], f"evaluator.{name}")
        if ev is None:
            continue
        settings, note = ev.adapt(tech)
        for k, v in settings.items():
            evaluators[name][k] = v
        if note:
            notes.append(f"evaluator {name}: {note}")
        if settings:
            ev = spec.build(evaluators[name], f"evaluator.{name}")
        why = ev.applies(tech)
        if why and default:
            drop.append(name)
            notes.append(f"evaluator {name} skipped: it {why}")
    if drop:
        with open_dict(cfg):
            for name in drop:
                del cfg.evaluator[name]
    return notes


# ============================================================================ check
def check(specs: dict[str, Any], facts: spec.Facts, cfg: DictConfig) -> None:
    """The rules across parts (validate._check_parts): `specs` maps each node's key (technique,
    objective.terms.<t>, evaluator.<e>) to its spec object (None: a node without one)."""
    tech = specs.get("technique")
    terms = {k.split(".", 2)[2]: s for k, s in specs.items() if k.startswith("objective.terms.")}
    for name, term in terms.items():
        if term is not None and hasattr(term, "check_objective"):
            term.check_objective(f"objective.terms.{name}", terms, facts)
    if tech is not None and tech.trainable:
        _check_objective(tech, list(terms), cfg)
    _check_own_methods(tech, specs)
    listed = [k.split(".", 1)[1] for k in specs if k.startswith("evaluator.")]
    if is_default_list(cfg):
        return   # expand() drops the default evaluators that cannot apply
    for name in listed:
        ev = specs[f"evaluator.{name}"]
        why = ev.applies(tech) if ev is not None else None
        if why:
            raise ev.refusal(f"evaluator.{name}", tech, [n for n in listed if n != name])


def _check_own_methods(tech, specs: dict[str, Any]) -> None:
    """An evaluator's edit method that only some techniques offer (their spec's `offers_methods`: flowedit,
    rfinv) needs one of them as the run's technique: one line naming the method's key."""
    if tech is None:
        return
    owners: dict[str, str] = {}
    for name, cls in sorted(spec.registered("technique").items()):
        for m in getattr(cls, "offers_methods", ()):
            owners.setdefault(m, name)
    offered = set(getattr(tech, "offers_methods", ()))
    for key, ev in specs.items():
        methods = getattr(ev, "methods", None) if key.startswith("evaluator.") else None
        for i, m in enumerate(methods if isinstance(methods, list) else []):
            if m in owners and m not in offered:
                rest = ",".join(str(x) for x in methods if x != m)
                raise ConfigError(f"{key}.methods[{i}]", f"{m} is the edit method of technique {owners[m]}, and "
                                  f"technique {tech.label or type(tech).__name__} does not offer it",
                                  f"set technique={owners[m]}, or drop it: {key}.methods=[{rest}]")


def _check_objective(tech, terms: list[str], cfg: DictConfig) -> None:
    default = f"objective=auto (its default: [{','.join(tech.default_objective)}])" if tech.default_objective else \
        "objective=[...] (conf/objective/)"
    if _is_auto(cfg.get("objective")):
        return   # expand() composes the default
    if not terms:
        raise ConfigError("objective", f"has no terms, but technique {tech.label} learns its deltas from an objective",
                          f"use {default}")
    refused = [t for t in terms if t in tech.refuses_objective]
    if refused:
        rest = [t for t in terms if t not in refused]
        raise ConfigError("objective", f"[{','.join(terms)}] includes {refused[0]}, which technique {tech.label} "
                          "cannot learn from",
                          f"use {default}" + (f", or objective=[{','.join(rest)}]" if rest else ""))
