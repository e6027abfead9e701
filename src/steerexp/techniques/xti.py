"""P+ / Extended Textual Inversion (XTI; Voynov et al. 2023, "P+: Extended Textual Conditioning in Text-to-Image
Generation"): textual inversion with a different token embedding for each cross-attention layer of the denoiser.

P+ is the space of per-layer conditionings: layer l of the UNet's cross-attention reads its own prompt
embedding c_l = E(p with v*_l), where E is the frozen text encoder and v*_l the token of that layer. XTI learns
{v*_l} with the textual-inversion loss, unchanged (objectives/denoising.py):

    {v*_l} = argmin E_{x, eps, t} || eps - eps_theta(x_t, t, {E(p with v*_l)}_l) ||^2

`technique.layers` says how the UNet's cross-attention layers (their `attn2` modules, in UNet order: down blocks,
mid block, up blocks) share tokens:
    per_layer   one token per layer (the paper's setting: 16 on SD 1.x, 7 on the embedded shapes UNet)
    per_block   one per UNet block (down_blocks.i, mid_block, up_blocks.i: the layers at one resolution)
    <k>         k groups of consecutive layers (k = 1 is plain textual inversion: the same tokens sample the same
                images, bit for bit; tests/test_rich_tokens.py)

How the per-layer conditionings reach their layers (the batch layout of sampling, guidance and guiders is untouched):
the G groups' conditionings sit side by side along the SEQUENCE axis, [B, G * L, D] (families with a pooled
embedding, sdxl: the G hidden-state blocks, then the mean of the G pooled vectors in the pooled rows), the
unconditional and negative conditionings are tiled G times likewise, and for the duration of sampling or of a
training step (`rows_per_layer`, a context manager that restores the original processors whatever happens, as
Prompt-to-Prompt's `controlled` does) each cross-attention layer's processor is wrapped by `GroupRows`, which
hands the diffusers processor only its group's L rows. No weight is touched: the fingerprint is unchanged. All G
conditionings come from ONE text-encoder pass over B * G prompts, each with its own added-token table
(FrozenGenerator.encode_prompt with per-prompt added_embeddings). Joint-attention families (sd3, flux,
shapes_flow) have no separate cross-attention layers: refused in one line before loading (`requirements`).

Export: xti_embeds.safetensors (no convention exists for per-layer tokens), read back by `load_xti`:
    keys      one per cross-attention layer, its diffusers module name (e.g.
              "down_blocks.0.attentions.0.transformer_blocks.0.attn2"): that layer's vectors [num_vectors,
              token_dim] (token_dim: every text encoder's width side by side, "encoders" says which columns are
              whose); layers of one group hold the same vectors
    metadata  format "steerexp-xti/1", placeholder, num_vectors, layers (the setting), groups (JSON: the layer
              names of each group, in order), encoders (JSON: [[name, width], ...])
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from steerexp import progress
from steerexp.generators import FrozenGenerator
from steerexp.generators.attention import swapped_processors
from steerexp.spec import check_settings
from steerexp.techniques.textual_inversion import TextualInversion
from steerexp.techniques.xti_spec import XTISpec

XTI_FORMAT = "steerexp-xti/1"
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


# ---------------------------------------------------------------------------- the layers and their groups
def cross_attention_layers(unet: nn.Module) -> list[str]:
    """The module names of the UNet's cross-attention layers (attn2), in UNet order: down, mid, up."""
    names = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    return sorted(names, key=lambda n: _BLOCK_ORDER.get(n.split(".")[0], 3))  # stable: order within a block kept


def layer_groups(layers: list[str], setting) -> list[list[str]]:
    """The groups of layers that share a token (module docstring: per_layer, per_block or k groups)."""
    if not layers:
        raise ValueError("this denoiser has no cross-attention layers (attn2): per-layer tokens need a UNet with "
                         "cross-attention")
    if setting == "per_layer":
        return [[n] for n in layers]
    if setting == "per_block":
        out: dict[str, list[str]] = {}
        for n in layers:
            out.setdefault(n.split(".attentions")[0], []).append(n)
        return list(out.values())
    k = int(setting)
    if not 1 <= k <= len(layers):
        raise ValueError(f"technique.layers={k} groups, but this UNet has {len(layers)} cross-attention layers; "
                         f"set technique.layers to a number in 1..{len(layers)}, per_layer or per_block")
    bounds = [round(i * len(layers) / k) for i in range(k + 1)]
    return [layers[a:b] for a, b in zip(bounds, bounds[1:])]


