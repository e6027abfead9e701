"""A real CLIP BPE tokenizer for the embedded generator, built offline.

open_clip ships OpenAI's BPE merges (`bpe_simple_vocab_16e6.txt.gz`); this writes them in
the vocab.json + merges.txt layout that `transformers.CLIPTokenizer` reads, with the same
ids as OpenAI CLIP (49406 = <|startoftext|>, 49407 = <|endoftext|>), so placeholder tokens
are added exactly as with Stable Diffusion.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe

NUM_MERGES = 49152 - 256 - 2


def write_clip_tokenizer_files(folder: Path, model_max_length: int) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True,
    }))
    return folder
