"""Serving many users from one warm base: from (user, prompt) to adapters active in a batch.

The sampler uses :class:`AdapterServing` twice per request. In the caller's thread,
:meth:`~AdapterServing.resolve` turns the prompt's concept mentions (and an optional style) into
adapters, loaded through the cache (so loading overlaps whatever batch is denoising meanwhile),
and into prompt text. Under the sampler's run lock, :meth:`~AdapterServing.activate` puts a
whole batch's adapters into the LoRA slots, one adapter set per image row, and lends embedding
rows to their new tokens.

``latest`` is resolved to a version number through the source at most every
``latest_ttl_s`` seconds per concept; the cache is keyed by concrete versions, so a newly
published version is served within that delay and a pinned version (``versions={"rex": 2}``,
as a provenance replay passes) never goes stale.

Everything is keyed by the requesting user: mentions resolve only among their concepts, and the
cache, the ``latest`` table and the token pool all key on (user, concept, version), so two users'
concepts of the same name never meet.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from gen.adapter import AdapterSource, LoraAdapter
from gen.adapter_cache import AdapterCache, CacheStats
from gen.base import Base
from gen.concepts import TokenPool, check_known, concept_text, parse_mentions, parse_style, refuse_spliced_placeholders, substitute
from gen.errors import InvalidRequest
from gen.lora_runtime import AdapterDoesNotFit, AdapterSet, LoraRuntime, PackedAdapter, RuntimeConfig, set_key

AdapterKey = tuple[str, str, "int | None"]  # (user, concept, version)
MAX_LATEST_ENTRIES = 100_000


@dataclass(frozen=True)
class ServingConfig:
    """How a sampler batches requests and keeps adapters warm."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    max_batch_images: int = 8  # images (not CFG rows) in one batch of compatible requests
    host_cache_bytes: int = 2 << 30
    device_cache_bytes: int = 1 << 30  # used when the base is not on the CPU
    latest_ttl_s: float = 2.0
    token_pool_size: int = 64  # placeholder tokens for adapters' new tokens; 0 leaves the tokenizer alone
    cuda_graphs: bool = True  # on a CUDA base, replay the UNet step as a CUDA graph (gen.cuda_graph)


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter ready to serve: packed for the slots, plus its text and identity (no raw LoRA tensors)."""

    key: AdapterKey
    info: LoraAdapter
    packed: PackedAdapter

    def nbytes(self) -> int:
        return self.packed.nbytes() + self.info.nbytes()

    def to(self, device: torch.device) -> ServedAdapter:
        return replace(self, packed=self.packed.to(device))


@dataclass(frozen=True)
class Resolved:
    """A request's adapters and how its prompt reads once its mentions are replaced."""

    adapters: tuple[tuple[ServedAdapter, float, str], ...] = ()  # (adapter, weight, "concept" | "style")
    texts: Mapping[str, str] = field(default_factory=dict)  # mention name -> text
    suffix: str = ""  # a style's trigger, appended
    owners: tuple[tuple[AdapterKey, int], ...] = ()  # local placeholder j -> (adapter, new-token index)

    def expand(self, prompt: str) -> str:
        return substitute(prompt, self.texts) + self.suffix

    @property
    def adapter_set(self) -> AdapterSet:
        return tuple((a.key, a.packed, weight) for a, weight, _ in self.adapters)

    def provenance(self) -> tuple[dict, ...]:
        """Each adapter as served: its key (what was asked for), not what the adapter says about itself."""
        return tuple(
            {"user": a.key[0], "concept": a.key[1], "version": a.key[2], "weight": weight, "kind": kind}
            for a, weight, kind in self.adapters
        )


NO_ADAPTERS = Resolved()


