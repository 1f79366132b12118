"""The fast LoRA runtime: preallocated slots on a model's target layers, filled by one batched copy.

peft serves one user well and many users badly: loading injects wrapper modules, switching
(``set_adapters``) walks every layer, and each active adapter adds its own kernels per layer.
Serving many users from one warm base wants the opposite, so the layers are prepared ONCE:

* every target ``nn.Linear`` / ``nn.Conv2d`` gets a forward hook and a bank of slots,
  ``A`` (bank, max_rank, in[, kh, kw]) and ``Bt`` (bank, max_rank, out). Rows past the rank
  written into a slot are zero, so unused rank contributes nothing;
* an adapter is *packed* once for these slots (alpha/rank folded into ``Bt``, cast to the model's
  dtype and device). A batch with one adapter set reads the packed tensors where they lie (the
  adapter cache): switching is a pointer swap, no copy (*bound*);
* a batch whose rows use different adapters needs them stacked, so each set is copied into a bank
  slot with one ``torch._foreach_copy_``; composing k adapters concatenates their ranks in one slot,
  each part's ``Bt`` scaled by its weight. Bank buffers and per-row slot indices are allocated
  once and filled in place (what a captured CUDA graph needs: :mod:`gen.cuda_graph`). Each row
  gathers its ``A``/``Bt`` from the bank, into one set of per-row buffers that grows to the largest
  batch and rank seen (a growth a forward could have read changes the graph key), and runs ``torch.bmm``. When classifier-free guidance doubles the batch the per-row slot list is
  repeated block-wise, so a negative-prompt row gets its prompt row's adapter (as in diffusers,
  where an active LoRA applies to both halves);
* a batch with one adapter set may instead be copied into the *single* slot, a bank slot kept for
  one-set batches: the same batched copy, into buffers that never move, so a CUDA graph replays it
  (a bound adapter's tensors move at every switch, so a graph cannot hold them);
* or it may run *fused*: ``W = W0 + Bt^T A`` written in place into the targeted layers and restored
  from a pristine copy of just those layers;
* through slots, target layers that read the same tensor share one ``x A^T`` GEMM over their
  concatenated ``A``, reading ``x`` once rather than once per layer. Which layers read one tensor is
  learned from the first forward with active hooks (self-attention's q/k/v in each block; every
  block's cross-attention k/v, which all read the prompt embedding) and checked by identity at
  every call. A graphed step's low-rank terms are memory- or latency-bound (SDXL on an H100: the
  slot's cost in a forward is 13.0-13.3% unshared, 10.4% sharing within blocks, 9.5-9.8% with
  the cross-attention k/v shared across blocks).

A bank slot (index 0) is kept empty for rows without an adapter in a mixed batch.
:class:`LoraRuntime` is not thread-safe: the sampler calls it under its run lock.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial

import torch
import torch.nn.functional as F
from torch import nn

from gen.adapter import LoraAdapter
from gen.cuda_graph import GraphedCalls
from gen.errors import InvalidRequest
from gen.lora_targets import TEXT_TARGETS, UNET_TARGETS, matches_target

EMPTY_SLOT = 0
SINGLE_PATHS = ("bound", "slot", "fused")  # how a batch with one adapter set on every row runs
MAX_ROW_VIEWS = 16  # (batch, rank) view sets of the per-row buffers kept (host objects only: remade when dropped)


class AdapterDoesNotFit(InvalidRequest):
    """An adapter targets layers or shapes the runtime has no slots for, or exceeds its rank budget."""


@dataclass(frozen=True)
class RuntimeConfig:
    """Which layers get slots and how large the slots are; fixed once the runtime is prepared."""

    unet_targets: tuple[str, ...] = UNET_TARGETS
    text_targets: tuple[str, ...] = TEXT_TARGETS
    max_rank: int = 64  # total rank of the adapters composed for one request
    bank_size: int = 8  # distinct adapter sets in one batch
    # How a batch with one adapter set runs (SINGLE_PATHS): "bound" reads the packed tensors in place
    # (a switch copies nothing; eager only), "slot" copies them into the single slot (one batched
    # copy; a CUDA graph replays it), "fused" writes them into the UNet weights (hooks idle; a switch
    # restores and rewrites the targeted layers). None: the slot on CUDA, bound elsewhere. Measured with
    # scripts/bench_serving.py (rank 16, an H100, SD1.5 / SDXL, steps replayed as CUDA graphs): the
    # slot adds 7.0% / 9.5-9.8% to a UNet forward and switches in 0.14 / 0.70-0.79 ms (>100x
    # diffusers' set_adapters); fused weights add nothing per step but a switch rewrites every targeted
    # weight (0.73 / 5.2 ms, 16-22x), and a mixed batch then runs at 0.94-0.95x of a fused one-user
    # batch. The slot is the default because it meets every serving bar; "fused" saves 6-9% of a step
    # where switches are rare. On the CPU the hooks cost ~1-3% and a fused switch ~70 ms. Fusing keeps
    # a pristine copy of the targeted layers, made at the first fuse.
    single: str | None = None
    # Through slots, Linear targets that read one tensor (learned from the first forward: q/k/v, and all
    # cross-attention k/v) share one A-GEMM; checked by identity at every call.
    share_projections: bool = True

    def __post_init__(self):
        if self.single is not None:
            _check_single(self.single)
        if not isinstance(self.share_projections, bool):
            raise ValueError(f"share_projections must be True or False, not {self.share_projections!r}")


def _check_single(single: str) -> None:
    if single not in SINGLE_PATHS:
        raise ValueError(f"single must be one of {SINGLE_PATHS}, not {single!r}")


@dataclass(frozen=True)
class PackedLora:
    """One adapter's tensors for one model's slots: per target layer ``A`` and scaled ``Bt``.

    All of them are views of one flat buffer, so moving an adapter between host and device is one
    copy rather than one per tensor (an SDXL adapter has ~1,400: per-tensor copies cost 10-100 ms).
    ``Bt`` is stored either contiguous, as the slots hold it, or (``b_as_stored``) as the file's
    ``B`` of shape (out, rank), viewed transposed: see :meth:`LoraSlots.pack` for which and why.
    """

    layers: tuple[int, ...]  # slot-layer index of each pair
    a: tuple[torch.Tensor, ...]  # (rank, in[, kh, kw])
    bt: tuple[torch.Tensor, ...]  # (rank, out), alpha/rank folded in
    rank: int
    flat: torch.Tensor  # the buffer every ``a`` and ``bt`` views: all ``a`` first, then all ``bt``
    b_as_stored: bool = False

    @classmethod
    def from_tensors(
        cls, layers: Sequence[int], a: Sequence[torch.Tensor], bt: Sequence[torch.Tensor], rank: int,
        flat: torch.Tensor | None = None, dtype: torch.dtype | None = None, pin: bool = False, b_as_stored: bool = False,
    ) -> PackedLora:
        """View ``a`` and ``bt`` in ``flat``; without one, a new host buffer (of ``dtype``; page-locked with
        ``pin``, so copies up to a GPU run asynchronously) is filled with them."""
        tensors = (*a, *(t.t() for t in bt)) if b_as_stored else (*a, *bt)
        fill = flat is None
        if fill:
            dtype = dtype or (tensors[0].dtype if tensors else torch.float32)
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, pin_memory=pin)
        views, offset = [], 0
        for t in tensors:
            views.append(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        if fill and tensors:
            torch._foreach_copy_(views, list(tensors))  # one batched copy, casting as it goes
        bts = [v.t() for v in views[len(a) :]] if b_as_stored else views[len(a) :]
        return cls(tuple(layers), tuple(views[: len(a)]), tuple(bts), rank, flat, b_as_stored)

    @cached_property
    def by_layer(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Slot-layer index -> (A, Bt): what a hook reads when the adapter is bound."""
        return dict(zip(self.layers, zip(self.a, self.bt)))

    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def to(self, device: torch.device | str) -> PackedLora:
        if _same_device(self.flat.device, torch.device(device)):
            return self
        flat = self.flat.to(device, non_blocking=True)
        return PackedLora.from_tensors(self.layers, self.a, self.bt, self.rank, flat, b_as_stored=self.b_as_stored)


