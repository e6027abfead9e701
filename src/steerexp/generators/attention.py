"""Prompt-to-Prompt attention control (Hertz et al. 2022) on a frozen UNet.

Two branches sample side by side from the same x_T, in one batch: the source (source prompt)
and the target (target prompt). Attention processors, installed on the UNet only for the
duration of sampling (`controlled(unet, controller)`, a context manager that puts the original
processors back whatever happens; no weight is touched, so the fingerprint is unchanged),
compute each layer's attention probabilities A = softmax(Q K^T / sqrt(d)) explicitly and hand
them to the `Controller`, which rewrites the target branch's A from the source branch's:

  cross-attention, steps inside `cross_steps` (a fraction [start, end) of the sampling steps):
    replace (word swap; both prompts have the same number of tokens)
        A_tgt[:, :, j] := A_src[:, :, j]                     every token, the swapped word included
    refine (prompts of different lengths: a token alignment, Needleman-Wunsch on token ids)
        A_tgt[:, :, j] := A_src[:, :, m(j)]                  target token j aligned to source token m(j)
        A_tgt[:, :, j] unchanged                             target tokens with no source counterpart
    reweight (`reweight: {word: scale}`, words of the target prompt)
        A_tgt[:, :, j] *= scale
  self-attention, steps inside `self_steps`, in the layers below the latent's full resolution
  (the paper's rule; `self_full_res: true` injects there too):
        A_tgt := A_src                                       the source's layout, pixel to pixel
  local blend (`blend`), after every step from `blend_start` of the steps on:
        M   = threshold(maxpool(cross-attention of the blend words, summed over the steps so far and
              averaged over layers and heads) scaled to [0, 1] by its min and max, blend_threshold),
              source words in the source branch OR target words in the target branch
        x_tgt := x_src + M * (x_tgt - x_src)                 outside the mask the target is the source

The paper scales the map by its max only; this generator's maps are flat (min/max ~ 0.7, so
every cell would pass any threshold below that), hence min-max. As in the paper's code, only
the conditional half of classifier-free guidance is controlled
(`control_uncond: true` also injects the unconditional half, with the identity token map: both
branches share one null). `sample_pair` is the two-branch DDIM loop; with `trajectory` (Direct
Inversion, techniques/direct_inversion.py) the source branch is set onto the inverted latents
after every step, before the local blend. The cross-attention maps of both branches, summed
over steps and averaged over layers and heads, are kept (`Controller.maps()`) so that they can
be logged per token (`token_grid`). `generate_pair` is P2P from plain sampling (a seed's x_T, a
source and a target prompt); the inversion techniques (techniques/ddim_inversion.py) start the two
branches from an inverted image instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from steerexp.generators import Guidance
from steerexp.techniques.ddim_inversion_spec import P2P_MODES

MODES = P2P_MODES   # technique.edit.mode


# ---------------------------------------------------------------------------- settings
def _window(value, key: str) -> tuple[float, float]:
    """A step window: f (= [0, f)) or [start, end), fractions of the sampling steps."""
    lo, hi = (0.0, value) if isinstance(value, (int, float)) else tuple(value)
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"technique.edit.{key} must be a fraction f in [0, 1] or [start, end] with "
                         f"0 <= start <= end <= 1, got {value!r}; e.g. technique.edit.{key}=0.8")
    return float(lo), float(hi)


@dataclass
class EditControl:
    """The Prompt-to-Prompt settings (conf: technique.edit.*; see the module docstring)."""
    cross_steps: tuple[float, float] = (0.0, 0.8)
    self_steps: tuple[float, float] = (0.0, 0.4)
    mode: str = "auto"                       # auto: replace when the token counts match, else refine
    reweight: dict[str, float] = field(default_factory=dict)
    blend_words: list[str] | dict | None = None   # null: the words that differ; or a list; or {source:, target:}
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    blend_dilate: int = 1                    # max-pool radius (latent cells) of the attention map
    control_uncond: bool = False
    self_full_res: bool = False              # also inject self-attention at the latent's full resolution

    KEYS = ("cross_steps", "self_steps", "mode", "reweight", "blend_words", "blend_threshold", "blend_start",
            "blend_dilate", "control_uncond", "self_full_res")

    @classmethod
    def from_config(cls, cfg: dict) -> "EditControl":
        c = {k: v for k, v in dict(cfg).items() if k in cls.KEYS and v is not None}
        out = cls(**c)
        out.cross_steps, out.self_steps = _window(out.cross_steps, "cross_steps"), _window(out.self_steps, "self_steps")
        if out.mode not in MODES:
            raise ValueError(f"technique.edit.mode must be one of {MODES}, got {out.mode!r}")
        if not 0 < out.blend_threshold < 1:
            raise ValueError(f"technique.edit.blend_threshold must be in (0, 1), got {out.blend_threshold}")
        if not 0 <= out.blend_start <= 1:
            raise ValueError(f"technique.edit.blend_start must be in [0, 1], got {out.blend_start}")
        for word, scale in dict(out.reweight).items():
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
                raise ValueError(f"technique.edit.reweight.{word} must be a number >= 0 (the attention scale "
                                 f"of that word), got {scale!r}")
        return out


# ---------------------------------------------------------------------------- tokens
def token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids with the start and end tokens, without padding."""
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids


