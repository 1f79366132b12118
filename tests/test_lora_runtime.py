"""The LoRA slot runtime against diffusers/peft as the reference, on a tiny SD UNet and text encoder."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from torch.overrides import TorchFunctionMode

from adapters.registry.synthetic import random_adapter
from adapters.validate import BaseSpec
from gen.lora_runtime import AdapterDoesNotFit, LoraRuntime, PackedLora, RuntimeConfig
from gen.tiny import build_tiny_pipeline

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1")  # Linear and Conv2d (1x1 and 3x3) layers
CONFIG = RuntimeConfig(unet_targets=TARGETS, max_rank=16, bank_size=3)
TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sd")


@pytest.fixture(scope="module")
def spec(pipe):
    return BaseSpec.from_pipeline(pipe, "tiny", "sd")


@pytest.fixture
def unet(pipe):
    return copy.deepcopy(pipe.unet)  # every test gets its own hooks and weights


def make(spec, seed, rank=4, alpha=8.0, components=("unet",), targets=TARGETS):
    return random_adapter(spec, rank=rank, alpha=alpha, targets=targets, components=components, seed=seed)


def inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.full((batch,), 10), torch.randn(batch, 8, 32, generator=g)


def forward(unet, sample, t, context):
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=context).sample


def diffusers_reference(unet, weighted):
    """A copy of ``unet`` with the adapters loaded by diffusers and activated with ``set_adapters``."""
    ref = copy.deepcopy(unet)
    for i, (adapter, _) in enumerate(weighted):
        metadata = {"r": adapter.rank, "lora_alpha": adapter.alpha, "target_modules": list(TARGETS)}
        ref.load_lora_adapter(adapter.component_tensors("unet"), prefix=None, adapter_name=f"a{i}", metadata=metadata)
    ref.set_adapters([f"a{i}" for i in range(len(weighted))], weights=[w for _, w in weighted])
    return ref


def one_set(runtime, weighted, key="s"):
    return tuple((f"{key}{i}", runtime.pack(a, f"adapter {i}"), w) for i, (a, w) in enumerate(weighted))


def runtime_for(unet, path, monkeypatch, **config):
    """A runtime whose one-set batches take ``path``: bound (read in place), the single slot, fused,
    or ``unbindable``: bound asked for, but the packed tensors are elsewhere (a host pack for a GPU model)."""
    single = "bound" if path == "unbindable" else path
    runtime = LoraRuntime({"unet": unet}, RuntimeConfig(**{**CONFIG.__dict__, "single": single, **config}))
    if path == "unbindable":
        monkeypatch.setattr(runtime.slots["unet"], "can_bind", lambda parts: False)
    return runtime


PATHS = ["bound", "slot", "fused", "unbindable"]


@pytest.mark.parametrize("path", PATHS)
def test_single_adapter_matches_diffusers(unet, spec, path, monkeypatch):
    adapter = make(spec, 1, rank=4, alpha=6.0)  # alpha != rank: the scale must be honoured
    x = inputs(2)
    expected = forward(diffusers_reference(unet, [(adapter, 1.0)]), *x)
    assert (expected - forward(unet, *x)).abs().max() > 0.1  # the reference really carries the adapter
    runtime = runtime_for(unet, path, monkeypatch)
    runtime.activate([one_set(runtime, [(adapter, 1.0)])] * 2)
    torch.testing.assert_close(forward(unet, *x), expected, **TOL)
    bank_used = any(t.abs().sum() > 0 for t in runtime.slots["unet"].a)
    assert bank_used == (path != "bound")  # a bound adapter is read where it lies: nothing is copied


@pytest.mark.parametrize("path", PATHS)
def test_two_adapters_composed_with_weights_match_set_adapters(unet, spec, path, monkeypatch):
    weighted = [(make(spec, 1, rank=4, alpha=8.0), 0.7), (make(spec, 2, rank=8, alpha=4.0), -0.4)]
    x = inputs(2)
    expected = forward(diffusers_reference(unet, weighted), *x)
    runtime = runtime_for(unet, path, monkeypatch)
    runtime.activate([one_set(runtime, weighted)] * 2)
    torch.testing.assert_close(forward(unet, *x), expected, **TOL)


def test_mixed_batch_row_equals_that_row_alone_with_its_adapter(unet, spec):
    first, second = make(spec, 1), make(spec, 2, rank=8, alpha=16.0)
    sample, t, context = inputs(3)
    alone = [
        forward(diffusers_reference(unet, [(first, 1.0)]), sample[:1], t[:1], context[:1]),
        forward(diffusers_reference(unet, [(second, 1.0)]), sample[1:2], t[1:2], context[1:2]),
        forward(unet, sample[2:], t[2:], context[2:]),  # no adapter
    ]
    runtime = LoraRuntime({"unet": unet}, CONFIG)
    runtime.activate([one_set(runtime, [(first, 1.0)], "a"), one_set(runtime, [(second, 1.0)], "b"), ()])
    torch.testing.assert_close(forward(unet, sample, t, context), torch.cat(alone), **TOL)
    # A CFG-doubled batch repeats the request rows: rows i and i + 3 carry the same adapter.
    doubled = forward(unet, sample.repeat(2, 1, 1, 1), t.repeat(2), context.repeat(2, 1, 1))
    torch.testing.assert_close(doubled, torch.cat(alone).repeat(2, 1, 1, 1), **TOL)


def test_later_mixed_batches_of_the_same_size_see_their_own_rows_and_reloaded_slots(unet, spec):
    """Each row's A and Bt are gathered once per batch into buffers a captured graph reads: the next
    batch of the same length and rank must refill them, also where a slot was reloaded meanwhile."""
    adapters = {k: make(spec, seed, rank=rank, alpha=8.0) for k, seed, rank in (("a", 1, 4), ("b", 2, 8), ("c", 3, 8), ("d", 4, 8))}
    sample, t, context = inputs(3)
    alone = {k: forward(diffusers_reference(unet, [(adapters[k], 1.0)]) if k else unet, sample, t, context) for k in [*adapters, None]}
    runtime = LoraRuntime({"unet": unet}, CONFIG)  # a bank of 3: the third batch evicts "b" for "d"
    for batch in (("a", "b", None), ("b", "a", "c"), ("d", "c", "a")):
        runtime.activate([one_set(runtime, [(adapters[k], 1.0)], k) if k else () for k in batch])
        expected = torch.cat([alone[k][i : i + 1] for i, k in enumerate(batch)])
        torch.testing.assert_close(forward(unet, sample, t, context), expected, **TOL)
    slot_of_a = runtime._resident[(("a0", 1.0),)]  # the bank's key for the set ("a0", weight 1)
    runtime.slots["unet"].load(slot_of_a, [(runtime.pack(adapters["c"], "c").parts["unet"], 1.0)])
    torch.testing.assert_close(forward(unet, sample, t, context)[2], alone["c"][2], **TOL)  # row 2 reads a's slot, now c's


class CountLowRankProjections(TorchFunctionMode):
    """Counts ``x A^T`` GEMMs: linear maps by a weight that is no parameter (the base layers' are), and
    batched products (the UNet's attention runs neither): how many the LoRA terms launch."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and not isinstance(args[1], nn.Parameter) or func is torch.bmm:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mixed", [False, True], ids=["single-slot", "mixed-batch"])
@pytest.mark.parametrize("context_width", [32, 64])  # 64: cross-attention's to_q is as wide as to_k/to_v but reads another tensor
def test_layers_reading_one_tensor_share_one_projection_and_still_match_diffusers(pipe, mixed, context_width):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": context_width}).eval()
    adapter = make(BaseSpec.from_pipeline(SimpleNamespace(unet=unet), "tiny", "sd"), 1, targets=("to_q", "to_k", "to_v", "to_out.0"))
    sample, t, _ = inputs(2)
    context = torch.randn(2, 8, context_width, generator=torch.Generator().manual_seed(1))
    expected = forward(diffusers_reference(unet, [(adapter, 1.0)]), sample, t, context)
    if mixed:
        expected[1:] = forward(unet, sample[1:], t[1:], context[1:])
    calls = {}
    for share in (False, True):
        runtime = LoraRuntime({"unet": unet}, RuntimeConfig(max_rank=8, bank_size=2, single="slot", share_projections=share))
        runtime.activate([one_set(runtime, [(adapter, 1.0)]), () if mixed else one_set(runtime, [(adapter, 1.0)])])
        for _ in range(2):  # the first forward learns which layers read one tensor; the second shares
            with CountLowRankProjections() as counter:
                got = forward(unet, sample, t, context)
            torch.testing.assert_close(got, expected, **TOL)
            assert not runtime.slots["unet"]._shared  # no shared projection outlives the forward (it holds an activation)
        calls[share] = counter.calls
        runtime.close()
    layers = len(runtime.slots["unet"].layers)
    assert calls[False] == layers
    # per transformer block, self-attention's q/k/v run one GEMM (2 fewer), and every block's cross-attention k/v read
    # the same context: one GEMM for all of them. Where q is as wide as k/v it reads another tensor and runs its own.
    blocks = len(unet.attn_processors) // 2
    assert blocks > 1
    assert calls[True] == layers - 2 * blocks - (2 * blocks - 1)


def test_text_encoder_slots_match_peft(pipe, spec):
    adapter = make(spec, 3, rank=4, alpha=2.0, components=("text_encoder",), targets=("q_proj", "k_proj", "v_proj", "out_proj"))
    encoder = copy.deepcopy(pipe.text_encoder)
    ids = torch.randint(0, encoder.config.vocab_size - 2, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2.0, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), copy.deepcopy(encoder))
    set_peft_model_state_dict(reference, adapter.component_tensors("text_encoder"))
    runtime = LoraRuntime({"text_encoder": encoder})
    runtime.activate([one_set(runtime, [(adapter, 1.0)])] * 2)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids).last_hidden_state, reference(ids).last_hidden_state, **TOL)


