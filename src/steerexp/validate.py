"""Validate the whole composed config before anything heavy is imported or loaded.

`steerexp` calls `validate(cfg)` first thing in its job (and `check_group_overrides(argv)` before
Hydra composes), so a wrong setting costs about a second instead of the 8-11 s of imports and
model loading, or a whole training run, that it cost before. Every problem is one `ConfigError`
that names the key and the fix; the CLI prints it as one line.

What is checked, cheapest first:

1. every value resolves (no `???`, no broken `${...}`), and `_target_`s pass `steerexp.safety`;
2. plain values: seeds (ints), eval.prompts / eval.seeds (non-empty lists), the `{}` slot of
   prompt templates (exactly one for textual inversion, no other format fields), sampling
   steps and guidance scale, learning rates, batch sizes, step counts, trainer intervals, the
   placeholder token;
3. the generator: its folder (model_index.json and component configs parse, safetensors files
   are complete) or hub id, the device (a GPU is looked for without importing torch) and dtype;
   then sampling steps against the scheduler's num_train_timesteps;
4. every file or folder setting (scorers.*: classifiers, a user's model, CLIP weights; target
   images, objective images, prompt files);
5. `ckpt_path`: exists, and (read without torch and without running any pickle code) was
   trained with this technique and the same delta-shaping settings;
6. prompts against the generator's tokenizer (the `tokenizers` library on the folder's files,
   exactly as transformers' CLIPTokenizer splits): a `{}` slot cut off by the tokenizer's
   length is an error, a prompt truncated after its slot a warning.

Nothing here imports torch, lightning, diffusers or transformers.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pickle
import re
import string
import struct
import zipfile
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from steerexp import ASSETS, conf_dir
from steerexp.errors import ConfigError
from steerexp.generators import EMBEDDED, embedded_path  # (no torch import)

DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_TRAIN_TIMESTEPS = 1000
DEFAULT_MAX_TOKENS = 77
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")
_ABSENT = object()

# techniques whose '{}' carries the edit: the baseline fills it with a word, the edit with learned tokens
SLOT_EDIT_TECHNIQUES = ("steerexp.techniques.textual_inversion.",)
# techniques whose '{}' is each target image's source prompt (inversion / editing of real images)
INVERSION_TECHNIQUES = ("steerexp.techniques.ddim_inversion.", "steerexp.techniques.null_text_inversion.",
                        "steerexp.techniques.negative_prompt_inversion.", "steerexp.techniques.direct_inversion.")


# ============================================================================ entry points
def validate(cfg: DictConfig) -> list[str]:
    """Check the composed config; raise the first problem as a ConfigError. Returns warnings
    (one line each) for things that run but probably not as meant."""
    c = plain(cfg)
    warnings: list[str] = []
    _check_targets(cfg)
    _check_values(c)
    gen = _check_generator(c)
    _check_family(c, gen)
    _check_sampling_limits(c, gen)
    _check_paths(c)
    _check_checkpoint(c)
    _check_prompt_lengths(c, gen, warnings)
    return warnings


def plain(cfg: DictConfig) -> dict:
    """The config (without Hydra's own node) as plain Python, every interpolation resolved; a
    missing (`???`) or unresolvable value is a ConfigError naming its key."""
    out: dict = {}
    for k in cfg.keys():
        if k == "hydra":
            continue
        try:
            v = cfg[k]
            if isinstance(v, (DictConfig, ListConfig)):
                v = OmegaConf.to_container(v, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as err:
            key = getattr(err, "full_key", None) or str(k)
            raise ConfigError(key, "is required but has no value (??? in its config)", _missing_fix(key)) from None
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or str(k)
            msg = getattr(err, "msg", None) or str(err)
            raise ConfigError(key, f"cannot be resolved: {msg.splitlines()[0]}",
                              "fix the ${...} interpolation or set the value directly") from None
        out[str(k)] = v
    return out


def _missing_fix(key: str) -> str:
    if key == "generator.path":
        return "set generator.path=/models/sd-v1-5 (a diffusers pipeline folder) or a hub id such as org/name"
    return f"set {key}=<value> on the command line"


# ============================================================================ small helpers
def get(c: dict, key: str, default: Any = _ABSENT) -> Any:
    node: Any = c
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(c: dict, key: str, lo: int, fix: str | None = None) -> None:
    """An integer >= lo, when the key is there."""
    v = get(c, key)
    if v is _ABSENT:
        return
    fix = fix or f"set e.g. {key}={max(lo, 1)}"
    if not _is_int(v):
        raise ConfigError(key, f"must be an integer, got {v!r}", fix)
    if v < lo:
        raise ConfigError(key, f"must be >= {lo}, got {v}", fix)


def _target(c: dict, group: str) -> str:
    node = c.get(group)
    return str(node.get("_target_", "")) if isinstance(node, dict) else ""


def technique_kind(c: dict) -> str:
    """slot: '{}' carries the edit (textual inversion); inversion: '{}' is a target's source
    prompt; fill: '{}' is filled with a plain word (technique.slot_word) and the edit lies elsewhere."""
    t = _target(c, "technique")
    tech = c.get("technique") or {}
    if t.startswith(SLOT_EDIT_TECHNIQUES) or ("placeholder" in tech and "slot_word" in tech):
        return "slot"
    if t.startswith(INVERSION_TECHNIQUES) or isinstance(tech.get("targets"), dict) and "files" in tech["targets"]:
        return "inversion"
    return "fill"


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


# ============================================================================ 1. targets
def _check_targets(cfg: DictConfig) -> None:
    try:
        from steerexp import safety
    except ImportError:  # the allowlist module is optional
        return
    safety.check_targets(cfg)


# ============================================================================ 2. plain values
def _check_values(c: dict) -> None:
    seed = c.get("seed", _ABSENT)
    if seed is not _ABSENT and (not _is_int(seed) or not 0 <= seed < 2 ** 32):
        raise ConfigError("seed", f"must be an integer in 0..2**32-1, got {seed!r}", "set e.g. seed=0")
    _check_eval(c)
    _check_sampling(c)
    _check_technique(c)
    _check_edit(c)
    _check_edit_bench(c)
    _check_trainer(c)
    _check_listed_entries(c)
    _check_scorers(c)
    border = get(c, "objective.terms.proximity.border", None)
    if border is not None and (not _is_int(border) or border < 1):
        raise ConfigError("objective.terms.proximity.border", f"must be null (the whole image) or a number of pixels "
                          f">= 1, got {border!r}", "set e.g. objective.terms.proximity.border=3")


def _check_listed_entries(c: dict) -> None:
    """Every entry of objective.terms is a term and every entry of evaluator an evaluator (a config of
    conf/objective/ or conf/evaluator/ gives it its _target_). A preset's settings for one the list no longer
    names (`objective=[concept_score]` or `evaluator=[]` after a preset that sets attribute_keep's weight or
    leakage's heads) would otherwise fail at instantiation, or after training."""
    for group, nodes, listed in (("objective.terms", get(c, "objective.terms", None), "objective=[...]"),
                                 ("evaluator", c.get("evaluator"), "evaluator=[...]")):
        if not isinstance(nodes, dict):
            continue
        for name, node in nodes.items():
            if isinstance(node, dict) and "_target_" not in node:
                kind = "a term of the objective" if group == "objective.terms" else "an evaluator of the run"
                head = listed.split("=")[0]
                raise ConfigError(f"{group}.{name}", f"has settings but is not {kind} ({listed} does not name it)",
                                  f"add it to the list ({head}=[...,{name}]) or drop its settings: '~{group}.{name}'")


def _check_scorers(c: dict) -> None:
    """A user's classifier needs the names of its outputs (conf/config.yaml: scorers.user)."""
    user = get(c, "scorers.user", None)
    if isinstance(user, dict) and user.get("path"):
        classes = user.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(x, str) for x in classes):
            raise ConfigError("scorers.user.classes", f"must list the names of the model's outputs, got {classes!r}",
                              "set e.g. scorers.user.classes=[dark,bright] (in the order of its logits)")
    _check_model_folders(c)
    _check_guidance_scorer(c)
    _check_noise_optimisation(c)
    _check_judges(c)


JUDGES = ("analytic", "classifier", "clip", "user")  # the judges every run has (conf/config.yaml: scorers)


def _check_judges(c: dict) -> None:
    """evaluator.<name>.judge names a scorer of the run that reads attributes; objective.terms.concept_score.scorer
    and .attribute_keep.scorer one with gradients (steerexp/evaluators/base.py: judges kept apart from objectives)."""
    table = get(c, "scorers", None) or {}
    names = sorted(set(JUDGES) | set(table))

    def known(name) -> bool:
        if isinstance(name, str) and name in names:
            return True
        from steerexp.scorers.factory import DEFAULTS  # scorers every run has without a config entry (rare path)

        return isinstance(name, str) and name in DEFAULTS

    for ev_name, ev in (c.get("evaluator") or {}).items():
        if not isinstance(ev, dict):
            continue
        if "scorer" in ev and ev_name == "concept":
            raise ConfigError(f"evaluator.{ev_name}.scorer", "was renamed: the judge is now one key, judge",
                              f"set evaluator.{ev_name}.judge={ev['scorer']} instead")
        judge = ev.get("judge")
        if judge is None:
            continue
        key = f"evaluator.{ev_name}.judge"
        if not known(judge):
            raise ConfigError(key, f"names no scorer of the run: {judge!r}",
                              f"choose one of {names} (or null: analytic on the shapes world)")
        if _scorer_kind(judge, table.get(judge)) == "noisy":
            raise ConfigError(key, f"scorers.{judge} reads noisy latents, not images", f"choose one of {JUDGES}")
        if judge == "user" and not (get(c, "scorers.user.path", None)):
            raise ConfigError(key, "is user, but scorers.user.path is not set",
                              "set scorers.user.path (and scorers.user.classes), or choose another judge")
    for term in ("concept_score", "attribute_keep"):  # the terms that optimise a classifier's reading
        key = f"objective.terms.{term}.scorer"
        score = get(c, key, None)
        if score is None:
            continue
        if not known(score):
            raise ConfigError(key, f"names no scorer of the run: {score!r}", "choose e.g. classifier or robust")
        kind = _scorer_kind(score, table.get(score))
        if kind in ("analytic", "clip", "noisy"):
            why = {"analytic": "the analytic judge has no gradients", "clip": "clip reads text similarity, not heads",
                   "noisy": "the noisy classifier reads noisy latents, not images"}[kind]
            raise ConfigError(key, f"scorers.{score} is no image classifier to optimise ({why})",
                              "choose a classifier, e.g. classifier or robust")
    _check_attribute_keep(c, table)


def _check_attribute_keep(c: dict, table: dict) -> None:
    """attribute_keep keeps named heads of the classifier; the head concept_score moves cannot be one of them.
    technique.keep (nudging) is the same term on the nudge's initial output."""
    terms = get(c, "objective.terms", None) or {}
    keep = terms.get("attribute_keep") if isinstance(terms, dict) else None
    if isinstance(keep, dict) and "_target_" in keep:
        moved = terms.get("concept_score", {}).get("head") if isinstance(terms.get("concept_score"), dict) else None
        _check_keep(keep, "objective.terms.attribute_keep", table, moved)
    tech = c.get("technique") if isinstance(c.get("technique"), dict) else {}
    nudge_keep = tech.get("keep")
    if nudge_keep is None or not str(tech.get("_target_", "")).endswith("nudging.Nudging"):
        return
    base = "technique.keep"
    if not isinstance(nudge_keep, dict) or set(nudge_keep) - {"heads", "weight", "scorer"}:
        raise ConfigError(base, f"must be null or {{heads, weight, scorer}}, got {nudge_keep!r}",
                          f"set e.g. '{base}={{heads:[colour,shape],weight:1.0,scorer:robust}}'")
    if tech.get("mode", "nudge") != "nudge":
        raise ConfigError(base, f"holds the nudge's objective; mode={tech.get('mode')} has none",
                          f"set {base}=null or technique.mode=nudge")
    weight = nudge_keep.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(base + ".weight", f"must be a number >= 0, got {weight!r}", f"set e.g. {base}.weight=1.0")
    scorer = nudge_keep.get("scorer", "classifier")
    if not isinstance(scorer, str) or scorer not in set(JUDGES) | set(table):
        raise ConfigError(base + ".scorer", f"names no scorer of the run: {scorer!r}",
                          "choose e.g. classifier or robust")
    if _scorer_kind(scorer, table.get(scorer)) in ("analytic", "clip", "noisy"):
        raise ConfigError(base + ".scorer", f"scorers.{scorer} is no image classifier to optimise",
                          "choose a classifier, e.g. classifier or robust")
    _check_keep({"scorer": scorer, **nudge_keep}, base, table, None)


def _check_keep(keep: dict, base: str, table: dict, moved: str | None) -> None:
    key, heads = f"{base}.heads", keep.get("heads")
    if not isinstance(heads, list) or not heads or not all(isinstance(h, str) for h in heads):
        raise ConfigError(key, f"must list the classifier heads to keep, got {heads!r}",
                          f"set e.g. {key}=[shape,colour]")
    if keep.get("reference", "start") not in ("start", "prompt"):
        raise ConfigError(f"{base}.reference", f"must be start or prompt, got "
                          f"{keep.get('reference')!r}", "start keeps the zero-delta image's reading, prompt the "
                          "class the prompt names")
    if moved in heads:
        rest = [h for h in heads if h != moved]
        raise ConfigError(key, f"includes {moved!r}, the head concept_score moves: the two terms would pull "
                          "against each other", f"keep the other heads: {key}=[{','.join(rest) or 'shape'}]")
    scorer = keep.get("scorer", "classifier")
    if _scorer_kind(scorer, table.get(scorer)) == "user":
        raise ConfigError(f"{base}.scorer", "is the user's one-head model, which answers every "
                          "head name with the same output", "keep heads with a classifier that has named heads, "
                          "e.g. robust")
    spec = table.get(scorer)
    users_folder = spec if isinstance(spec, str) and spec else isinstance(spec, dict) and spec.get("path")
    if _scorer_kind(scorer, spec) == "classifier" and not users_folder:  # a shipped concept classifier
        from steerexp.worlds.shapes.world import HEADS  # their heads (numpy only)

        unknown = [h for h in heads if h not in HEADS]
        if unknown:
            raise ConfigError(key, f"names {unknown}, which scorers.{scorer} has no head for",
                              f"choose among {sorted(HEADS)}")


FOLDER_KINDS = {"classifier": "an image classifier", "noisy": "a timestep-aware classifier (noisy latents)"}
GUIDING_KINDS = ("classifier", "user", "noisy", "clip")  # = techniques.energy_guidance.GUIDING_KINDS


def _scorer_kind(name: str, spec: Any) -> str:
    return str(spec["kind"]) if isinstance(spec, dict) and spec.get("kind") else name


def _check_model_folders(c: dict) -> None:
    """A classifier or noisy scorer is a folder: `path`, or `asset` (a folder shipped in steerexp/assets)."""
    for name, spec in (get(c, "scorers", None) or {}).items():
        kind, key = _scorer_kind(name, spec), f"scorers.{name}"
        if kind not in FOLDER_KINDS or not isinstance(spec, dict):
            continue
        if spec.get("path") and spec.get("asset"):
            raise ConfigError(key, "gives both path and asset", f"keep one: {key}.path=<folder> or {key}.asset=<name>")
        if spec.get("asset"):
            folder = ASSETS / str(spec["asset"])
            shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())
            if not (folder / "config.json").is_file():
                raise ConfigError(f"{key}.asset", f"no shipped model {spec['asset']!r}",
                                  f"choose one of {shipped}, or give {key}.path=<folder>")
        elif spec.get("path"):
            folder = Path(str(spec["path"])).expanduser()
            _classifier_folder(f"{key}.path", str(spec["path"]), folder)
        else:
            continue
        found = _read_json(folder / "config.json", key)
        found = found.get("kind", "classifier") if isinstance(found, dict) else "classifier"
        if found != kind and found in FOLDER_KINDS:
            raise ConfigError(key, f"is kind {kind} but {folder.name} holds {FOLDER_KINDS[found]}",
                              f"set {key}.kind={found}, or point it at {FOLDER_KINDS[kind]}")


