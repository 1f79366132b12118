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
import re
from collections import Counter
from collections.abc import Iterable
from functools import cache

from transformers import CLIPTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"
_WORD = re.compile(r"\w+|[^\w\s]+")  # words and runs of punctuation, as the Whitespace pre-tokenizer splits


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


def learn_merges(corpus: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges, most frequent pair first, ties broken by the pair itself.

    ``tokenizers``' trainer breaks ties between equally frequent pairs differently from run to run,
    so the same corpus gave different vocabularies (and a pipeline different images for the same
    prompt) in two processes. Our corpora are a few hundred distinct words, so the plain algorithm
    over word counts is instant and, with an explicit tie-break, deterministic.
    """
    symbols = _byte_symbols()
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for word in _WORD.findall(text.lower()):
            chars = [symbols[b] for b in word.encode("utf-8")]
            words[(*chars[:-1], chars[-1] + "</w>")] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_clip_tokenizer(corpus: Iterable[str], out_dir: str, *, num_merges: int = 2000, model_max_length: int = 77) -> CLIPTokenizer:
    """Learn up to ``num_merges`` BPE merges from ``corpus`` and save a CLIP tokenizer to ``out_dir``."""
    base = list(_byte_symbols())
    merges = learn_merges(corpus, num_merges)

    vocab = base + [s + "</w>" for s in base]
    known = set(vocab)
    for a, b in merges:
        if a + b not in known:
            vocab.append(a + b)
            known.add(a + b)
    vocab += [START, END]

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=model_max_length, pad_token=END)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
