"""Real-architecture diffusers pipelines with random weights, built offline, for measuring techniques at
scale (speed and memory do not depend on the weights) and for testing every generator family.

    make_random_pipeline("sd15", "out/sd15-real", size="real")   # -> Path of a diffusers pipeline folder

Each folder (model_index.json + one subfolder per component, weights as safetensors) loads with the diffusers
pipeline class of its family, from the local path, with no download:

    sd15  StableDiffusionPipeline    unet: UNet2DConditionModel; text_encoder: CLIPTextModel (tokenizer:
                                     CLIPTokenizer); scheduler: PNDMScheduler
    sdxl  StableDiffusionXLPipeline  unet: UNet2DConditionModel with addition_embed_type "text_time" and
                                     projection_class_embeddings_input_dim = text_encoder_2's projection_dim
                                     + 6 x addition_time_embed_dim (real: 1280 + 6 x 256 = 2816);
                                     text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection
                                     (cross_attention_dim = the two hidden sizes, 768 + 1280); tokenizer,
                                     tokenizer_2: CLIPTokenizer (the second pads with "!"); EulerDiscreteScheduler
    sd3   StableDiffusion3Pipeline   transformer: SD3Transformer2DModel; text_encoder, text_encoder_2:
                                     CLIPTextModelWithProjection (pooled_projection_dim = the two projection
                                     dims, 768 + 1280 = 2048); text_encoder_3: T5EncoderModel or None
                                     (joint_attention_dim = T5's d_model, 4096; CLIP hidden states are
                                     zero-padded to it); tokenizer_3: T5TokenizerFast;
                                     FlowMatchEulerDiscreteScheduler (shift 3)
    flux  FluxPipeline               transformer: FluxTransformer2DModel (guidance_embeds; pooled_projection_dim =
                                     CLIP's hidden size 768, joint_attention_dim = T5's d_model 4096);
                                     text_encoder: CLIPTextModel, text_encoder_2: T5EncoderModel (tokenizer_2:
                                     T5TokenizerFast); FlowMatchEulerDiscreteScheduler (use_dynamic_shifting)

All have an AutoencoderKL with 4 resolution levels (VAE scale factor 8); sd3 and flux have 16 latent channels
with their real scaling_factor and shift_factor, no quant convs.

size="tiny": a 0.5-1.7M-parameter configuration per family (widths 8-64, 1-2 layers), built and saved in well
under 5 s, sampling 2 steps at 32-64 px in under 2 s on a CPU; the tests use it.

size="real": the public configurations (config values only): SD 1.5 (UNet 860M, CLIP ViT-L/14 text encoder
123M, VAE 84M), SDXL base 1.0 (UNet 2.6B, CLIP-L + OpenCLIP bigG text encoders, 123M + 695M), SD3 medium
(MMDiT 2B: 24 layers x 24 heads x 64; CLIP-L + bigG with projections; T5 v1.1 XXL encoder 4.8B) and FLUX.1-dev
(MMDiT 12B: 19 double + 38 single blocks x 24 heads x 128, guidance embedding; CLIP-L; T5 XXL). CLIP
vocabularies are 49408 (the real OpenAI BPE, which open_clip ships; ids 49406/49407 for start/end), T5's
embedding 32128 rows. Reductions for what does not fit a machine's memory, all OFF by default and recorded in
the folder's random_pipeline.json:

    depth      fraction of the denoiser's transformer blocks kept (sd3: num_layers; flux: num_layers and
               num_single_layers; sdxl: transformer_layers_per_block; sd15 has none to reduce), each >= 1
    t5=False   sd3 only: no text_encoder_3 / tokenizer_3 (StableDiffusion3Pipeline then feeds zeros for T5);
               as with the real SD3 folders, load it with from_pretrained(folder, text_encoder_3=None,
               tokenizer_3=None): diffusers refuses a model_index without them otherwise
    t5_layers  number of T5 encoder layers (real: 24) at full width

Full FLUX.1-dev (48 GB in fp32) and T5-XXL (19 GB) do not fit a 24 GiB machine: there, use e.g. flux with
depth=0.25 (5 double + 10 single blocks, 3.0B) and t5_layers=4, sd3 with t5=False. A build that would not fit
the available memory (weights are built in fp32 one component at a time, then cast to `dtype`) stops first
with a message naming these reductions.

Tokenizers are made in code, no download: tiny CLIP BPE vocabularies from a word list (the 256 byte symbols
and their end-of-word forms, merges that make each listed word one token, then <|startoftext|> and
<|endoftext|>), the real CLIP BPE for size="real", and a small T5 unigram vocabulary ("<pad>", "</s>",
"<unk>" at ids 0-2 as in T5, "\u2581word" pieces for the word list, single characters as fallback) wrapped
as a transformers T5 tokenizer; T5's embedding keeps its real 32128 rows for size="real".

Weights: normal(0, 1/sqrt(fan_in)) for every matrix/convolution/embedding, ones for 1-D weights (norms), zeros
for biases, from one torch.Generator seeded by (seed, component): the same seed gives the same weights. The
libraries' own initialisation is skipped (the weights are overwritten anyway), so a real SD 1.5 builds in
seconds.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from pathlib import Path

import torch

ARCHS = ("sd15", "sdxl", "sd3", "flux")
SIZES = ("tiny", "real")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
CLIP_MAX_LENGTH = 77

# ----------------------------------------------------------------------------------------------- word list
WORDS = """
a an the of and or with on in at to from by for as is are was it its this that these those my your our one two
three four five six seven eight nine ten photo picture image rendering rendition painting drawing sketch style
close up close-up cropped clean dark bright good nice small large big little tiny huge left right top bottom
middle center centre above below near far front back object thing shape shapes star circle square triangle
rectangle hexagon pentagon ring cross heart diamond oval ellipse line dot disk cube sphere cone cylinder
red green blue yellow orange purple pink brown black white grey gray cyan magenta violet gold silver colour color
cat dog bird fish horse cow sheep lion tiger bear mouse car bus bike boat plane train house tree flower sun moon
sky sea water mountain city street road forest field garden room table chair cup bottle book lamp window door
man woman person people child boy girl face hand portrait landscape background foreground scene view light
shadow night day morning evening summer winter spring autumn old new young beautiful ugly happy sad quiet
high low quality detailed realistic blurry sharp art artist oil watercolor watercolour digital render
""".split()


def word_list() -> list[str]:
    """The tiny tokenizers' words: the list above, then every ASCII letter as a word (sorted, deduplicated)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return list(dict.fromkeys(WORDS + letters))