def _check_guidance_scorer(c: dict) -> None:
    """energy_guidance: technique.scorer names a scorer of the run that has gradients."""
    if not _target(c, "technique").endswith("energy_guidance.EnergyGuidance"):
        return
    name, table = get(c, "technique.scorer", None), get(c, "scorers", None)
    if not isinstance(table, dict) or name is None:
        return
    name = "classifier" if name == "concept" else name  # the option's old name
    usable = sorted(n for n, s in table.items() if _scorer_kind(n, s) in GUIDING_KINDS
                    and (_scorer_kind(n, s) != "user" or isinstance(s, dict) and s.get("path")))
    fix = f"set technique.scorer to one of {usable}"
    if not isinstance(name, str) or name not in table:
        raise ConfigError("technique.scorer", f"no scorer named {name!r} in scorers (conf/config.yaml)", fix)
    kind = _scorer_kind(name, table[name])
    if kind not in GUIDING_KINDS:
        raise ConfigError("technique.scorer", f"scorers.{name} is of kind {kind!r}, which gives no gradient to guide "
                          "with", fix)
    if kind == "user" and not (isinstance(table[name], dict) and table[name].get("path")):
        raise ConfigError("technique.scorer", f"names scorers.{name}, which has no path",
                          f"set scorers.{name}.path (and .classes), or {fix}")


