"""Serving benchmark: our LoRA slots against diffusers/peft on one warm UNet; prints a table, writes JSON.

    python scripts/bench_serving.py                  # CPU: SD1.5 UNet (random weights) at 8x8 latents
    python scripts/bench_serving.py --quick          # smoke mode: tiny UNet, few repeats (seconds)

On CUDA it runs the SD1.5 and SDXL UNets at full size in float16 instead, naming the card
(``--models``, ``--compile`` choose which; compiling the baseline takes 1-3 minutes per UNet, and
``--compile`` alone skips it).
Every baseline is measured in the same run, on the same UNet and inputs; forward passes of the
variants being compared are interleaved round-robin and reported as medians, so drift in a
shared machine's load affects them alike. Adapters are rank 16 on to_q/to_k/to_v/to_out.0.

Measured:
* switch: activating a cached adapter for a batch (bound: read in place; slot: one batched copy into
  the single slot; fused: restore + addmm; into a bank slot for a mixed batch: one batched copy) vs
  diffusers ``set_adapters`` between two loaded adapters;
* cold load: registry read + pack + activate vs diffusers ``load_lora_adapter`` of the
  same tensors from a safetensors file (page cache warm for both);
* forward: one UNet call with 1 adapter / 2 composed vs our no-adapter path, and diffusers with
  peft LoRA active vs diffusers without;
* batch: 8 requests from 8 users in one call vs 8 from one user, and vs serving the 8 users
  one at a time with diffusers (``set_adapters`` + a 1-request call each);
* step (CUDA; off CUDA with ``--step-smoke`` as a code-path check): graphed forwards with 1 adapter / 2
  composed, fused or through the single slot (and through the slot with each layer's own A-GEMM, no
  q/k/v sharing), against our graphed no-adapter forward; one denoising
  step with one adapter replayed as a CUDA graph (``gen.cuda_graph``) against diffusers eager with peft,
  and against diffusers hotswap + ``torch.compile`` (``--compile``); the stalls of the first step and
  of the first switch; a mixed batch graphed against a one-user batch graphed (fused, and through the
  slot); checks that graph and eager outputs agree and that timed switches capture nothing;
* load test: 4 client threads x 25 requests, Zipf-distributed over 50 users' adapters, through
  ``Sampler.generate_many`` on a tiny pipeline with a real registry: latency, throughput, hit rate.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.registry import Registry  # noqa: E402
from adapters.registry.synthetic import DEFAULT_TARGETS, random_adapter  # noqa: E402
from adapters.validate import BaseSpec  # noqa: E402
from gen.base import Base  # noqa: E402
from gen.cuda_graph import GraphedUNet  # noqa: E402
from gen.lora_runtime import LoraRuntime, RuntimeConfig  # noqa: E402
from gen.sampler import Request, Sampler  # noqa: E402
from gen.serving import ServingConfig  # noqa: E402
from gen.tiny import TinyConfig, build_tiny_pipeline  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
TINY = TinyConfig()
TINY_UNET = dict(
    sample_size=TINY.sample_size, block_out_channels=TINY.block_out_channels, layers_per_block=TINY.layers_per_block,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8, norm_num_groups=8, cross_attention_dim=TINY.cross_attention_dim,
)
SWITCH_PATHS = ("bound", "slot", "fused", "bank_copy", "resident")  # the switch cases, as named in the JSON
TARGETS = {
    "switch": 50.0, "cold_load": 10.0, "forward_1": 1.10, "forward_2": 1.15, "batch_vs_one_user": 0.95, "batch_vs_diffusers": 2.0,
    "step_vs_diffusers_eager": 2.0, "step_vs_diffusers_compiled": 1.3, "stall_s": 5.0,
}


@dataclass(frozen=True)
class UnetCase:
    """One UNet to benchmark: its config, latent side, dtype and how many repeats to time."""

    name: str
    config: dict
    latent: int
    dtype: torch.dtype
    reps: int
    rank: int = 16
    requests: int = 8  # requests (users) in the multi-user batch; each is 2 rows with CFG
    text_len: int = 77


@dataclass
class Clock:
    device: torch.device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def once(self, fn: Callable[[], object]) -> float:
        """Seconds of one call, synchronised: for stalls (capture, compile, a switch) that happen once."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def round_robin(self, cases: dict[str, tuple[Callable[[], object], Callable[[], object]]], reps: int, calls: int = 1) -> dict[str, float]:
        """Median ms per call of each case's ``run`` (which makes ``calls`` calls) after its untimed ``setup``.

        Cases are interleaved, one of each per round, so a shared machine's changing load
        affects them alike; round 0 warms up and is not counted. The garbage collector is paused
        while a case runs, as ``timeit`` does: with three UNets and a peft model alive (~500k
        objects) a full collection takes ~35 ms and lands on whichever call triggers it.
        """
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for rep in range(reps + 1):
            for name, (setup, run) in cases.items():
                setup()
                self.sync()
                gc.disable()
                try:
                    start = time.perf_counter()
                    run()
                    self.sync()
                    elapsed = time.perf_counter() - start
                finally:
                    gc.enable()
                if rep:
                    samples[name].append(elapsed * 1000 / calls)
        return {name: statistics.median(values) for name, values in samples.items()}