def test_switching_copies_into_the_same_buffers_and_restores_the_base_exactly(unet, spec):
    x = inputs(2)
    base_out = forward(unet, *x)
    runtime = LoraRuntime({"unet": unet}, RuntimeConfig(**{**CONFIG.__dict__, "single": "fused"}))
    slots = runtime.slots["unet"]
    pointers = lambda: [t.data_ptr() for t in (*slots.a, *slots.bt, *(layer.weight for layer in slots.layers.values()))]
    before = pointers()
    sets = [one_set(runtime, [(make(spec, s, rank=2 + 2 * s), 1.0)], f"k{s}") for s in range(5)]  # more sets than bank slots
    runtime.activate([sets[0], ()])
    forward(unet, *x)  # the hooks' first forward learns which layers share a projection: later ones share (other rounding)
    outputs = []
    for s in [*sets, sets[0]]:  # evicts and reloads, ranks shrinking and growing
        runtime.activate([s, s])  # fused
        fused = forward(unet, *x)
        runtime.activate([s, ()])  # per-row slots
        outputs.append(forward(unet, *x))
        torch.testing.assert_close(outputs[-1][:1], fused[:1], **TOL)
        torch.testing.assert_close(outputs[-1][1:], base_out[1:], **TOL)
    assert pointers() == before  # buffers and weights never reallocate: a captured graph survives
    torch.testing.assert_close(outputs[-1], outputs[0], rtol=0, atol=0)
    runtime.deactivate()
    assert torch.equal(forward(unet, *x), base_out)  # restored from the pristine copy, bit for bit
    runtime.close()
    assert not any(layer._forward_hooks for layer in slots.layers.values())