@dataclass(frozen=True)
class _Active:
    rank: int
    slot: int | None = None  # one slot for every row
    rows: torch.Tensor | None = None  # or a slot per request row
    bound: tuple[tuple[PackedLora, float], ...] = ()  # or packed adapters (and weights) read in place by every row


@dataclass
class _SharedProjection:
    """One input group's ``x A^T`` within a forward, until every member has read it (it holds an activation)."""

    x: torch.Tensor  # the input it was computed from: a member called with another tensor computes anew
    h: torch.Tensor  # (..., members * rank)
    unread: int


@dataclass
class _Readers:
    """Which Linear targets read which tensor, recorded through the first forward with active hooks.

    Weak references: the record must not keep a forward's activations alive, and a dead reference
    cannot be mistaken for a new tensor that reuses its address."""

    seen: set[int] = field(default_factory=set)
    by_input: list[tuple[weakref.ref, list[int]]] = field(default_factory=list)

    def add(self, i: int, x: torch.Tensor) -> None:
        self.seen.add(i)
        for ref, members in self.by_input:
            if ref() is x:
                members.append(i)
                return
        self.by_input.append((weakref.ref(x), [i]))

    def groups(self) -> list[tuple[int, ...]]:
        return [tuple(members) for _, members in self.by_input if len(members) > 1]


@dataclass
class _GroupedA:
    """A slot's A rows of each input group, concatenated, in buffers sized for ``max_rank``: the slot's
    rank ``r`` reads a contiguous prefix (members * r, in) of each, so a slot keeps one set of buffers
    whatever ranks it holds over time (one per (slot, rank) grew with every composed rank served).
    A graph captured at rank ``r`` reads that prefix; :meth:`LoraSlots.use` refills it before it can replay."""

    storage: list[torch.Tensor]  # per group, flat: members * max_rank * in
    views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]  # rank -> buffers, dst, src
    loads: int = -1  # the slot's load count when last filled
    rank: int = -1  # and the rank it was laid out for


