"""Validate the whole composed config before anything heavy is imported or loaded.

`steerexp` calls `validate(cfg)` first thing in its job (and `check_group_overrides(argv)` before
Hydra composes), so a wrong setting costs about a second instead of the 8-11 s of imports and
model loading, or a whole training run, that it cost before. Every problem is one `ConfigError`
that names the key and the fix; the CLI prints it as one line.

What is checked, cheapest first:

1. every value resolves (no `???`, no broken `${...}`), and `_target_`s pass `steerexp.safety`;
2. plain values: seeds (every seed of the config an integer in 0..MAX_SEED), eval.prompts /
   eval.seeds (non-empty lists of at most MAX_LIST entries), prompts without control characters
   (a newline), the `{}` slot of prompt templates (exactly one for textual inversion, no other
   format fields), sampling steps and guidance scale, learning rates, batch sizes, step counts,
   trainer intervals, the placeholder token;
3. the generator (steerexp.generators.checks): its folder (model_index.json and component configs
   parse, safetensors files are complete) or hub id, the device (a GPU is looked for without
   importing torch), dtype, and height / width (positive, divisible by the VAE factor and the family's
   latent patches, within its limit); then sampling steps against the scheduler's num_train_timesteps;
4. every file or folder setting (scorers.*: classifiers, a user's model, CLIP weights; target
   images, objective images, prompt files): user images from their headers (a regular file, not
   a FIFO or a device; images.min_side, images.max_aspect, images.max_pixels; at most
   images.MAX_IMAGES per setting: steerexp.images' file checks);
5. `ckpt_path`: a regular file, and (from its JSON sidecar or safetensors header: nothing is unpickled) was
   trained with this technique and the same delta-shaping settings; a deltas.safetensors also
   holds floating-point, finite values of a sane size (MAX_DELTA_NORM) and, for textual
   inversion, rows as wide as this generator's token embeddings;
6. prompts against the generator's tokenizer (the `tokenizers` library on the folder's files,
   exactly as transformers' CLIPTokenizer splits): a `{}` slot cut off by the tokenizer's
   length is an error, a prompt truncated after its slot a warning.

Nothing here imports torch, lightning, diffusers or transformers.
"""
from __future__ import annotations

import functools
import json
import math
import re
import string
import struct
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from steerexp import ASSETS, combine, conf_dir, spec
from steerexp import scorer_kinds as kinds
from steerexp.errors import ConfigError, shorten
from steerexp.generators.checks import (GeneratorInfo, check_family, check_generator,  # (no torch import)
                                       check_safetensors, read_json, read_safetensors_header, text_encoder_widths)

DEFAULT_MAX_TOKENS = 77
_ABSENT = object()
# Every seed is an integer in 0..MAX_SEED: numpy's legacy seeding takes no more, and the seeds derived from it
# (seed * 1000 + r, seed * 1_000_003 + step) stay inside torch's 64-bit range.
MAX_SEED = 2**32 - 1
# eval.seeds, eval.prompts and a technique's seed lists hold at most this many entries (200,000 evaluation seeds
# ran for minutes without a line of output; 10,000 seeds x 8 prompts is already 160,000 images)
MAX_LIST = 10_000
# a checkpoint's deltas: the largest row norm (over the last dimension, as metrics.json's delta_norm/*) allowed.
# Token embeddings have norms near 1, latents about sqrt(width); 1e4 is far above any edit and below nonsense (1e30)
MAX_DELTA_NORM = 1e4
MAX_VALUE_CHECK_BYTES = 256 * 2**20  # deltas files up to this size have their values read here (bigger: at load)

# techniques whose '{}' carries the edit: the baseline fills it with a word, the edit with learned tokens
SLOT_EDIT_TECHNIQUES = ("steerexp.techniques.textual_inversion.",)


