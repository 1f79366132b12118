"""Concept mentions in prompts, and the tokens that stand for a concept in the text encoder.

A prompt names the requesting user's concepts in angle brackets: ``"a photo of <rex> on the
beach"``, optionally weighted: ``<rex:0.8>``. Each mention becomes the adapter's trigger and class
word (``"sks dog"``), and the adapter's LoRA is applied with that weight.

Adapters trained with new tokens (pivotal tuning) also bring token embeddings. Many users'
adapters share one tokenizer and one text encoder, so their tokens must not collide and must not
grow the vocabulary without bound. :class:`TokenPool` therefore adds a fixed set of placeholder
tokens (``<bespoke-token-0>``, ...) once, with one embedding row each, and lends rows to adapters
per batch: an adapter keeps its rows while it stays recent (LRU), so a hot adapter's embeddings are
written once. Between preparing a request and running its batch, a prompt refers to its new
tokens by *local* placeholders numbered from 0 within that request; :meth:`TokenPool.render`
maps them to the rows lent for the batch. Users cannot type a placeholder (it reads as a mention
and is refused), nor build one from text and mentions (:func:`refuse_spliced_placeholders`), so
no request can reach another user's embedding row.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from gen.adapter import LoraAdapter
from gen.errors import InvalidRequest

MAX_WEIGHT = 2.0
PLACEHOLDER = "<bespoke-token-{}>"
_PLACEHOLDER_RE = re.compile(r"<bespoke-token-(\d+)>", re.IGNORECASE)  # the tokenizer lowercases
# "<name>" or "<name:weight>". The pattern only finds candidates: Python's ``re`` has no class for
# combining marks (``\w`` misses them, so "नमस्ते" would not match), so :func:`_mention_name` checks the
# name against the registry's rules (adapters.registry.names, replicated here: gen never imports adapters).
# Spaces around the colon are allowed ("<rex: 0.8>" was once left as literal text, silently serving no adapter);
# a space right after "<" is not, so "a < b > c" stays text.
_MENTION_RE = re.compile(r"<(?P<name>\w[^\s<>:]*)\s*(?::\s*(?P<weight>[^<>\s]*)\s*)?>")
_NAME_PUNCTUATION = frozenset("_-.@+")
_TEXT_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


class UnknownConcept(InvalidRequest):
    """A prompt mentions a concept the requesting user does not have."""


@dataclass(frozen=True)
class Mention:
    """One ``<name>`` or ``<name:weight>`` in a prompt."""

    name: str
    weight: float = 1.0


# What ``float`` reads, less what a weight should never be written as: ``float`` also takes other
# scripts' digits ("٠.٥"), digit-group underscores ("1_0") and words ("inf", "nan").
_WEIGHT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_weight(text: str, where: str) -> float:
    """A mention's or style's weight: a plain decimal number within ``MAX_WEIGHT``."""
    if not _WEIGHT_RE.fullmatch(text.strip()):
        raise InvalidRequest(f"{where}: weight {text!r} is not a number")
    weight = float(text)
    if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
        raise InvalidRequest(f"{where}: weight {text} is outside [-{MAX_WEIGHT}, {MAX_WEIGHT}]")
    return weight


def _mention_name(match: re.Match) -> str | None:
    """The NFC name of a candidate mention if the registry would accept it, else None (literal text).

    Registry names: letters, digits and combining marks of any script plus ``_ - . @ +``,
    starting with a letter, digit or ``_``; NFC, as the registry stores them.
    """
    name = unicodedata.normalize("NFC", match["name"])
    first_ok = unicodedata.category(name[0])[0] in "LN" or name[0] == "_"
    rest_ok = all(unicodedata.category(c)[0] in "LNM" or c in _NAME_PUNCTUATION for c in name[1:])
    return name if first_ok and rest_ok else None


def _find_mentions(prompt: str) -> list[tuple[re.Match, str]]:
    """Every mention in ``prompt`` with its NFC name; candidates whose name is no concept name stay text."""
    return [(m, name) for m in _MENTION_RE.finditer(prompt) if (name := _mention_name(m)) is not None]


def parse_mentions(prompt: str) -> list[Mention]:
    """The distinct concepts a prompt mentions, in order; one concept may not carry two weights."""
    found: dict[str, Mention] = {}
    for match, name in _find_mentions(prompt):
        weight = match["weight"]
        if name.lower().startswith("bespoke-token-"):
            raise InvalidRequest(f"{match[0]} is a reserved token and cannot be used in a prompt")
        mention = Mention(name, 1.0 if weight is None else parse_weight(weight, match[0]))
        if found.setdefault(name, mention) != mention:
            raise InvalidRequest(f"<{name}> is mentioned with two different weights")
    return list(found.values())


def parse_style(spec: str) -> Mention:
    """A style named by parameter: ``"watercolor"`` or ``"watercolor:0.6"``."""
    match = _MENTION_RE.fullmatch(f"<{spec.strip()}>") if isinstance(spec, str) else None
    if match is None or _mention_name(match) is None:
        raise InvalidRequest(f"style {spec!r} is not a concept name, optionally with :weight")
    return parse_mentions(match[0])[0]


def refuse_placeholders(text: str | None) -> None:
    """Refuse text that names a pool placeholder directly (e.g. a negative prompt)."""
    if text and (match := _PLACEHOLDER_RE.search(text)):
        raise InvalidRequest(f"{match[0]} is a reserved token and cannot be used in a prompt")


def check_known(user: str, mentions: Sequence[Mention], concepts: Sequence[str]) -> None:
    """Raise :class:`UnknownConcept`, listing the user's concepts, for the first unknown mention."""
    for mention in mentions:
        if mention.name not in concepts:
            theirs = ", ".join(f"<{c}>" for c in sorted(concepts)) if concepts else "none yet"
            raise UnknownConcept(f"user {user!r} has no concept <{mention.name}>; their concepts: {theirs}")


