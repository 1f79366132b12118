"""CUDA-graph replay of the UNet step under switching LoRA slots.

What a graph relies on is checked everywhere: the runtime's mode key, and that the tensors the
hooks read stay put across switches. The capture itself needs CUDA and is skipped without it
(scripts/bench_serving.py runs the same checks at SD1.5/SDXL size on a GPU).
"""

import copy

import pytest
import torch

from adapters.registry.synthetic import random_adapter
from adapters.validate import BaseSpec
from gen.cuda_graph import GraphedUNet
from gen.lora_runtime import LoraRuntime, RuntimeConfig
from gen.tiny import build_tiny_pipeline

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sd")


def runtime_on(pipe, device, single):
    unet = copy.deepcopy(pipe.unet).to(device)
    spec = BaseSpec.from_pipeline(pipe, "tiny", "sd")
    runtime = LoraRuntime({"unet": unet}, RuntimeConfig(unet_targets=TARGETS, max_rank=16, bank_size=3, single=single))
    sets = [((f"k{s}", runtime.pack(random_adapter(spec, rank=4, targets=TARGETS, seed=s, std=0.1), f"adapter {s}"), 1.0),) for s in range(4)]
    return unet, runtime, sets


def inputs(batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor(10), encoder_hidden_states=torch.randn(batch, 8, 32, generator=g))
    return {k: v.to(device) for k, v in x.items()}


def test_graph_key_says_which_modes_can_be_captured(pipe):
    unet, runtime, sets = runtime_on(pipe, "cpu", single="bound")
    runtime.activate([()])
    assert runtime.graph_key() == ("idle",)
    runtime.activate([sets[0]], single="fused")
    assert runtime.graph_key() == ("idle",)  # fused: the hooks are idle, the weights changed in place
    runtime.activate([sets[0]], single="bound")
    assert runtime.graph_key() is None  # bound: the hooks read the adapter's own tensors, which differ per adapter
    runtime.activate([sets[0]], single="slot")
    assert runtime.graph_key() == ("slot", runtime.single_slot, 4, True)  # copied into the single slot: the same key for every set
    runtime.activate([sets[0], sets[1]])
    assert runtime.graph_key() == ("rows", 2, 4, True, 0)  # 0: the per-row buffers were never replaced


def test_mixed_batch_indices_are_rewritten_in_place_across_switches(pipe):
    unet, runtime, sets = runtime_on(pipe, "cpu", single="bound")
    slots, x = runtime.slots["unet"], inputs(4, "cpu")
    runtime.activate([sets[0], sets[1]])
    with torch.inference_mode():  # the index is first made inside an inference-mode forward
        unet(**x)
    index = slots._row_index[(2, 4)]
    pointer = index.data_ptr()
    runtime.activate([sets[2], ()])  # another pair of sets: other bank slots, same buffers
    assert index.data_ptr() == pointer and slots._row_index[(2, 4)] is index
    assert index.tolist() == [runtime._resident[(("k2", 1.0),)], 0] * 2


def test_graphed_unet_runs_eagerly_off_cuda_and_leaves_the_unet_as_it_was(pipe):
    unet, runtime, sets = runtime_on(pipe, "cpu", single="bound")
    graphed = GraphedUNet(unet, runtime.graph_key)
    x = inputs(2, "cpu")
    runtime.activate([sets[0]])
    with torch.no_grad():
        expected = unet(**x).sample
        with graphed.installed():
            out = unet(**x).sample
    torch.testing.assert_close(out, expected)
    assert graphed.captures == 0 and "forward" not in vars(unet)