# ----------------------------------------------------------------------------------------------- tokenizers
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    bs += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word's symbols: merge the lowest-ranked adjacent pair until none applies."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, _ = min(pairs)
        if rank == math.inf:
            break
        first, second = next(p for p in zip(symbols, symbols[1:]) if ranks.get(p) == rank)
        out, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                out.append(first + second)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary (byte symbols, their end-of-word forms, one merged token per merge, then
    <|startoftext|>, <|endoftext|>) whose merges make each of `words` a single token."""
    byte_symbols = list(_bytes_to_unicode().values())
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:  # new merges rank last: they apply only after every earlier one
            ranks[(symbols[0], symbols[1])] = len(ranks)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    merges = sorted(ranks, key=ranks.get)
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def make_clip_tokenizer(folder: Path, size: str, pad_token: str = "<|endoftext|>"):
    """Save a CLIPTokenizer in `folder`: the real 49408-token BPE (size="real") or a word-list one; returns it."""
    from transformers import CLIPTokenizer

    if size == "real":
        from steerexp.pretrain.tokenizer import write_clip_tokenizer_files

        tmp = Path(folder).with_name(Path(folder).name + ".bpe")
        write_clip_tokenizer_files(tmp, CLIP_MAX_LENGTH)
        tok = CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"), pad_token=pad_token,
                            model_max_length=CLIP_MAX_LENGTH)
        shutil.rmtree(tmp)
    else:
        vocab, merges = clip_vocab_and_merges(word_list())
        tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)
    tok.save_pretrained(str(folder))
    return tok


def make_t5_tokenizer(folder: Path, max_length: int):
    """Save a T5 tokenizer (unigram; <pad>=0, </s>=1, <unk>=2 as in T5) in `folder`; returns it."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -5.0 - 0.01 * i) for i, w in enumerate(word_list())]
    chars = [chr(c) for c in range(33, 127)]
    pieces += [(c, -20.0) for c in chars] + [("\u2581" + c, -21.0) for c in chars if c.isalpha()]
    pieces = list(dict(pieces).items())  # first score wins for a repeated piece
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return tok