@dataclass
class _RowWeights:
    """Every Linear layer's A (None for Conv2d and for input-group members) and every layer's Bt, and each
    input group's A, for up to ``rows`` batch rows at up to ``rank``, in flat buffers.

    A forward of ``n`` rows at rank ``r`` reads contiguous prefixes: (n, r, in) and (n, r, out). Row ``b``
    always carries the slot of request row ``b % len(rows)`` (a CFG-doubled batch repeats the request
    rows), so one fill of all ``rows`` serves every batch length. One set per model, grown to the
    largest batch and rank seen: keyed per (request rows, batch, rank) they were never freed and grew
    with every combination served (6.5x the bank after 28 mixed batches of ranks 4-32).
    """

    rows: int
    rank: int
    a: list[torch.Tensor | None]
    bt: list[torch.Tensor]
    grouped: list[torch.Tensor]
    read: bool = False  # a forward read them (so a captured graph may): replacing them changes the graph key


class LoraSlots:
    """LoRA slots on every target layer of one model (a UNet or a text encoder)."""

    def __init__(self, model: nn.Module, targets: Sequence[str], max_rank: int, bank_size: int, share_projections: bool = True):
        self.layers: dict[str, nn.Module] = {
            name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and matches_target(name, targets)
        }
        self._index = {name: i for i, name in enumerate(self.layers)}
        param = next(model.parameters())
        self.device, self.dtype, self.max_rank = param.device, param.dtype, max_rank
        slots = bank_size + 1  # + the empty slot
        self.a: list[torch.Tensor] = []
        self.bt: list[torch.Tensor] = []
        for name, layer in self.layers.items():
            if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
                raise ValueError(f"{name}: LoRA slots need a plain Conv2d (groups=1, zero padding)")
            in_shape = (layer.in_features,) if isinstance(layer, nn.Linear) else (layer.in_channels, *layer.kernel_size)
            out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            self.a.append(torch.zeros(slots, max_rank, *in_shape, dtype=self.dtype, device=self.device))
            self.bt.append(torch.zeros(slots, max_rank, out, dtype=self.dtype, device=self.device))
        self._ranks = [0] * slots  # rows >= _ranks[s] are zero in every layer of slot s
        self._active: _Active | None = None
        self._rows: dict[int, torch.Tensor] = {}  # batch length -> per-row slot indices (filled in place)
        self._row_index: dict[tuple[int, int], torch.Tensor] = {}  # (length, rows in the forward) -> indices repeated
        # Every layer's A and Bt per row, and each input group's A per row, of which its members' A are views
        self._row_weights: _RowWeights | None = None
        self._row_views: OrderedDict[tuple[int, int], tuple[list[torch.Tensor | None], list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()
        self._rows_per_request = 1  # forward rows per request row seen (2 with classifier-free guidance): what use_rows reserves
        self._row_generation = 0  # bumped when per-row buffers a forward read are replaced: part of the graph key
        self._views: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # (slot, offset, rank, layers) -> A, Bt views
        self._pristine: list[torch.Tensor] | None = None
        self._graphs = GraphedCalls(self.device)  # fuse and restore, replayed on CUDA
        self.fused = False
        self.share_projections = share_projections  # may be switched between forwards: it is part of the graph key
        self._groups: list[tuple[int, ...]] = []  # input groups: layers that read one tensor, in call order
        self._member: dict[int, tuple[int, int]] = {}  # layer -> (its group, its place in it)
        self._readers: _Readers | None = _Readers()  # until the groups are learned
        self._shared: dict[int, _SharedProjection] = {}  # input group -> its projection, within one forward
        self._loads = [0] * slots  # loads into each slot: a grouped copy of its A is current when made since the last one
        self._group_a: dict[int, _GroupedA] = {}  # slot -> its input groups' A
        self._handles = [layer.register_forward_hook(partial(self._hook, i)) for i, layer in enumerate(self.layers.values())]
        self._handles.append(model.register_forward_hook(lambda *_: self._shared.clear()))  # a stray entry holds an activation

    # --- adapters in and out of slots ---

    def pack(
        self, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float, what: str, device: torch.device | str | None = None
    ) -> PackedLora:
        """Pack diffusers-layout ``{module: (lora_A, lora_B)}`` for these slots; ``what`` names the adapter in errors.

        The result is on ``device`` (default: the slots' device) in the slots' dtype; host copies
        for a CUDA runtime are page-locked, so a later copy up runs asynchronously. For a CUDA runtime
        ``B`` is transposed here, on the host, into the slots' layout, so that filling a slot on the GPU
        is one batched copy (a transposing copy is one kernel per tensor: 9x slower for SD1.5 on an
        H100; transposing once per cold load on the GPU instead read SDXL's cold load 11.4x -> 8.8x
        diffusers'). A CPU runtime keeps ``B`` as stored: a transposing copy there costs 7x a plain one,
        and every cold load packs while only a mixed batch fills a slot.
        """
        layers, a_list, bt_list, ranks = [], [], [], set()
        for name, (a, b) in sorted(pairs.items(), key=lambda kv: self._index.get(kv[0], -1)):
            i = self._index.get(name)
            if i is None:
                raise AdapterDoesNotFit(f"{what} targets {name}, which has no LoRA slot (slots cover {len(self.layers)} layers)")
            rank = a.shape[0]
            slot_a, slot_bt = self.a[i], self.bt[i]
            fits = tuple(a.shape[1:]) == tuple(slot_a.shape[2:]) and tuple(b.shape[:2]) == (slot_bt.shape[2], rank)
            if not fits or b.numel() != slot_bt.shape[2] * rank:  # a Conv2d's B is (out, r, 1, 1), never (out, r, 3, 3)
                raise AdapterDoesNotFit(f"{what}: LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit layer {name}")
            layers.append(i)
            a_list.append(a)
            bt_list.append(b.reshape(b.shape[0], rank).t())
            ranks.add(rank)
        if len(ranks) > 1:
            raise AdapterDoesNotFit(f"{what} mixes LoRA ranks {sorted(ranks)} across layers")
        rank = ranks.pop() if ranks else 0
        if rank > self.max_rank:
            raise AdapterDoesNotFit(f"{what} has rank {rank}, over the runtime's max_rank {self.max_rank}")
        device = self.device if device is None else torch.device(device)
        # Packed on the host, page-locked for a CUDA runtime: a copy up from pageable memory is staged by the
        # driver at a fraction of the bus speed, and torch caches page-locked blocks, so this costs no allocation.
        cuda = self.device.type == "cuda"
        packed = PackedLora.from_tensors(layers, a_list, bt_list, rank, dtype=self.dtype, pin=cuda, b_as_stored=not cuda)
        if scale != 1:
            packed.flat[sum(a.numel() for a in packed.a) :].mul_(scale)  # every Bt: the end of the buffer
        return packed.to(device)

    def load(self, slot: int, parts: Sequence[tuple[PackedLora, float]]) -> None:
        """Write ``parts`` (packed adapter, weight) into ``slot``, ranks concatenated: one batched copy.

        Rows a previous occupant used and this one does not are zeroed first (one batched zero),
        and parts with a weight other than 1 are scaled in place (one batched multiply each).
        """
        total = self._check_rank(parts)
        covered_by_all = set.intersection(*(set(p.layers) for p, _ in parts)) if parts else set()
        old = self._ranks[slot]
        zero = []
        for i in range(len(self.layers)):
            lo, hi = (total, old) if i in covered_by_all else (0, max(old, total))
            if hi > lo:
                zero += [self.a[i][slot, lo:hi], self.bt[i][slot, lo:hi]]
        dst, src, scaled = [], [], []
        offset = 0
        for packed, weight in parts:
            a_views, bt_views = self._slot_views(slot, offset, packed)
            dst += a_views + bt_views
            src += [*packed.a, *packed.bt]
            if weight != 1:
                scaled.append((bt_views, weight))
            offset += packed.rank
        with torch.no_grad():
            if zero:
                torch._foreach_zero_(zero)
            if dst:
                torch._foreach_copy_(dst, src)
            for views, weight in scaled:
                torch._foreach_mul_(views, weight)
        self._ranks[slot] = total
        self._loads[slot] += 1
        self._shared.clear()
        if self._active is not None and self._active.slot == slot:
            self._grouped_a(slot)  # a captured graph reads the grouped copy: refill it now
        self._gather_row_weights()  # rows in use may read this slot

    def _check_rank(self, parts: Sequence[tuple[PackedLora, float]]) -> int:
        """The composed rank; over ``max_rank`` it is refused even where it could run (bound), so a set
        that serves alone also fits a mixed batch."""
        total = sum(p.rank for p, _ in parts)
        if total > self.max_rank:
            raise AdapterDoesNotFit(f"composed rank {total} is over the runtime's max_rank {self.max_rank}")
        return total

    def _slot_views(self, slot: int, offset: int, packed: PackedLora) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of ``slot``'s rows ``offset:offset + rank`` in the packed adapter's layers, made once.

        Making hundreds of views costs more host time than the copy itself on a GPU, and a
        bank sees few (slot, offset, rank, layers) combinations, so they are kept.
        """
        key = (slot, offset, packed.rank, packed.layers)
        views = self._views.get(key)
        if views is None:
            span = slice(offset, offset + packed.rank)
            views = self._views[key] = ([self.a[i][slot, span] for i in packed.layers], [self.bt[i][slot, span] for i in packed.layers])
        return views

    # --- what the hooks do ---

    def use(self, slot: int) -> None:
        """Every row uses ``slot`` (unfused)."""
        self._set(_Active(self._ranks[slot], slot=slot))
        if self._active is not None:
            self._grouped_a(slot)  # made or refilled here, outside any forward a graph may be capturing

    def _grouped_a(self, slot: int) -> list[torch.Tensor]:
        """Each input group's ``A`` rows of ``slot``, concatenated (members * rank, in): what its shared
        GEMM reads. Prefixes of buffers kept per slot that never move (see :class:`_GroupedA`), refilled
        by one batched copy after the slot is loaded or when its rank changed."""
        rank = self._ranks[slot]
        grouped = self._group_a.get(slot)
        if grouped is None:
            storage = [self.a[g[0]].new_empty(len(g) * self.max_rank * self.a[g[0]].shape[2]) for g in self._groups]
            grouped = self._group_a[slot] = _GroupedA(storage, {})
        views = grouped.views.get(rank)
        if views is None:  # the views are kept: making hundreds costs more host time than the copy (as in _slot_views)
            buffers = [buf[: len(g) * rank * self.a[g[0]].shape[2]].view(len(g) * rank, self.a[g[0]].shape[2]) for buf, g in zip(grouped.storage, self._groups)]
            dst = [buf[j * rank : (j + 1) * rank] for buf, g in zip(buffers, self._groups) for j in range(len(g))]
            src = [self.a[i][slot, :rank] for g in self._groups for i in g]
            views = grouped.views[rank] = (buffers, dst, src)
        buffers, dst, src = views
        if (grouped.loads, grouped.rank) != (self._loads[slot], rank) and dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)
        grouped.loads, grouped.rank = self._loads[slot], rank
        return buffers

    def bind(self, parts: Sequence[tuple[PackedLora, float]]) -> None:
        """Every row uses ``parts`` (packed adapter, weight) read where they are: no copy. They must be on the slots' device."""
        self._set(_Active(self._check_rank(parts), bound=tuple(parts)))

    def can_bind(self, parts: Sequence[tuple[PackedLora, float]]) -> bool:
        return all(t.device == self.device for p, _ in parts for t in p.a[:1])

    def use_rows(self, row_slots: Sequence[int]) -> None:
        """Row ``i`` of a request batch uses ``row_slots[i]``; a CFG-doubled batch repeats the list.

        The indices, and each row's A and Bt gathered from its slot, are written in place into buffers
        that move only to grow (see :class:`_RowWeights`), so a captured graph that reads them sees the
        new batch's slots.
        Gathering here, once per request batch, rather than in every layer's hook keeps two gathers
        per layer out of every denoising step.
        """
        rows = self._rows.get(len(row_slots))
        if rows is None:
            rows = self._rows[len(row_slots)] = torch.empty(len(row_slots), dtype=torch.long, device=self.device)
        with torch.inference_mode():  # an index made inside an inference-mode forward is an inference tensor
            rows.copy_(torch.tensor(row_slots))
            for (length, batch), index in self._row_index.items():
                if length == len(rows):
                    index.copy_(rows.repeat(batch // length))
        self._set(_Active(max(self._ranks[s] for s in row_slots), rows=rows))
        self._gather_row_weights()

    def _gather_row_weights(self) -> None:
        """Refill the per-row weights for the active rows and rank: every batch of them reads a prefix."""
        if self._active is None or self._active.rows is None:
            return
        self._reserve_rows(len(self._active.rows) * self._rows_per_request, self._active.rank)
        self._fill_row_weights()

    def _reserve_rows(self, rows: int, rank: int) -> bool:
        """Make the per-row buffers hold ``rows`` rows at ``rank`` (growing, never shrinking); whether they were replaced.

        Replacing buffers a forward read frees memory a captured graph may read: the generation in
        :meth:`graph_key` changes with them, so such a graph is never replayed again. Buffers no forward
        read (reserved at :meth:`use_rows`, grown by the first forward) are replaced without that.
        """
        held = self._row_weights
        if held is not None and rows <= held.rows and rank <= held.rank:
            return False
        if held is not None:
            rows, rank = max(rows, held.rows), max(rank, held.rank)
            if held.read:
                self._row_generation += 1
        self._row_views.clear()
        new = partial(torch.empty, device=self.device, dtype=self.dtype)
        a = [new(rows * rank * a.shape[2]) if isinstance(layer, nn.Linear) and i not in self._member else None
             for i, (a, layer) in enumerate(zip(self.a, self.layers.values()))]
        grouped = [new(rows * len(g) * rank * self.a[g[0]].shape[2]) for g in self._groups]
        self._row_weights = _RowWeights(rows, rank, a, [new(rows * rank * bt.shape[2]) for bt in self.bt], grouped)
        return True

    def _row_views_for(self, batch: int, rank: int) -> tuple[list[torch.Tensor | None], list[torch.Tensor], list[torch.Tensor]]:
        """Views (batch, rank, ...) of the per-row buffers' prefixes: made once per (batch, rank), a few kept."""
        views = self._row_views.get((batch, rank))
        if views is None:
            held = self._row_weights
            a_rows = [None if buf is None else buf[: batch * rank * a.shape[2]].view(batch, rank, a.shape[2]) for buf, a in zip(held.a, self.a)]
            grouped = [buf[: batch * len(g) * rank * self.a[g[0]].shape[2]].view(batch, len(g) * rank, self.a[g[0]].shape[2]) for buf, g in zip(held.grouped, self._groups)]
            for buf, g in zip(grouped, self._groups):
                for j, member in enumerate(g):
                    a_rows[member] = buf[:, j * rank : (j + 1) * rank]  # filled in place through the view
            bt_rows = [buf[: batch * rank * bt.shape[2]].view(batch, rank, bt.shape[2]) for buf, bt in zip(held.bt, self.bt)]
            views = self._row_views[(batch, rank)] = (a_rows, bt_rows, grouped)
            while len(self._row_views) > MAX_ROW_VIEWS:
                self._row_views.popitem(last=False)
        return views

    def _fill_row_weights(self) -> None:
        """Gather every row's A and Bt from its slot into all the per-row buffers' rows, at the active rank."""
        rows, rank, held = self._active.rows, self._active.rank, self._row_weights
        a_rows, bt_rows, _ = self._row_views_for(held.rows, rank)
        with torch.inference_mode():
            index = rows.repeat(-(-held.rows // len(rows)))[: held.rows]  # row b carries request row b % len(rows)
            for src, dst in zip([*self.a, *self.bt], [*a_rows, *bt_rows]):
                if dst is not None and dst.is_contiguous():
                    torch.index_select(src[:, :rank], 0, index, out=dst)
                elif dst is not None:  # a view into its input group's buffer
                    dst.copy_(src[:, :rank].index_select(0, index))

    def _weights_for(self, i: int, batch: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Layer ``i``'s A and Bt for each of ``batch`` rows."""
        a_rows, bt_rows, _ = self._row_buffers(batch)
        return a_rows[i], bt_rows[i]

    def _row_buffers(self, batch: int) -> tuple[list[torch.Tensor | None], list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's A and Bt, and each input group's A, for ``batch`` rows: reserved and filled by
        :meth:`use_rows`, grown here (in an eager call, never under graph capture, which warms up eagerly)
        for a batch longer than reserved."""
        rows, rank = len(self._active.rows), self._active.rank
        if batch % rows:
            raise RuntimeError(f"a batch of {batch} rows cannot carry {rows} per-row adapters")
        if batch > rows * self._rows_per_request:
            self._rows_per_request = batch // rows
        views = self._row_views.get((batch, rank))  # made only while the buffers hold (batch, rank): every layer's call but the first
        if views is None:
            if self._reserve_rows(batch, rank):
                self._fill_row_weights()
            views = self._row_views_for(batch, rank)
        self._row_weights.read = True
        return views

    def disable(self) -> None:
        self._set(None)

    def graph_key(self) -> tuple | None:
        """What a forward through these hooks depends on besides its inputs, for graph capture:
        ``None`` while bound adapters are read where they lie (their tensors change at a switch)."""
        active = self._active
        if active is None:  # idle hooks: nothing, or an adapter fused into the weights in place
            return ("idle",)
        if active.bound:
            return None
        if active.rows is None:
            return ("slot", active.slot, active.rank, self.share_projections)
        return ("rows", len(active.rows), active.rank, self.share_projections, self._row_generation)

    def _set(self, active: _Active | None) -> None:
        self.unfuse()
        self._shared.clear()
        self._active = active if active is not None and active.rank > 0 else None

    def fuse(self, slot: int) -> None:
        """Write ``W0 + Bt^T A`` of ``slot`` into the target layers' weights; hooks go idle.

        All ``max_rank`` rows take part (those past the slot's rank are zero), so fusing a slot is
        the same work whatever it holds: on CUDA it replays as a graph, one launch instead of one per
        layer (SD1.5 on an H200: 5.1 ms eagerly, 0.8 ms replayed). The first fuse runs eagerly and
        records every slot's graph.
        """
        if self._ranks[slot] == 0 or not self.layers:
            self._set(None)
            return
        self._active = None  # idle hooks; the weights are rewritten from the pristine copy (no unfuse first)
        first = self._pristine is None
        if first:  # kept from the first fuse on: a copy of the targeted layers only
            self._pristine = [layer.weight.detach().clone() for layer in self.layers.values()]
        self._graphs.run(("fuse", slot), partial(self._write_fused, slot))
        if first:  # every other slot's fuse is recorded now, so a cold load into a new slot replays too
            for other in range(1, len(self._ranks)):
                self._graphs.capture(("fuse", other), partial(self._write_fused, other))
        self.fused = True

    def _write_fused(self, slot: int) -> None:
        # The restore is one batched copy and each layer's addmm runs in place: one kernel per layer, where
        # addmm(pristine, out=weight) would launch a copy and a GEMM per layer for the same traffic.
        self._restore()
        with torch.no_grad():
            for layer, a, bt in zip(self.layers.values(), self.a, self.bt):
                out = layer.weight.shape[0]
                layer.weight.view(out, -1).addmm_(bt[slot].t(), a[slot].reshape(self.max_rank, -1))

    def unfuse(self) -> None:
        """Restore the targeted weights from the pristine copy (one batched copy)."""
        if self.fused:
            self._graphs.run(("restore",), self._restore)
            self.fused = False

    def _restore(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_([layer.weight for layer in self.layers.values()], self._pristine)

    def close(self) -> None:
        """Remove the hooks and restore the weights: the model is exactly as before."""
        self.unfuse()
        self._graphs = GraphedCalls(self.device)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _rows_for(self, batch: int) -> torch.Tensor:
        rows = self._active.rows
        index = self._row_index.get((len(rows), batch))
        if index is None:
            if batch % len(rows):
                raise RuntimeError(f"a batch of {batch} rows cannot carry {len(rows)} per-row adapters")
            index = self._row_index[(len(rows), batch)] = rows.repeat(batch // len(rows))
        return index

    def _hook(self, i: int, layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        active = self._active
        if active is None:
            return None
        x, r = args[0], active.rank
        if self._readers is not None and isinstance(layer, nn.Linear):
            self._observe(i, x)
        if active.bound:
            for packed, weight in active.bound:
                pair = packed.by_layer.get(i)
                if pair is not None:
                    _add_lora(layer, x, out, *pair, weight)
            return out
        a, bt = self.a[i], self.bt[i]
        if active.rows is None:
            _add_lora(layer, x, out, a[active.slot, :r], bt[active.slot, :r], h=self._shared_projection(i, x))
        elif isinstance(layer, nn.Linear):
            n = x.shape[0]
            a_rows, bt_rows = self._weights_for(i, n)
            h = self._shared_projection(i, x)
            if h is None:
                h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a_rows.transpose(1, 2))
            out.view(n, -1, out.shape[-1]).baddbmm_(h, bt_rows)
        else:  # each row's own A: convolve with every slot's A, then keep the row's slot
            conv = partial(F.conv2d, bias=None, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            n, rows = x.shape[0], self._rows_for(x.shape[0])
            h = conv(x, a[:, :r].reshape(-1, *a.shape[2:]))
            h = h.view(n, a.shape[0], r, -1)[torch.arange(n, device=h.device), rows]
            out.add_(torch.bmm(self._weights_for(i, n)[1].transpose(1, 2), h).view(out.shape))
        return out

    @property
    def input_groups(self) -> list[tuple[str, ...]]:
        """The target layers that share one projection, by name (empty until the second forward with active hooks)."""
        names = list(self.layers)
        return [tuple(names[i] for i in g) for g in self._groups]

    def _observe(self, i: int, x: torch.Tensor) -> None:
        """Record that layer ``i`` reads ``x``; a layer called again means a new forward: the first one's
        readers become the input groups.

        Learned rather than guessed from names or widths: every cross-attention k/v in the model reads
        the prompt embedding (one GEMM for all of them instead of one per block; 70 SDXL blocks), while
        a cross-attention q as wide as its k/v reads another tensor. The groups are fixed here, in the
        second forward with active hooks, before any graph that reads the buffers built from them can
        have been captured (a capture first warms up eagerly): buffers built without them are dropped.
        """
        if i not in self._readers.seen:
            self._readers.add(i, x)
            return
        self._groups, self._readers = self._readers.groups(), None
        self._member = {i: (g, j) for g, members in enumerate(self._groups) for j, i in enumerate(members)}
        self._group_a.clear()
        self._row_weights = None  # no graph read them: a capture runs after two forwards with active hooks
        self._row_views.clear()
        self._shared.clear()

    def _shared_projection(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Layer ``i``'s ``x A^T`` (slot or per-row weights) sliced from its input group's one GEMM, or
        ``None`` for a layer in no group. The first member called with ``x`` runs the GEMM for all;
        a member called with another tensor than the group's last runs it anew."""
        member = self._member.get(i) if self.share_projections else None
        if member is None:
            return None
        g, j = member
        shared = self._shared.get(g)
        if shared is None or shared.x is not x:
            active = self._active
            if active.rows is None:
                h = F.linear(x, self._grouped_a(active.slot)[g])
            else:
                n = x.shape[0]
                h = torch.bmm(x.reshape(n, -1, x.shape[-1]), self._row_buffers(n)[2][g].transpose(1, 2))
            shared = self._shared[g] = _SharedProjection(x, h, len(self._groups[g]))
        shared.unread -= 1
        if not shared.unread:
            del self._shared[g]
        r = self._active.rank
        return shared.h[..., j * r : (j + 1) * r]


def _same_device(have: torch.device, want: torch.device) -> bool:
    return have.type == want.type and (want.index is None or want.index == have.index)


def _add_lora(
    layer: nn.Module, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, weight: float = 1.0, h: torch.Tensor | None = None
) -> None:
    """``out += weight * Bt^T A x`` for every row: one adapter's (or slot's) low-rank term of ``layer``;
    ``h`` is ``x A^T`` where it was already computed (a Linear's shared projection)."""
    if isinstance(layer, nn.Linear):
        h = F.linear(x, a) if h is None else h
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, a.shape[0]), bt, alpha=weight)
    else:
        h = F.conv2d(x, a, bias=None, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        out.add_(torch.einsum("nrhw,ro->nohw", h, bt), alpha=weight)


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter packed for every model of a pipeline it touches (``unet``, ``text_encoder``...)."""

    parts: Mapping[str, PackedLora]

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts.values())

    def to(self, device: torch.device | str) -> PackedAdapter:
        return PackedAdapter({c: p.to(device) for c, p in self.parts.items()})


# One request's adapters: (identity, packed, weight) per composed adapter, in rank order.
AdapterSet = tuple[tuple[Hashable, PackedAdapter, float], ...]


def set_key(adapter_set: AdapterSet) -> tuple:
    return tuple((key, weight) for key, _, weight in adapter_set)


class LoraRuntime:
    """Slots on every LoRA-capable model of a pipeline, and which adapter set each batch row uses.

    A one-set batch binds the packed tensors (no copy), is copied into the single slot, or is
    fused; the single slot and the fused weights cost nothing when they already hold that set.
    Mixed batches copy sets into bank slots, where they stay resident (LRU): a batch whose sets
    are already resident costs no copy at all.
    """

    def __init__(self, models: Mapping[str, nn.Module], config: RuntimeConfig = RuntimeConfig()):
        self.config = config
        self.single_slot = config.bank_size + 1  # after the mixed batches' slots 1..bank_size
        self.slots = {
            name: LoraSlots(
                model, config.unet_targets if name == "unet" else config.text_targets, config.max_rank, config.bank_size + 1, config.share_projections
            )
            for name, model in models.items()
        }
        self._resident: OrderedDict[tuple, int] = OrderedDict()  # set key -> bank slot, least recent first
        self._fused: tuple | None = None
        self._in_single_slot: dict[str, tuple] = {}  # model -> the set key its single slot holds

    @classmethod
    def for_pipeline(cls, pipe, config: RuntimeConfig = RuntimeConfig()) -> LoraRuntime:
        names = ("unet", "text_encoder", "text_encoder_2")
        return cls({n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}, config)

    def pack(self, adapter: LoraAdapter, what: str, device: torch.device | str | None = None) -> PackedAdapter:
        """Pack an adapter for these slots (checks every layer and shape; ``what`` names it in errors)."""
        parts = {}
        for component in {k.split(".", 1)[0] for k in adapter.tensors}:
            if component not in self.slots:
                raise AdapterDoesNotFit(f"{what} has LoRA weights for {component}, which this base does not have")
            tensors = adapter.component_tensors(component)
            modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
            missing = [m for m in modules if f"{m}.lora_A.weight" not in tensors or f"{m}.lora_B.weight" not in tensors]
            if missing:
                raise AdapterDoesNotFit(f"{what}: {component}.{missing[0]} lacks its lora_A or lora_B weight")
            pairs = {m: (tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]) for m in modules}
            ranks = sorted({a.shape[0] for a, _ in pairs.values()})
            if ranks != [adapter.rank]:  # the scale is alpha / the declared rank, and the sampler budgets composed ranks by it
                found = f"rank {ranks[0]}" if len(ranks) == 1 else f"mixed ranks {ranks}"
                raise AdapterDoesNotFit(f"{what} declares rank {adapter.rank!r}, but its {component} LoRA tensors have {found}")
            parts[component] = self.slots[component].pack(pairs, adapter.scale, what, device)
        return PackedAdapter(parts)

    @property
    def single_path(self) -> str:
        """How one-set batches run by default: ``config.single``; unset: the slot on CUDA, where a
        step replays as a graph that a bound adapter's moving tensors would break, bound elsewhere
        (see RuntimeConfig)."""
        if self.config.single is not None:
            return self.config.single
        return "slot" if "unet" in self.slots and self.slots["unet"].device.type == "cuda" else "bound"

    def activate(self, rows: Sequence[AdapterSet], single: str | None = None) -> None:
        """Make row ``i`` of the next batch use ``rows[i]`` (an empty set: the base alone).

        A batch with one adapter set on every row takes ``single`` (one of SINGLE_PATHS; default
        :attr:`single_path`) in the UNet; text encoders, which no graph replays, bind. A set that
        cannot be bound (packed on another device) goes through the single slot. Other batches go
        through bank slots.
        """
        single = single or self.single_path
        _check_single(single)
        keys = [set_key(s) for s in rows]
        distinct = {k: s for k, s in zip(keys, rows) if s}
        if len(distinct) > self.config.bank_size:
            raise ValueError(f"{len(distinct)} adapter sets in one batch; the bank holds {self.config.bank_size}")
        if not distinct:
            self._each(lambda slots: slots.disable())
            self._fused = None
        elif len(distinct) == 1 and all(keys):  # one set for every row
            key, adapter_set = next(iter(distinct.items()))
            fuse = single == "fused"
            for name, slots in self.slots.items():
                parts = [(packed.parts[name], w) for _, packed, w in adapter_set if name in packed.parts]
                path = single if name == "unet" else "bound"  # text encoders run eagerly: nothing to gain by copying
                if path == "fused":
                    if self._fused != key:
                        slots.fuse(self._place(key, adapter_set, {key}))
                elif path == "bound" and slots.can_bind(parts):
                    slots.bind(parts)
                else:
                    if self._in_single_slot.get(name) != key:
                        slots.load(self.single_slot, parts)
                        self._in_single_slot[name] = key
                    slots.use(self.single_slot)
            self._fused = key if fuse else None
        else:
            slot_of = {k: self._place(k, s, set(distinct)) for k, s in distinct.items()}
            row_slots = [slot_of.get(k, EMPTY_SLOT) for k in keys]
            self._each(lambda slots: slots.use_rows(row_slots))
            self._fused = None

    def graph_key(self, model: str = "unet") -> tuple | None:
        """``model``'s hook mode for :class:`gen.cuda_graph.GraphedUNet` (see :meth:`LoraSlots.graph_key`)."""
        return self.slots[model].graph_key() if model in self.slots else ("idle",)

    def deactivate(self) -> None:
        """Back to the base alone (unfused weights, idle hooks); adapters stay resident in the bank."""
        self.activate([])

    def close(self) -> None:
        """Remove every hook and restore the weights."""
        self._each(lambda slots: slots.close())
        self._resident.clear()
        self._in_single_slot.clear()
        self._fused = None

    def _each(self, fn) -> None:
        for slots in self.slots.values():
            fn(slots)

    def _place(self, key: tuple, adapter_set: AdapterSet, needed: set) -> int:
        """The bank slot holding ``adapter_set``, loading it over the least recent unneeded one if absent."""
        if key in self._resident:
            self._resident.move_to_end(key)
            return self._resident[key]
        used = set(self._resident.values())
        free = [s for s in range(1, self.config.bank_size + 1) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next(k for k in self._resident if k not in needed)
            slot = self._resident.pop(victim)
            if victim == self._fused:  # its weights are fused: restore before the slot changes
                self.slots["unet"].unfuse()
                self._fused = None
        for name, slots in self.slots.items():
            slots.load(slot, [(packed.parts[name], w) for _, packed, w in adapter_set if name in packed.parts])
        self._resident[key] = slot
        return slot