NOISE_TECHNIQUES = ("steerexp.techniques.reno.", "steerexp.techniques.noise_search.")


def _check_noise_optimisation(c: dict) -> None:
    """reno / noise_search (steerexp/techniques/noise.py): rewards name scorers of the run with weights >= 0 (reno's
    with gradients), the settings are in range, and max_calls pays for at least one step of the method."""
    t = _target(c, "technique")
    if not t.startswith(NOISE_TECHNIQUES):
        return
    tech, table = c.get("technique") or {}, get(c, "scorers", None) or {}
    reno = t.startswith(NOISE_TECHNIQUES[0])
    rewards = tech.get("rewards")
    if not isinstance(rewards, dict) or not rewards:
        raise ConfigError("technique.rewards", f"must map scorer names to weights, got {rewards!r}",
                          "set e.g. technique.rewards={classifier:1.0}")
    names = sorted(set(JUDGES) | set(table))
    if any(n not in names for n in rewards):  # e.g. robust: scorers every run has without a config entry (rare path)
        from steerexp.scorers.factory import DEFAULTS

        names = sorted(set(names) | set(DEFAULTS))
    for name, w in rewards.items():
        key = f"technique.rewards.{name}"
        if not _is_number(w) or not math.isfinite(w) or w < 0:
            raise ConfigError(key, f"must be a finite weight >= 0, got {w!r}", f"set e.g. {key}=1.0 (0 leaves it out)")
        if w == 0:
            continue
        if name not in names:
            raise ConfigError(key, f"names no scorer of the run: {name!r}", f"choose from {names}")
        kind = _scorer_kind(name, table.get(name))
        if kind == "noisy" or (reno and kind == "analytic"):
            why = "reads noisy latents, not images" if kind == "noisy" else "has no gradients to follow"
            raise ConfigError(key, f"scorers.{name} {why}", "use a classifier (classifier, robust) or clip"
                              + ("; or technique=noise_search, which needs no gradient" if kind == "analytic" else ""))
    if not any(_is_number(w) and w > 0 for w in rewards.values()):
        raise ConfigError("technique.rewards", "has no positive weight: nothing to optimise",
                          "set e.g. technique.rewards.classifier=1.0")
    _finite(c, "technique.grad_clip", 0.0, strict=True, fix="set e.g. technique.grad_clip=1.0 (null: no clipping)")
    _finite(c, "technique.norm_weight", 0.0, fix="set e.g. technique.norm_weight=0.01 (0: no chi-norm term)")
    for k in ("iterations", "neighbours", "max_calls"):
        if tech.get(k) is not None:
            _check_int(c, f"technique.{k}", 1)
    m = tech.get("momentum")
    if m is not None and not (_is_number(m) and 0 <= m < 1):
        raise ConfigError("technique.momentum", f"must be in [0, 1), got {m!r}", "set e.g. technique.momentum=0.9")
    r = tech.get("radius")
    if r is not None and not (_is_number(r) and 0 < r <= 1):
        raise ConfigError("technique.radius", f"must be in (0, 1] (the share of fresh noise in a neighbour), got {r!r}",
                          "set e.g. technique.radius=0.5")
    if "keep" in tech and tech["keep"] not in ("best", "last"):
        raise ConfigError("technique.keep", f"must be best or last, got {tech['keep']!r}", "set technique.keep=best")
    steps, calls = get(c, "sampling.steps", 25), tech.get("max_calls")
    if not (_is_int(steps) and _is_int(calls)):
        return
    if reno:
        k = tech.get("opt_sampling_steps") or steps
        need = k + (3 + bool(tech.get("checkpoint"))) * k + (steps if k != steps else 0)
        what = f"one gradient step through {k} DDIM steps (+ the final sample at sampling.steps={steps})"
    else:
        need, what = tech.get("candidates", 1) * steps, f"best-of-{tech.get('candidates', 1)} at sampling.steps={steps}"
    if _is_int(need) and calls < need:
        raise ConfigError("technique.max_calls", f"is {calls} generator calls per output, but {what} needs {need}",
                          f"set technique.max_calls={need} or more")


def _non_empty_list(value: Any, key: str, what: str, why_empty: str, fix: str) -> None:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list of {what}, got {value!r}", fix)
    if not value:
        raise ConfigError(key, f"is empty: {why_empty}", fix)


def _check_eval(c: dict) -> None:
    ev = c.get("eval")
    if not isinstance(ev, dict):
        return
    seeds = ev.get("seeds", _ABSENT)
    if seeds is not _ABSENT:
        _non_empty_list(seeds, "eval.seeds", "integers", "the paired comparison needs at least one seed",
                        "set e.g. eval.seeds=[0,1,2,3]")
        for i, s in enumerate(seeds):
            if not _is_int(s) or s < 0:
                raise ConfigError(f"eval.seeds[{i}]", f"seeds must be non-negative integers, got {s!r}",
                                  "set e.g. eval.seeds=[0,1,2,3]")
    prompts = ev.get("prompts", _ABSENT)
    if prompts is not _ABSENT:
        _non_empty_list(prompts, "eval.prompts", "prompt templates", "give at least one prompt template",
                        "set e.g. eval.prompts=['a photo of a {}','a red {}']")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ConfigError(f"eval.prompts[{i}]", f"must be a non-empty string, got {p!r}",
                                  "set e.g. eval.prompts=['a photo of a {}']")
    _check_prompt_templates(c)


def _fields(prompt: str) -> list[str] | None:
    """The format fields of a prompt ('' for '{}', e.g. 'name' for '{name}', with their spec), or
    None when it is not a valid format string (a lone brace)."""
    try:
        out = []
        for _lit, name, spec, conv in string.Formatter().parse(prompt):
            if name is not None:
                out.append(name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else ""))
        return out
    except ValueError:
        return None


def _prompt_lists(c: dict) -> Iterable[tuple[str, list, bool]]:
    """(key, prompts, must_have_slot) for every prompt list that reaches technique.generate()."""
    kind = technique_kind(c)
    prompts = get(c, "eval.prompts")
    if isinstance(prompts, list):
        yield "eval.prompts", prompts, kind == "slot"
    tech = c.get("technique") or {}
    if kind == "slot" and isinstance(tech.get("templates"), list):
        yield "technique.templates", tech["templates"], True
    for name, ev in (c.get("evaluator") or {}).items():
        if not isinstance(ev, dict):
            continue
        for k, v in ev.items():
            if k.endswith("prompts") and isinstance(v, list):
                yield f"evaluator.{name}.{k}", v, False
            elif k.endswith("prompts") and isinstance(v, str) and Path(v).expanduser().is_file():
                try:
                    lines = [ln.strip() for ln in Path(v).expanduser().read_text().splitlines() if ln.strip()]
                except (OSError, UnicodeDecodeError):
                    continue
                yield f"evaluator.{name}.{k} ({v})", lines, False