def relative_gap(got: torch.Tensor, reference: torch.Tensor) -> float:
    """max |got - reference| / std(reference), in float32: how far two UNet outputs are apart."""
    got, reference = got.float(), reference.float()
    return ((got - reference).abs().max() / reference.std()).item()


def counter() -> Callable[[], int]:
    return itertools.count().__next__


class Bench:
    """One UNet three times over (ours with slots, vanilla, diffusers+peft) with the same weights and inputs."""

    def __init__(self, case: UnetCase, device: torch.device, workdir: Path):
        self.case, self.workdir, self.clock = case, workdir, Clock(device)
        with torch.device(device):
            torch.manual_seed(0)
            self.unet = UNet2DConditionModel(**case.config).to(case.dtype).eval()
        self.vanilla, self.peft = copy.deepcopy(self.unet), copy.deepcopy(self.unet)
        spec = BaseSpec.from_pipeline(SimpleNamespace(unet=self.unet), "bench", "sd")
        n = max(case.requests, 10)  # more than the bank holds, so cycling through them always copies
        self.adapters = [
            random_adapter(spec, rank=case.rank, alpha=float(case.rank), targets=DEFAULT_TARGETS, seed=i, std=0.02, dtype=case.dtype)
            for i in range(n)
        ]
        self.runtime = LoraRuntime({"unet": self.unet}, RuntimeConfig(max_rank=2 * case.rank, bank_size=case.requests))
        self.sets = [((f"a{i}", self.runtime.pack(a, f"a{i}"), 1.0),) for i, a in enumerate(self.adapters)]
        self.registry = Registry(workdir / "registry")
        for i, adapter in enumerate(self.adapters[:3]):
            self.registry.for_user("bench").put(adapter, spec, f"c{i}")
            save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, str(workdir / f"lora{i}.safetensors"))
        self.pair, self.batch = self.inputs(2), self.inputs(2 * case.requests)

    def inputs(self, rows: int) -> dict:
        g = torch.Generator().manual_seed(rows)
        cfg, dt, dev = self.case.config, self.case.dtype, self.clock.device
        kwargs = dict(
            sample=torch.randn(rows, 4, self.case.latent, self.case.latent, generator=g).to(dev, dt),
            timestep=torch.full((rows,), 500, device=dev),
            encoder_hidden_states=torch.randn(rows, self.case.text_len, cfg["cross_attention_dim"], generator=g).to(dev, dt),
        )
        if cfg.get("addition_embed_type") == "text_time":
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, 1280, generator=g).to(dev, dt), "time_ids": torch.randn(rows, 6, generator=g).to(dev, dt)}
        return kwargs

    def activate(self, rows, single: str = "bound", share: bool = True) -> Callable[[], None]:
        """A setup: ``rows`` active, one-set batches on ``single``, q/k/v sharing one projection or not."""
        def setup():
            self.runtime.slots["unet"].share_projections = share
            self.runtime.activate(rows, single=single)
        return setup

    def forward(self, unet, kwargs: dict) -> Callable[[], None]:
        def run():
            with torch.inference_mode():
                unet(**kwargs)
        return run

    def load_into_peft(self, i: int, name: str) -> None:
        self.peft.load_lora_adapter(
            str(self.workdir), weight_name=f"lora{i % 3}.safetensors", prefix="unet", adapter_name=name, use_safetensors=True, local_files_only=True
        )

    def cold_load(self) -> dict:
        """A registry read + pack + copy into a slot, vs diffusers loading the same tensors from a file."""
        ours, theirs = counter(), counter()

        def ours_load():  # a new key every time: never resident in the bank
            n = ours()
            adapter = self.registry.get("bench", f"c{n % 3}")
            self.runtime.activate([((f"cold{n}", self.runtime.pack(adapter, "cold"), 1.0),)])

        def diffusers_load():
            self.load_into_peft(theirs(), "cold")
            self.peft.set_adapters("cold")

        def forget():
            if "cold" in getattr(self.peft, "peft_config", {}):
                self.peft.delete_adapters("cold")

        read = counter()
        return self.clock.round_robin(
            {
                "ours": (lambda: None, ours_load),
                "ours_read": (lambda: None, lambda: self.registry.get("bench", f"c{read() % 3}")),  # the host's share of it
                "diffusers": (forget, diffusers_load),
            },
            self.case.reps,
        )

    def switch(self, calls: int = 20) -> dict:
        """Each call activates another cached adapter set: per one-set path, and for a mixed batch."""
        sets = self.sets

        def cycling(single: str | None = None, mixed: bool = False) -> Callable[[], None]:
            nxt = counter()
            rows = lambda s: [s, ()] if mixed else [s]  # noqa: E731 - a mixed batch: the set and the base alone
            return lambda: [self.runtime.activate(rows(sets[nxt() % len(sets)]), single=single) for _ in range(calls)]

        def warm_pair():
            self.runtime.activate([sets[0], sets[1]])  # both resident in the bank, nothing fused

        hot, theirs = counter(), counter()
        return self.clock.round_robin(
            {
                "bound": (self.activate([()]), cycling("bound")),
                "slot": (self.activate([()]), cycling("slot")),  # a copy into the single slot
                "fused": (self.activate([()]), cycling("fused")),
                # more sets than bank slots, so each call copies
                "bank_copy": (self.activate([()]), cycling(mixed=True)),
                "resident": (warm_pair, lambda: [self.runtime.activate([sets[hot() % 2], ()]) for _ in range(calls)]),
                "diffusers": (lambda: None, lambda: [self.peft.set_adapters(f"u{theirs() % 2}") for _ in range(calls)]),
            },
            self.case.reps,
            calls=calls,
        )

    def forwards(self) -> dict:
        pair, peft = self.pair, self.peft
        run, composed = self.forward(self.unet, pair), self.composed()
        return self.clock.round_robin(
            {
                "vanilla": (lambda: None, self.forward(self.vanilla, pair)),
                "off": (self.activate([()]), run),
                "one": (self.activate([self.sets[0]]), run),
                "two": (self.activate([composed]), run),
                "fused": (self.activate([self.sets[0]], "fused"), run),
                "two_fused": (self.activate([composed], "fused"), run),
                "peft_one": (lambda: peft.set_adapters("u0"), self.forward(peft, pair)),
                "peft_two": (lambda: peft.set_adapters(["u0", "u1"], weights=[1.0, 0.7]), self.forward(peft, pair)),
            },
            self.case.reps,
        )

    def batches(self) -> dict:
        users, run = self.sets[: self.case.requests], self.forward(self.unet, self.batch)
        peft_pair = self.forward(self.peft, self.pair)

        def one_user_at_a_time():
            for i in range(self.case.requests):
                self.peft.set_adapters(f"u{i}")
                peft_pair()

        return self.clock.round_robin(
            {
                "mixed": (self.activate(users), run),
                "mixed_activate": (self.activate([users[0]] * len(users)), self.activate(users)),  # once per batch, not per step
                "one_user": (self.activate([users[0]] * len(users)), run),
                "one_user_fused": (self.activate([users[0]] * len(users), "fused"), run),
                "no_adapter": (self.activate([()] * len(users)), run),
                "diffusers_serial": (lambda: None, one_user_at_a_time),
            },
            max(3, self.case.reps),  # the 0.95x bar sits within a few percent of 1: 5 rounds on the CPU (3 moved it 0.94-1.00)
        )

    def compiled_hotswap(self) -> tuple[Callable[[], None], Callable[[], None], dict]:
        """Diffusers' fastest path: ``enable_lora_hotswap``, one adapter, ``torch.compile``; then adapters
        swapped in with ``load_lora_adapter(hotswap=True)``. Returns (step, hotswap to the next file, stalls)."""
        hot = copy.deepcopy(self.vanilla)
        hot.enable_lora_hotswap(target_rank=self.case.rank)
        files = counter()
        load = lambda hotswap: hot.load_lora_adapter(  # noqa: E731
            str(self.workdir), weight_name=f"lora{files() % 3}.safetensors", prefix="unet", adapter_name="default_0",
            hotswap=hotswap, use_safetensors=True, local_files_only=True,
        )
        load(False)
        step = self.forward(torch.compile(hot), self.pair)
        stalls = {"compile_first_step_s": self.clock.once(step)}
        stalls["hotswap_then_step_s"] = self.clock.once(lambda: (load(True), step()))
        return step, lambda: load(True), stalls

    def composed(self) -> tuple:
        """Two adapters in one request, the second at weight 0.7: rank 2 x case.rank."""
        return (*self.sets[0], ("a1", self.sets[1][0][1], 0.7))

    def steps(self, compile_baseline: bool) -> dict:
        """CUDA: the serving step, a UNet forward (batch 2, CFG) replayed as a CUDA graph, per one-set path.

        Ours: the adapter fused in place, or copied into the single slot and added by the hooks,
        both replayed as graphs; mixed batches gather from the bank under a graph too. Every graph
        is captured before the timed rounds. Baselines: our own no-adapter graph (for the 1.10 /
        1.15 bars), diffusers eager with the peft LoRA active, and diffusers hotswap +
        ``torch.compile`` (its first call compiles). Stalls are single calls: the first step
        (capture / compile) and a switch followed by a step.
        """
        sets, users, checks, stalls, composed = self.sets, self.sets[: self.case.requests], {}, {}, self.composed()
        torch.cuda.empty_cache()  # the eager sections' cached blocks, so the graphs' pool can have them
        graphed = GraphedUNet(self.unet, self.runtime.graph_key)
        step, batch = self.forward(self.unet, self.pair), self.forward(self.unet, self.batch)

        def switch_and_step(single: str) -> Callable[[], None]:
            nxt = counter()

            def run():
                self.runtime.activate([sets[(nxt() + 1) % len(sets)]], single=single)  # sets[0] is active first
                step()
            return run

        def graph_vs_eager(kwargs) -> float:  # for the active mode
            with torch.inference_mode():
                return relative_gap(self.unet(**kwargs).sample, graphed.eager(**kwargs).sample)

        one, many = [sets[0]], [users[0]] * len(users)
        modes = {  # name -> (setup, forward): each is captured before timing
            "off": (self.activate([()]), step),
            "fused": (self.activate(one, "fused"), step),
            "fused_two": (self.activate([composed], "fused"), step),
            "slot": (self.activate(one, "slot"), step),
            "slot_two": (self.activate([composed], "slot"), step),
            "slot_unshared": (self.activate(one, "slot", share=False), step),
            "mixed_batch": (self.activate(users), batch),
            "mixed_batch_unshared": (self.activate(users, share=False), batch),
            "one_user_batch_fused": (self.activate(many, "fused"), batch),
            "one_user_batch_slot": (self.activate(many, "slot"), batch),
        }
        with graphed.installed():
            self.runtime.activate(one, single="fused")
            stalls["ours_first_step_s"] = self.clock.once(step)
            stalls["ours_switch_then_step_s"] = self.clock.once(switch_and_step("fused"))
            self.runtime.activate(one, single="slot")
            stalls["ours_slot_first_step_s"] = self.clock.once(step)
            stalls["ours_slot_switch_then_step_s"] = self.clock.once(switch_and_step("slot"))
            for name, rows, single, kwargs in (
                ("fused", [sets[3]], "fused", self.pair), ("slot", [sets[3]], "slot", self.pair),
                ("mixed", users, None, self.batch), ("mixed_other", users[::-1], None, self.batch),
            ):
                self.runtime.activate(rows, single=single)
                checks[f"graph_vs_eager_{name}"] = graph_vs_eager(kwargs)
            self.runtime.activate([sets[3]], single="bound")  # the same adapter as a separate low-rank term (hooks, eager)
            with torch.inference_mode():
                bound = self.unet(**self.pair).sample
            for single in ("fused", "slot"):
                self.runtime.activate([sets[3]], single=single)
                with torch.inference_mode():
                    checks[f"graph_{single}_vs_hooks"] = relative_gap(self.unet(**self.pair).sample, bound)
            for setup, run in modes.values():  # every shape and mode the timed rounds use: captured here
                setup()
                run()
            captures = graphed.captures
            diffusers_eager = (lambda: self.peft.set_adapters("u0"), self.forward(self.peft, self.pair))
            # each one-set path's step, and its switch followed by a step: timed again beside the compiled baseline
            per_path = {}
            for single in ("fused", "slot"):
                per_path[single] = modes[single]
                per_path[f"{single}_switch"] = (self.activate(one, single), switch_and_step(single))
            t = self.clock.round_robin(
                modes | per_path | {
                    "mixed_activate": (self.activate(many, "fused"), self.activate(users)),  # once per batch
                    "diffusers_eager": diffusers_eager,
                },
                self.case.reps,
            )
            if compile_baseline:  # rounds of their own, after compiling: one H200 run read eager 2x slower after it
                compiled_step, hotswap, compile_stalls = self.compiled_hotswap()
                stalls |= compile_stalls
                c = self.clock.round_robin(
                    per_path | {
                        "diffusers_compiled": (lambda: None, compiled_step),
                        "diffusers_hotswap_step": (lambda: None, lambda: (hotswap(), compiled_step())),
                        "diffusers_eager": diffusers_eager,
                    },
                    self.case.reps,
                )
            checks["captures_in_timed_rounds"] = graphed.captures - captures  # every timed switch re-used a graph: 0
            checks["captures"], checks["capture_s"] = graphed.captures, graphed.capture_s
            checks["input_group_sizes"] = sorted(len(g) for g in self.runtime.slots["unet"].input_groups)
        result = {
            "step_ms": t["fused"], "switch_then_step_ms": t["fused_switch"], "diffusers_eager_ms": t["diffusers_eager"],
            "speedup_vs_diffusers_eager": t["diffusers_eager"] / t["fused"],
            "mixed_batch_ms": t["mixed_batch"], "one_user_batch_ms": t["one_user_batch_fused"], "mixed_batch_activate_ms": t["mixed_activate"],
            "throughput_mixed_vs_one_user": t["one_user_batch_fused"] / t["mixed_batch"],
            "slot": {
                "step_ms": t["slot"], "switch_then_step_ms": t["slot_switch"], "speedup_vs_diffusers_eager": t["diffusers_eager"] / t["slot"],
                "one_user_batch_ms": t["one_user_batch_slot"], "throughput_mixed_vs_one_user": t["one_user_batch_slot"] / t["mixed_batch"],
            },
            "graphed_forward": {
                "off_ms": t["off"], "fused_1_ms": t["fused"], "fused_2_ms": t["fused_two"], "slot_1_ms": t["slot"], "slot_2_ms": t["slot_two"],
                "ratio_fused_1": t["fused"] / t["off"], "ratio_fused_2": t["fused_two"] / t["off"],
                "ratio_slot_1": t["slot"] / t["off"], "ratio_slot_2": t["slot_two"] / t["off"],
                # the same without shared q/k/v projections (each target layer its own A-GEMM): what sharing saves
                "slot_1_unshared_ms": t["slot_unshared"], "ratio_slot_1_unshared": t["slot_unshared"] / t["off"],
                "mixed_batch_unshared_ms": t["mixed_batch_unshared"],
            },
            "stalls_s": stalls, "checks": checks,
        }
        if compile_baseline:
            result["with_compiled_baseline"] = {
                "step_ms": c["fused"], "switch_then_step_ms": c["fused_switch"], "diffusers_eager_ms": c["diffusers_eager"],
                "slot_step_ms": c["slot"], "slot_switch_then_step_ms": c["slot_switch"],
                "diffusers_compiled_ms": c["diffusers_compiled"], "diffusers_hotswap_then_step_ms": c["diffusers_hotswap_step"],
                "speedup_vs_diffusers_compiled": c["diffusers_compiled"] / c["fused"],
                "slot_speedup_vs_diffusers_compiled": c["diffusers_compiled"] / c["slot"],
                "speedup_switch_then_step_vs_hotswap": c["diffusers_hotswap_step"] / c["fused_switch"],
                "slot_speedup_switch_then_step_vs_hotswap": c["diffusers_hotswap_step"] / c["slot_switch"],
            }
        return result

    def run(self, step: bool, compile_baseline: bool = False) -> dict:
        cold = self.cold_load()  # before the users' adapters are in the peft model
        for i in range(self.case.requests):
            self.load_into_peft(i, f"u{i}")
        switch, f, b = self.switch(), self.forwards(), self.batches()
        steps = self.steps(compile_baseline) if step else None
        path = self.runtime.single_path
        self.runtime.close()
        return {
            "step": steps,
            "case": {"name": self.case.name, "latent": self.case.latent, "dtype": str(self.case.dtype).removeprefix("torch."), "rank": self.case.rank, "rows": 2, "batch_requests": self.case.requests},
            "switch": {
                "ours_path": path,
                "ours_ms": switch[path], "diffusers_set_adapters_ms": switch["diffusers"], "speedup": switch["diffusers"] / switch[path],
                **{f"ours_{name}_ms": switch[name] for name in SWITCH_PATHS},
                **{f"speedup_{name}": switch["diffusers"] / switch[name] for name in SWITCH_PATHS},
            },
            "cold_load": {
                "ours_ms": cold["ours"], "ours_registry_read_ms": cold["ours_read"], "diffusers_load_lora_adapter_ms": cold["diffusers"],
                "speedup": cold["diffusers"] / cold["ours"],
            },
            "forward": {
                "forward_off_ms": f["off"], "forward_1_ms": f["one"], "forward_2_ms": f["two"], "forward_1_fused_ms": f["fused"], "forward_2_fused_ms": f["two_fused"],
                "ratio_1": f["one"] / f["off"], "ratio_2": f["two"] / f["off"], "ratio_1_fused": f["fused"] / f["off"], "ratio_2_fused": f["two_fused"] / f["off"],
                "ratio_off_vs_vanilla": f["off"] / f["vanilla"],
                "diffusers_vanilla_ms": f["vanilla"], "diffusers_1_ms": f["peft_one"], "diffusers_2_ms": f["peft_two"],
                "diffusers_ratio_1": f["peft_one"] / f["vanilla"], "diffusers_ratio_2": f["peft_two"] / f["vanilla"],
            },
            "batch": {
                "batch_mixed_ms": b["mixed"], "batch_one_user_ms": b["one_user"], "batch_one_user_fused_ms": b["one_user_fused"], "batch_mixed_activate_ms": b["mixed_activate"],
                "batch_no_adapter_ms": b["no_adapter"], "diffusers_one_user_at_a_time_ms": b["diffusers_serial"],
                "throughput_mixed_vs_one_user": b["one_user"] / b["mixed"],
                "throughput_mixed_vs_one_user_fused": b["one_user_fused"] / b["mixed"],
                "throughput_mixed_vs_diffusers_serial": b["diffusers_serial"] / b["mixed"],
            },
        }


