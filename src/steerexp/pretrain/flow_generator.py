"""Pretraining of the second embedded generator: a miniature SD3-format flow-matching transformer.

Same world, captions, held-out class, protected set and classifier-free dropout as the UNet generator
(generator.py: `training_data`, the rare-word pool), another family: a StableDiffusion3Pipeline folder with

- `transformer`      an SD3Transformer2DModel (MMDiT) on the shapes VAE's 8 x 8 x 4 latents;
- `vae`              a copy of the shapes generator's VAE (shift_factor 0, its scaling_factor kept);
- `text_encoder(_2)` two tiny CLIPTextModelWithProjection ("CLIP-L" and "CLIP-G") with the shapes
                     generator's CLIP BPE tokenizer files (`tokenizer`, `tokenizer_2`);
- `text_encoder_3`   a tiny T5EncoderModel with a T5 tokenizer built here offline (`t5_tokenizer`:
                     the world's words as whole pieces, single characters as the fallback, 24 tokens);
- `scheduler`        FlowMatchEulerDiscreteScheduler (shift 1: see conf/pretrain.yaml).

The text encoders are trained jointly with the transformer (rectified flow: x_t = (1 - s) x0 + s eps,
target eps - x0, model time 1000 s, s logit-normal), and the conditioning is built exactly as the SD3
pipeline and steerexp's SD3Generator build it (`conditioning`; tests/test_shapes_flow.py checks the three
agree). EMA weights are saved.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from steerexp import ASSETS
from steerexp.pretrain import weak
from steerexp.pretrain.common import optimizer_step, training_setup, to_tensor
from steerexp.pretrain.generator import build_text_encoder, encode_latents, tokenize, training_data, unknown_word_pool
from steerexp.pretrain.tokenizer import write_clip_tokenizer_files
from steerexp.worlds.shapes import world

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def vae_folder(out: Path) -> Path:
    """The shapes VAE the flow generator reuses: the one this recipe built into `out`, else the shipped one."""
    return out / "shapes" / "vae" if (out / "shapes" / "vae" / "config.json").is_file() else ASSETS / "shapes" / "vae"


def t5_tokenizer(folder: Path, max_length: int):
    """A T5 tokenizer (Unigram, Metaspace, '</s>' appended) over the words the generator's captions use
    (the held-out name is not one: a tokenizer fitted to the training captions never saw it) plus
    single characters, so any other word (a rare word, the held-out name) is spelled in characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = sorted(world.world_words() - {world.HELDOUT})
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [(s, 0.0) for s in T5_SPECIALS] + [("\u2581" + w, -2.0) for w in words] + [("\u2581", -4.0)]
    vocab += [(c, -6.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=T5_SPECIALS.index("<unk>"), byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", T5_SPECIALS.index("</s>"))])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)
    fast.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)  # what the pipeline will load


def build_clip(cfg, tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    return build_text_encoder(cfg, tokenizer, CLIPTextModelWithProjection, cfg.projection_dim)


def build_t5(cfg, tokenizer, d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=tokenizer.model_max_length * 2, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    ))


def build_transformer(cfg, latent_channels: int, sample_size: int, joint_dim: int, pooled_dim: int):
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=cfg.patch_size, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=joint_dim, caption_projection_dim=cfg.attention_head_dim * cfg.num_attention_heads,
        pooled_projection_dim=pooled_dim, pos_embed_max_size=sample_size // cfg.patch_size, qk_norm=cfg.qk_norm,
    )


def conditioning(clip_l, clip_g, t5, ids_l, ids_g, ids_t5, joint_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_hidden_states [B, CLIP length + T5 length, joint_dim], pooled [B, P]) as
    StableDiffusion3Pipeline.encode_prompt and steerexp.generators.sd3.SD3Generator build them: CLIP-L and
    CLIP-G penultimate hidden states side by side, zero-padded to the T5 width, then the T5 rows (no attention
    mask); pooled = both projected outputs."""
    out_l = clip_l(ids_l, output_hidden_states=True)
    out_g = clip_g(ids_g, output_hidden_states=True)
    clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    hidden = torch.cat([clip, t5(ids_t5)[0]], dim=-2)
    return hidden, torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)


def sample_sigmas(b: int, cfg, gen: torch.Generator) -> torch.Tensor:
    """Training noise levels in (0, 1): logit-normal (SD3's rf/lognorm) or uniform."""
    if cfg.sigma_sampling == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(b, generator=gen))
    if cfg.sigma_sampling == "uniform":
        return torch.rand(b, generator=gen)
    raise ValueError(f"generator_flow.sigma_sampling must be logit_normal or uniform, got {cfg.sigma_sampling!r}")