class GroupRows:
    """A cross-attention processor that hands the wrapped one (diffusers' own) only rows [start, stop) of the
    stacked conditioning: its group's L rows. Self-attention (no encoder states) passes through untouched."""

    def __init__(self, inner, start: int, stop: int):
        self.inner, self.start, self.stop = inner, start, stop

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states[:, self.start : self.stop]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


@contextlib.contextmanager
def rows_per_layer(unet: nn.Module, groups: list[list[str]], rows: int):
    """Within the block, the layers of group g read rows [g * rows, (g + 1) * rows) of the conditioning; the original
    processors are put back afterwards, also on error (no weight is touched)."""
    group = {f"{name}.processor": g for g, names in enumerate(groups) for name in names}
    rows_of = lambda name, proc: (GroupRows(proc, group[name] * rows, (group[name] + 1) * rows) if name in group
                                  else proc)
    with swapped_processors(unet, rows_of):
        yield


def read_export(path: str | Path, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors export whose metadata `format` is `fmt` (XTI's and NeTI's), else a
    ValueError naming what the file is not."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != fmt:
            raise ValueError(f"{path} is not {what} export (metadata format {meta.get('format')!r}, expected "
                             f"{fmt!r})")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def load_xti(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """xti_embeds.safetensors -> ({layer module name: [num_vectors, token_dim]}, metadata with groups and encoders
    parsed from JSON). See the module docstring for the layout."""
    tensors, meta = read_export(path, XTI_FORMAT, "an XTI")
    meta["groups"], meta["encoders"] = json.loads(meta["groups"]), json.loads(meta["encoders"])
    meta["num_vectors"] = int(meta["num_vectors"])
    return tensors, meta


# ---------------------------------------------------------------------------- the technique
class XTI(TextualInversion):
    """Textual inversion in P+: `embeddings` [G, num_vectors, token_dim], one token per group of cross-attention
    layers (module docstring), the sole nn.Parameter; everything else is textual inversion's."""

    spec = XTISpec

    @classmethod
    def requirements(cls, cfg):
        why = (f"{cls.__name__} gives each cross-attention layer of a UNet its own token, and this family's "
               "transformer has joint attention (no separate cross-attention layers); use textual_inversion")
        return super().requirements(cfg) | {"cross_attention": why}

    def __init__(self, generator: FrozenGenerator, layers="per_layer", **kwargs):
        check_settings(self.spec, locals() | kwargs)
        super().__init__(generator, **kwargs)
        self.layers = layers
        self.layer_names = cross_attention_layers(generator.denoiser)
        self.groups = layer_groups(self.layer_names, layers)
        hidden, _ = generator.unpack(generator.encode_prompt([""]))
        self.rows = hidden.shape[1]  # L: the hidden-state rows each layer reads
        self.make_deltas()

    def make_deltas(self) -> None:
        """The learned deltas (XTI: one row block per group, replacing textual inversion's [num_vectors, D])."""
        self.embeddings = nn.Parameter(torch.zeros(len(self.groups), self.num_vectors, self.generator.token_dim))

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def structure(self) -> dict:
        return {"num_vectors": self.num_vectors, "layers": self.layers, "groups": len(self.groups)}

    def start_from(self, init: torch.Tensor) -> None:
        self.embeddings.copy_(init.expand_as(self.embeddings))

    # ------------------------------------------------------------------ the per-layer conditioning
    def tables(self, vectors: torch.Tensor) -> torch.Tensor:
        """[..., G, num_vectors, token_dim] vectors -> [..., G, n_added, token_dim] added-token tables (our rows)."""
        gen = self.generator
        rows = torch.tensor(self.token_ids, device=vectors.device)
        table = vectors.new_zeros(*vectors.shape[:-2], len(gen.added_tokens), vectors.shape[-1])
        return table.index_copy(table.ndim - 2, rows, vectors)

    def group_vectors(self, strength: float = 1.0) -> torch.Tensor:
        """[G, num_vectors, token_dim]: v_init + strength * (v*_g - v_init) (the magnitude evaluator's knob)."""
        if strength == 1.0:
            return self.embeddings
        return self.initial + strength * (self.embeddings - self.initial)

    def stacked(self, prompts: list[str], tables: torch.Tensor) -> torch.Tensor:
        """The conditioning [B, G * L (+ pooled rows), D] of the prompts, group g's block from tables[g]
        ([G, n_added, W], shared by the prompts) or tables[b, g] ([B, G, n_added, W], per prompt)."""
        gen, G, B = self.generator, self.num_groups, len(prompts)
        if tables.ndim == 3:
            per_prompt = tables.repeat_interleave(B, dim=0)                  # row g * B + b: tables[g]
        else:
            per_prompt = tables.transpose(0, 1).reshape(G * B, *tables.shape[2:])  # row g * B + b: tables[b, g]
        cond = gen.encode_prompt(list(prompts) * G, per_prompt.to(gen.device))
        hidden, pooled = gen.unpack(cond)
        hidden = hidden.view(G, B, *hidden.shape[1:]).transpose(0, 1).reshape(B, G * hidden.shape[1], -1)
        pooled = pooled.view(G, B, -1).mean(0) if pooled is not None else None
        return gen.pack(hidden, pooled)

    def tiled(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """A conditioning without per-layer tokens (the null, a negative prompt), the same for every group."""
        if cond is None:
            return None
        hidden, pooled = self.generator.unpack(cond)
        return self.generator.pack(hidden.repeat(1, self.num_groups, 1), pooled)

    def layer_control(self):
        return rows_per_layer(self.generator.denoiser, self.groups, self.rows)

    def training_cond(self, prompts: list[str]):
        return self.stacked(prompts, self.tables(self.group_vectors()))

    def edited_cond(self, prompts: list[str]):
        """The edit's conditioning for sampling: a tensor, or a callable (t, i) -> tensor (neti.py)."""
        tables = self.tables(self.group_vectors(self.strength)).detach()
        return self.stacked(prompts, tables)

    # ------------------------------------------------------------------ use
    def generate(self, prompts: list[str], seeds: list[int], edited: bool, batch_size: int = 64) -> torch.Tensor:
        """As FrozenGenerator.generate (same seeds, steps and guidance), with the per-layer conditioning and the
        processors that route it; the baseline (edited=False) is textual inversion's, the class word."""
        if not edited:
            return super().generate(prompts, seeds, edited)
        if len(prompts) != len(seeds):
            raise ValueError(f"generate needs one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
        gen, steps, out = self.generator, self.sampling_steps, []
        texts = [self.fill(p, True) for p in prompts]
        with torch.no_grad(), self.layer_control():
            uncond, negative = (self.tiled(e) for e in gen.guidance_embeddings(self.guidance))
            for i in range(0, len(texts), batch_size):
                p, s = texts[i : i + batch_size], list(seeds[i : i + batch_size])
                tick = lambda *_, n=len(p): progress.advance(n / steps)
                z = gen.sample(self.edited_cond(p), gen.initial_latents(s), uncond, steps, self.guidance,
                               negative=negative, callback=tick)
                out.append(gen.decode_latents(z).float().cpu())
        return torch.cat(out)

    def per_layer_vectors(self) -> dict[str, torch.Tensor]:
        """{layer module name: [num_vectors, token_dim]} of the learned tokens (a group's layers share theirs)."""
        vectors = self.embeddings.detach().cpu()
        return {name: vectors[g].clone().contiguous() for g, names in enumerate(self.groups) for name in names}

    def export(self, run_dir) -> list[str]:
        gen = self.generator
        meta = {"format": XTI_FORMAT, "placeholder": self.placeholder, "num_vectors": str(self.num_vectors),
                "layers": str(self.layers), "groups": json.dumps(self.groups),
                "encoders": json.dumps([[e.name, e.width] for e in gen.encoders])}
        save_file(self.per_layer_vectors(), str(Path(run_dir) / "xti_embeds.safetensors"), metadata=meta)
        return ["xti_embeds.safetensors"]
