"""The settings of DDIM inversion (techniques/ddim_inversion.py), declared once; null-text, negative-prompt and
Direct Inversion extend this spec (their *_spec.py modules). Torch-free.

The edit. An inversion reconstructs its targets and edits them by a prompt swap from the same inverted noise.
The edit prompt of each target is, first found:
1. `edit.prompts` (one for all, or one per target);
2. a manifest's `target` column (`targets.manifest`);
3. the source prompt with words swapped by `edit.replace`:
   - `auto` (the default): what the run's concept names (conf/config.yaml: `concept`, what the edit aims at).
     Each source prompt's word for `concept.head` becomes `concept.target`: with concept.head=colour and
     concept.target=blue, "a red circle on the left" becomes "a blue circle on the left". On the defaults (head
     shape, target star) every world target is edited into the held-out star. A source prompt that already names
     the target is left as it is (its edit prompt is its source prompt), but at least one must change.
   - a map of words, e.g. `{red: blue}`: every source prompt must use one of its words.
Both are checked here before anything loads: on the world targets' prompts (computed from their seeds, without
rendering) and on `targets.prompts` given for image files. A folder's or a manifest's prompts are known at load.
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.base_spec import TechniqueSpec

WORLD_PROMPT = "a {colour} {shape} {position}"   # the world targets' source prompts
TEMPLATE_FIELDS = ("shape", "colour", "size", "position", "background")   # what a world prompt template may name
CONTROLS = (None, "p2p")                # edit.control: a bare prompt swap, or Prompt-to-Prompt
P2P_MODES = ("auto", "replace", "refine")   # edit.mode (generators/attention.py)
MANIFEST_COLUMNS = ("image", "source", "target")
AUTO = "auto"


@dataclass
class InversionTargetsSpec:
    """technique.targets: the images to invert, and their source prompts."""

    files: Any = None               # a folder of PNG/JPG files or a list of paths; null: K world samples
    prompts: Any = None             # source prompts for files: one per image (sorted order) or one string for all
    manifest: Optional[str] = None  # or a CSV/JSON of edits: image, source, target[, mask] per row (paths relative
                                    # to it)
    resize: bool = False            # files of another size: refuse (false) or resize bicubic to the generator's size
    convert: bool = False           # files not in RGB mode: refuse (false) or convert to RGB
    k: int = 16                     # world samples: how many, from world stream `seed`
    seed: int = 0
    shapes: Any = None              # null: the generator's seen shapes; or a list of world shapes
    fixed: Any = None               # fix scene attributes, e.g. {colour: red} (null: none)
    prompt_template: str = WORLD_PROMPT        # the world samples' source prompts ({shape} {colour} {size}
                                               # {position} {background})


@dataclass
class EditSpec:
    """technique.edit: the edit prompt, and its Prompt-to-Prompt attention control (generators/attention.py)."""

    # the edit prompt: the source prompt with words swapped. auto: its word for `head` becomes `target` (the run's
    # concept; see the module docstring); or a map of words, e.g. {red: blue}, that every source prompt uses
    replace: Any = AUTO
    head: Any = "${concept.head}"       # replace=auto: which attribute's word is swapped (shape | colour | size |
    target: Any = "${concept.target}"   #   position), and for which of its values
    prompts: Any = None             # or explicit edit prompts (one per image, or one for all)
    control: Optional[str] = None   # null: a bare prompt swap; p2p: Prompt-to-Prompt attention control
    cross_steps: Any = 0.8          # P2P: inject the source's cross-attention in the first 0.8 of the steps (or
                                    # [start, end])
    self_steps: Any = 0.4           # P2P: inject the source's self-attention in the first 0.4 of the steps (or
                                    # [start, end])
    mode: str = "auto"              # P2P token map: replace (same token count), refine (aligned), auto (replace when
                                    # it can)
    reweight: Any = None            # P2P: scale the attention of target-prompt words, e.g. {blue: 2.0}
    blend: bool = False             # P2P local blend: outside the blend words' attention mask the target is the source
    blend_words: Any = None         # null: the words the edit changes; or a list; or {source: [...], target: [...]}
    blend_threshold: float = 0.3    # the mask: the words' attention map (scaled to [0, 1]) above this
    blend_start: float = 0.2        # blend from this fraction of the steps on
    blend_dilate: int = 1           # max-pool radius of the attention map, in latent cells
    control_uncond: bool = False    # also control the unconditional half of guidance (the paper controls the
                                    # conditional only)
    self_full_res: bool = False     # also inject self-attention at the latent's full resolution (the paper does not)


@register("technique", "ddim_inversion")
@dataclass
class DDIMInversionSpec(TechniqueSpec):
    """DDIM inversion of real images: invert to x_T at guidance `invert_guidance`, reconstruct (or edit) at
    `guidance_scale`."""

    has_targets = True      # the originals (target_images)
    invertible = True       # reconstruct(method) / edit(method) (techniques/protocols.py: Invertible)

    _target_: str = "steerexp.techniques.ddim_inversion.DDIMInversion"
    targets: InversionTargetsSpec = field(default_factory=InversionTargetsSpec)
    edit: EditSpec = field(default_factory=EditSpec)
    invert_guidance: float = 1.0    # the pivot trajectory's guidance (1: conditional prediction only)
    batch_size: int = 16            # images inverted / sampled together
    # reconstruction / edit guidance for this technique's own method (ddim_w<scale>); null: sampling.guidance_scale
    guidance_scale: Optional[float] = 1.0

    def check(self, key: str) -> None:
        self.at_least(key, "invert_guidance", 0, 1.0)
        self.at_least(key, "guidance_scale", 0, "5.0 (1 = no guidance)", optional=True)
        self.at_least(key, "batch_size", 1, 16)
        sources = check_targets(self.targets, f"{key}.targets")
        check_edit(self.edit, f"{key}.edit")
        t = self.targets
        if self.edit.prompts is None and not t.manifest and sources is not None:
            edit_prompts(sources, self.edit.replace, self.edit.head, self.edit.target, f"{key}.edit",
                         world=not t.files)


# ---------------------------------------------------------------------------- the targets
def check_targets(t: InversionTargetsSpec, key: str) -> list[str] | None:
    """The targets' rules; returns their source prompts when the config alone says them (world targets, or files
    with targets.prompts given as a list or one string for all), else None."""
    if t.manifest:
        return None
    if t.files is not None:
        if isinstance(t.files, list) and not t.files:
            raise ConfigError(f"{key}.files", "is an empty list", f"give image paths or a folder: {key}.files=<folder>")
        p = t.prompts
        if p is None:
            raise ConfigError(f"{key}.prompts", "image files need source prompts (one per image, or one string for "
                              "all)", f"set e.g. {key}.prompts='a red circle on the left'")
        if isinstance(p, str):
            return [p]
        if not isinstance(p, list) or not p or not all(isinstance(x, str) and x.strip() for x in p):
            raise ConfigError(f"{key}.prompts", f"must be one prompt or a list of prompts, got {p!r}",
                              f"set e.g. {key}.prompts='a red circle on the left'")
        if isinstance(t.files, list) and len(p) != len(t.files):
            raise ConfigError(f"{key}.prompts", f"has {len(p)} prompts for {len(t.files)} images",
                              "give one per image (in the files' order) or a single string")
        return list(p)
    if not isinstance(t.k, int) or t.k < 1:
        raise ConfigError(f"{key}.k", f"must be >= 1 world images, got {t.k!r}", f"set e.g. {key}.k=16")
    from steerexp.worlds.shapes import world   # numpy only

    fixed = dict(t.fixed or {}) if isinstance(t.fixed, dict) or t.fixed is None else None
    choices = dict(world.HEADS, background=tuple(world.BACKGROUNDS))
    if fixed is None:
        raise ConfigError(f"{key}.fixed", f"must map scene attributes to values, got {t.fixed!r}",
                          f"set e.g. {key}.fixed={{colour:red}}")
    for name, value in fixed.items():
        if name not in choices or value not in choices[name]:
            raise ConfigError(f"{key}.fixed", f"{name}={value!r} is not a world attribute value",
                              f"choose from {({k: list(v) for k, v in choices.items()})}")
    shapes = t.shapes if t.shapes is not None else list(world.SEEN_SHAPES)
    if not isinstance(shapes, list) or not shapes or any(s not in world.SHAPES for s in shapes):
        raise ConfigError(f"{key}.shapes", f"must be null or a non-empty list of world shapes, got {t.shapes!r}",
                          f"choose from {list(world.SHAPES)}, e.g. {key}.shapes=[circle,square]")
    template = t.prompt_template
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:
        names = None
    if names is None or any(n not in TEMPLATE_FIELDS for n in names):
        raise ConfigError(f"{key}.prompt_template", f"{template!r} may name only the fields "
                          f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}",
                          f"set e.g. {key}.prompt_template='{WORLD_PROMPT}'")
    return [world_prompt(world.scene_of(t.seed, i, tuple(shapes), **fixed), template) for i in range(t.k)]


def world_prompt(scene: Any, template: str = WORLD_PROMPT) -> str:
    """A world scene's source prompt."""
    from steerexp.worlds.shapes import world

    return template.format(shape=scene.shape, colour=scene.colour, size=scene.size,
                           position=world.POSITION_PHRASES[scene.position], background=scene.background)


