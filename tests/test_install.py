"""The install holds on a fresh machine: no prerelease among what steerexp depends on, and every
direct dependency pinned to a released, tested range (CI runs these in its fresh venv)."""
import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def dependency_closure(name: str = "steerexp", extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """Every installed distribution steerexp[dev] pulls in (markers evaluated, extras followed): name -> version."""
    seen: dict[str, str] = {}
    todo = [(name, set(extras))]
    while todo:
        dist_name, wanted = todo.pop()
        key = re.sub(r"[-_.]+", "-", dist_name).lower()
        dist = md.distribution(dist_name)
        first = key not in seen
        seen[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            applies = (req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})))
            if not applies:
                continue
            sub = re.sub(r"[-_.]+", "-", req.name).lower()
            if sub == key:  # steerexp[dev] -> steerexp[sweeps]
                if not req.extras <= wanted:
                    todo.append((dist_name, wanted | req.extras))
                continue
            if first or req.extras:
                todo.append((req.name, set(req.extras)))
    return seen


def test_nothing_steerexp_depends_on_is_a_prerelease():
    closure = dependency_closure()
    assert {"hydra-core", "omegaconf", "torch", "accelerate", "tqdm", "wandb", "ray", "submitit"} <= set(closure)
    pre = {k: v for k, v in closure.items() if Version(v).is_prerelease or Version(v).is_devrelease}
    assert not pre, f"prereleases installed: {pre}; tighten the ranges in pyproject.toml"


def test_hydra_and_omegaconf_are_the_released_lines_we_test():
    assert Version(md.version("hydra-core")) < Version("1.4") and not Version(md.version("hydra-core")).is_prerelease
    assert Version(md.version("omegaconf")) < Version("2.4")


def test_every_direct_dependency_has_an_upper_bound():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    for text in requirements:
        req = Requirement(text)
        if req.name == "steerexp":
            continue
        ops = {spec.operator for spec in req.specifier}
        assert ops & {"<", "<=", "==", "~="}, (
            f"{text!r} has no upper bound: a future release could break a fresh install"
        )
        assert not any(Version(spec.version).is_prerelease for spec in req.specifier if "*" not in spec.version), text