def train_flow(transformer, encoders, latents, ids, protected_latents, protected_ids, empty_ids, cfg, gen,
               early_step: int | None = None, on_early=None) -> bool:
    """Joint rectified-flow training of the transformer and the three text encoders; EMA weights end in place.
    ids / protected_ids / empty_ids: per encoder (CLIP-L, CLIP-G, T5) token-id tensors. After step `early_step`
    (1-based) `on_early(transformer_ema)` gets the transformer's EMA weights ({name: tensor}); when it returns True
    training stops there (the weak-only build) and False is returned (True: trained to the end)."""
    clip_l, clip_g, t5 = encoders
    joint_dim = transformer.config.joint_attention_dim
    modules = [transformer, *encoders]
    params = [p for m in modules for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt, sched, progress = training_setup(params, "flow", cfg.lr, cfg.steps, 0.0, warmup=min(cfg.warmup, cfg.steps))
    for m in modules:
        m.train()
    n, k = ids[0].shape[:2]
    for step in range(cfg.steps):
        b = cfg.batch_size
        idx = torch.randint(n, (b,), generator=gen)
        which_caption = torch.randint(k, (b,), generator=gen)
        z = latents[idx].clone()
        batch_ids = [e[idx, which_caption].clone() for e in ids]
        prot = torch.rand(b, generator=gen) < cfg.protected_rate
        which = torch.randint(len(protected_latents), (b,), generator=gen)
        z[prot] = protected_latents[which[prot]]
        drop = torch.rand(b, generator=gen) < cfg.cond_dropout
        for e, p_ids, empty in zip(batch_ids, protected_ids, empty_ids):
            e[prot] = p_ids[which[prot]]
            e[drop] = empty  # the empty prompt in every encoder
        noise = torch.randn(z.shape, generator=gen)
        sigma = sample_sigmas(b, cfg, gen)
        s = sigma.view(-1, 1, 1, 1)
        hidden, pooled = conditioning(clip_l, clip_g, t5, *batch_ids, joint_dim)
        pred = transformer(hidden_states=(1 - s) * z + s * noise, timestep=sigma * 1000,
                           encoder_hidden_states=hidden, pooled_projections=pooled).sample
        loss = F.mse_loss(pred, noise - z)
        loss_value = optimizer_step(opt, sched, loss, clip_params=params)
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        progress(step, loss_value)
        if on_early is not None and step + 1 == early_step:
            names = [n for n, _ in transformer.named_parameters()]
            if on_early(dict(zip(names, ema[: len(names)]))):
                return False
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    for m in modules:
        m.eval()
    return True


def pretrain_flow_generator(cfg, out: Path, seed: int, vae_dir: Path, weak_only: bool = False) -> Path:
    """Train and save the flow generator as a StableDiffusion3Pipeline folder in `out`, and (generator_weak.fraction)
    its early transformer beside it as `<out>_weak` (pretrain/weak.py). weak_only: the same seeded run stopped
    after the early step, writing only the weak folder (`out` must hold the generator: the weak folder borrows the
    rest from it)."""
    import tempfile

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    wc, fc = cfg.world, cfg.generator_flow
    out = Path(out)
    weak_out = out.parent / f"{out.name}_weak"
    if weak_only and not (out / "model_index.json").is_file():
        raise FileNotFoundError(f"generator_flow_weak: {out} holds no flow generator to borrow the rest from; build "
                                "it first (stages=[generator_flow])")
    with tempfile.TemporaryDirectory() as scratch:   # weak-only: the tokenizer files are read, not kept
        tok_root = Path(scratch) if weak_only else out
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tok_root / "tokenizer", fc.max_length))
        tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tok_root / "tokenizer_2",
                                                                               fc.max_length))
        tokenizer_3 = t5_tokenizer(tok_root / "tokenizer_3", fc.t5_max_length)
    # the same world draw, captions and rare-word pool as the UNet generator (generator.py)
    unknown = unknown_word_pool(tokenizer, wc.unknown_words, seed) if wc.unknown_word_rate > 0 else ()
    images, captions, protected, protected_captions = training_data(wc, seed, unknown)
    x, px = to_tensor(images), to_tensor(protected)
    print(f"[data] {len(x)} world images, {len(px)} protected, {wc.captions_per_image} captions each", flush=True)

    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # the SD3 pipeline decodes latents / scaling_factor + shift_factor
    sf = vae.config.scaling_factor
    latents, protected_latents = encode_latents(vae, x) * sf, encode_latents(vae, px) * sf

    flat = [c for cs in captions for c in cs]
    ids, protected_ids, empty_ids = [], [], []
    for tok in (tokenizer, tokenizer_2, tokenizer_3):  # each encoder's own tokenizer, as the pipeline does
        ids.append(tokenize(tok, flat).view(len(captions), wc.captions_per_image, -1))
        protected_ids.append(tokenize(tok, list(protected_captions)))
        empty_ids.append(tokenize(tok, [""])[0])

    clip_l, clip_g = build_clip(fc.clip_l, tokenizer), build_clip(fc.clip_g, tokenizer_2)
    joint_dim = fc.t5.d_model
    if joint_dim < fc.clip_l.hidden_size + fc.clip_g.hidden_size:
        raise ValueError("generator_flow.t5.d_model (the joint attention width) must be >= the two CLIP widths")
    t5 = build_t5(fc.t5, tokenizer_3, joint_dim)
    transformer = build_transformer(fc.transformer, vae.config.latent_channels, latents.shape[-1], joint_dim,
                                    fc.clip_l.projection_dim + fc.clip_g.projection_dim)
    n_params = sum(p.numel() for m in (transformer, t5) for p in m.parameters())
    print(f"[flow] transformer + T5: {n_params / 1e6:.2f}M parameters", flush=True)
    at = weak.early_step(cfg, fc.steps)
    if weak_only and at is None:
        raise ValueError("generator_weak.fraction is null: set it (e.g. 0.1) to build the weak model")
    save = lambda w: weak.save_weights(transformer, w, weak_out, "transformer", "generator_flow_weak") or weak_only
    if not train_flow(transformer, (clip_l, clip_g, t5), latents, ids, protected_latents, protected_ids, empty_ids,
                      fc, gen, at, save if at else None):
        weak.write_index(weak_out, out, "transformer")
        return weak_out
    if weak_only:  # (early_step <= steps always: never reached; the generator in `out` is never overwritten)
        raise RuntimeError("generator_flow_weak: training ended without reaching the weak model's step")

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=fc.shift)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g,
                                    tokenizer_2=tokenizer_2, text_encoder_3=t5, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(out)
    share_with_sibling(out)
    if at is not None:
        weak.write_index(weak_out, out, "transformer")
    return out