# ============================================================================ entry points
def validate(cfg: DictConfig) -> list[str]:
    """Check the composed config; raise the first problem as a ConfigError. Returns warnings
    (one line each) for things that run but probably not as meant."""
    cfg = combine.expanded(cfg)  # what the run will run: objective=auto, the evaluators the technique decides
    c = plain(cfg)
    warnings: list[str] = []
    _check_targets(cfg)
    _check_values(c)
    gen = check_generator(c)
    check_family(c, gen)
    _check_parts(cfg, gen)
    _check_sampling_limits(c, gen)
    _check_paths(c)
    _check_checkpoint(c, gen)
    _check_prompt_lengths(c, gen, warnings)
    return warnings


def facts_of(c: dict, gen: "GeneratorInfo") -> spec.Facts:
    """What the specs may know about the generator (steerexp/spec.py)."""
    family = None
    if gen.folder is not None:
        index = read_json(gen.folder / "model_index.json", "generator.path", required=False)
        from steerexp import generators

        name = index.get("_class_name") if isinstance(index, dict) else None
        family = generators.FAMILIES.get(name, (None,))[0]
    # no path: an embedded generator (load_generator's default is shapes, which conf/generator/shapes.yaml keeps)
    embedded = (get(c, "generator.embedded", None) or "shapes") if get(c, "generator.path", None) is None else None
    return spec.Facts(family=family, folder=gen.folder, embedded=embedded, num_train_timesteps=gen.train_timesteps)


def _check_parts(cfg: DictConfig, gen: "GeneratorInfo") -> None:
    """Every part's own rules, from its spec (steerexp/spec.py): the technique, each objective term, each
    evaluator."""
    facts = facts_of({"generator": OmegaConf.to_container(cfg.generator, resolve=True)}, gen)
    steps, table = OmegaConf.select(cfg, "sampling.steps", default=None), cfg.get("scorers")
    facts.sampling_steps = steps if _is_int(steps) else None
    facts.scorers = kinds.table(OmegaConf.to_container(table, resolve=True) if isinstance(table, DictConfig) else {})
    nodes = [("technique", cfg.get("technique")), ("trainer", cfg.get("trainer")), ("guider", cfg.get("guider"))]
    objective = cfg.get("objective")
    if isinstance(objective, DictConfig) and isinstance(objective.get("terms"), DictConfig):
        nodes += [(f"objective.terms.{k}", objective.terms[k]) for k in objective.terms]
    evaluators = cfg.get("evaluator")
    if isinstance(evaluators, DictConfig):
        nodes += [(f"evaluator.{k}", evaluators[k]) for k in evaluators]
    specs = {key: spec.check_node(node, key, facts) for key, node in nodes if node is not None}
    combine.check(specs, facts, cfg)  # across parts: what the technique cannot use (steerexp/combine.py)
    if cfg.get("guider") is not None:  # the guidance technique's own CFG knobs vs a guider (steerexp/guider_spec.py)
        from steerexp.guider_spec import check_with_technique

        check_with_technique(*(OmegaConf.to_container(cfg[k], resolve=True) if cfg.get(k) is not None else None
                               for k in ("guider", "technique", "evaluator")))


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
    cls = technique_spec(c)  # invertible: '{}' is each target image's source prompt (inversion of real images)
    if cls.invertible if cls is not None else isinstance(tech.get("targets"), dict) and "files" in tech["targets"]:
        return "inversion"
    return "fill"


def technique_spec(c: dict) -> type | None:
    """The spec class of the run's technique (the registered spec with its _target_), or None."""
    t = _target(c, "technique")
    return next((cls for cls in spec.registered("technique").values() if getattr(cls, "_target_", None) == t), None)


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
    if seed is not _ABSENT:
        _check_seed("seed", seed, "set e.g. seed=0")
    _check_eval(c)
    _check_all_seeds(c)
    _check_control_characters(c)
    _check_sampling(c)
    _check_technique(c)
    _check_trainer(c)
    _check_listed_entries(c)
    _check_scorers(c)


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


FOLDER_KINDS = {"classifier": "an image classifier", "noisy": "a timestep-aware classifier (noisy latents)"}


_scorer_kind = kinds.kind   # (steerexp/scorer_kinds.py)