def test_adapters_that_do_not_fit_are_refused(unet, spec):
    runtime = LoraRuntime({"unet": unet}, RuntimeConfig(max_rank=8))  # default targets: attention only
    with pytest.raises(AdapterDoesNotFit, match="no LoRA slot"):
        runtime.pack(make(spec, 1), "alice/rex v1")  # also targets proj_in and conv1
    with pytest.raises(AdapterDoesNotFit, match="rank 16, over the runtime's max_rank 8"):
        runtime.pack(make(spec, 1, rank=16, targets=("to_q",)), "alice/rex v1")
    with pytest.raises(AdapterDoesNotFit, match="text_encoder, which this base does not have"):
        runtime.pack(make(spec, 1, components=("text_encoder",), targets=("q_proj",)), "alice/rex v1")
    odd = make(spec, 1, rank=4, targets=("to_q",))
    key = next(k for k in odd.tensors if k.endswith("lora_B.weight"))
    odd.tensors[key] = odd.tensors[key][..., None, None].expand(-1, -1, 3, 3).contiguous()  # (out, r, 3, 3): a reshape error once
    with pytest.raises(AdapterDoesNotFit, match="do not fit layer"):
        runtime.pack(odd, "alice/odd v1")
    small = runtime.pack(make(spec, 1, rank=6, targets=("to_q",)), "a")
    with pytest.raises(AdapterDoesNotFit, match="composed rank 12"):
        runtime.activate([(("a", small, 1.0), ("b", small, 1.0))])