def _check_prompt_templates(c: dict) -> None:
    """'{}' marks the concept slot. Textual inversion fills it with str.format: exactly one '{}',
    no other field ('{name}' is a KeyError, two '{}' an IndexError), and eval prompts without a
    slot would compare the baseline with itself. Other techniques replace '{}' with a word, so a
    '{name}' field would reach the generator as literal text."""
    kind = technique_kind(c)
    for key, prompts, must_have_slot in _prompt_lists(c):
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ConfigError(f"{key}[{i}]", f"prompts must be strings, got {p!r}", f"quote it: {key}=['...']")
            if kind == "inversion":
                continue
            fields = _fields(p)
            if fields is None:
                if kind == "slot":
                    raise ConfigError(f"{key}[{i}]", f"{_short(p)} has an unmatched '{{' or '}}'",
                                      "use '{}' for the concept slot and no other braces")
                continue
            other = [f for f in fields if f != ""]
            if other:
                raise ConfigError(
                    f"{key}[{i}]",
                    f"{_short(p)} has the format field {{{other[0]}}}; only '{{}}' (the concept slot) is filled",
                    "write the word itself, or '{}' where the concept goes",
                )
            if kind != "slot":
                continue
            if len(fields) > 1:
                raise ConfigError(
                    f"{key}[{i}]",
                    f"{_short(p)} has {len(fields)} '{{}}' slots; the concept fills exactly one",
                    "keep one '{}' where the concept goes",
                )
            if must_have_slot and not fields:
                raise ConfigError(
                    f"{key}[{i}]",
                    f"{_short(p)} has no '{{}}' slot, so its baseline and edited "
                    "prompts are the same text and the comparison measures nothing",
                    "add '{}' where the concept goes, e.g. 'a red {}'",
                )


def _finite(c: dict, key: str, lo: float | None = None, strict: bool = False, fix: str | None = None) -> None:
    v = get(c, key)
    if v is _ABSENT or v is None:
        return
    if not _is_number(v):
        raise ConfigError(key, f"must be a number, got {v!r}", fix or f"set e.g. {key}=1.0")
    if not math.isfinite(v):
        raise ConfigError(key, f"must be a finite number, got {v}", fix or f"set e.g. {key}=1.0")
    if lo is not None and (v <= lo if strict else v < lo):
        raise ConfigError(key, f"must be {'>' if strict else '>='} {lo:g}, got {v}", fix or f"set e.g. {key}=1.0")


def _check_sampling(c: dict) -> None:
    _check_int(c, "sampling.steps", 1, fix="set e.g. sampling.steps=25")
    _finite(c, "sampling.guidance_scale", 0.0, fix="set e.g. sampling.guidance_scale=5.0 (1 = no guidance)")


def _check_technique(c: dict) -> None:
    tech = c.get("technique")
    if not isinstance(tech, dict):
        return
    t = "technique."
    for k in ("train_sampling_steps", "opt_sampling_steps"):
        if k == "train_sampling_steps" or tech.get(k) is not None:  # opt_sampling_steps: null = sampling.steps
            _check_int(c, t + k, 1, fix=f"set e.g. {t}{k}=10")
    for k in ("guidance_scale",):
        _finite(c, t + k, 0.0, fix=f"set e.g. {t}{k}=5.0 (1 = no guidance)")
    for k in ("lr", "opt_lr"):
        if k in tech:
            _finite(c, t + k, 0.0, strict=True, fix=f"set a small positive rate, e.g. {t}{k}=0.005")
    for k in (
        "batch_size",
        "nudge_batch",
        "num_vectors",
        "candidates",
        "top_k",
        "beam_width",
        "proposals",
        "inner_steps",
        "max_words",
        "max_calls",
    ):
        if tech.get(k) is not None:
            _check_int(c, t + k, 1)
    if "steps" in tech:
        _check_int(c, t + "steps", 0, fix=f"set e.g. {t}steps=100 (0 = no training)")
    for k in ("opt_steps", "rounds"):
        if tech.get(k) is not None and not isinstance(tech[k], dict):
            _check_int(c, t + k, 0)
    if "seed" in tech and tech["seed"] is not None and (not _is_int(tech["seed"]) or tech["seed"] < 0):
        raise ConfigError("technique.seed", f"must be a non-negative integer, got {tech['seed']!r}", "set e.g. seed=0")
    for k in ("seeds", "train_seeds"):
        seeds = tech.get(k)
        if isinstance(seeds, list):
            for i, s in enumerate(seeds):
                if not _is_int(s) or s < 0:
                    raise ConfigError(f"{t}{k}[{i}]", f"seeds must be non-negative integers, got {s!r}",
                                      f"set e.g. {t}{k}=[100,101,102,103]")
    if "placeholder" in tech:
        p = tech["placeholder"]
        if not isinstance(p, str) or not p or any(ch.isspace() for ch in p) or "{" in p or "}" in p:
            raise ConfigError(
                "technique.placeholder",
                f"must be one non-empty token without spaces or braces, got {p!r}",
                "set e.g. technique.placeholder='<v*>'",
            )
    for k in ("slot_word", "initializer"):
        if k in tech and (not isinstance(tech[k], str) or not tech[k].strip()):
            raise ConfigError(t + k, f"must be a non-empty word, got {tech[k]!r}", f"set e.g. {t}{k}=object")


# technique.edit of the inversion techniques (techniques/ddim_inversion.py; P2P: generators/attention.py)
EDIT_KEYS = ("replace", "prompts", "control", "blend", "cross_steps", "self_steps", "mode", "reweight", "blend_words",
             "blend_threshold", "blend_start", "blend_dilate", "control_uncond", "self_full_res")
EDIT_TYPES = ("colour", "shape", "size", "background", "position")  # evaluators/edit_bench.py


def _edit_method(m: Any) -> bool:
    """An edit method name: <inversion>[+p2p[+blend]] or sdedit_s<strength> (evaluators, edit_bench)."""
    return isinstance(m, str) and re.fullmatch(
        r"(vae|npi|nti|di|ddim_w\d+(\.\d+)?)(\+p2p(\+blend)?)?|sdedit_s(0?\.\d+|1(\.0*)?)", m) is not None


def _check_edit(c: dict) -> None:
    """technique.edit of an inversion technique: the prompt swap and its Prompt-to-Prompt control."""
    edit = get(c, "technique.edit", None)
    if technique_kind(c) != "inversion" or not isinstance(edit, dict):
        return
    k = "technique.edit."
    unknown = sorted(set(edit) - set(EDIT_KEYS))
    if unknown:
        raise ConfigError(k + unknown[0], "is not a setting of technique.edit",
                          f"use one of {', '.join(EDIT_KEYS)} (see conf/technique/ddim_inversion.yaml)")
    if edit.get("control") not in (None, "p2p"):
        raise ConfigError(k + "control", f"must be null (a bare prompt swap) or p2p, got {edit['control']!r}",
                          f"set {k}control=p2p (Prompt-to-Prompt attention control) or {k}control=null")
    for flag in ("blend", "control_uncond", "self_full_res"):
        if flag in edit and not isinstance(edit[flag], bool):
            raise ConfigError(k + flag, f"must be true or false, got {edit[flag]!r}", f"set {k}{flag}=true")
    if edit.get("blend") and edit.get("control") != "p2p":
        raise ConfigError(k + "blend", "is true but technique.edit.control is not p2p: the blend mask comes from "
                          "P2P's attention maps", f"set {k}control=p2p, or {k}blend=false")
    for w in ("cross_steps", "self_steps"):
        v = edit.get(w)
        ok = (_is_number(v) and 0 <= v <= 1) or (
            isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) and 0 <= v[0] <= v[1] <= 1)
        if w in edit and not ok:
            raise ConfigError(k + w, f"must be a fraction of the steps in [0, 1] or [start, end] within it, got {v!r}",
                              f"set e.g. {k}{w}=0.8 or {k}{w}=[0.1,0.8]")
    if "mode" in edit and edit["mode"] not in ("auto", "replace", "refine"):
        raise ConfigError(k + "mode", f"must be auto, replace or refine, got {edit['mode']!r}", f"set {k}mode=auto")
    reweight = edit.get("reweight")
    if reweight is not None and not isinstance(reweight, dict):
        raise ConfigError(k + "reweight", f"must map words to attention scales, got {reweight!r}",
                          f"set e.g. {k}reweight={{blue:2.0}}")
    for word, scale in (reweight or {}).items():
        if not _is_number(scale) or scale < 0 or not math.isfinite(scale):
            raise ConfigError(f"{k}reweight.{word}", f"must be a number >= 0 (the word's attention scale), got "
                              f"{scale!r}", f"set e.g. {k}reweight.{word}=2.0")
    if edit.get("blend_threshold") is not None:
        v = edit["blend_threshold"]
        if not _is_number(v) or not 0 < v < 1:
            raise ConfigError(k + "blend_threshold", f"must be in (0, 1), got {v!r}",
                              f"set e.g. {k}blend_threshold=0.3")
    if edit.get("blend_start") is not None:
        v = edit["blend_start"]
        if not _is_number(v) or not 0 <= v <= 1:
            raise ConfigError(k + "blend_start", f"must be a fraction of the steps in [0, 1], got {v!r}",
                              f"set e.g. {k}blend_start=0.2")
    if edit.get("blend_dilate") is not None:
        _check_int(c, k + "blend_dilate", 0, fix=f"set e.g. {k}blend_dilate=1 (latent cells)")
    words = edit.get("blend_words")
    lists = list(words.values()) if isinstance(words, dict) else [words]
    if words is not None and (not all(isinstance(x, list) and all(isinstance(w, str) for w in x) for x in lists)
                              or isinstance(words, dict) and set(words) - {"source", "target"}):
        raise ConfigError(k + "blend_words", f"must be null, a list of words or {{source: [...], target: [...]}}, "
                          f"got {words!r}", f"set e.g. {k}blend_words=[circle] (null: the words the edit changes)")