def _check_model_folders(c: dict) -> None:
    """A classifier or noisy scorer is a folder: `path`, or `asset` (a folder shipped in steerexp/assets)."""
    for name, entry in (get(c, "scorers", None) or {}).items():
        kind, key = _scorer_kind(name, entry), f"scorers.{name}"
        if kind not in FOLDER_KINDS or not isinstance(entry, dict):
            continue
        if entry.get("path") and entry.get("asset"):
            raise ConfigError(key, "gives both path and asset", f"keep one: {key}.path=<folder> or {key}.asset=<name>")
        if entry.get("asset"):
            folder = ASSETS / str(entry["asset"])
            shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())
            if not (folder / "config.json").is_file():
                raise ConfigError(f"{key}.asset", f"no shipped model {entry['asset']!r}",
                                  f"choose one of {shipped}, or give {key}.path=<folder>")
        elif entry.get("path"):
            folder = Path(str(entry["path"])).expanduser()
            _classifier_folder(f"{key}.path", str(entry["path"]), folder)
        else:
            continue
        found = read_json(folder / "config.json", key)
        found = found.get("kind", "classifier") if isinstance(found, dict) else "classifier"
        if found != kind and found in FOLDER_KINDS:
            raise ConfigError(key, f"is kind {kind} but {folder.name} holds {FOLDER_KINDS[found]}",
                              f"set {key}.kind={found}, or point it at {FOLDER_KINDS[kind]}")


def _non_empty_list(value: Any, key: str, what: str, why_empty: str, fix: str) -> None:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list of {what}, got {_short(repr(value))}", fix)
    if not value:
        raise ConfigError(key, f"is empty: {why_empty}", fix)
    _check_list_cap(key, value, what)


def _check_list_cap(key: str, value: list, what: str) -> None:
    if len(value) > MAX_LIST:
        raise ConfigError(key, f"holds {len(value)} {what}, over the limit of {MAX_LIST}",
                          f"use at most {MAX_LIST} (split a bigger evaluation into several runs: a sweep over "
                          "seed ranges)")


def _check_seed(key: str, value: Any, fix: str) -> None:
    """An integer in 0..MAX_SEED (not a bool, not a float, not above 2**32 - 1)."""
    if not _is_int(value):
        raise ConfigError(key, f"must be an integer in 0..{MAX_SEED} (2**32-1), got {_short(repr(value))}", fix)
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(key, f"must be an integer in 0..{MAX_SEED} (2**32-1), got {shorten(str(value), 60)}", fix)


def _is_seed_key(name: str) -> bool:
    return name == "seed" or name.endswith("seeds")


def _check_all_seeds(c: dict) -> None:
    """Every `seed` and `*seeds` setting of the config (technique.seed, technique.train_seeds,
    technique.targets.seed, evaluator.edit_bench.seed...): integers in 0..MAX_SEED (null where a default applies),
    lists of at most MAX_LIST."""
    def walk(node: Any, key: str) -> None:
        if not isinstance(node, dict):
            return
        for k, v in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if isinstance(v, dict):
                walk(v, sub)
                continue
            if not _is_seed_key(str(k)) or v is None or sub in ("seed", "eval.seeds"):
                continue
            fix = f"set e.g. {sub}=0" if k == "seed" else f"set e.g. {sub}=[0,1,2,3]"
            if str(k) == "seed":
                _check_seed(sub, v, fix)
            elif isinstance(v, list):
                _check_list_cap(sub, v, "seeds")
                for i, s_ in enumerate(v):
                    _check_seed(f"{sub}[{i}]", s_, fix)
            elif not isinstance(v, str):  # a string: an option of its own (e.g. 'eval'), read by its technique
                _check_seed(sub, v, fix)

    walk({k: v for k, v in c.items() if k != "hydra"}, "")