def load_test(workdir: Path, threads: int, per_thread: int, users: int, steps: int) -> dict:
    """Client threads send one request per ``generate_many`` call; the sampler batches across them."""
    base = Base.from_pipeline(build_tiny_pipeline("sd"), "tiny")
    spec = BaseSpec.from_base(base)
    registry = Registry(workdir / "load_registry")
    for u in range(users):
        registry.for_user(f"user{u}").put(random_adapter(spec, rank=8, seed=u, std=0.1), base, "pet", trigger="sks", class_word="dog")
    sampler = Sampler(base, registry, ServingConfig(runtime=RuntimeConfig(max_rank=16)))
    sampler.generate("warm up", seed=0, steps=1)
    zipf = [1 / (k + 1) ** 1.1 for k in range(users)]
    latencies: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        rng = random.Random(c)
        for i in range(per_thread):
            user = rng.choices(range(users), weights=zipf)[0]
            request = Request("a photo of <pet> on the beach", user=f"user{user}", seed=c * 1000 + i, steps=steps, guidance_scale=5.0)
            start = time.perf_counter()
            sampler.generate_many([request])
            with lock:
                latencies.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    workers = [threading.Thread(target=client, args=(c,)) for c in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    latencies.sort()
    stats = sampler.serving.stats()
    pick = lambda q: latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))]  # noqa: E731
    return {
        "threads": threads, "requests": len(latencies), "users": users, "steps": steps, "image": base.default_size,
        "p50_ms": pick(0.5), "p95_ms": pick(0.95), "throughput_rps": len(latencies) / wall,
        "hit_rate": stats.hit_rate, "cache_hits": stats.hits, "cache_misses": stats.misses,
    }