# ----------------------------------------------------------------------------------------------- configs
def _clip_config(kind: str, size: str, vocab_size: int) -> dict:
    """CLIPTextConfig kwargs: kind "L" (OpenAI ViT-L/14 text tower) or "G" (OpenCLIP bigG)."""
    if size == "tiny":
        width = 32
        cfg = dict(hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   projection_dim=width, hidden_act="gelu" if kind == "G" else "quick_gelu")
    elif kind == "L":
        cfg = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu")
    else:
        cfg = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu")
    return cfg | dict(vocab_size=vocab_size, max_position_embeddings=CLIP_MAX_LENGTH, layer_norm_eps=1e-5,
                      bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def _t5_config(size: str, vocab_size: int, layers: int | None) -> dict:
    if size == "tiny":
        cfg = dict(d_model=64, d_ff=64, d_kv=8, num_heads=4, num_layers=2)
    else:  # T5 v1.1 XXL encoder
        cfg = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24)
    if layers is not None:
        cfg["num_layers"] = layers
    return cfg | dict(vocab_size=vocab_size, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)


def _vae_config(arch: str, size: str) -> dict:
    if size == "tiny":
        cfg = dict(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64)
    else:
        cfg = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                   sample_size=1024 if arch in ("sdxl", "sd3", "flux") else 512)
    cfg |= dict(in_channels=3, out_channels=3, act_fn="silu", down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4)
    if arch == "sd15":
        return cfg | dict(latent_channels=4, scaling_factor=0.18215)
    if arch == "sdxl":
        return cfg | dict(latent_channels=4, scaling_factor=0.13025, force_upcast=True)
    shift_scale = {"sd3": (0.0609, 1.5305), "flux": (0.1159, 0.3611)}[arch]
    return cfg | dict(latent_channels=16, shift_factor=shift_scale[0], scaling_factor=shift_scale[1],
                      use_quant_conv=False, use_post_quant_conv=False)


def _kept(n: int, depth: float) -> int:
    return max(1, round(n * depth))


def _unet_config(arch: str, size: str, depth: float, cross_dim: int, pooled_dim: int = 0) -> dict:
    tiny = size == "tiny"
    if arch == "sd15":
        if tiny:
            return dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=cross_dim,
                        attention_head_dim=8, norm_num_groups=32)
        return dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
                    layers_per_block=2, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=cross_dim,
                    attention_head_dim=8, norm_num_groups=32)
    # sdxl: the pooled text embedding (text_encoder_2's projection) and 6 size/crop ids of addition_time_embed_dim
    time_dim = 8 if tiny else 256
    common = dict(in_channels=4, out_channels=4, layers_per_block=2 if not tiny else 1, cross_attention_dim=cross_dim,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                  projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim, norm_num_groups=32)
    if tiny:
        return common | dict(sample_size=8, block_out_channels=[32, 64], attention_head_dim=[2, 4],
                             transformer_layers_per_block=[1, _kept(2, depth)],
                             down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                             up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    return common | dict(sample_size=128, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                         transformer_layers_per_block=[1, _kept(2, depth), _kept(10, depth)],
                         down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                         up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])


def _sd3_config(size: str, depth: float, joint_dim: int, pooled_dim: int) -> dict:
    if size == "tiny":
        return dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=_kept(2, depth),
                    attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                    joint_attention_dim=joint_dim, pooled_projection_dim=pooled_dim, pos_embed_max_size=16)
    return dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=_kept(24, depth),
                attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
                joint_attention_dim=joint_dim, pooled_projection_dim=pooled_dim, pos_embed_max_size=192)


def _flux_config(size: str, depth: float, joint_dim: int, pooled_dim: int) -> dict:
    if size == "tiny":
        return dict(patch_size=1, in_channels=64, num_layers=_kept(1, depth), num_single_layers=_kept(1, depth),
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_dim,
                    pooled_projection_dim=pooled_dim, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    return dict(patch_size=1, in_channels=64, num_layers=_kept(19, depth), num_single_layers=_kept(38, depth),
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=joint_dim,
                pooled_projection_dim=pooled_dim, guidance_embeds=True, axes_dims_rope=[16, 56, 56])


# Each family's scheduler/scheduler_config.json exactly as the public hub model's file has it (keys, values and
# _diffusers_version as published; written as is, not re-serialised by diffusers, so no default is added): SD 1.5
# (stable-diffusion-v1-5), SDXL base 1.0, SD3 medium (diffusers) and FLUX.1-dev. These mirror the hub configs; a
# scheduler built from them (e.g. DDIMScheduler.from_config) sees what it would see on the real folder.
SCHEDULERS = {
    "sd15": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False},
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
            "num_train_timesteps": 1000, "shift": 3.0},
    "flux": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
             "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
}
OPTIONAL = {  # model_index entries the pipelines know but these folders leave empty
    "sd15": ("safety_checker", "feature_extractor", "image_encoder"),
    "sdxl": ("feature_extractor", "image_encoder"),
    "sd3": ("feature_extractor", "image_encoder"),
    "flux": ("feature_extractor", "image_encoder"),
}