# ---------------------------------------------------------------------------- the edit
def check_edit(edit: EditSpec, key: str) -> None:
    """technique.edit: the prompt swap and its Prompt-to-Prompt control (generators/attention.py)."""
    k = key + "."
    if edit.control not in CONTROLS:
        raise ConfigError(k + "control", f"must be null (a bare prompt swap) or p2p, got {edit.control!r}",
                          f"set {k}control=p2p (Prompt-to-Prompt attention control) or {k}control=null")
    if edit.blend and edit.control != "p2p":
        raise ConfigError(k + "blend", "is true but technique.edit.control is not p2p: the blend mask comes from "
                          "P2P's attention maps", f"set {k}control=p2p, or {k}blend=false")
    for w in ("cross_steps", "self_steps"):
        v = getattr(edit, w)
        ok = (_number(v) and 0 <= v <= 1) or (
            isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v) and 0 <= v[0] <= v[1] <= 1)
        if not ok:
            raise ConfigError(k + w, f"must be a fraction of the steps in [0, 1] or [start, end] within it, got {v!r}",
                              f"set e.g. {k}{w}=0.8 or {k}{w}=[0.1,0.8]")
    if edit.mode not in P2P_MODES:
        raise ConfigError(k + "mode", f"must be auto, replace or refine, got {edit.mode!r}", f"set {k}mode=auto")
    if edit.reweight is not None and not isinstance(edit.reweight, dict):
        raise ConfigError(k + "reweight", f"must map words to attention scales, got {edit.reweight!r}",
                          f"set e.g. {k}reweight={{blue:2.0}}")
    for word, scale in (edit.reweight or {}).items():
        if not _number(scale) or scale < 0 or not math.isfinite(scale):
            raise ConfigError(f"{k}reweight.{word}", f"must be a number >= 0 (the word's attention scale), got "
                              f"{scale!r}", f"set e.g. {k}reweight.{word}=2.0")
    if not 0 < edit.blend_threshold < 1:
        raise ConfigError(k + "blend_threshold", f"must be in (0, 1), got {edit.blend_threshold!r}",
                          f"set e.g. {k}blend_threshold=0.3")
    if not 0 <= edit.blend_start <= 1:
        raise ConfigError(k + "blend_start", f"must be a fraction of the steps in [0, 1], got {edit.blend_start!r}",
                          f"set e.g. {k}blend_start=0.2")
    if edit.blend_dilate < 0:
        raise ConfigError(k + "blend_dilate", f"must be >= 0, got {edit.blend_dilate}",
                          f"set e.g. {k}blend_dilate=1 (latent cells)")
    words = edit.blend_words
    lists = list(words.values()) if isinstance(words, dict) else [words]
    if words is not None and (not all(isinstance(x, list) and all(isinstance(w, str) for w in x) for x in lists)
                              or isinstance(words, dict) and set(words) - {"source", "target"}):
        raise ConfigError(k + "blend_words", f"must be null, a list of words or {{source: [...], target: [...]}}, "
                          f"got {words!r}", f"set e.g. {k}blend_words=[circle] (null: the words the edit changes)")
    p = edit.prompts
    if p is not None and not (isinstance(p, str) and p.strip() or isinstance(p, list) and p
                              and all(isinstance(x, str) and x.strip() for x in p)):
        raise ConfigError(k + "prompts", f"must be null, one edit prompt or a list of them, got {p!r}",
                          f"set e.g. {k}prompts='a blue circle on the left', or null")
    r = edit.replace
    if r != AUTO and not (isinstance(r, dict) and r and all(isinstance(a, str) and isinstance(b, str) and b.strip()
                                                            for a, b in r.items())):
        raise ConfigError(k + "replace", f"must be auto (from the run's concept) or a map of words {{old: new}}, "
                          f"got {r!r}", f"set e.g. {k}replace={{red:blue}}, or {k}replace=auto")


