"""A UNet's denoising step replayed as a CUDA graph, with LoRA slots that switch under it.

An eager diffusion UNet on a fast GPU is bound by kernel launches, not arithmetic: a graph
replays the launches recorded once. A graph reads the same memory every time, so it stays valid
only while nothing it reads moves, and the LoRA runtime keeps that promise: fused adapters are
written into the weights in place, bank slots and per-row slot indices are fixed buffers filled
in place. So switching adapters never re-captures; only an input shape or a runtime mode not seen
before (:meth:`gen.lora_runtime.LoraRuntime.graph_key`) does, once (0.1-0.7 s on an H200).

This is the serving path's alternative to diffusers' fastest one, ``torch.compile`` with LoRA
hotswapping: that compiles for about a minute before the first image (54-89 s for SD1.5 on an
H200) and measured 1.7x slower per step (scripts/bench_serving.py).
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

WARMUP_CALLS = 2  # lazy initialisation and library workspaces happen here, outside the graph


class GraphedCalls:
    """In-place work between tensors that never move, run eagerly the first time per key and
    replayed as a CUDA graph after that (off CUDA: always eagerly).

    For the LoRA runtime's fuse and restore: hundreds of small kernels whose launches, not their
    arithmetic, are the cost. The eager first run does the work; the capture after it records
    without running.
    """

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph | None] = {}  # None: capture failed, stay eager

    def run(self, key: Hashable, fn: Callable[[], None]) -> None:
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        fn()
        self.capture(key, fn)

    def capture(self, key: Hashable, fn: Callable[[], None]) -> None:
        """Record ``fn`` as ``key``'s graph without running it (a no-op off CUDA or once ``key`` is known).

        Only after a call of the same kind ran eagerly: lazy initialisation must not happen under capture.
        """
        if not self.enabled or key in self._graphs:
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                fn()
        except Exception as e:
            warnings.warn(f"CUDA graph capture of {key!r} failed, running it eagerly: {type(e).__name__}: {e}", stacklevel=3)
            graph = None
        self._graphs[key] = graph


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static buffers the graph reads
    output: torch.Tensor  # the buffer it writes


class GraphedUNet:
    """Stands in for ``unet.forward`` while :meth:`installed`: replays a graph per input signature.

    ``state_key`` says what else the forward depends on (the LoRA runtime's mode); ``None`` means
    it reads tensors that may move, and that call runs eagerly. Calls with grad enabled, off CUDA,
    with extra UNet inputs (ControlNet residuals, attention kwargs...) or while the UNet carries
    peft LoRA layers (diffusers' ``load_lora_weights``, training) also run eagerly: peft picks
    adapters and scales in Python, which a replay would not see change.
    At most ``max_graphs`` graphs are kept (least recently used dropped); they share one memory pool,
    which is safe because replays run one at a time on one stream and outputs are copied out.
    """

    def __init__(self, unet: nn.Module, state_key: Callable[[], Hashable | None] = tuple, max_graphs: int = 8):
        self.unet, self.state_key, self.max_graphs = unet, state_key, max_graphs
        self.eager = unet.forward
        self._graphs: OrderedDict[tuple, _Captured | None] = OrderedDict()  # None: capture failed, run eagerly
        self._pool = None
        self.captures, self.capture_s, self.replays = 0, 0.0, 0

    @contextmanager
    def installed(self) -> Iterator[GraphedUNet]:
        """``unet(...)`` goes through the graphs inside this block; outside it the UNet is untouched
        (deep copies, training and other callers see the plain module). A ``forward`` someone set on
        the instance (accelerate's autocast wrapper while training) is what runs eagerly, and is put back."""
        own = vars(self.unet).get("forward")
        self.eager = self.unet.forward
        self.unet.forward = self
        try:
            yield self
        finally:
            if own is None:
                del self.unet.forward
            else:
                self.unet.forward = own

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, added_cond_kwargs=None, return_dict: bool = True, **others):
        key, inputs = self._signature(sample, timestep, encoder_hidden_states, added_cond_kwargs, args, others)
        if key is None:
            return self.eager(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **others)
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        captured = self._graphs[key]
        if captured is None:
            out = self._run(inputs)
        else:
            torch._foreach_copy_(list(captured.inputs.values()), list(inputs.values()))
            captured.graph.replay()
            self.replays += 1
            out = captured.output.clone()  # the next replay overwrites the graph's own buffer
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput  # here: importing diffusers costs seconds, and `bespoke --help` reaches this module

        return UNet2DConditionOutput(sample=out)

    def _signature(self, sample, timestep, context, added, args, others) -> tuple[tuple | None, dict[str, torch.Tensor]]:
        if args or any(v is not None for v in others.values()) or not sample.is_cuda or torch.is_grad_enabled():
            return None, {}
        if getattr(self.unet, "peft_config", None):
            return None, {}
        if added is not None and not all(torch.is_tensor(v) for v in added.values()):
            return None, {}
        state = self.state_key()
        if state is None:
            return None, {}
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])  # what the UNet does with it
        inputs = {"sample": sample, "timestep": t, "encoder_hidden_states": context}
        inputs |= {f"added.{k}": v for k, v in (added or {}).items()}
        shapes = tuple((name, tuple(v.shape), v.dtype, v.device) for name, v in inputs.items())
        return (shapes, state, torch.is_inference_mode_enabled()), inputs

    def _run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {k.removeprefix("added."): v for k, v in inputs.items() if k.startswith("added.")}
        return self.eager(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=added or None, return_dict=False)[0]

    def _capture(self, inputs: dict[str, torch.Tensor]) -> _Captured | None:
        start = time.perf_counter()
        static = {name: v.clone() for name, v in inputs.items()}
        try:
            side = torch.cuda.Stream(device=inputs["sample"].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self._run(static)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (adapter copies, other callers' allocations) may use CUDA meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = self._run(static)
        except Exception as e:  # an operation a graph cannot hold: this signature runs eagerly from now on
            warnings.warn(f"CUDA graph capture failed, running this UNet input shape eagerly: {type(e).__name__}: {e}", stacklevel=3)
            return None
        finally:
            self.capture_s += time.perf_counter() - start
        self.captures += 1
        return _Captured(graph, static, output)