def step_rows(s: dict, requests: int) -> list[tuple[str, str, str, str, str]]:
    """The CUDA rows: graphed forwards per one-set path against our graphed no-adapter forward, and the
    serving step against diffusers eager and hotswap + compile."""
    st, ck, g, slot = s["stalls_s"], s["checks"], s["graphed_forward"], s["slot"]
    rows = [
        ("graphed forward, no adapter", f"{g['off_ms']:.1f} ms", "", "", ""),
        ("graphed forward, 1 adapter: fused / slot", f"{g['fused_1_ms']:.1f} / {g['slot_1_ms']:.1f}", "", f"{g['ratio_fused_1']:.3f} / {g['ratio_slot_1']:.3f}", "<=1.10"),
        ("  slot, unshared q/k/v projections", f"{g['slot_1_unshared_ms']:.1f}", "", f"{g['ratio_slot_1_unshared']:.3f}", ""),
        ("graphed forward, 2 composed: fused / slot", f"{g['fused_2_ms']:.1f} / {g['slot_2_ms']:.1f}", "", f"{g['ratio_fused_2']:.3f} / {g['ratio_slot_2']:.3f}", "<=1.15"),
        ("step, 1 adapter (fused, CUDA graph)", f"{s['step_ms']:.1f} ms", f"diffusers eager {s['diffusers_eager_ms']:.1f} ms", f"{s['speedup_vs_diffusers_eager']:.2f}x faster", ">=2x"),
        ("step, 1 adapter (slot, CUDA graph)", f"{slot['step_ms']:.1f} ms", "", f"{slot['speedup_vs_diffusers_eager']:.2f}x faster", ">=2x"),
    ]
    if "with_compiled_baseline" in s:
        w = s["with_compiled_baseline"]
        rows += [
            ("  vs hotswap + torch.compile (*)", f"{w['step_ms']:.1f} / {w['slot_step_ms']:.1f}", f"compiled {w['diffusers_compiled_ms']:.1f} ms", f"{w['speedup_vs_diffusers_compiled']:.2f}x / {w['slot_speedup_vs_diffusers_compiled']:.2f}x", ">=1.3x"),
            ("switch + step (*) fused / slot", f"{w['switch_then_step_ms']:.1f} / {w['slot_switch_then_step_ms']:.1f}", f"hotswap from file + step {w['diffusers_hotswap_then_step_ms']:.1f} ms", f"{w['speedup_switch_then_step_vs_hotswap']:.2f}x / {w['slot_speedup_switch_then_step_vs_hotswap']:.2f}x", ""),
            ("  (*) after compiling: eager diffusers", "", f"{w['diffusers_eager_ms']:.1f} ms", "", ""),
            ("stall: first step", f"{st['ours_first_step_s']:.2f} s", f"compile {st['compile_first_step_s']:.1f} s", "", "<=5 s"),
            ("stall: first switch + step", f"{st['ours_switch_then_step_s']:.3f} s", f"hotswap {st['hotswap_then_step_s']:.2f} s", "", "<=5 s"),
        ]
    else:
        rows += [
            ("switch + step: fused / slot", f"{s['switch_then_step_ms']:.1f} / {slot['switch_then_step_ms']:.1f}", "", "", ""),
            ("stall: first step / switch + step", f"{st['ours_first_step_s']:.2f} / {st['ours_switch_then_step_s']:.3f} s", "", "", "<=5 s"),
        ]
    rows += [
        ("  the same through the slot", f"{st['ours_slot_first_step_s']:.2f} / {st['ours_slot_switch_then_step_s']:.3f} s", "", "", "<=5 s"),
        (f"graphed batch of {requests}, {requests} users", f"{s['mixed_batch_ms']:.1f} ms", f"one user, slot {slot['one_user_batch_ms']:.1f} ms", f"{slot['throughput_mixed_vs_one_user']:.3f}x throughput", ">=0.95x"),
        ("  vs one user fused (an option)", "", f"{s['one_user_batch_ms']:.1f} ms", f"{s['throughput_mixed_vs_one_user']:.3f}x throughput", ""),
        ("  mixed, unshared q/k/v projections", f"{g['mixed_batch_unshared_ms']:.1f} ms", "", "", ""),
        ("  its activation, once per batch", f"{s['mixed_batch_activate_ms']:.2f} ms", "(from a fused one-user batch)", "", ""),
        ("checks: graph vs eager (max/std)", f"{max(v for k, v in ck.items() if k.startswith('graph_vs_eager')):.1e}", f"fused / slot vs hooks {ck['graph_fused_vs_hooks']:.1e} / {ck['graph_slot_vs_hooks']:.1e}", f"{ck['captures']} captures, {ck['captures_in_timed_rounds']} while timed", "0 while timed"),
    ]
    return rows