def test_runtime_for_a_pipeline_covers_unet_and_text_encoders(pipe):
    runtime = LoraRuntime.for_pipeline(SimpleNamespace(unet=pipe.unet, text_encoder=pipe.text_encoder))
    try:
        assert set(runtime.slots) == {"unet", "text_encoder"}
        assert all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in runtime.slots["unet"].layers)
        assert runtime.slots["text_encoder"].layers
    finally:
        runtime.close()


def test_unset_single_path_is_bound_on_the_cpu_and_the_slot_on_cuda(unet, spec):
    """One adapter set per batch: bound on the CPU (no copy; hooks cost ~1% there), the single slot on CUDA
    (a graphed step needs buffers that never move); neither touches the weights."""
    runtime = LoraRuntime({"unet": unet}, CONFIG)
    weight = next(iter(runtime.slots["unet"].layers.values())).weight.clone()
    runtime.activate([one_set(runtime, [(make(spec, 1), 1.0)])] * 2)
    assert runtime.single_path == "bound" and runtime.graph_key() is None and not runtime.slots["unet"].fused
    torch.testing.assert_close(next(iter(runtime.slots["unet"].layers.values())).weight, weight, rtol=0, atol=0)
    if torch.cuda.is_available():  # pragma: no cover - CPU in CI
        gpu = LoraRuntime({"unet": copy.deepcopy(unet).cuda()}, CONFIG)
        gpu.activate([one_set(gpu, [(make(spec, 1), 1.0)])] * 2)
        assert gpu.graph_key()[:2] == ("slot", gpu.single_slot) and not gpu.slots["unet"].fused


def test_single_slot_is_refilled_in_place_only_when_the_set_changes(unet, spec):
    """The single slot's buffers never move (a captured graph reads them) and the graph key stays the same
    across switches of one rank; re-activating the set it holds copies nothing."""
    runtime = LoraRuntime({"unet": unet}, RuntimeConfig(**{**CONFIG.__dict__, "single": "slot"}))
    slots, x = runtime.slots["unet"], inputs(2)
    first, second = (one_set(runtime, [(make(spec, s), 1.0)], f"k{s}") for s in (1, 2))
    runtime.activate([first] * 2)
    forward(unet, *x)  # learns the input groups: later forwards share projections (other rounding)
    key, out_first = runtime.graph_key(), forward(unet, *x)
    loads = []
    original = slots.load
    slots.load = lambda slot, parts: (loads.append(slot), original(slot, parts))
    runtime.activate([second] * 2)
    assert runtime.graph_key() == key == ("slot", runtime.single_slot, 4, True)
    assert not (forward(unet, *x) - out_first).abs().max() < 1e-3  # the second adapter really replaced the first
    runtime.activate([second] * 2)
    runtime.activate([first, ()])  # a mixed batch goes to the bank, leaving the single slot as it is
    runtime.activate([second] * 2)
    assert loads == [runtime.single_slot, 1]
    runtime.activate([first] * 2)
    torch.testing.assert_close(forward(unet, *x), out_first, rtol=0, atol=0)
    assert runtime.single_slot not in runtime._resident.values()


def test_single_slot_shared_projections_follow_rank_changes_and_a_reload_in_place(unet, spec):
    """Each (slot, rank) keeps its own grouped A, refilled after every load: switching ranks and back, or
    loading the slot in use without activating again (what a replayed graph sees), reads the current adapter."""
    runtime = LoraRuntime({"unet": unet}, RuntimeConfig(**{**CONFIG.__dict__, "single": "slot"}))
    x = inputs(2)
    sets = [one_set(runtime, [(make(spec, seed, rank=rank), 1.0)], f"k{seed}") for seed, rank in ((1, 4), (2, 8), (3, 4))]
    expected = []
    for s in sets:
        runtime.activate([s, s], single="bound")  # the reference: read in place, no slot
        expected.append(forward(unet, *x))
    for i in (0, 1, 0, 2):
        runtime.activate([sets[i], sets[i]])
        torch.testing.assert_close(forward(unet, *x), expected[i], **TOL)
    runtime.slots["unet"].load(runtime.single_slot, [(sets[0][0][1].parts["unet"], 1.0)])  # same rank, slot in use
    torch.testing.assert_close(forward(unet, *x), expected[0], **TOL)