def edit_prompts(sources: list[str], replace: Any, head: Any = None, target: Any = None, key: str = "technique.edit",
                 world: bool = False) -> list[str]:
    """The edit prompts of `sources` by `replace` (auto: `head`'s word becomes `target`; or a map of words); a
    ConfigError when the edit cannot be made (the module docstring says when)."""
    if replace == AUTO:
        return auto_edit(sources, head, target, key, world)
    out = []
    for p in sources:
        new = " ".join(replace.get(w, w) for w in p.split())
        if new == p:
            fix = ("name a word every source prompt uses (e.g. {red: blue}), fix it in the world targets (e.g. "
                   "technique.targets.fixed={colour: red}), or give technique.edit.prompts" if world else
                   "name a word the prompt uses (e.g. {red: blue}) or give technique.edit.prompts")
            raise ConfigError(f"{key}.replace", f"{dict(replace)} changes no word of the source prompt {p!r}", fix)
        out.append(new)
    return out


def head_phrases(head: Any) -> dict[str, str] | None:
    """{value: the words a world prompt says it with} of a concept head, or None for a head the world's prompts do
    not name."""
    from steerexp.worlds.shapes import world

    if head == "position":
        return dict(world.POSITION_PHRASES)
    if isinstance(head, str) and head in world.HEADS:
        return {v: v for v in world.HEADS[head]}
    return None