def _check_edit_bench(c: dict) -> None:
    bench = get(c, "evaluator.edit_bench", None)
    if not isinstance(bench, dict):
        return
    k = "evaluator.edit_bench."
    types = bench.get("types")
    if types is not None:
        bad = [t for t in types if t not in EDIT_TYPES] if isinstance(types, list) else [types]
        if bad or not types:
            raise ConfigError(k + "types", f"must be a non-empty list of edit types, got {types!r}",
                              f"choose from {list(EDIT_TYPES)}, e.g. {k}types=[colour,shape]")
        template = bench.get("prompt_template")
        fields = _fields(template) if isinstance(template, str) else []
        missing = [t for t in types if t not in (fields or [])]
        if missing:
            raise ConfigError(k + "prompt_template", f"{_short(str(template))} has no {{{missing[0]}}}, so a "
                              f"{missing[0]} edit would not change the prompt",
                              f"add {{{missing[0]}}} to it (and to technique.targets.prompt_template), "
                              "or drop the type")
    methods = bench.get("methods")
    if methods is not None:
        if not isinstance(methods, list) or not methods:
            raise ConfigError(k + "methods", f"must be a non-empty list of edit methods, got {methods!r}",
                              f"set e.g. {k}methods=[ddim_w7.5,di+p2p] (null: every inversion method)")
        for i, m in enumerate(methods):
            if not _edit_method(m):
                raise ConfigError(f"{k}methods[{i}]", f"{m!r} is not an edit method",
                                  "use <inversion>[+p2p[+blend]] (inversion: ddim_w<w>, npi, nti, di) or "
                                  "sdedit_s<strength in (0, 1]>, e.g. nti+p2p+blend")
    att = bench.get("attention_maps")
    if att is not None and not isinstance(att, bool) and not (_edit_method(att) and "+p2p" in str(att)):
        raise ConfigError(k + "attention_maps", f"must be a +p2p method (or true: the first one), got {att!r}",
                          f"set e.g. {k}attention_maps=di+p2p, or null")


TRAINER_KEYS = ("_target_", "log_every_n_steps", "gradient_clip_val", "checkpoint_every")  # steerexp.trainer.Trainer


def _check_trainer(c: dict) -> None:
    for k in ("checkpoint_every", "log_every_n_steps"):
        _check_int(c, f"trainer.{k}", 1, fix=f"set e.g. trainer.{k}=100 (steps)")
    trainer = get(c, "trainer", None)
    if isinstance(trainer, dict) and trainer.get("_target_") == "steerexp.trainer.Trainer":
        unknown = sorted(set(trainer) - set(TRAINER_KEYS))
        if unknown:
            fix = ("progress bars follow the top-level setting: set progress=true|false|auto"
                   if "progress" in unknown[0] else f"drop it; the trainer's settings are {list(TRAINER_KEYS[1:])}")
            raise ConfigError(f"trainer.{unknown[0]}", "is not a setting of steerexp's trainer (steerexp/trainer.py)",
                              fix)
    clip = get(c, "trainer.gradient_clip_val")
    if clip is not _ABSENT and clip is not None and not (_is_number(clip) and clip > 0):
        raise ConfigError("trainer.gradient_clip_val", f"must be a positive number or null, got {clip!r}",
                          "set e.g. trainer.gradient_clip_val=1.0, or null for no clipping")
    threads = get(c, "threads")
    if threads is not _ABSENT and threads != "auto" and not (_is_int(threads) and threads >= 1):
        raise ConfigError("threads", f"must be auto or a positive integer, got {threads!r}",
                          "set threads=auto (1 for a small CPU generator) or e.g. threads=4")
    bars = get(c, "progress")
    if bars is not _ABSENT and str(bars).lower() not in ("auto", "true", "false"):
        raise ConfigError("progress", f"must be auto, true or false, got {bars!r}",
                          "set progress=auto (bars on a terminal), progress=true or progress=false")


# ============================================================================ 3. generator
class GeneratorInfo:
    """What the checks after this one need: the local pipeline folder (None for an unresolved
    hub id), its scheduler's num_train_timesteps, and the tokenizer folder."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.train_timesteps = DEFAULT_TRAIN_TIMESTEPS
        if folder is not None:
            sched = _read_json(folder / "scheduler" / "scheduler_config.json", "generator.path", required=False)
            if isinstance(sched, dict) and _is_int(sched.get("num_train_timesteps")):
                self.train_timesteps = sched["num_train_timesteps"]

    @property
    def tokenizer_folder(self) -> Path | None:
        return self.folder / "tokenizer" if self.folder is not None and (self.folder / "tokenizer").is_dir() else None


def _read_json(path: Path, key: str, required: bool = True) -> Any:
    if not path.is_file():
        if required:
            raise ConfigError(key, f"{path} is missing", "point the setting at a complete folder")
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(
            key, f"{path} is not valid JSON ({err})", "restore that file (re-download or re-export the pipeline)"
        ) from None
    except OSError as err:
        raise ConfigError(key, f"cannot read {path} ({err.strerror or err})", "check the file's permissions") from None


def looks_like_hub_id(value: str) -> bool:
    return (
        value.count("/") == 1
        and not value.startswith((".", "/", "~"))
        and re.fullmatch(r"[\w.\-]+/[\w.\-]+", value) is not None
    )


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub model in the Hugging Face cache, if one was downloaded."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        cache = str(Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
    repo = Path(cache).expanduser() / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snap = repo / "snapshots" / commit
    return snap if (snap / "model_index.json").is_file() else None


def _check_generator(c: dict) -> GeneratorInfo:
    gen = c.get("generator")
    if not isinstance(gen, dict):
        return GeneratorInfo(None)
    path = gen.get("path")
    embedded = gen.get("embedded") or "shapes"
    if embedded not in EMBEDDED:
        raise ConfigError("generator.embedded", f"must be shapes or shapes_flow, got {embedded!r}",
                          "set generator=shapes or generator=shapes_flow (or generator.path to a pipeline folder)")
    if path is None or path == "":
        folder: Path | None = embedded_path(embedded)
    elif not isinstance(path, str):
        raise ConfigError("generator.path", f"must be a folder or a hub id, got {path!r}",
                          "set generator.path=/models/sd-v1-5 or org/name (null: the shipped shapes generator)")
    else:
        local = Path(path).expanduser()
        if local.exists():
            folder = local
        elif looks_like_hub_id(path):
            folder = hub_snapshot(path)  # None: the loader downloads it (or says the hub is unreachable)
        else:
            raise ConfigError(
                "generator.path",
                f"generator folder not found: {local}",
                "set generator.path to a Stable Diffusion pipeline folder (with model_index.json) "
                "or a hub id such as org/name",
            )
    if path is None and not (folder / "model_index.json").is_file():
        stage = {"shapes": "generator", "shapes_flow": "generator_flow"}.get(str(embedded), "generator")
        raise ConfigError("generator.embedded", f"the embedded generator {embedded} is not built: {folder} is missing",
                          f"build it with steerexp-pretrain 'stages=[{stage}]' threads=1 (shapes_flow is not shipped: "
                          "the shipped models stay under 50 MB; it is built into $STEEREXP_BUILT or ~/.cache/steerexp)")
    if folder is not None and (path is None or Path(str(path)).expanduser().exists()):
        check_pipeline_folder(folder)
    device = gen.get("device", "auto")
    _check_device(device)
    dtype = gen.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise ConfigError(
            "generator.dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}", "set generator.dtype=fp32"
        )
    on_cpu = device == "cpu" or device == "auto" and gpu_count() == 0
    if dtype == "fp16" and on_cpu:
        why = "generator.device=auto found no GPU" if device == "auto" else "generator.device=cpu"
        raise ConfigError("generator.dtype", f"fp16 does not run on the CPU ({why})",
                          "set generator.dtype=fp32 (or bf16), or run on a CUDA device")
    return GeneratorInfo(folder)


def _check_family(c: dict, gen: GeneratorInfo) -> None:
    """A pipeline class steerexp supports, and a technique its family can run: one line, before any model loads.
    The sd family (the shapes generator among it) runs every technique, so only other families import the
    technique's class to ask what it needs."""
    if gen.folder is None or _target(c, "generator") != "steerexp.generators.load_generator":
        return
    from steerexp import generators

    index = _read_json(gen.folder / "model_index.json", "generator.path", required=False)
    pipeline_class = index.get("_class_name") if isinstance(index, dict) else None
    if pipeline_class not in generators.FAMILIES:
        supported = ", ".join(generators.FAMILIES)
        raise ConfigError("generator.path", f"holds a {pipeline_class} pipeline, which steerexp does not support",
                          f"use a pipeline of a supported class: {supported}")
    family = generators.FAMILIES[pipeline_class][0]
    if family == "sd":
        return
    generators.check_edit_methods(c.get("evaluator") or {}, family)
    target = _target(c, "technique")
    if not target:
        return
    from hydra.utils import get_class

    why = generators.inapplicable(get_class(target), c.get("technique") or {}, family)
    if why:
        raise ConfigError("technique", why)