# ----------------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def _skip_init():
    """torch.nn.init's functions (and so the libraries' default initialisation) do nothing in the block: the
    weights are written afterwards by `_fill_random`, and a real-size default init costs minutes on a CPU."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _fill_random(model: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=generator)


def _component_specs(arch: str, size: str, depth: float, t5: bool, t5_layers: int | None,
                     clip_vocab: int, t5_vocab: int) -> dict[str, tuple[str, str, dict]]:
    """name -> (library, class, config kwargs) of every model component."""
    from transformers import CLIPTextConfig, T5Config

    L = _clip_config("L", size, clip_vocab)
    G = _clip_config("G", size, clip_vocab)
    T5 = _t5_config(size, t5_vocab, t5_layers)
    specs: dict[str, tuple[str, str, dict]] = {"vae": ("diffusers", "AutoencoderKL", _vae_config(arch, size))}
    clip = lambda cls, cfg: ("transformers", cls, CLIPTextConfig(**cfg))
    if arch == "sd15":
        specs["text_encoder"] = clip("CLIPTextModel", L)
        specs["unet"] = ("diffusers", "UNet2DConditionModel", _unet_config(arch, size, depth, L["hidden_size"]))
    elif arch == "sdxl":
        specs["text_encoder"] = clip("CLIPTextModel", L)
        specs["text_encoder_2"] = clip("CLIPTextModelWithProjection", G)
        specs["unet"] = ("diffusers", "UNet2DConditionModel",
                         _unet_config(arch, size, depth, L["hidden_size"] + G["hidden_size"], G["projection_dim"]))
    elif arch == "sd3":
        specs["text_encoder"] = clip("CLIPTextModelWithProjection", L)
        specs["text_encoder_2"] = clip("CLIPTextModelWithProjection", G)
        if t5:
            specs["text_encoder_3"] = ("transformers", "T5EncoderModel", T5Config(**T5))
        # CLIP hidden states (L + G, concatenated) are zero-padded to T5's width, the joint attention width
        specs["transformer"] = ("diffusers", "SD3Transformer2DModel",
                                _sd3_config(size, depth, T5["d_model"], L["projection_dim"] + G["projection_dim"]))
    else:
        specs["text_encoder"] = clip("CLIPTextModel", L)
        specs["text_encoder_2"] = ("transformers", "T5EncoderModel", T5Config(**T5))
        specs["transformer"] = ("diffusers", "FluxTransformer2DModel",
                                _flux_config(size, depth, T5["d_model"], L["hidden_size"]))
    return specs


def _construct(library: str, cls_name: str, config):
    import diffusers
    import transformers

    cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
    return cls(**config) if library == "diffusers" else cls(config)


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parameter_counts(arch: str, size: str = "tiny", depth: float = 1.0, t5: bool = True,
                     t5_layers: int | None = None) -> dict[str, int]:
    """Parameters of each model component (built on the meta device: no memory, no time)."""
    specs = _component_specs(arch, size, depth, t5, t5_layers, 49408 if size == "real" else 1000,
                             32128 if size == "real" else 300)
    counts = {}
    for name, (lib, cls, cfg) in specs.items():
        with torch.device("meta"), _skip_init():
            counts[name] = sum(p.numel() for p in _construct(lib, cls, cfg).parameters())
    return counts


def make_random_pipeline(arch: str, out: str | Path, size: str = "tiny", seed: int = 0, dtype: str = "fp32",
                         depth: float = 1.0, t5: bool = True, t5_layers: int | None = None,
                         overwrite: bool = False) -> Path:
    """Write a random-weight diffusers pipeline folder of family `arch` to `out` and return its path.

    size: "tiny" | "real"; dtype: the saved weights' dtype (fp32 | fp16 | bf16); depth, t5, t5_layers: the
    reductions of the module docstring (defaults: none). `out` must not exist or be empty (or `overwrite`)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if not 0 < depth <= 1:
        raise ValueError(f"depth must be a fraction in (0, 1], got {depth}")
    if arch == "sd15" and depth != 1:
        raise ValueError("depth reduces transformer blocks; sd15's UNet has one per attention layer, none to drop")
    if not t5 and arch != "sd3":
        raise ValueError("t5=False is for sd3 only (FluxPipeline needs its T5 encoder: reduce t5_layers instead)")
    if t5_layers is not None and t5_layers < 1:
        raise ValueError(f"t5_layers must be >= 1, got {t5_layers}")
    import diffusers

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    index: dict = {"_class_name": PIPELINES[arch], "_diffusers_version": diffusers.__version__}
    # tokenizers first: the text encoders' vocabulary sizes follow from them (tiny) or are the real ones
    clip_tok = make_clip_tokenizer(out / "tokenizer", size)
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    if arch in ("sdxl", "sd3"):  # the second CLIP tokenizer of SDXL / SD3 pads with "!"
        make_clip_tokenizer(out / "tokenizer_2", size, pad_token="!")
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    t5_name = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}.get(arch)
    t5_vocab = 0
    if t5_name and (t5 or arch == "flux"):
        t5_tok = make_t5_tokenizer(out / t5_name, 256 if arch == "sd3" else 512)
        t5_vocab = 32128 if size == "real" else len(t5_tok)
        index[t5_name] = ["transformers", "T5TokenizerFast"]
    clip_vocab = 49408 if size == "real" else len(clip_tok)
    if len(clip_tok) > clip_vocab:
        raise RuntimeError(f"the CLIP tokenizer has {len(clip_tok)} tokens, more than the embedding's {clip_vocab}")

    specs = _component_specs(arch, size, depth, t5, t5_layers, clip_vocab, t5_vocab)
    available = _available_bytes()
    counts = {}
    for i, (name, (lib, cls_name, cfg)) in enumerate(specs.items()):
        with torch.device("meta"), _skip_init():
            counts[name] = sum(p.numel() for p in _construct(lib, cls_name, cfg).parameters())
        need = counts[name] * 4 * 1.1  # built in fp32
        if available is not None and need > available:
            shutil.rmtree(out)
            raise MemoryError(
                f"{arch} {size}: {name} has {counts[name] / 1e9:.2f}B parameters, {need / 2**30:.1f} GiB to build in "
                f"fp32, but only {available / 2**30:.1f} GiB are available; reduce it with depth=<fraction> "
                "(denoiser blocks), t5_layers=<n> or t5=False (sd3)")
        with _skip_init():
            model = _construct(lib, cls_name, cfg)
        _fill_random(model, torch.Generator().manual_seed(seed * 1000 + i))
        if dtype != "fp32":
            model.to(DTYPES[dtype])
        model.save_pretrained(str(out / name), safe_serialization=True)
        index[name] = [lib, cls_name]
        del model
    if "text_encoder_3" not in specs and arch == "sd3":
        index["text_encoder_3"] = index["tokenizer_3"] = [None, None]

    write_scheduler_config(out, SCHEDULERS[arch])
    index["scheduler"] = ["diffusers", SCHEDULERS[arch]["_class_name"]]
    for name in OPTIONAL[arch]:
        index[name] = [None, None]
    if arch == "sd15":
        index["requires_safety_checker"] = False
    if arch == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    manifest = dict(arch=arch, size=size, seed=seed, dtype=dtype, depth=depth, t5=t5, t5_layers=t5_layers,
                    parameters=counts, total_parameters=sum(counts.values()), pipeline=PIPELINES[arch])
    (out / "random_pipeline.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def write_scheduler_config(folder: str | Path, config: dict) -> Path:
    """Write `config` (with its _class_name) as the pipeline folder's scheduler/scheduler_config.json, as is."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def pipeline_class(folder: str | Path):
    """The diffusers pipeline class named in a folder's model_index.json."""
    import diffusers

    name = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]
    if not re.fullmatch(r"[A-Za-z0-9]+Pipeline", name) or name not in PIPELINES.values():
        raise ValueError(f"{folder}: model_index.json names {name!r}, not one of {sorted(PIPELINES.values())}")
    return getattr(diffusers, name)
