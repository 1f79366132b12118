"""Offline CLIP tokenizers.

No tokenizer can be downloaded here, so the project trains its own byte-level BPE with CLIP's
conventions: every byte exists as a symbol with and without the ``</w>`` end-of-word suffix,
so any string (rare identifiers like ``sks``, new tokens like ``<rex>``, any Unicode) still
tokenizes through sub-word fallback, and merges learned from a corpus make its words single
tokens. The folder it writes loads with ``CLIPTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from functools import cache

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"


@cache
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2/CLIP's reversible map from the 256 bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = dict(zip(printable, printable))
    extra = 0
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + extra
            extra += 1
    return tuple(chr(codes[b]) for b in range(256))


def build_clip_tokenizer(corpus: Iterable[str], out_dir: str, *, num_merges: int = 2000, model_max_length: int = 77) -> CLIPTokenizer:
    """Learn up to ``num_merges`` BPE merges from ``corpus`` and save a CLIP tokenizer to ``out_dir``."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    # Split like CLIP (words, punctuation), then map bytes to symbols without GPT-2's space marker.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    base = list(_byte_symbols())
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(base) + num_merges,
        end_of_word_suffix="</w>",
        initial_alphabet=base,
        show_progress=False,
    )
    bpe.train_from_iterator((text.lower() for text in corpus), trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]

    vocab = base + [s + "</w>" for s in base]
    known = set(vocab)
    for a, b in merges[:num_merges]:
        if a + b not in known:
            vocab.append(a + b)
            known.add(a + b)
    vocab += [START, END]

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges[:num_merges]))
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=model_max_length, pad_token=END)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