# the components the flow generator takes unchanged from the shapes generator: its name -> the sibling's folder
SHARED = {"vae": "vae", "tokenizer": "tokenizer", "tokenizer_2": "tokenizer"}
IGNORED = ("tokenizer.json",)  # the fast tokenizers' cache of the files below, not read by the CLIPTokenizer loaded


def share_with_sibling(folder: Path, sibling: str = "shapes") -> dict:
    """Replace the copies of the shapes generator's VAE and tokenizer files in `folder` by a shared.json that
    borrows them from `folder.parent / sibling` (generators.shared_components), with the config keys that differ
    as overrides (the VAE's shift_factor 0.0, the tokenizers' model_max_length 16). A copy is replaced only when
    its weight and vocabulary files are byte-identical to the sibling's and it loads equal from there (same
    config, same weights, same token ids); else it stays. Without the sibling (a build into out=DIR that did not
    build the generator stage) nothing changes. Returns the shared.json written ({} if none)."""
    import importlib
    import json
    import shutil

    from steerexp.generators import SHARED_FILE, pipeline_index
    from steerexp.generators.frozen import borrowed_components

    folder = Path(folder)
    manifest = {}
    for name, theirs in SHARED.items():
        own, source = folder / name, folder.parent / sibling / theirs
        if not own.is_dir() or not source.is_dir():
            continue
        configs = [f for f in ("config.json", "tokenizer_config.json") if (own / f).is_file()]
        data = sorted(p.name for p in own.iterdir() if p.is_file() and p.name not in configs + list(IGNORED))
        if any(not (source / f).is_file() or (source / f).read_bytes() != (own / f).read_bytes() for f in data):
            continue
        overrides = {}
        for f in configs:
            mine, base = json.loads((own / f).read_text()), json.loads((source / f).read_text())
            overrides |= {k: v for k, v in mine.items() if not k.startswith("_") and base.get(k) != v}
        manifest[name] = {"from": f"{sibling}/{theirs}", "config": overrides}
    if not manifest:
        return {}
    (folder / SHARED_FILE).write_text(json.dumps(manifest, indent=1))
    library = {name: pipeline_index(folder)[name] for name in manifest}
    borrowed = borrowed_components(folder, "fp32")
    for name in list(manifest):
        cls = getattr(importlib.import_module(library[name][0]), library[name][1])
        if _same_component(cls.from_pretrained(str(folder / name)), borrowed[name]):
            shutil.rmtree(folder / name)
        else:
            del manifest[name]
    if manifest:
        (folder / SHARED_FILE).write_text(json.dumps(manifest, indent=1))
    else:
        (folder / SHARED_FILE).unlink()
    return manifest


def _same_component(a, b) -> bool:
    """Two loads of a component are the same: a model's config (but where it was read) and every weight; a
    tokenizer's vocabulary, length and ids for the world's captions."""
    if isinstance(a, torch.nn.Module):
        config = lambda m: {k: v for k, v in dict(m.config).items() if k != "_name_or_path"}
        sa, sb = a.state_dict(), b.state_dict()
        return config(a) == config(b) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    probe = ["a small red star on the left", "", "a photo of a zebra and a blue circle"]
    ids = lambda t: t(probe, padding="max_length", max_length=t.model_max_length, truncation=True).input_ids
    return a.get_vocab() == b.get_vocab() and a.model_max_length == b.model_max_length and ids(a) == ids(b)
