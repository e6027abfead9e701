"""Pretraining of the embedded generator: a miniature Stable Diffusion on the shapes world.

Three stages, each a plain loop: a tiny AutoencoderKL on world images; a CLIPTextModel and
a UNet2DConditionModel trained jointly on the VAE latents with the denoising loss and
classifier-free dropout (EMA weights are kept); then everything is saved as a diffusers
StableDiffusionPipeline folder with a DDIM scheduler and no safety checker.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from steerexp.pretrain import weak
from steerexp.pretrain.common import optimizer_step, training_setup, to_tensor
from steerexp.pretrain.tokenizer import write_clip_tokenizer_files
from steerexp.worlds.shapes import world


def unknown_word_pool(tokenizer: CLIPTokenizer, n: int, seed: int) -> tuple[str, ...]:
    """`n` whole-word BPE tokens (alphabetic, >= 4 letters) that no world text uses and that
    do not contain the held-out name, drawn deterministically from the vocabulary."""
    banned = world.world_words()
    words = sorted(t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha()
                   and t[:-4].isascii() and len(t) >= 8 and t[:-4] not in banned and world.HELDOUT not in t)
    rng = np.random.default_rng([seed, 3])
    return tuple(words[i] for i in sorted(rng.choice(len(words), size=min(n, len(words)), replace=False)))


def training_data(cfg, seed: int, unknown_words: tuple[str, ...] = ()):
    """World images and captions for the generator (held-out name never in a caption)."""
    shapes = world.SEEN_SHAPES if cfg.heldout_mode == "absent" else world.SHAPES
    if cfg.heldout_mode not in ("generic", "absent"):
        raise ValueError(f"world.heldout_mode must be 'generic' or 'absent', got {cfg.heldout_mode!r}")
    images, scenes = world.dataset(seed, cfg.n_images, shapes=shapes, res=cfg.resolution)
    rng = np.random.default_rng([seed, 1])
    captions = [[world.generator_caption(s, rng, cfg.generic_rate, unknown_words, cfg.unknown_word_rate)
                 for _ in range(cfg.captions_per_image)] for s in scenes]
    assert not any(world.HELDOUT in c.split() for cs in captions for c in cs)
    protected, protected_captions = world.protected_set(cfg.resolution)
    return images, captions, protected, list(protected_captions)


def build_vae(cfg, resolution: int) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=resolution,
    )


def train_vae(vae: AutoencoderKL, images: torch.Tensor, cfg, gen: torch.Generator) -> None:
    opt, sched, progress = training_setup(vae.parameters(), "vae", cfg.lr, cfg.steps, 0.0, warmup=min(100, cfg.steps))
    vae.train()
    for step in range(cfg.steps):
        x = images[torch.randint(len(images), (cfg.batch_size,), generator=gen)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        progress(step, optimizer_step(opt, sched, loss))
    vae.eval()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([vae.encode(images[i : i + batch] * 2 - 1).latent_dist.mean for i in range(0, len(images), batch)])


def build_text_encoder(cfg, tokenizer: CLIPTokenizer, cls=CLIPTextModel, projection_dim: int | None = None):
    """A CLIP text model of `cls` (the flow generator uses CLIPTextModelWithProjection) for the tokenizer."""
    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=projection_dim or cfg.hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_unet(cfg, latent_channels: int, sample_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(unet, text_encoder, latents, caption_ids, protected_latents, protected_ids, empty_ids, cfg, gen,
               early_step: int | None = None, on_early=None):
    """Joint denoising training of the UNet and text encoder; returns EMA copies of both. After step `early_step`
    (1-based) `on_early(unet_ema)` gets the UNet's EMA weights then ({name: tensor}); when it returns True, training
    stops there (the weak-only build) and None is returned."""
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012, prediction_type="epsilon")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt, sched, progress = training_setup(params, "unet", cfg.lr, cfg.steps, 0.0, warmup=min(200, cfg.steps))
    unet.train(), text_encoder.train()
    n, k = caption_ids.shape[:2]
    for step in range(cfg.steps):
        b = cfg.batch_size
        idx = torch.randint(n, (b,), generator=gen)
        z = latents[idx].clone()
        ids = caption_ids[idx, torch.randint(k, (b,), generator=gen)].clone()
        prot = torch.rand(b, generator=gen) < cfg.protected_rate
        which = torch.randint(len(protected_latents), (b,), generator=gen)
        z[prot], ids[prot] = protected_latents[which[prot]], protected_ids[which[prot]]
        ids[torch.rand(b, generator=gen) < cfg.cond_dropout] = empty_ids
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(1000, (b,), generator=gen)
        pred = unet(noise_sched.add_noise(z, noise, t), t, text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise)
        loss_value = optimizer_step(opt, sched, loss, clip_params=params)
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        progress(step, loss_value)
        if on_early is not None and step + 1 == early_step:
            names = [n for n, _ in unet.named_parameters()]
            if on_early(dict(zip(names, ema[: len(names)]))):
                return None
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval(), text_encoder.eval()
    return noise_sched


def pretrain_generator(cfg, out: Path, seed: int, weak_only: bool = False) -> Path:
    """Train and save the embedded generator as a StableDiffusionPipeline folder, and (generator_weak.fraction)
    its early UNet beside it as `<out>_weak` (pretrain/weak.py). weak_only: the same seeded run, stopped after the early
    step, writing only the weak folder (the generator's folder `out` is read, not written: its VAE must be the one
    this run trains, so that the weak UNet shares the generator's latent space; checked bit for bit)."""
    import tempfile

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    wc = cfg.world
    weak_out = out.parent / f"{out.name}_weak"
    with tempfile.TemporaryDirectory() as scratch:   # weak-only: the tokenizer files are read, not kept
        tok_dir = write_clip_tokenizer_files((Path(scratch) if weak_only else out) / "tokenizer",
                                             cfg.text_encoder.max_length)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unknown = unknown_word_pool(tokenizer, wc.unknown_words, seed) if wc.unknown_word_rate > 0 else ()
    images, captions, protected, protected_captions = training_data(wc, seed, unknown)
    x = to_tensor(images)
    px = to_tensor(protected)
    print(f"[data] {len(x)} world images, {len(px)} protected, {wc.captions_per_image} captions each", flush=True)

    vae = build_vae(cfg.vae, wc.resolution)
    train_vae(vae, torch.cat([x, px.repeat(max(1, len(x) // 200), 1, 1, 1)]), cfg.vae, gen)
    latents, protected_latents = encode_latents(vae, x), encode_latents(vae, px)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    sf = vae.config.scaling_factor
    latents, protected_latents = latents * sf, protected_latents * sf

    caption_ids = tokenize(tokenizer, [c for cs in captions for c in cs]).view(len(captions), wc.captions_per_image, -1)
    protected_ids = tokenize(tokenizer, protected_captions)
    empty_ids = tokenize(tokenizer, [""])[0]

    if weak_only:
        theirs = AutoencoderKL.from_pretrained(out / "vae")
        public = lambda conf: json.loads(json.dumps({k: v for k, v in dict(conf).items() if not k.startswith("_")}))
        same = public(theirs.config) == public(vae.config) and all(
            torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), vae.state_dict().values()))
        if not same:
            gap = max(((a.float() - b.float()).abs().max().item() for a, b in
                       zip(theirs.state_dict().values(), vae.state_dict().values())), default=float("nan"))
            raise RuntimeError(f"generator_weak: this run's VAE differs from {out / 'vae'} (largest weight "
                               f"difference {gap:.3g}), so its early UNet would "
                               "not share that generator's latent space; rebuild both with stages=[generator] "
                               "(the same seed and threads as the generator's build)")
        print(f"[generator_weak] this run's VAE equals {out / 'vae'} bit for bit", flush=True)

    text_encoder = build_text_encoder(cfg.text_encoder, tokenizer)
    unet = build_unet(cfg.unet, vae.config.latent_channels, latents.shape[-1], cfg.text_encoder.hidden_size)
    at = weak.early_step(cfg, cfg.unet.steps)
    if weak_only and at is None:
        raise ValueError("generator_weak.fraction is null: set it (e.g. 0.1) to build the weak model")
    on_early = (lambda w: weak.save_weights(unet, w, weak_out, "unet", "generator_weak") or weak_only) if at else None
    noise_sched = train_unet(unet, text_encoder, latents, caption_ids, protected_latents, protected_ids,
                             empty_ids, cfg.unet, gen, at, on_early)
    if weak_only:
        if noise_sched is not None:  # (early_step <= steps always: never reached)
            raise RuntimeError("generator_weak: training ended without reaching the weak model's step")
        weak.write_index(weak_out, out, "unet")
        return weak_out

    scheduler = DDIMScheduler.from_config(noise_sched.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    if at is not None:
        weak.write_index(weak_out, out, "unet")
    return out