def test_unknown_single_path_is_refused(unet):
    with pytest.raises(ValueError, match="single must be one of"):
        RuntimeConfig(single="fast")
    with pytest.raises(ValueError, match="share_projections must be True or False"):
        RuntimeConfig(share_projections="no")  # a truthy string would have turned sharing on
    with pytest.raises(ValueError, match="single must be one of"):
        LoraRuntime({"unet": unet}, CONFIG).activate([()], single="fast")


def test_packed_adapter_is_one_buffer_so_a_move_is_one_copy(unet, spec):
    runtime = LoraRuntime({"unet": unet}, CONFIG)
    packed = runtime.pack(make(spec, 1), "adapter").parts["unet"]
    storage = packed.flat.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in (*packed.a, *packed.bt))
    assert packed.nbytes() == sum(t.numel() * t.element_size() for t in (*packed.a, *packed.bt))
    assert packed.to("cpu") is packed  # already there: nothing copied


@pytest.mark.parametrize("b_as_stored", [False, True])  # the layouts of a CUDA runtime's packs and a CPU runtime's
def test_either_packed_layout_gives_the_same_bt_and_survives_a_move(b_as_stored):
    a, b = [torch.randn(4, 6), torch.randn(4, 3)], [torch.randn(5, 4), torch.randn(2, 4)]
    packed = PackedLora.from_tensors([0, 1], a, [t.t() for t in b], 4, b_as_stored=b_as_stored)
    moved = PackedLora.from_tensors(packed.layers, packed.a, packed.bt, 4, packed.flat.clone(), b_as_stored=b_as_stored)  # what .to() does
    for got in (packed, moved):
        assert all(torch.equal(x, y) for x, y in zip(got.a, a)) and all(torch.equal(x, y.t()) for x, y in zip(got.bt, b))
        assert all(x.is_contiguous() != b_as_stored for x in got.bt)


def held_bytes(slots):
    """Bytes of the device buffers a LoraSlots keeps besides its bank and pristine weights (per-row and grouped copies)."""
    seen, skip = set(), {t.untyped_storage().data_ptr() for t in (*slots.a, *slots.bt)}

    def walk(v):
        if torch.is_tensor(v):
            ptr = v.untyped_storage().data_ptr()
            if ptr not in skip and ptr not in seen and v.dtype == slots.dtype:
                seen.add(ptr)
                yield v.untyped_storage().nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                yield from walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from walk(x)
        elif hasattr(v, "__dataclass_fields__"):
            for name in v.__dataclass_fields__:
                yield from walk(getattr(v, name))

    return sum(walk({k: v for k, v in vars(slots).items() if k not in ("a", "bt", "_pristine", "layers", "_index")}))