def check_pipeline_folder(folder: Path, key: str = "generator.path") -> None:
    """A diffusers pipeline folder: model_index.json and each listed component's config parse, each
    model component has weights, and every safetensors file is complete."""
    if not folder.is_dir():
        raise ConfigError(
            key, f"{folder} is a file, not a pipeline folder", "set it to the folder that holds model_index.json"
        )
    index = _read_json(folder / "model_index.json", key, required=False)
    if index is None:
        raise ConfigError(key, f"{folder} is not a diffusers pipeline folder: model_index.json is missing",
                          "point generator.path at the folder that holds model_index.json")
    if not isinstance(index, dict):
        raise ConfigError(key, f"{folder / 'model_index.json'} is not a JSON object", "restore that file")
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise ConfigError(key, f"{sub} is missing (model_index.json lists the component {name!r})",
                              "restore the folder (re-download or re-export the pipeline)")
        for cfg_file in ("config.json", "scheduler_config.json", "tokenizer_config.json", "special_tokens_map.json"):
            _read_json(sub / cfg_file, key, required=False)
        files = [p for p in sub.iterdir() if p.is_file()]
        if (sub / "config.json").is_file() and not any(
            p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json") for p in files
        ):
            raise ConfigError(key, f"{sub} has a config.json but no weights file", "restore its weights")
        for p in files:
            if p.suffix == ".safetensors":
                check_safetensors(p, key)


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file; ValueError says what is wrong (no tensor is read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is {size} bytes, too short for a safetensors file (truncated)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: its header claims {n} bytes, the file has {size}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise ValueError(f"{path} has a corrupt safetensors header (tensor {name!r} has no data_offsets)")
        end = max(end, offs[1])
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: its header says {8 + n + end} bytes, the file has {size}")
    return header


def check_safetensors(path: Path, key: str) -> dict:
    try:
        return read_safetensors_header(path)
    except ValueError as err:
        raise ConfigError(key, str(err), "re-download or re-export that file") from None
    except OSError as err:
        raise ConfigError(key, f"cannot read {path} ({err.strerror or err})", "check the file") from None


# ---------------------------------------------------------------------------- GPUs without torch
def gpu_count() -> int | None:
    """CUDA GPUs this process can use, found without importing torch: 0 when there surely is none,
    None when it cannot tell (e.g. a ROCm device)."""
    physical = None
    proc = Path("/proc/driver/nvidia/gpus")
    try:
        if proc.is_dir():
            physical = len(list(proc.iterdir()))
        else:
            devs = [p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
            physical = len(devs) if devs or not Path("/dev/nvidiactl").exists() else None
    except OSError:
        physical = None
    if not physical and Path("/dev/kfd").exists():  # AMD ROCm: torch.cuda runs on HIP
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = 0
        for entry in visible.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break  # CUDA stops at the first invalid entry
            n += 1
        return n if physical is None else min(n, physical)
    return physical


def _check_device(device: Any) -> None:
    if not isinstance(device, str) or not re.fullmatch(r"auto|[a-z]+(:\d+)?", device):
        raise ConfigError(
            "generator.device", f"must be auto, cpu, cuda or cuda:<index>, got {device!r}", "set generator.device=auto"
        )
    if not device.startswith("cuda"):
        return
    n = gpu_count()
    if n == 0:
        hint = (
            "CUDA_VISIBLE_DEVICES hides every GPU"
            if os.environ.get("CUDA_VISIBLE_DEVICES") is not None
            else "no NVIDIA GPU or driver was found"
        )
        raise ConfigError("generator.device", f"is {device} but this machine has no usable GPU ({hint})",
                          "set generator.device=cpu (or auto: a GPU when there is one)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if n is not None and index >= n:
        raise ConfigError("generator.device", f"is {device} but only {n} GPU(s) are visible (cuda:0..cuda:{n - 1})",
                          "set generator.device=cuda:0 (or auto)")


def _check_sampling_limits(c: dict, gen: GeneratorInfo) -> None:
    top = gen.train_timesteps
    where = "the scheduler's num_train_timesteps" if gen.folder is not None else "the default num_train_timesteps"
    for key in ("sampling.steps", "technique.train_sampling_steps", "technique.opt_sampling_steps"):
        v = get(c, key)
        if _is_int(v) and v > top:
            raise ConfigError(key, f"is {v}, more than {where} ({top})", f"set {key} in 1..{top} (e.g. 25)")


# ============================================================================ 4. files and folders
def _leaves(node: Any, key: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if isinstance(v, dict):
                yield from _leaves(v, sub)
            else:
                yield sub, v


# (key pattern, kind); the first matching pattern decides
PATH_RULES: tuple[tuple[str, str], ...] = (
    ("scorers.user.path", "classifier_spec"),
    ("scorers.classifier", "classifier_folder"),
    ("*.pretrained", "weights"),
    ("technique.targets.folder", "image_folder"),
    ("technique.targets.files", "image_files"),
    ("technique.targets.manifest", "manifest_file"),
    ("technique.protected", "image_folder"),
    ("technique.exemplars", "folder"),
    ("objective*.image", "image_file"),
    ("evaluator.*prompts", "prompt_file"),
)


def _check_paths(c: dict) -> None:
    for key, value in _leaves(c):
        if value is None or value == "" or key.startswith("hydra."):
            continue
        kind = next((k for pattern, k in PATH_RULES if fnmatchcase(key, pattern)), None)
        if kind is None:
            continue
        if kind == "image_files" and isinstance(value, list):
            if not value:
                raise ConfigError(key, "is an empty list", f"give image paths or a folder, or set {key}=null")
            for i, f in enumerate(value):
                if not isinstance(f, str) or not Path(f).expanduser().is_file():
                    raise ConfigError(f"{key}[{i}]", f"image file not found: {f}", "give existing PNG/JPG files")
            continue
        if not isinstance(value, str):
            continue
        p = Path(value).expanduser()
        CHECKS[kind](key, value, p)


def _classifier_folder(key: str, value: str, p: Path) -> None:
    if not p.is_dir():
        raise ConfigError(
            key,
            f"no concept classifier folder at {p}",
            f"point it at a folder with config.json and model.safetensors, or set {key}=null for the shipped one",
        )
    if not (p / "config.json").is_file():
        raise ConfigError(key, f"{p} has no config.json (a classifier folder has config.json and model.safetensors)",
                          f"point it at a classifier folder, or set {key}=null for the shipped one")
    _read_json(p / "config.json", key)
    if (p / "model.safetensors").is_file():
        check_safetensors(p / "model.safetensors", key)


def _classifier_spec(key: str, value: str, p: Path) -> None:
    """'module.path:factory' or a TorchScript file (see steerexp.scorers.user)."""
    if value.endswith((".pt", ".ts", ".pth")):
        if not p.is_file():
            raise ConfigError(
                key,
                f"TorchScript file not found: {p}",
                f"give an existing .pt/.ts file, 'module.path:factory', or {key}=null for the shipped classifier",
            )
        return
    module, _, attr = value.partition(":")
    if not attr or not module:
        hint = f"no file {p}" if ("/" in value or "." in Path(value).name) else "not 'module.path:factory'"
        raise ConfigError(
            key,
            f"{value!r} is neither a TorchScript file nor 'module.path:factory' ({hint})",
            f"give an existing .pt/.ts file, 'module.path:factory', or {key}=null for the shipped classifier",
        )
    import importlib.util

    top = module.split(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(key, f"module {top!r} (of {value!r}) is not installed or not on the path",
                          "install it, or fix the module path")
    try:
        from steerexp import safety
    except ImportError:
        return
    checker: Callable | None = getattr(safety, "check_callable", None)
    if checker is not None:
        checker(f"{module}.{attr}", key)


def _weights(key: str, value: str, p: Path) -> None:
    if value.endswith((".pt", ".bin", ".safetensors", ".pth")) and not p.is_file():
        raise ConfigError(
            key, f"weights file not found: {p}", f"give an existing file or an open_clip tag, or {key}=null"
        )
    if value.endswith(".safetensors") and p.is_file():
        check_safetensors(p, key)


def _image_folder(key: str, value: str, p: Path) -> None:
    if not p.is_dir():
        raise ConfigError(key, f"image folder not found: {p}", "point it at a folder of PNG/JPG images")
    if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()):
        raise ConfigError(key, f"no PNG/JPG images in {p}", "add some (3-10 is typical)")


def _image_files(key: str, value: str, p: Path) -> None:
    if not p.exists():
        raise ConfigError(key, f"no such folder or file: {p}", "give a folder of PNG/JPG images or a list of files")
    if p.is_dir():
        _image_folder(key, value, p)


def _folder(key: str, value: str, p: Path) -> None:
    if not p.is_dir():
        raise ConfigError(key, f"folder not found: {p}", f"point it at a folder of PNG/JPG images, or {key}=null")


def _image_file(key: str, value: str, p: Path) -> None:
    if not p.is_file():
        raise ConfigError(key, f"image not found: {p}", "give an existing PNG/JPG file")


def _manifest_file(key: str, value: str, p: Path) -> None:
    if not p.is_file():
        raise ConfigError(key, f"edit manifest not found: {p}",
                          "give a CSV (header: image,source,target[,mask]) or a JSON list of such rows, or "
                          f"{key}=null")


def _prompt_file(key: str, value: str, p: Path) -> None:
    if not p.is_file():
        raise ConfigError(key, f"prompt file not found: {p}",
                          f"give a text file (one prompt per line), a list of prompts, or {key}=null")


CHECKS: dict[str, Callable[[str, str, Path], None]] = {
    "classifier_folder": _classifier_folder,
    "classifier_spec": _classifier_spec,
    "weights": _weights,
    "image_folder": _image_folder,
    "image_files": _image_files,
    "folder": _folder,
    "image_file": _image_file,
    "prompt_file": _prompt_file,
    "manifest_file": _manifest_file,
}


# ============================================================================ 5. checkpoints
class _Stub:
    """Stands for anything the checkpoint builds that we do not need (storages, devices)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        pass


class TensorStub:
    """A tensor read from a checkpoint: only its shape (its data is never read)."""

    def __init__(self, shape):
        self.shape = tuple(int(s) for s in shape)

    def __repr__(self):
        return f"TensorStub{self.shape}"


def _rebuild_tensor(storage, offset, size, stride, *rest):
    return TensorStub(size)


def _rebuild_parameter(data, *rest):
    return data


_TORCH_DTYPES = {
    "float16",
    "float32",
    "float64",
    "bfloat16",
    "half",
    "float",
    "double",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "bool",
    "complex64",
    "complex128",
    "long",
    "int",
}
_SAFE_BUILTINS = {
    "set": set,
    "frozenset": frozenset,
    "list": list,
    "dict": dict,
    "tuple": tuple,
    "int": int,
    "float": float,
    "complex": complex,
    "bool": bool,
    "str": str,
    "bytes": bytes,
    "bytearray": bytearray,
    "slice": slice,
    "range": range,
}


class CheckpointUnpickler(pickle.Unpickler):
    """Reads a Lightning checkpoint's data.pkl with only what such a file needs: plain containers,
    OrderedDict, and torch's tensor/parameter rebuild functions and storage types mapped to stubs.
    Everything else is refused (pickle.UnpicklingError): nothing from the file ever runs."""

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if module == "_codecs" and name == "encode":  # how protocol 2 writes bytes
            return lambda text, encoding="latin1": text.encode(encoding)
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and (name.endswith("Storage") or name == "device"):
            return _Stub
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and name in _TORCH_DTYPES:
            return f"torch.{name}"
        raise pickle.UnpicklingError(f"refused {module}.{name}")

    def persistent_load(self, pid):
        return _Stub(pid)


def read_checkpoint_info(path: Path) -> dict | None:
    """The "steerexp" record of a checkpoint ({technique, structure, deltas}), without torch and
    without running any code from the file; None when the file has none or cannot be read safely."""
    if path.suffix == ".safetensors":
        meta = read_safetensors_header(path).get("__metadata__") or {}
        if "technique" not in meta:
            return None
        structure = meta.get("structure")
        try:
            structure = json.loads(structure) if isinstance(structure, str) else structure
        except ValueError:
            structure = None
        return {"technique": meta["technique"], "structure": structure if isinstance(structure, dict) else {}}
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not names:
                return None
            data = zf.read(min(names, key=len))
    except (zipfile.BadZipFile, OSError, KeyError):
        return None  # a legacy (non-zip) torch file: the load itself checks it
    import io

    try:
        obj = CheckpointUnpickler(io.BytesIO(data)).load()
    except Exception:  # refused or malformed: skip the deep check, never run anything
        return None
    info = obj.get("steerexp") if isinstance(obj, dict) else None
    return info if isinstance(info, dict) and "technique" in info else None


def _same(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _fmt(v: Any) -> str:
    return (
        json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) or v is None else str(v)
    )


def _check_checkpoint(c: dict) -> None:
    ckpt = c.get("ckpt_path")
    if ckpt is None or ckpt == "":
        return
    if not isinstance(ckpt, str):
        raise ConfigError(
            "ckpt_path", f"must be a file path, got {ckpt!r}", "set ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    p = Path(ckpt).expanduser()
    if not p.is_file():
        what = "is a folder, not a checkpoint file" if p.is_dir() else "does not exist"
        raise ConfigError("ckpt_path", f"{p} {what}",
                          "set ckpt_path=<run dir>/checkpoints/last.ckpt, or ckpt_path=null to start fresh")
    try:
        info = read_checkpoint_info(p)
    except ValueError as err:  # a broken safetensors file
        raise ConfigError("ckpt_path", str(err), "use another checkpoint") from None
    except OSError as err:
        raise ConfigError("ckpt_path", f"cannot read {p} ({err.strerror or err})", "check the file") from None
    if info is None:
        return
    tech = c.get("technique") or {}
    want = str(tech.get("_target_", ""))
    have = str(info.get("technique", ""))
    if want and have and have != want:
        raise ConfigError("ckpt_path", f"{p} was trained with technique {have}, this run uses {want}",
                          "choose the technique it was trained with, or another checkpoint")
    structure = info.get("structure") or {}
    if not isinstance(structure, dict):
        return
    for k, v in structure.items():
        mine = get(tech, str(k))
        if mine is _ABSENT:
            continue
        if not _same(mine, v):
            raise ConfigError(
                f"technique.{k}",
                f"the checkpoint was trained with technique.{k}={_fmt(v)}, this run has {_fmt(mine)}",
                f"set technique.{k}={_fmt(v)} or use another checkpoint",
            )


# ============================================================================ 6. prompts vs the tokenizer
class SlotTokenizer:
    """The generator's CLIP tokenizer through the `tokenizers` library (tokenizer.json, or
    vocab.json + merges.txt built as transformers' CLIPTokenizer builds them), no padding, no
    truncation; `max_length` as the generator uses it."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.folder = folder
        tj = folder / "tokenizer.json"
        try:
            if tj.is_file():
                tok = Tokenizer.from_file(str(tj))
            elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                tok = self._from_vocab(folder)
            else:
                raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt")
        except Exception as err:
            raise ConfigError(
                "generator.path",
                f"cannot read the tokenizer in {folder}: {str(err).splitlines()[0]}",
                "restore the tokenizer files (re-download or re-export the pipeline)",
            ) from None
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok
        self.max_length = self._max_length(folder)

    @staticmethod
    def _from_vocab(folder: Path):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        special = _read_json(folder / "special_tokens_map.json", "generator.path", required=False) or {}
        conf = _read_json(folder / "tokenizer_config.json", "generator.path", required=False) or {}

        def tok_str(name, default):
            v = conf.get(name) or special.get(name) or default
            return v.get("content", default) if isinstance(v, dict) else str(v)

        bos, eos = tok_str("bos_token", "<|startoftext|>"), tok_str("eos_token", "<|endoftext|>")
        unk = tok_str("unk_token", "<|endoftext|>")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(ln.split()) for ln in lines if ln and not ln.startswith("#version") and len(ln.split()) == 2]
        tok = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=unk,
            )
        )
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(
                    Regex(
                        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                    ),
                    behavior="removed",
                    invert=True,
                ),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([bos, eos, unk])
        tok.post_processor = processors.RobertaProcessing(
            (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)), trim_offsets=False, add_prefix_space=False
        )
        return tok

    @staticmethod
    def _max_length(folder: Path) -> int:
        conf = _read_json(folder / "tokenizer_config.json", "generator.path", required=False) or {}
        n = conf.get("model_max_length")
        if _is_number(n) and 0 < n < 1_000_000:
            return int(n)
        enc = _read_json(folder.parent / "text_encoder" / "config.json", "generator.path", required=False) or {}
        n = enc.get("max_position_embeddings")
        return int(n) if _is_int(n) and n > 0 else DEFAULT_MAX_TOKENS

    def in_vocab(self, word: str) -> bool:
        """As FrozenGenerator.add_tokens decides that a placeholder is taken."""
        return any(self.tok.token_to_id(w) is not None for w in (word, f"{word}</w>", word.lower() + "</w>"))

    def add_tokens(self, tokens: list[str]) -> None:
        self.tok.add_tokens(list(tokens))

    def n_tokens(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def slot_end(self, template: str, fill: str) -> tuple[int, int]:
        """(index of the slot's last token, total tokens) for template with '{}' -> fill; indices
        count the start token, as in the generator's input ids."""
        at = template.index("{}")
        text = template[:at] + fill + template[at + 2 :]
        lo, hi = at, at + len(fill)
        enc = self.tok.encode(text)
        last = -1
        for i, (offs, special) in enumerate(zip(enc.offsets, enc.special_tokens_mask)):
            if not special and offs[0] < hi and offs[1] > lo:
                last = i
        return last, len(enc.ids)


def slot_tokenizer(folder: Path, added: tuple[str, ...] = ()) -> SlotTokenizer:
    """A SlotTokenizer with `added` tokens, cached per folder (a sweep or a test suite loads it once)."""
    try:
        stamp = max(p.stat().st_mtime_ns for p in folder.iterdir())
    except (OSError, ValueError):
        stamp = 0
    return _cached_tokenizer(str(folder), stamp, added)


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(folder: str, stamp: int, added: tuple[str, ...]) -> SlotTokenizer:
    tok = SlotTokenizer(Path(folder))
    if added:
        tok.add_tokens(list(added))
    return tok


def _fills(c: dict) -> dict[str, str] | None:
    """What fills '{}' in evaluation prompts, by name; None when '{}' is not a plain word."""
    tech = c.get("technique") or {}
    kind = technique_kind(c)
    if kind == "slot":
        placeholder, n = str(tech.get("placeholder", "<v*>")), tech.get("num_vectors", 1)
        n = n if _is_int(n) and n >= 1 else 1
        tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, n)]
        return {"technique.slot_word": str(tech.get("slot_word", "")), "the learned token(s)": " ".join(tokens)}
    if kind == "inversion":
        return None
    return {"technique.slot_word": str(tech.get("slot_word", "object"))}