def word_positions(tokenizer, prompt: str, words) -> list[int]:
    """Positions (in the padded sequence; 0 is the start token) of the tokens of every occurrence of
    `words` (one word or a list) in the prompt."""
    words = {words} if isinstance(words, str) else set(words)
    words = {w.lower() for w in words}
    pos, out = 1, []
    for w in prompt.split():
        n = len(token_ids(tokenizer, w)) - 2
        if w.strip(".,;:!?").lower() in words:
            out += list(range(pos, pos + n))
        pos += n
    return [p for p in out if p < tokenizer.model_max_length - 1]


def token_strings(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens (without start and end tokens), as words for map titles."""
    ids = token_ids(tokenizer, prompt)[1:-1]
    return [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]


def align(src: list[int], tgt: list[int]) -> list[int]:
    """Global alignment (Needleman-Wunsch; match +1, mismatch -1, gap 0) of two token sequences:
    for each target token the index of its source token, or -1 where the target inserts one."""
    n, m = len(src), len(tgt)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if src[i - 1] == tgt[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    out, i, j = [-1] * m, n, m
    while i > 0 and j > 0:
        if score[i][j] == score[i - 1][j - 1] + (1 if src[i - 1] == tgt[j - 1] else -1):
            out[j - 1] = i - 1 if src[i - 1] == tgt[j - 1] else -1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return out


def token_map(tokenizer, source: str, target: str, mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper [L], alphas [L]) for one prompt pair: target token j takes the source's map at
    mapper[j] where alphas[j] = 1 and keeps its own where alphas[j] = 0."""
    L = tokenizer.model_max_length
    s, t = token_ids(tokenizer, source), token_ids(tokenizer, target)
    if mode == "replace" and len(s) != len(t):
        raise ValueError(f"technique.edit.mode=replace needs prompts with the same number of tokens; "
                         f"{source!r} has {len(s)}, {target!r} has {len(t)}. Use mode=refine (or auto)")
    if mode == "replace" or (mode == "auto" and len(s) == len(t)):
        return torch.arange(L), torch.ones(L)
    base = align(s, t)
    mapper, alphas = torch.zeros(L, dtype=torch.long), torch.ones(L)
    for j, i in enumerate(base):
        mapper[j], alphas[j] = max(i, 0), float(i >= 0)
    # padding: the source's padding, in order
    mapper[len(t):] = (torch.arange(L - len(t)) + len(s)).clamp(max=L - 1)
    return mapper, alphas


def changed_words(source: str, target: str) -> tuple[list[str], list[str]]:
    """The words of each prompt that the other lacks (position by position when the word counts match)."""
    a, b = source.split(), target.split()
    if len(a) == len(b):
        pairs = [(x, y) for x, y in zip(a, b) if x != y]
        return [x for x, _ in pairs], [y for _, y in pairs]
    return [x for x in a if x not in b], [y for y in b if y not in a]


# ---------------------------------------------------------------------------- the controller
class Controller:
    """Rewrites the target branch's attention from the source branch's (see the module docstring).

    The UNet batch is [cond_src, cond_tgt] (guidance 1), [cond_src, cond_tgt, uncond_src, uncond_tgt]
    (classifier-free guidance) or [cond_src, cond_tgt, uncond_tgt] (Direct Inversion, whose source step
    is replaced by the inverted latent: its unconditional pass is never used), n images each."""

    def __init__(self, control: EditControl, tokenizer, sources: list[str], targets: list[str], steps: int,
                 latent_hw: tuple[int, int], device: torch.device):
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} source prompts for {len(targets)} target prompts")
        self.control, self.n, self.steps, self.latent_hw = control, len(sources), steps, latent_hw
        maps = [token_map(tokenizer, s, t, control.mode) for s, t in zip(sources, targets)]
        self.mapper = torch.stack([m for m, _ in maps]).to(device)            # [n, L]
        self.alphas = torch.stack([a for _, a in maps]).to(device)            # [n, L]
        L = tokenizer.model_max_length
        self.equalizer = torch.ones(self.n, L, device=device)
        for i, t in enumerate(targets):
            for word, scale in control.reweight.items():
                self.equalizer[i, word_positions(tokenizer, t, word)] = float(scale)
        self.blend_src, self.blend_tgt = torch.zeros(self.n, L), torch.zeros(self.n, L)
        for i, (s, t) in enumerate(zip(sources, targets)):
            words_s, words_t = self.blend_words(s, t)
            self.blend_src[i, word_positions(tokenizer, s, words_s)] = 1
            self.blend_tgt[i, word_positions(tokenizer, t, words_t)] = 1
        self.blend_src, self.blend_tgt = self.blend_src.to(device), self.blend_tgt.to(device)
        self.step = 0
        self.store = torch.zeros(2 * self.n, L, *latent_hw, device=device)  # cross maps summed over steps
        self._step_maps: list[torch.Tensor] = []

    def blend_words(self, source: str, target: str) -> tuple[list[str], list[str]]:
        words = self.control.blend_words
        if words is None:
            return changed_words(source, target)
        if isinstance(words, dict):
            return list(words.get("source") or []), list(words.get("target") or [])
        return list(words), list(words)

    def active(self, window: tuple[float, float]) -> bool:
        return window[0] * self.steps <= self.step < window[1] * self.steps

    # ------------------------------------------------------------------ called by the processors
    def __call__(self, probs: torch.Tensor, is_cross: bool) -> torch.Tensor:
        """probs [B, heads, Q, K] of one attention layer -> the controlled probs."""
        n, B = self.n, probs.shape[0]
        if B not in (2 * n, 3 * n, 4 * n):
            raise RuntimeError(f"the P2P controller expects a batch of 2, 3 or 4 x {n}, got {B}")
        if is_cross:
            self._record(probs[: 2 * n])
        pairs = [(0, True)] + ([(2 * n, False)] if B == 4 * n and self.control.control_uncond else [])
        parts = list(probs.split(n))
        for start, cond in pairs:
            src, tgt = probs[start : start + n], probs[start + n : start + 2 * n]
            if is_cross and self.active(self.control.cross_steps):
                parts[start // n + 1] = self._cross(src, tgt) if cond else src
            elif not is_cross and self.active(self.control.self_steps) and self.self_layer(probs.shape[2]):
                parts[start // n + 1] = src
        return torch.cat(parts)

    def self_layer(self, queries: int) -> bool:
        """Self-attention is injected below the latent's full resolution only (the paper's rule: its
        layers of at most 32 x 32 queries on a 64 x 64 latent), unless `self_full_res`."""
        return self.control.self_full_res or queries < self.latent_hw[0] * self.latent_hw[1]

    def _cross(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        index = self.mapper[:, None, None, :].expand(-1, src.shape[1], src.shape[2], -1)
        alphas = self.alphas[:, None, None, :]
        injected = src.gather(-1, index) * alphas + tgt * (1 - alphas)
        return injected * self.equalizer[:, None, None, :]

    def layer_grid(self, queries: int) -> tuple[int, int]:
        """(h, w) of a layer's query grid: the latent's, halved (rounding up, as the UNet's strided convolutions
        do) until it holds `queries` positions; so non-square latents keep their aspect ratio."""
        h, w = self.latent_hw
        while h * w > queries and (h > 1 or w > 1):
            h, w = -(-h // 2), -(-w // 2)
        if h * w != queries:  # not a downsampled latent grid: read it as a square
            side = int(round(queries ** 0.5))
            return side, side
        return h, w

    def _record(self, probs: torch.Tensor) -> None:
        """Mean over heads of one cross-attention layer, as maps at the latent resolution."""
        B, _, Q, K = probs.shape
        grid = self.layer_grid(Q)
        maps = probs.mean(1).transpose(1, 2).reshape(B, K, *grid)
        if grid != tuple(self.latent_hw):
            maps = F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)
        self._step_maps.append(maps)

    # ------------------------------------------------------------------ called by the sampling loop
    def end_step(self) -> None:
        """Add this step's cross maps (mean over layers) to the store; move to the next step."""
        if self._step_maps:
            self.store += torch.stack(self._step_maps).mean(0)
            self._step_maps = []
        self.step += 1

    def blend_mask(self) -> torch.Tensor:
        """[n, 1, h, w] in {0, 1}: where the target may differ from the source."""
        n, k = self.n, self.control.blend_dilate

        def mask(maps, words):
            m = (maps * words[:, :, None, None]).sum(1, keepdim=True)
            if k > 0:
                m = F.max_pool2d(m, 2 * k + 1, stride=1, padding=k)
            lo, hi = m.flatten(1).amin(1)[:, None, None, None], m.flatten(1).amax(1)[:, None, None, None]
            return (m - lo) / (hi - lo).clamp(min=1e-12) > self.control.blend_threshold

        return (mask(self.store[:n], self.blend_src) | mask(self.store[n:], self.blend_tgt)).float()

    def blend(self, x_src: torch.Tensor, x_tgt: torch.Tensor) -> torch.Tensor:
        if self.step < self.control.blend_start * self.steps:
            return x_tgt
        return x_src + self.blend_mask() * (x_tgt - x_src)

    def maps(self) -> torch.Tensor:
        """[2, n, L, h, w]: the cross-attention maps of the source and target branches, averaged over steps."""
        return (self.store / max(1, self.step)).view(2, self.n, *self.store.shape[1:])


class Processor:
    """diffusers' plain attention (AttnProcessor) with the probabilities passed through the controller."""

    def __init__(self, controller: Controller):
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, seq, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if not is_cross else encoder_hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)          # [B * heads, Q, K]
        B = hidden_states.shape[0]
        probs = self.controller(probs.view(B, -1, *probs.shape[1:]), is_cross).flatten(0, 1)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def swapped_processors(denoiser, replace):
    """Within the block each attention processor of `denoiser` (a diffusers model) is `replace(name, original)`; the
    original processors are put back afterwards, also on error. No weight is touched, so the generator's fingerprint
    does not move. Prompt-to-Prompt (`controlled`), per-layer tokens (techniques/xti.py) and RF-Edit's value
    sharing (techniques/rf_solver.py) install theirs through it."""
    original = denoiser.attn_processors
    denoiser.set_attn_processor({name: replace(name, proc) for name, proc in original.items()})
    try:
        yield
    finally:
        denoiser.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it is given


@contextlib.contextmanager
def controlled(unet, controller: Controller | None):
    """Within the block every attention layer of `unet` runs through `controller`; the original
    processors are put back afterwards (also on error). `controller=None` changes nothing."""
    if controller is None:
        yield None
        return
    with swapped_processors(unet, lambda _name, _proc: Processor(controller)):
        yield controller


# ---------------------------------------------------------------------------- the two-branch loop
def sample_pair(gen, latents: torch.Tensor, cond_src: torch.Tensor, cond_tgt: torch.Tensor, uncond: torch.Tensor,
                steps: int, guidance, controller: Controller | None = None,
                trajectory: list[torch.Tensor] | None = None, blend: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM from `latents` (x_T, [n, C, h, w]) with the source and target prompts side by side, in one batch.

    uncond: the null of both branches, [n, L, D] or one per step [n, S, L, D] (null-text inversion).
    trajectory: the inverted latents [x*_0 .. x*_T] of the source; given, the source branch is set onto
    x*_{t-1} after every step (Direct Inversion). blend: local blend (needs a controller).
    Returns the clean latents (z_src, z_tgt)."""
    if blend and controller is None:
        raise ValueError("local blend needs attention control: its mask comes from the cross-attention maps")
    schedule, n = gen.schedule(steps), len(latents)
    per_step = uncond.ndim == 4
    cond = torch.cat([cond_src, cond_tgt])
    x_src, x_tgt = latents, latents.clone()
    # Direct Inversion replaces the source's step by x*_{t-1}: only its conditional pass (the attention the
    # target takes) is used, so its unconditional pass is skipped (the same result, a quarter less compute)
    skip = trajectory is not None and guidance.scale != 1 and not (controller and controller.control.control_uncond)
    with torch.no_grad(), controlled(gen.unet, controller):
        for i, t in enumerate(schedule.timesteps):
            u = uncond[:, i] if per_step else uncond
            u = u.expand(n, -1, -1).to(gen.device, gen.dtype) if u.shape[0] != n else u.to(gen.device, gen.dtype)
            if skip:
                out = gen.denoise(torch.cat([x_src, x_tgt, x_tgt]), t.to(gen.device), torch.cat([cond, u]))
                guided = guidance.combine(out[n : 2 * n], out[2 * n :], i, steps)
                x_tgt = schedule.step(*schedule.split(guided, x_tgt, i), i)
            else:
                x = torch.cat([x_src, x_tgt])
                out = gen.model_output(x, t.to(gen.device), cond, torch.cat([u, u]), guidance, i, steps)
                x_src, x_tgt = schedule.step(*schedule.split(out, x, i), i).chunk(2)
            if controller is not None:
                controller.end_step()
            if trajectory is not None:  # Direct Inversion: the source branch back onto the inversion trajectory
                x_src = trajectory[steps - 1 - i].to(x_src)
            if blend:
                x_tgt = controller.blend(x_src, x_tgt)
    return x_src, x_tgt


def generate_pair(gen, sources: list[str], targets: list[str], seeds: list[int], steps: int = 25, guidance=None,
                  control: EditControl | None = None, blend: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P from plain sampling: images [N, 3, H, W] in [0, 1] of the source prompts and of their edits to the
    target prompts, from the same x_T per seed (guidance: a Guidance, default w = 7.5; control: the P2P settings)."""
    guidance = guidance or Guidance()
    controller = Controller(control or EditControl(), gen.tokenizer, list(sources), list(targets), steps,
                            gen.latent_shape()[1:], gen.device)
    with torch.no_grad():
        z_src, z_tgt = sample_pair(gen, gen.initial_latents(seeds), gen.encode_prompt(list(sources)),
                                   gen.encode_prompt(list(targets)), gen.encode_prompt([""]), steps, guidance,
                                   controller, blend=blend)
        return gen.decode_latents(z_src).float().cpu(), gen.decode_latents(z_tgt).float().cpu()


# ---------------------------------------------------------------------------- logging the maps
def token_grid(images: torch.Tensor, maps: torch.Tensor, tokens: list[list[str]], gap: int = 2) -> torch.Tensor:
    """One row per image: the image, then its cross-attention map per token (normalised to [0, 1],
    shown grey, nearest-upsampled to the image size). images [n, 3, H, W]; maps [n, L, h, w] (position
    0 is the start token); tokens: the words of each row. [3, H', W'] in [0, 1]."""
    H, W = images.shape[-2:]
    width = max(len(t) for t in tokens) + 1
    rows = []
    for img, m, toks in zip(images, maps, tokens):
        cells = [img.float().cpu()]
        for j in range(len(toks)):
            a = m[j + 1].float().cpu()
            a = (a - a.min()) / (a.max() - a.min()).clamp(min=1e-12)
            cells.append(F.interpolate(a[None, None], size=(H, W), mode="nearest")[0].expand(3, -1, -1))
        cells += [torch.ones(3, H, W)] * (width - len(cells))
        row = []
        for c in cells:
            row += [c, torch.ones(3, H, gap)]
        rows += [torch.cat(row[:-1], dim=-1)]
        rows += [torch.ones(3, gap, rows[-1].shape[-1])]
    return torch.cat(rows[:-1], dim=-2)