@pytest.fixture
def exact_fp32():
    """TF32 off: fused weights and a separate LoRA term then agree to fp32 rounding, not to TF32's 1e-3.

    (Set and restored by hand: these flags are module properties that monkeypatch cannot delete.)
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("single", ["fused", "slot"])
def test_graph_replays_match_eager_across_switches_without_recapture(pipe, exact_fp32, single):
    unet, runtime, sets = runtime_on(pipe, "cuda", single=single)
    graphed = GraphedUNet(unet, runtime.graph_key)
    x = inputs(4, "cuda")
    # The bank holds 3 sets. The first fuse (slot 1) records every slot's fuse, so slot 2's first fuse already
    # replays a graph recorded while the slot was empty; sets[3] evicts sets[2], then sets[2] returns into slot 2.
    plans = [[()] * 2, [sets[0]] * 2, [sets[1]] * 2, [sets[0], sets[1]], [sets[2], ()], [sets[1], sets[0]], [sets[3]] * 2, [sets[2]] * 2]
    with torch.no_grad(), graphed.installed():
        for rows in plans:
            runtime.activate(rows, single="bound")  # the reference: eager, a one-set batch through hooks, not fused
            expected = graphed.eager(**x).sample
            runtime.activate(rows)
            for _ in range(2):
                torch.testing.assert_close(unet(**x).sample, expected, rtol=1e-4, atol=1e-4)
    # One idle (and fused) graph, one mixed-rows graph (rank 4, 2 requests), and with the single slot its graph: switches re-use them.
    assert graphed.captures == (2 if single == "fused" else 3)
    assert graphed.replays == 2 * len(plans)
    if single == "fused":
        assert runtime._resident[(("k2", 1.0),)] == 2
        assert runtime.slots["unet"]._graphs._graphs.keys() >= {("fuse", 1), ("fuse", 2), ("fuse", 3)}  # fuses recorded as graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("single", [None, "fused"])  # None: the CUDA default, the single slot
def test_sampler_on_cuda_gives_the_eager_images_through_graphs(family, single, tiny_sd_dir, tiny_sdxl_dir, tmp_path):
    import numpy as np

    from adapters.registry import Registry
    from gen.base import load_base
    from gen.sampler import Request, Sampler
    from gen.serving import ServingConfig

    base = load_base(tiny_sd_dir if family == "sd" else tiny_sdxl_dir, device="cuda", dtype=torch.float32)
    registry = Registry(tmp_path / "registry")
    for u in range(2):
        registry.for_user(f"user{u}").put(random_adapter(BaseSpec.from_base(base), rank=8, seed=u, std=0.1), base, "pet", trigger="sks", class_word="dog")
    sampler = Sampler(base, registry, ServingConfig(runtime=RuntimeConfig(single=single)))
    requests = [Request("a photo of <pet> on the beach", user=f"user{u}", seed=u, steps=3, guidance_scale=4.0) for u in range(2)]

    def images(reqs):
        return [np.asarray(g.images[0]).astype(np.int16) for g in sampler.generate_many(reqs)]

    graphed_one, graphed_mixed = images(requests[:1]), images(requests)  # one adapter, then a mixed batch
    graphs, sampler.graphs = sampler.graphs, None
    eager_one, eager_mixed = images(requests[:1]), images(requests)
    assert graphs.captures == 2 and graphs.replays == 2 * 3  # 3 steps each, CFG rows in one call
    for got, want in zip(graphed_one + graphed_mixed, eager_one + eager_mixed):
        assert np.abs(got - want).max() <= 1
    assert np.abs(graphed_mixed[0] - graphed_mixed[1]).mean() > 1  # the two users' images really differ


def test_a_unet_with_peft_layers_is_never_graphed(pipe, monkeypatch):
    """peft switches adapters and scales in Python (``set_adapters``, training's per-row routing): a replay would not follow."""
    from peft import LoraConfig, inject_adapter_in_model

    unet = inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q"]), copy.deepcopy(pipe.unet))
    graphed = GraphedUNet(unet)
    x = inputs(2, "cpu")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # as if on CUDA: only the peft check is left
    with torch.no_grad():
        assert graphed._signature(x["sample"], x["timestep"], x["encoder_hidden_states"], None, (), {})[0] is None
        assert GraphedUNet(pipe.unet)._signature(x["sample"], x["timestep"], x["encoder_hidden_states"], None, (), {})[0] is not None


def test_installing_keeps_a_forward_set_on_the_instance(pipe):
    """accelerate wraps ``forward`` on the instance while training; a validation sampler's graphs must give it back."""
    unet = copy.deepcopy(pipe.unet)
    calls = []
    plain = unet.forward
    unet.forward = lambda *a, **k: calls.append(1) or plain(*a, **k)
    wrapper = unet.forward
    graphed = GraphedUNet(unet)
    x = inputs(2, "cpu")
    with torch.no_grad(), graphed.installed():
        unet(**x)  # off CUDA: eagerly, through the wrapper
    assert calls == [1] and unet.forward is wrapper