class AdapterServing:
    """Concept resolution, the adapter cache, the LoRA slots and the token pool of one sampler."""

    def __init__(self, base: Base, source: AdapterSource, config: ServingConfig = ServingConfig()):
        self.fingerprints = base.fingerprints  # taken before the token pool resizes the text encoders
        self.source = source
        self.config = config
        self.runtime = LoraRuntime.for_pipeline(base.pipe, config.runtime)
        self.tokens = TokenPool(base.pipe, config.token_pool_size) if config.token_pool_size else None
        on_cpu = base.device.type == "cpu"
        self._pack_device = None if on_cpu else "cpu"  # host tier on the host; the device tier copies up
        self.cache: AdapterCache[ServedAdapter] = AdapterCache(
            config.host_cache_bytes,
            ServedAdapter.nbytes,
            device_max_bytes=0 if on_cpu else config.device_cache_bytes,
            to_device=lambda served: served.to(base.device),
        )
        self._latest: OrderedDict[tuple[str, str], tuple[int | None, float]] = OrderedDict()
        self._latest_lock = threading.Lock()

    # --- in the caller's thread ---

    def resolve(self, user: str | None, prompt: str, style: str | None = None, versions: Mapping[str, int] | None = None) -> Resolved:
        """Load the adapters ``prompt`` mentions (and ``style``) for ``user``; the text they become.

        ``versions`` pins some of them (by name) to a version; the others use ``latest``.
        """
        mentions = parse_mentions(prompt)
        named = mentions + ([parse_style(style)] if style is not None else [])
        pins = _check_pins(versions, [m.name for m in named])
        if not named:
            return NO_ADAPTERS
        if user is None:
            raise InvalidRequest(f"<{named[0].name}> names a concept, but no user was given; concepts belong to a user")
        if style is not None and named[-1].name in {m.name for m in mentions}:
            raise InvalidRequest(f"style {named[-1].name!r} is also mentioned in the prompt; name it once")
        check_known(user, named, self.source.concepts(user))
        adapters, texts, owners = [], {}, []
        for i, mention in enumerate(named):
            served = self._load(user, mention.name, pins.get(mention.name))
            adapters.append((served, mention.weight, "concept" if i < len(mentions) else "style"))
            texts[mention.name] = concept_text(served.info, mention.name, len(owners))
            owners += [(served.key, j) for j in range(len(served.info.new_tokens))]
        suffix = f", {texts[named[-1].name]}" if style is not None and adapters[-1][0].info.trigger else ""
        refuse_spliced_placeholders(prompt, texts, suffix)
        resolved = Resolved(tuple(adapters), texts, suffix, tuple(owners))
        if not self.fits([resolved]):
            raise InvalidRequest(f"this request composes more than the sampler's limits allow ({self._limits()})")
        return resolved

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def _load(self, user: str, concept: str, version: int | None = None) -> ServedAdapter:
        """The served adapter for ``version`` (default ``latest``) of (user, concept), through the cache."""
        if version is not None:
            key = (user, concept, version)
            return self.cache.get(key, lambda: self._serve(self.source.get(user, concept, version), key))
        now = time.monotonic()
        with self._latest_lock:
            known = self._latest.get((user, concept))
        if known is not None and known[1] > now:
            key = (user, concept, known[0])
            return self.cache.get(key, lambda: self._serve(self.source.get(user, concept, known[0]), key))
        adapter = self.source.get(user, concept, "latest")
        if adapter.version is None:  # the version is what tells a new latest from the cached one (and names its slot)
            raise InvalidRequest(f"the adapter source returned {user}/{concept} without a version number; a source must number the versions it serves")
        with self._latest_lock:
            self._latest[(user, concept)] = (adapter.version, now + self.config.latest_ttl_s)
            self._latest.move_to_end((user, concept))
            if len(self._latest) > MAX_LATEST_ENTRIES:
                self._latest.popitem(last=False)
        key = (user, concept, adapter.version)
        return self.cache.get(key, lambda: self._serve(adapter, key))

    def _serve(self, adapter: LoraAdapter, key: AdapterKey) -> ServedAdapter:
        """``adapter`` packed, keyed by the cache's ``key`` (requested user, concept, resolved version).

        The key, not the adapter's own identity fields, names it in the LoRA slots, the token pool
        and provenance: a source may leave those fields empty, and equal (empty) identities would
        merge different users' adapters in one batch.
        """
        user, concept, version = key
        what = f"{user}/{concept} v{version}"
        if adapter.user is not None and unicodedata.normalize("NFC", adapter.user) != unicodedata.normalize("NFC", user):
            # The source is trusted to scope by user; this keeps a faulty one from crossing users anyway.
            theirs = f"{adapter.user}/{adapter.concept} v{adapter.version}"
            raise InvalidRequest(f"the adapter source returned {theirs} for user {user!r}; another user's adapter is never served")
        if adapter.base_fingerprint not in self.fingerprints:
            raise AdapterDoesNotFit(f"{what} was trained on base {adapter.base_fingerprint}; this sampler serves base {self.fingerprints.adapted}")
        packed = self.runtime.pack(adapter, what, self._pack_device)
        return ServedAdapter(key, replace(adapter, tensors={}), packed)

    # --- under the run lock ---

    def fits(self, batch: Sequence[Resolved]) -> bool:
        """Whether these requests can share one batch: bank slots, rank budget and placeholder rows."""
        sets = {set_key(r.adapter_set) for r in batch if r.adapters}
        new_tokens = {a.key: len(a.info.new_tokens) for r in batch for a, _, _ in r.adapters}
        rank = max((sum(a.info.rank for a, _, _ in r.adapters) for r in batch), default=0)
        pool = len(self.tokens.tokens) if self.tokens else 0
        return len(sets) <= self.config.runtime.bank_size and sum(new_tokens.values()) <= pool and rank <= self.config.runtime.max_rank

    def activate(self, batch: Sequence[tuple[Resolved, int, str]]) -> list[str]:
        """Activate each request's adapters for its ``n`` image rows; returns each request's final text."""
        lent = {}
        if self.tokens is not None:
            lent = self.tokens.assign({a.key: a.info for r, _, _ in batch for a, _, _ in r.adapters})
        self.runtime.activate([r.adapter_set for r, n, _ in batch for _ in range(n)])
        return [self.tokens.render(text, r.owners, lent) if r.owners else text for r, _, text in batch]

    def deactivate(self) -> None:
        """Leave the pipeline as the base alone between batches, for anyone else who runs it."""
        self.runtime.deactivate()

    def _limits(self) -> str:
        cfg = self.config.runtime
        pool = len(self.tokens.tokens) if self.tokens else 0
        return f"total rank {cfg.max_rank}, {pool} new tokens"


def _check_pins(versions: Mapping[str, int] | None, named: Sequence[str]) -> dict[str, int]:
    """``versions`` checked: each names an adapter of the request and is a version number."""
    pins = dict(versions or {})
    for name, version in pins.items():
        if name not in named:
            raise InvalidRequest(f"versions pins <{name}>, which the request does not mention")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidRequest(f"versions: <{name}> must be pinned to a version number (1, 2, ...), not {version!r}")
    return pins