def auto_edit(sources: list[str], head: Any, target: Any, key: str = "technique.edit",
              world: bool = False) -> list[str]:
    """edit.replace=auto: each source prompt's words for `head` become `target`'s (already `target`: unchanged)."""
    phrases = head_phrases(head)
    fix = (f"set {key}.replace={{old: new}} or {key}.prompts, or set concept.head/concept.target to an attribute the "
           "prompts name (shape, colour, size, position)")
    if phrases is None:
        raise ConfigError(f"{key}.replace", f"is auto, which swaps each source prompt's {head} for {target!r} "
                          f"(concept.head, concept.target), but {head!r} is no attribute the world's prompts name", fix)
    if target not in phrases:
        raise ConfigError(f"{key}.target", f"is {target!r} (concept.target), no {head} the world's prompts name, so "
                          f"{key}.replace=auto cannot swap to it", f"set concept.target to one of {list(phrases)}, "
                          f"or {key}.replace={{old: new}}")
    out = []
    for p in sources:
        found = [(m.start(), m.end(), v) for v, ph in phrases.items()
                 for m in [re.search(rf"(?<!\S){re.escape(ph)}(?!\S)", p)] if m]
        if not found:
            more = f" (add {{{head}}} to technique.targets.prompt_template)" if world else ""
            raise ConfigError(f"{key}.replace", f"is auto, which swaps each source prompt's {head} for {target!r} "
                              f"(concept.head, concept.target), but the source prompt {p!r} names no {head}{more}",
                              fix)
        start, end, value = min(found)
        out.append(p if value == target else p[:start] + phrases[target] + p[end:])
    if out == list(sources):
        raise ConfigError(f"{key}.replace", f"is auto, and every source prompt already names {target!r} "
                          f"(concept.target): the edit would change nothing",
                          f"set concept.target to another {head}, or {key}.replace={{old: new}}")
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