def _check_prompt_lengths(c: dict, gen: GeneratorInfo, warnings: list[str]) -> None:
    folder = gen.tokenizer_folder
    prompts = get(c, "eval.prompts")
    if folder is None or not isinstance(prompts, list):
        return
    fills = _fills(c)
    if fills is None:
        return
    tech = c.get("technique") or {}
    kind = technique_kind(c)
    lists = [("eval.prompts", prompts)]
    if kind == "slot":
        learned = fills["the learned token(s)"].split()
        base = slot_tokenizer(folder)
        for token in learned:
            if base.in_vocab(token):
                raise ConfigError("technique.placeholder", f"{token!r} is already in the tokenizer's vocabulary",
                                  f"choose a string the vocabulary lacks, such as '<{token.strip('<>')}-new>'")
        init = tech.get("initializer")
        if isinstance(init, str) and init and (n := base.n_tokens(init)) != 1:
            raise ConfigError("technique.initializer", f"{init!r} splits into {n} tokens; it must be a single token",
                              "pick a one-token word such as 'object'")
        tok = slot_tokenizer(folder, tuple(learned))
        if isinstance(tech.get("templates"), list):
            lists.append(("technique.templates", tech["templates"]))
    else:
        tok = slot_tokenizer(folder)
    limit = tok.max_length
    for key, plist in lists:
        for i, p in enumerate(plist):
            if not isinstance(p, str):
                continue
            if kind != "slot" or "{}" not in p:
                fill = next(iter(fills.values()))
                total = tok.n_tokens(p.replace("{}", fill)) + 2
                if total > limit:
                    warnings.append(
                        f"{key}[{i}]: {_short(p)} is {total} tokens, longer than the tokenizer's "
                        f"{limit}; the words after token {limit - 2} are dropped"
                    )
                continue
            total = 0
            for what, fill in fills.items():
                if key == "technique.templates" and what != "the learned token(s)":
                    continue
                last, n = tok.slot_end(p, fill)
                total = max(total, n)
                if last > limit - 2:
                    raise ConfigError(
                        f"{key}[{i}]",
                        f"{_short(p)} puts its '{{}}' slot (filled with {what} "
                        f"{fill!r}) at token {last}, past the tokenizer's {limit}-token limit, so the "
                        "concept is cut off and the edit vanishes",
                        "shorten the prompt or move '{}' nearer the start",
                    )
            if total > limit:
                warnings.append(
                    f"{key}[{i}]: {_short(p)} is {total} tokens with its slot filled, longer than the "
                    f"tokenizer's {limit}; the words after token {limit - 2} are dropped"
                )