def test_per_row_and_grouped_buffers_stay_bounded_across_batch_sizes_and_ranks(unet, spec):
    """Mixed batches of every (request rows, batch, rank) and single-slot sets of every composed rank reuse one
    set of buffers sized by the largest seen: keyed per combination they grew without end (6.5x the bank)."""
    runtime = LoraRuntime({"unet": unet}, RuntimeConfig(**{**CONFIG.__dict__, "single": "slot"}))
    slots = runtime.slots["unet"]
    packs = {r: [(f"r{r}s{i}", runtime.pack(make(spec, 10 * r + i, rank=r, alpha=float(r)), f"{r}/{i}"), 1.0) for i in range(2)] for r in (2, 4, 8)}
    sample, t, context = inputs(6)
    forward(unet, sample, t, context)  # no hooks yet
    # The largest first: three request rows at rank 8, CFG-doubled; a composed rank-12 set through the single slot.
    plans = [[(packs[8][0],), (packs[4][0],), ()], [(packs[2][0],), ()], [(packs[4][1],), (packs[2][1],)], [(packs[2][0],), (packs[4][0],), (packs[2][1],)]]
    big = [(packs[8][0], packs[4][0])] * 2
    expected = {}
    name = lambda s: tuple(k for k, _, _ in s)  # noqa: E731
    for rows in plans:  # the reference: each row alone, its set bound (read in place)
        for s in rows:
            if name(s) not in expected:
                runtime.activate([s], single="bound")
                expected[name(s)] = forward(unet, sample[:1], t[:1], context[:1])
    runtime.activate(big, single="bound")
    expected_big = forward(unet, sample[:2], t[:2], context[:2])
    held = None
    for round_ in range(3):
        for rows in plans if round_ else plans[:1]:  # round 0: the largest only
            for repeat in (1, 2):  # without and with classifier-free guidance's doubled batch
                runtime.activate(rows)
                n = len(rows) * repeat
                got = forward(unet, sample[:1].expand(n, -1, -1, -1), t[:n], context[:1].expand(n, -1, -1))
                torch.testing.assert_close(got, torch.cat([expected[name(s)] for s in rows] * repeat), **TOL)
            for composed in ([packs[8][0], packs[4][0]], [packs[2][0]], [packs[4][0], packs[2][1]]) if round_ else ():  # single slot: ranks 12, 2, 6
                runtime.activate([tuple(composed)] * 2)
                forward(unet, sample[:2], t[:2], context[:2])
            runtime.activate(big)
            torch.testing.assert_close(forward(unet, sample[:2], t[:2], context[:2]), expected_big, **TOL)
        if held is None:
            held = held_bytes(slots)
    assert held_bytes(slots) == held
    assert slots.input_groups  # the grouped copies took part


def test_replacing_per_row_buffers_a_forward_read_changes_the_graph_key(unet, spec):
    """A captured graph reads the per-row buffers where they lie: growing them (a longer batch, a higher rank)
    must change the graph key so no graph recorded on the old ones replays; buffers no forward read yet
    (reserved by use_rows, grown by the first forward's CFG-doubled batch) are replaced without that."""
    runtime = LoraRuntime({"unet": unet}, CONFIG)
    slots = runtime.slots["unet"]
    low, high = (one_set(runtime, [(make(spec, s, rank=r), 1.0)], f"k{s}") for s, r in ((1, 4), (2, 8)))
    for _ in range(2):  # learn the input groups first, as any capture does in its warm-up
        runtime.activate([low, ()])
        forward(unet, *inputs(4))  # reserved for 2 rows, grown to 4 before any layer read them
    key = runtime.graph_key()
    pointers = [b.data_ptr() for b in slots._row_weights.bt]
    runtime.activate([(), low])  # other slots per row, as many rows, the same rank: the same buffers, refilled
    assert runtime.graph_key() == key and [b.data_ptr() for b in slots._row_weights.bt] == pointers
    runtime.activate([low, low, ()])  # 3 request rows (6 with CFG): longer buffers, read before
    grown = runtime.graph_key()
    assert grown[:4] == ("rows", 3, 4, True) and grown[4] != key[4]
    runtime.activate([high, ()])  # a higher rank: new buffers again, but no forward read the 3-row ones: same generation
    assert runtime.graph_key()[4] == grown[4]
    forward(unet, *inputs(4))
    runtime.activate([high, high, (), ()])  # 4 request rows: longer again, and the rank-8 ones were read
    assert runtime.graph_key()[4] != grown[4]


def test_an_adapter_whose_declared_rank_is_not_its_tensors_is_refused(unet, spec):
    """The scale is alpha / the declared rank and the sampler budgets composed ranks by it: a source that does not
    validate could hand over rank-8 tensors declared rank 4, scaled 2x and let through a composition over max_rank."""
    from dataclasses import replace

    runtime = LoraRuntime({"unet": unet}, RuntimeConfig(max_rank=8))
    adapter = make(spec, 1, rank=8, targets=("to_q",))
    runtime.pack(adapter, "alice/rex v1")
    with pytest.raises(AdapterDoesNotFit, match="declares rank 4, but its unet LoRA tensors have rank 8"):
        runtime.pack(replace(adapter, rank=4), "alice/rex v1")
    with pytest.raises(AdapterDoesNotFit, match="declares rank 0, but"):  # once a ZeroDivisionError computing alpha / rank
        runtime.pack(replace(adapter, rank=0), "alice/rex v1")