def concept_text(adapter: LoraAdapter, name: str, first_placeholder: int) -> str:
    """What a mention becomes: trigger and class word (else the concept name), new tokens as local placeholders.

    New tokens are numbered from ``first_placeholder`` in the adapter's order.
    """
    text = " ".join(t for t in (adapter.trigger, adapter.class_word) if t) or name
    refuse_placeholders(text)
    if not adapter.new_tokens:
        return text
    index = {token: first_placeholder + i for i, token in enumerate(adapter.new_tokens)}
    longest_first = "|".join(map(re.escape, sorted(index, key=len, reverse=True)))
    return re.sub(longest_first, lambda m: PLACEHOLDER.format(index[m[0]]), text)


def substitute(prompt: str, texts: Mapping[str, str]) -> str:
    """Replace every ``<name>`` / ``<name:w>`` mention with ``texts[name]``; other names stay as written."""
    def text(match: re.Match) -> str:
        name = _mention_name(match)
        return match[0] if name is None else texts.get(name, match[0])

    return _MENTION_RE.sub(text, prompt)


def refuse_spliced_placeholders(prompt: str, texts: Mapping[str, str], suffix: str = "") -> None:
    """Refuse a prompt whose expansion would contain a placeholder that no concept text put there.

    The prompt and each text are free of placeholders, but joined they can make one: a concept
    ``0`` without trigger reads "0", so ``<bespoke-token-<0>>`` expands to ``<bespoke-token-0>``,
    a row lent to another request. So the whole expansion is checked, with the texts' own
    placeholders blanked (a placeholder is whole: it cannot be part of a forged one).
    """
    blanked = {name: _PLACEHOLDER_RE.sub(" ", text) for name, text in texts.items()}
    if match := _PLACEHOLDER_RE.search(substitute(prompt, blanked) + _PLACEHOLDER_RE.sub(" ", suffix)):
        raise InvalidRequest(f"the prompt's mentions expand to {match[0]}, a reserved token that cannot be used in a prompt")


class TokenPool:
    """Placeholder tokens added once to a pipeline's tokenizers, with embedding rows lent to adapters.

    Adding tokens resizes each text encoder's embedding matrix once, when the pool is made (its
    new rows start at zero); after that nothing reallocates. Call :meth:`assign` and
    :meth:`render` under the sampler's run lock.
    """

    def __init__(self, pipe, size: int):
        self.tokens = [PLACEHOLDER.format(i) for i in range(size)]
        self._encoders: dict[str, tuple[torch.nn.Embedding, list[int]]] = {}
        for tokenizer_name, encoder_name in _TEXT_ENCODERS:
            tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
            if tokenizer is None or encoder is None:
                continue
            tokenizer.add_tokens(self.tokens)  # no-op when tokenizer_2 is the same object
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            if encoder.get_input_embeddings().num_embeddings < len(tokenizer):
                old = encoder.get_input_embeddings().num_embeddings
                encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
                with torch.no_grad():
                    encoder.get_input_embeddings().weight[old:] = 0
            self._encoders[encoder_name] = (encoder.get_input_embeddings(), ids)
        self._lent: OrderedDict[Hashable, list[int]] = OrderedDict()  # adapter key -> rows, least recent first

    def assign(self, adapters: Mapping[Hashable, LoraAdapter]) -> dict[Hashable, list[int]]:
        """Rows for every adapter's new tokens in one batch, writing the embeddings of newly lent rows.

        An encoder the adapter has no embedding for gets zero rows for its tokens.
        """
        needed = {k: a for k, a in adapters.items() if a.new_tokens}
        if sum(len(a.new_tokens) for a in needed.values()) > len(self.tokens):
            raise InvalidRequest(f"one batch needs more than the {len(self.tokens)} placeholder tokens of the pool")
        for key in needed:
            if key in self._lent:
                self._lent.move_to_end(key)
        used = {row for rows in self._lent.values() for row in rows}
        free = [row for row in range(len(self.tokens)) if row not in used]
        for key, adapter in needed.items():
            if key in self._lent:
                continue
            while len(free) < len(adapter.new_tokens):
                victim = next(k for k in self._lent if k not in needed)
                free += self._lent.pop(victim)
            rows, free = free[: len(adapter.new_tokens)], free[len(adapter.new_tokens):]
            self._write(rows, adapter)
            self._lent[key] = rows
        return {key: self._lent[key] for key in needed}

    def render(self, text: str, owners: Sequence[tuple[Hashable, int]], lent: Mapping[Hashable, list[int]]) -> str:
        """Map local placeholder ``j`` (new token ``owners[j] = (adapter key, index)``) to its lent row's token."""
        def row_token(match: re.Match) -> str:
            key, index = owners[int(match[1])]
            return self.tokens[lent[key][index]]

        return _PLACEHOLDER_RE.sub(row_token, text)

    def _write(self, rows: list[int], adapter: LoraAdapter) -> None:
        with torch.no_grad():
            for name, (embedding, ids) in self._encoders.items():
                target = [ids[r] for r in rows]
                values = adapter.token_embeddings.get(name)
                if values is None:
                    embedding.weight[target] = 0
                else:
                    embedding.weight[target] = values.to(embedding.weight.device, embedding.weight.dtype)