# prompt-like settings: their keys' last part matches this (prompts, templates, the slot word, edit words...)
_PROMPT_KEY = re.compile(r"prompt|template|slot_word|initializer|placeholder|replace|words|negative|caption")
PROMPT_FIX = "write each prompt on one line, a space instead of the newline, tab or other control character"
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _control_problem(text: str) -> str | None:
    m = _CONTROL_CHARS.search(text)
    if m is None:
        return None
    ch = m.group()
    name = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab"}.get(ch, "a control character")
    return f"{_short(text)} holds {name} ({ch.encode('unicode_escape').decode()}) at character {m.start()}"


def _check_control_characters(c: dict) -> None:
    """No prompt, template or prompt word holds a control character: a newline in a prompt splits the lines of
    the run's logs, tables and labels (and the tokenizer reads it as a space), so it is never what was meant."""
    def check(key: str, v: Any) -> None:
        if isinstance(v, str):
            problem = _control_problem(v)
            if problem:
                raise ConfigError(key, problem, PROMPT_FIX)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                check(f"{key}[{i}]", x)
        elif isinstance(v, dict):
            for k, x in v.items():
                check(f"{key}.{k}", x)

    for key, value in _leaves({k: c.get(k) for k in ("eval", "technique", "evaluator", "objective", "concept")
                               if isinstance(c.get(k), dict)}):
        if _PROMPT_KEY.search(key.rsplit(".", 1)[-1]):
            check(key, value)


def _check_eval(c: dict) -> None:
    ev = c.get("eval")
    if not isinstance(ev, dict):
        return
    seeds = ev.get("seeds", _ABSENT)
    if seeds is not _ABSENT:
        _non_empty_list(seeds, "eval.seeds", "seeds", "the paired comparison needs at least one seed",
                        "set e.g. eval.seeds=[0,1,2,3]")
        for i, s in enumerate(seeds):
            _check_seed(f"eval.seeds[{i}]", s, "set e.g. eval.seeds=[0,1,2,3]")
    prompts = ev.get("prompts", _ABSENT)
    if prompts is not _ABSENT:
        _non_empty_list(prompts, "eval.prompts", "prompts", "give at least one prompt template",
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
            problem = _control_problem(p)  # (a prompt file's lines; the config's own prompts are checked earlier)
            if problem:
                raise ConfigError(f"{key}[{i}]", problem, PROMPT_FIX)
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
    """The generic checks of a technique WITHOUT a spec (a researcher's own, outside the package): common keys by
    name. A technique with a spec (every shipped one) owns its rules (steerexp/spec.py) and skips these."""
    tech = c.get("technique")
    if not isinstance(tech, dict) or technique_spec(c) is not None:
        return
    t = "technique."
    for k in ("opt_sampling_steps",):
        if tech.get(k) is not None:  # opt_sampling_steps: null = sampling.steps
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
        "inner_steps",
        "max_calls",
    ):
        if tech.get(k) is not None:
            _check_int(c, t + k, 1)
    if "steps" in tech:
        _check_int(c, t + "steps", 0, fix=f"set e.g. {t}steps=100 (0 = no training)")
    for k in ("opt_steps", "rounds"):
        if tech.get(k) is not None and not isinstance(tech[k], dict):
            _check_int(c, t + k, 0)
    # (technique.seed, .seeds, .train_seeds: _check_all_seeds)
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