def print_table(result: dict) -> None:
    print(f"\nbespoke serving benchmark on {result['device']}")
    for name, r in result["models"].items():
        c, f, b = r["case"], r["forward"], r["batch"]
        print(f"\n{name}: latents {c['latent']}x{c['latent']}, {c['dtype']}, rank {c['rank']}, batch 2 rows (CFG) unless noted")
        rows = [
            (f"switch: a cached adapter ({r['switch']['ours_path']})", f"{r['switch']['ours_ms']:.3f} ms", f"set_adapters {r['switch']['diffusers_set_adapters_ms']:.2f} ms", f"{r['switch']['speedup']:.0f}x faster", ">=50x"),
            ("switch: bound (no copy)", f"{r['switch']['ours_bound_ms']:.3f} ms", "", f"{r['switch']['speedup_bound']:.0f}x faster", ""),
            ("switch: copy into the single slot", f"{r['switch']['ours_slot_ms']:.3f} ms", "", f"{r['switch']['speedup_slot']:.1f}x faster", ""),
            ("switch: fused (restore + addmm)", f"{r['switch']['ours_fused_ms']:.3f} ms", "", f"{r['switch']['speedup_fused']:.1f}x faster", ""),
            ("switch: copy into a bank slot (mixed)", f"{r['switch']['ours_bank_copy_ms']:.3f} ms", "", f"{r['switch']['speedup_bank_copy']:.1f}x faster", ""),
            ("switch: resident in the bank (mixed)", f"{r['switch']['ours_resident_ms']:.3f} ms", "", f"{r['switch']['speedup_resident']:.0f}x faster", ""),
            ("cold load from the registry", f"{r['cold_load']['ours_ms']:.2f} ms (read {r['cold_load']['ours_registry_read_ms']:.1f})", f"load_lora_adapter {r['cold_load']['diffusers_load_lora_adapter_ms']:.1f} ms", f"{r['cold_load']['speedup']:.1f}x faster", ">=10x"),
            ("forward, no adapter (idle hooks)", f"{f['forward_off_ms']:.1f} ms", f"vanilla {f['diffusers_vanilla_ms']:.1f} ms", f"{f['ratio_off_vs_vanilla']:.3f} of vanilla", ""),
            ("forward, 1 adapter (slots)", f"{f['forward_1_ms']:.1f} ms", f"peft {f['diffusers_1_ms']:.1f} ms", f"{f['ratio_1']:.3f} (peft {f['diffusers_ratio_1']:.3f})", "<=1.10"),
            ("forward, 1 adapter (fused)", f"{f['forward_1_fused_ms']:.1f} ms", "", f"{f['ratio_1_fused']:.3f}", ""),
            ("forward, 2 composed", f"{f['forward_2_ms']:.1f} ms", f"peft {f['diffusers_2_ms']:.1f} ms", f"{f['ratio_2']:.3f} (peft {f['diffusers_ratio_2']:.3f})", "<=1.15"),
            ("forward, 2 composed (fused)", f"{f['forward_2_fused_ms']:.1f} ms", "", f"{f['ratio_2_fused']:.3f}", ""),
            (f"batch of {c['batch_requests']} requests, {c['batch_requests']} users", f"{b['batch_mixed_ms']:.1f} ms", f"one user {b['batch_one_user_ms']:.1f} ms", f"{b['throughput_mixed_vs_one_user']:.3f}x throughput", ">=0.95x"),
            ("  vs one user fused / no adapter", "", f"{b['batch_one_user_fused_ms']:.1f} / {b['batch_no_adapter_ms']:.1f} ms", f"{b['throughput_mixed_vs_one_user_fused']:.3f}x", ""),
            ("  its activation, once per batch", f"{b['batch_mixed_activate_ms']:.2f} ms", "", "", ""),
            ("  vs diffusers, one user at a time", "", f"serial {b['diffusers_one_user_at_a_time_ms']:.1f} ms", f"{b['throughput_mixed_vs_diffusers_serial']:.2f}x throughput", ">=2x"),
        ]
        if r["step"] is not None:
            rows += step_rows(r["step"], c["batch_requests"])
        print(f"{'':36s}{'ours':>12s}  {'baseline':<30s}{'ratio':<28s}target")
        for label, ours, base, ratio, target in rows:
            print(f"{label:36s}{ours:>12s}  {base:<30s}{ratio:<28s}{target}")
    lt = result.get("load_test")
    if lt is None:
        return
    print(
        f"\nload test: {lt['threads']} threads x {lt['requests'] // lt['threads']} requests over {lt['users']} users (Zipf), "
        f"{lt['steps']} steps at {lt['image']}px: p50 {lt['p50_ms']:.0f} ms, p95 {lt['p95_ms']:.0f} ms, "
        f"{lt['throughput_rps']:.2f} req/s, cache hit rate {lt['hit_rate']:.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny UNet, few repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats per forward variant")
    parser.add_argument("--out", default="runs/bench_serving.json")
    parser.add_argument("--models", nargs="+", choices=["sd15", "sdxl"], default=["sd15", "sdxl"], help="CUDA: which full-size UNets")
    parser.add_argument("--compile", nargs="*", choices=["sd15", "sdxl"], default=None, help="CUDA: compile the diffusers baseline for these; without the flag every model run is compiled (minutes), the flag alone compiles none")
    parser.add_argument("--skip-load-test", action="store_true")
    parser.add_argument("--step-smoke", action="store_true", help="run the step section off CUDA too (graphs fall back to eager): a code-path check")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    device = torch.device(args.device)
    if args.quick:
        cases = [UnetCase("tiny-sd", TINY_UNET, 8, torch.float32, reps=args.reps or 1, text_len=8)]
    elif device.type == "cuda":
        full = {"sd15": UnetCase("sd15", SD15_UNET, 64, torch.float16, reps=args.reps or 20), "sdxl": UnetCase("sdxl", SDXL_UNET, 128, torch.float16, reps=args.reps or 10)}
        cases = [full[m] for m in args.models]
    else:
        cases = [UnetCase("sd15-small-latent", SD15_UNET, 8, torch.float32, reps=args.reps or 5)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": name, "torch": torch.__version__, "targets": TARGETS, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            workdir = Path(tmp) / case.name
            workdir.mkdir()
            step = device.type == "cuda" or args.step_smoke
            compiled = (args.compile is None and device.type == "cuda") or case.name in (args.compile or ())  # CUDA by default (the flag's help)
            result["models"][case.name] = Bench(case, device, workdir).run(step, compile_baseline=step and compiled)
            Path(args.out).write_text(json.dumps(result, indent=2))  # partial results survive a later failure
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not args.skip_load_test:
            result["load_test"] = load_test(Path(tmp), *((2, 3, 5, 1) if args.quick else (4, 25, 50, 4)))
    print_table(result)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