# ============================================================================ group overrides, before Hydra composes
def config_groups(dirs: Iterable[Path]) -> dict[str, set[str]]:
    """group -> its options (yaml files, without suffix) in the given config folders."""
    groups: dict[str, set[str]] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for sub in d.iterdir():
            if sub.is_dir() and not sub.name.startswith((".", "_")):
                opts = groups.setdefault(sub.name, set())
                opts.update(p.relative_to(sub).with_suffix("").as_posix() for p in sub.rglob("*.yaml"))
    return groups


def _option_strings(value: Any) -> Iterable[str] | None:
    """The option names in an override's value (a name, a list, or a sweep of them); None when the
    value is not plain (a range, a glob, an interpolation)."""
    from hydra.core.override_parser.types import ChoiceSweep, Sweep

    if isinstance(value, ChoiceSweep):
        out = []
        for v in value.list:
            sub = _option_strings(v)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if isinstance(value, Sweep):
        return None
    if value is None:
        return []
    if isinstance(value, str):
        return None if "${" in value else [value]
    if isinstance(value, list):
        out = []
        for v in value:
            sub = _option_strings(v)
            if sub is None:
                return None
            out.extend(sub)
        return out
    return [str(value)]


def check_group_overrides(argv: list[str]) -> None:
    """Before Hydra composes: every `group=option` (also `group=[a,b]`, `+group=...`, sweeps
    `group=a,b`) on the command line names a file in conf/<group>/ (or --config-dir)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return
    if args.help or args.hydra_help or not args.overrides:
        return
    dirs = [conf_dir()]
    if args.config_dir:
        dirs.append(Path(args.config_dir).expanduser())
    if args.config_path or any(o.lstrip("+~").startswith("hydra.searchpath") for o in args.overrides):
        return  # another primary config or search path: Hydra knows its groups
    groups = config_groups(dirs)
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:
        return  # Hydra reports syntax errors itself
    for ov in overrides:
        if ov.is_delete():
            continue
        group = ov.key_or_group
        if group not in groups:
            continue
        names = _option_strings(ov.value())
        for name in names or []:
            if name not in groups[group]:
                options = ", ".join(sorted(groups[group])) or "(none)"
                raise ConfigError(group, f"no option {name!r} in conf/{group}/", f"choose from: {options}")