def _check_trainer(c: dict) -> None:
    """What the trainer's own rules (trainer_spec.py) cannot see: the precision against the generator's device, the
    batch against accumulation x devices; and the run-wide threads and progress settings."""
    trainer = get(c, "trainer", None)
    if isinstance(trainer, dict):
        precision, acc = str(trainer.get("precision", "")), str(trainer.get("accelerator", "auto")).lower()
        on_cpu = acc == "cpu" or (acc == "auto" and str(get(c, "generator.device", "")).lower() == "cpu")
        if precision in ("16-mixed", "16") and on_cpu:
            raise ConfigError("trainer.precision", "16-mixed needs CUDA (its GradScaler); this run trains on the CPU",
                              "set trainer.precision=bf16-mixed on the CPU (or train on a GPU)")
        devices, accumulate = trainer.get("devices", 1), trainer.get("accumulate_grad_batches", 1)
        world = devices if _is_int(devices) and devices > 0 else len(devices) if isinstance(devices, list) else 1
        batch = get(c, "technique.batch_size", None)
        if _is_int(accumulate) and accumulate > 0 and _is_int(batch) and batch % (accumulate * world):
            raise ConfigError("trainer.accumulate_grad_batches", f"technique.batch_size={batch} (the batch of one "
                              f"optimizer step) does not split into {accumulate} micro-batches x {world} devices",
                              f"set technique.batch_size to a multiple of {accumulate * world}")
    threads = get(c, "threads")
    if threads is not _ABSENT and threads != "auto" and not (_is_int(threads) and threads >= 1):
        raise ConfigError("threads", f"must be auto or a positive integer, got {threads!r}",
                          "set threads=auto (1 for a small CPU generator) or e.g. threads=4")
    bars = get(c, "progress")
    if bars is not _ABSENT and str(bars).lower() not in ("auto", "true", "false"):
        raise ConfigError("progress", f"must be auto, true or false, got {bars!r}",
                          "set progress=auto (bars on a terminal), progress=true or progress=false")


# ============================================================================ 3. generator
# (its folder, device and dtype: steerexp.generators.checks; the scheduler's limits here)
def _check_sampling_limits(c: dict, gen: GeneratorInfo) -> None:
    top = gen.train_timesteps
    where = "the scheduler's num_train_timesteps" if gen.folder is not None else "the default num_train_timesteps"
    for key in ("sampling.steps", "technique.opt_sampling_steps"):
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


IMAGE_KINDS = ("image_folder", "image_files", "folder", "image_file")  # their checks take the images policy too


def _policy_of(c: dict):
    """The run's steerexp.images.ImagePolicy (conf/config.yaml: images); a bad setting is its ConfigError."""
    from steerexp import images

    return images.ImagePolicy.from_config(c.get("images"))  # the same policy run.build makes


def _check_paths(c: dict) -> None:
    pol = None
    for key, value in _leaves(c):
        if value is None or value == "" or key.startswith("hydra."):
            continue
        kind = next((k for pattern, k in PATH_RULES if fnmatchcase(key, pattern)), None)
        if kind is None:
            continue
        if kind in IMAGE_KINDS:
            from steerexp import images  # PIL and numpy (no torch), only when a config names images

            if pol is None:
                pol = _policy_of(c)
            if kind == "image_files" and isinstance(value, list):
                images.check_image_list(key, value, pol)
            elif isinstance(value, str):
                images.FILE_CHECKS[kind](key, value, Path(value).expanduser(), pol)
        elif isinstance(value, str):
            CHECKS[kind](key, value, Path(value).expanduser())


def _regular_file(key: str, p: Path, missing: str, fix: str) -> None:
    """steerexp.images.check_regular_file (os.stat alone: nothing is opened), imported when a path is checked."""
    from steerexp.images import check_regular_file

    check_regular_file(key, p, missing, fix)


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
    read_json(p / "config.json", key)
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
    if value.endswith((".pt", ".bin", ".safetensors", ".pth")):
        _regular_file(key, p, "weights file not found", f"give an existing file or an open_clip tag, or {key}=null")
    if value.endswith(".safetensors") and p.is_file():
        check_safetensors(p, key)


def _manifest_file(key: str, value: str, p: Path) -> None:
    _regular_file(key, p, "edit manifest not found",
                  f"give a CSV (header: image,source,target[,mask]) or a JSON list of such rows, or {key}=null")


def _prompt_file(key: str, value: str, p: Path) -> None:
    _regular_file(key, p, "prompt file not found",
                  f"give a text file (one prompt per line), a list of prompts, or {key}=null")


# the other kinds (IMAGE_KINDS) are steerexp.images.FILE_CHECKS, which take the images policy too
CHECKS: dict[str, Callable[..., None]] = {
    "classifier_folder": _classifier_folder,
    "classifier_spec": _classifier_spec,
    "weights": _weights,
    "prompt_file": _prompt_file,
    "manifest_file": _manifest_file,
}


