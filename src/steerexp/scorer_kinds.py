"""What each kind of scorer can do, torch-free: the rules that parts naming a scorer of the run share.

A run's scorers are addressed by name (conf/config.yaml: `scorers`; steerexp/scorers/factory.py builds them):
the names every run has (DEFAULTS) plus any entry `<name>: {kind: ..., ...}`. The parts that name one check it
here, from their specs, before anything loads:

- a judge (`evaluator.<name>.judge`) reads attributes off images: analytic, a classifier, a CLIP read zero-shot,
  or the user's classifier; never the noisy classifier (it reads noisy latents);
- an objective term that optimises a classifier's reading (`concept_score.scorer`, `attribute_keep.scorer`,
  nudging's `technique.keep.scorer`) needs an image classifier with gradients: not the analytic judge (no
  gradients), not a CLIP (text similarity, no heads), not the noisy classifier.

Spec rules read the run's table from `Facts.scorers` (steerexp/spec.py), this module's `table()`.
"""
from __future__ import annotations

from typing import Any

from steerexp.errors import ConfigError

# the scorers every run has without a config entry (steerexp/scorers/factory.py reads them from here)
DEFAULTS: dict[str, Any] = {"classifier": None, "clip": {"model": None, "pretrained": None},
                            "user": {"path": None, "classes": None},
                            "robust": {"kind": "classifier", "asset": "classifier_robust"},
                            "noisy": {"kind": "noisy", "asset": "classifier_noisy"},
                            "analytic": None}
JUDGES = ("analytic", "classifier", "clip", "user")   # the judges every run has (conf/config.yaml: scorers)
# why a kind cannot be optimised through the decoded images (an objective term's scorer)
NOT_OPTIMISABLE = {"analytic": "the analytic judge has no gradients", "clip": "clip reads text similarity, not heads",
                   "noisy": "the noisy classifier reads noisy latents, not images"}


def kind(name: str, spec: Any) -> str:
    """The kind of the scorer `name` with config entry `spec` (its `kind:`, else its name)."""
    return str(spec["kind"]) if isinstance(spec, dict) and spec.get("kind") else name


def table(scorers: Any = None) -> dict[str, Any]:
    """The run's scorers by name: DEFAULTS with the config's `scorers:` node (plain values) over them."""
    return {**DEFAULTS, **(scorers if isinstance(scorers, dict) else {})}


def has_path(spec: Any) -> bool:
    return bool(isinstance(spec, dict) and spec.get("path"))


def check_judge(key: str, name: Any, scorers: dict | None) -> None:
    """`key` (evaluator.<name>.judge) names a scorer of the run that reads attributes off images."""
    tab = table(scorers)
    if not isinstance(name, str) or name not in tab:
        raise ConfigError(key, f"names no scorer of the run: {name!r}",
                          f"choose one of {sorted(set(JUDGES) | set(tab))} (or null: analytic on the shapes world)")
    if kind(name, tab[name]) == "noisy":
        raise ConfigError(key, f"scorers.{name} reads noisy latents, not images", f"choose one of {JUDGES}")
    if name == "user" and not has_path(tab["user"]):
        raise ConfigError(key, "is user, but scorers.user.path is not set",
                          "set scorers.user.path (and scorers.user.classes), or choose another judge")


def check_optimisable(key: str, name: Any, scorers: dict | None) -> str:
    """`key` names a scorer of the run that an objective can optimise through images (a classifier with
    gradients); returns its kind."""
    tab = table(scorers)
    if not isinstance(name, str) or name not in tab:
        raise ConfigError(key, f"names no scorer of the run: {name!r}", "choose e.g. classifier or robust")
    k = kind(name, tab[name])
    if k in NOT_OPTIMISABLE:
        raise ConfigError(key, f"scorers.{name} is no image classifier to optimise ({NOT_OPTIMISABLE[k]})",
                          "choose a classifier, e.g. classifier or robust")
    return k


def shipped_heads(name: str, scorers: dict | None) -> dict[str, tuple] | None:
    """The heads (and their classes) of scorer `name` when it is one of the shipped concept classifiers (no
    folder of the user's), else None (a user's model: its heads are known only once it loads)."""
    tab = table(scorers)
    spec = tab.get(name)
    users_folder = spec if isinstance(spec, str) and spec else has_path(spec)
    if kind(name, spec) != "classifier" or users_folder:
        return None
    from steerexp.worlds.shapes.world import HEADS  # (numpy only)

    return {h: tuple(c) for h, c in HEADS.items()}


def check_head(key: str, head: Any, target: Any, name: str, scorers: dict | None, hint: str = "") -> None:
    """`<key>.head` and `<key>.target` are a head and one of its classes of scorer `name` when it is a shipped concept
    classifier (a user's model: its heads are known only once it loads); `hint` is added to the fixes."""
    heads = shipped_heads(name, scorers)
    if heads is None:
        return
    if head not in heads:
        raise ConfigError(f"{key}.head", f"is {head!r}, which scorers.{name} has no head for",
                          f"choose among {sorted(heads)}{hint}")
    if target not in heads[head]:
        raise ConfigError(f"{key}.target", f"is {target!r}, which is no {head} of scorers.{name}",
                          f"choose one of {list(heads[head])}{hint}")