# ============================================================================ 5. checkpoints
def read_checkpoint_info(path: Path) -> dict | None:
    """The "steerexp" record of a checkpoint ({technique, structure, deltas}), without torch and without unpickling
    anything; None when it has none. A .ckpt's record is its JSON sidecar (`<ckpt>.json`, written beside every
    checkpoint by steerexp.trainer.Sidecar); a deltas.safetensors' is its header's metadata. A checkpoint without
    a sidecar (written before the sidecar existed) is checked where it loads (torch.load(weights_only=True), then
    techniques.base.check_compatible): the same one-line errors, after the model has loaded."""
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
        info = json.loads(Path(f"{path}.json").read_text()).get("steerexp")
    except (ValueError, OSError, AttributeError):
        return None
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


def _check_checkpoint(c: dict, gen: GeneratorInfo | None = None) -> None:
    ckpt = c.get("ckpt_path")
    if ckpt is None or ckpt == "":
        return
    if not isinstance(ckpt, str):
        raise ConfigError(
            "ckpt_path", f"must be a file path, got {ckpt!r}", "set ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    p = Path(ckpt).expanduser()
    fix = "set ckpt_path=<run dir>/checkpoints/last.ckpt, or ckpt_path=null to start fresh"
    if p.is_dir():
        raise ConfigError("ckpt_path", f"{p} is a folder, not a checkpoint file", fix)
    _regular_file("ckpt_path", p, "no such checkpoint file", fix)  # a FIFO or /dev/zero is never opened
    try:
        info = read_checkpoint_info(p)
    except ValueError as err:  # a broken safetensors file
        raise ConfigError("ckpt_path", str(err), "use another checkpoint") from None
    except OSError as err:
        raise ConfigError("ckpt_path", f"cannot read {p} ({err.strerror or err})", "check the file") from None
    if info is None:  # no steerexp record (a file of other origin): a safetensors' values and shapes are still read
        if p.suffix == ".safetensors":
            _check_delta_values(p)
            _check_delta_shapes(c, p, {}, gen)
        return
    tech = c.get("technique") or {}
    want = str(tech.get("_target_", ""))
    have = str(info.get("technique", ""))
    if want and have and have != want:
        raise ConfigError("ckpt_path", f"{p} was trained with technique {have}, this run uses {want}",
                          "choose the technique it was trained with, or another checkpoint")
    structure = info.get("structure") or {}
    if isinstance(structure, dict):
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
    if p.suffix == ".safetensors":
        _check_delta_values(p)
    _check_delta_shapes(c, p, info, gen)


# safetensors dtypes of deltas (floating point) and how numpy reads them (BF16: by hand; F8: not read here)
_FLOAT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": None, "F8_E4M3": None, "F8_E5M2": None}


def _check_delta_values(p: Path) -> None:
    """A deltas.safetensors holds floating-point tensors whose values are finite and whose largest row norm (over
    the last dimension, as metrics.json's delta_norm/*) is at most MAX_DELTA_NORM. Read without torch: the header,
    then (files up to MAX_VALUE_CHECK_BYTES) the raw values with numpy."""
    header = read_safetensors_header(p)
    fix = "use the deltas.safetensors a steerexp run wrote (or retrain: technique.steps > 0, ckpt_path=null)"
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    for name, info in tensors.items():
        dtype = info.get("dtype")
        if dtype not in _FLOAT_DTYPES:
            raise ConfigError("ckpt_path", f"{p} holds {name!r} as {dtype} values; deltas are floating point "
                              "(F32, F16 or BF16)", fix)
    if p.stat().st_size > MAX_VALUE_CHECK_BYTES:
        return  # the run checks the values when it loads them
    import numpy as np

    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        data = f.read()
    for name, info in tensors.items():
        dtype, shape = info["dtype"], info.get("shape") or []
        lo, hi = info["data_offsets"]
        raw = data[lo:hi]
        if _FLOAT_DTYPES[dtype] is None and dtype != "BF16":
            continue
        width = shape[-1] if shape and shape[-1] else max(math.prod(shape), 1)
        try:
            if dtype == "BF16":
                values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                values = np.frombuffer(raw, _FLOAT_DTYPES[dtype])
            if values.size != math.prod(shape):
                raise ValueError(f"{values.size} values for the shape {shape}")
            rows = values.astype(np.float64).reshape(-1, width)
        except ValueError as err:
            raise ConfigError("ckpt_path", f"{p} is corrupt: {name!r} ({err})", "use another checkpoint") from None
        if rows.size == 0:
            continue
        bad = ~np.isfinite(rows)
        if bad.any():
            raise ConfigError("ckpt_path", f"{p} holds {int(bad.sum())} non-finite values (NaN/inf) in {name!r} "
                              f"{list(shape)}", fix)
        norm = float(np.sqrt(np.square(rows).sum(-1)).max())
        if norm > MAX_DELTA_NORM:
            raise ConfigError("ckpt_path", f"{p} holds {name!r} {list(shape)} with a row of norm {norm:.3g}, over "
                              f"the limit of {MAX_DELTA_NORM:g} for deltas (a diverged or corrupted file)", fix)


def _checkpoint_shapes(p: Path, info: dict) -> dict[str, list[int]]:
    """The deltas' shapes a checkpoint records: a safetensors header's, or a .ckpt's steerexp record."""
    if p.suffix == ".safetensors":
        header = read_safetensors_header(p)
        return {k: list(v.get("shape") or []) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    deltas = info.get("deltas")
    return {str(k): list(v) for k, v in deltas.items() if isinstance(v, (list, tuple))} \
        if isinstance(deltas, dict) else {}


def _check_delta_shapes(c: dict, p: Path, info: dict, gen: GeneratorInfo | None) -> None:
    """Textual inversion's rows are as wide as this generator's token embeddings (every text encoder's width side
    by side): a checkpoint of another generator is one line naming the shapes, before any model loads. (Every
    technique's shapes are checked again against the loaded technique, before sampling: run.load_checkpoint_deltas.)"""
    if gen is None or gen.folder is None or technique_kind(c) != "slot":
        return
    widths = text_encoder_widths(gen.folder)
    if not widths:
        return
    want = sum(widths.values())
    n = get(c, "technique.num_vectors", 1)
    for name, shape in _checkpoint_shapes(p, info).items():
        if name in ("embeddings", "initial") and len(shape) == 2 and shape[1] != want:
            expected = [n if _is_int(n) else shape[0], want]
            parts = " + ".join(f"{k} {w}" for k, w in widths.items())
            raise ConfigError("ckpt_path", f"{p} holds {name!r} of shape {shape}, but this generator's token "
                              f"embeddings need {expected} ({parts}): it was trained with another generator",
                              "use a checkpoint trained with this generator, or set generator (generator.path) "
                              "to the one it was trained with")


# ============================================================================ 6. prompts vs the tokenizer
class SlotTokenizer:
    """The generator's CLIP tokenizer through the `tokenizers` library (tokenizer.json, or
    vocab.json + merges.txt built as transformers' CLIPTokenizer builds them), no padding, no
    truncation; `max_length` as the generator uses it."""

    def __init__(self, folder: Path, overrides: dict | None = None):
        from tokenizers import Tokenizer

        self.folder, self.overrides = folder, dict(overrides or {})  # overrides: a borrowed tokenizer's (shared.json)
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
        self.max_length = self._max_length(folder, self.overrides)

    @staticmethod
    def _from_vocab(folder: Path):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        special = read_json(folder / "special_tokens_map.json", "generator.path", required=False) or {}
        conf = read_json(folder / "tokenizer_config.json", "generator.path", required=False) or {}

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
    def _max_length(folder: Path, overrides: dict) -> int:
        conf = (read_json(folder / "tokenizer_config.json", "generator.path", required=False) or {}) | overrides
        n = conf.get("model_max_length")
        if _is_number(n) and 0 < n < 1_000_000:
            return int(n)
        enc = read_json(folder.parent / "text_encoder" / "config.json", "generator.path", required=False) or {}
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


def slot_tokenizer(folder: Path, added: tuple[str, ...] = (), max_length: int | None = None) -> SlotTokenizer:
    """A SlotTokenizer with `added` tokens, cached per folder (a sweep or a test suite loads it once);
    `max_length`: a borrowed tokenizer's model_max_length (shared.json)."""
    try:
        stamp = max(p.stat().st_mtime_ns for p in folder.iterdir())
    except (OSError, ValueError):
        stamp = 0
    return _cached_tokenizer(str(folder), stamp, added, max_length)


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(folder: str, stamp: int, added: tuple[str, ...], max_length: int | None) -> SlotTokenizer:
    tok = SlotTokenizer(Path(folder), {"model_max_length": max_length} if max_length else None)
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
    folder, overrides = gen.tokenizer or (None, {})
    max_length = overrides.get("model_max_length")
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
        base = slot_tokenizer(folder, max_length=max_length)
        if len(learned) > base.max_length - 2:  # they could never all fit in a prompt (and 10,000 would be added)
            raise ConfigError("technique.num_vectors", f"is {len(learned)}, but a prompt holds at most "
                              f"{base.max_length - 2} tokens besides its start and end",
                              "set e.g. technique.num_vectors=1 (1-8 is typical)")
        for token in learned:
            if base.in_vocab(token):
                raise ConfigError("technique.placeholder", f"{token!r} is already in the tokenizer's vocabulary",
                                  f"choose a string the vocabulary lacks, such as '<{token.strip('<>')}-new>'")
        init = tech.get("initializer")
        if isinstance(init, str) and init and (n := base.n_tokens(init)) != 1:
            raise ConfigError("technique.initializer", f"{init!r} splits into {n} tokens; it must be a single token",
                              "pick a one-token word such as 'object'")
        tok = slot_tokenizer(folder, tuple(learned), max_length)
        if isinstance(tech.get("templates"), list):
            lists.append(("technique.templates", tech["templates"]))
    else:
        tok = slot_tokenizer(folder, max_length=max_length)
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
                        f"{_short(fill)}) at token {last}, past the tokenizer's {limit}-token limit, so the "
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


def _list_length(text: str) -> int:
    """How many entries the first [...] list of an override's value holds (top-level commas, outside quotes and
    nested brackets), counted without Hydra's parser: it takes 15 s for a list of 10,000 seeds."""
    depth, quote, n, seen = 0, "", 0, False
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote, seen = ch, True
        elif ch in "[{(":
            depth += 1
            if depth > 1:
                seen = True
        elif ch in "]})":
            depth -= 1
            if depth == 0:
                break
        elif ch == "," and depth == 1:
            n += 1
        elif not ch.isspace() and depth >= 1:
            seen = True
    return n + 1 if seen else 0


def check_list_sizes(argv: list[str]) -> None:
    """Before Hydra parses the command line: a seeds or prompts list over MAX_LIST entries is one line at once
    (Hydra's parser needs 15 s for 10,001 seeds, and a run of 200,000 seeds printed nothing for minutes)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or arg.startswith("-") or not value.lstrip().startswith("["):
            continue
        last = key.rsplit(".", 1)[-1]
        if not (last.endswith("seeds") or last.endswith("prompts")):
            continue
        n = _list_length(value)
        if n > MAX_LIST:
            what = "seeds" if last.endswith("seeds") else "prompts"
            raise ConfigError(key, f"holds {n} {what}, over the limit of {MAX_LIST}",
                              f"use at most {MAX_LIST} (split a bigger evaluation into several runs: a sweep over "
                              "seed ranges)")


def check_group_overrides(argv: list[str]) -> None:
    """Before Hydra composes: every `group=option` (also `group=[a,b]`, `+group=...`, sweeps
    `group=a,b`) on the command line names a file in conf/<group>/ (or --config-dir); seeds and prompts lists
    hold at most MAX_LIST entries (check_list_sizes)."""
    check_list_sizes(argv)
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
