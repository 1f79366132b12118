"""Several users' LoRA in one training step: our batched routing against peft's per-user loop; table + JSON.

    python scripts/bench_multi_user.py                       # built-in base, on CUDA when there is one
    python scripts/bench_multi_user.py --device cpu --users 2 4 8 16
    python scripts/bench_multi_user.py --quick               # smoke mode: a tiny pipeline, seconds

One step is what the trainer does per micro-batch, minus data and optimizer: a forward pass of the
UNet on ``rows`` rows per user (each user's rows in turn, routed to their own LoRA), a loss, and the
backward pass into every user's LoRA weights. For K users it is timed three ways, in one process on
the same weights, interleaved round by round with the garbage collector paused while a step is
timed (``bench_serving.Clock``):

* ours: ``adapters.train.lora`` as the trainer uses it, where rows in equal runs per user take two
  batched products per layer (``bmm``; grouped convolutions for Conv2d targets);
* peft: the same attachment routed through peft's mixed-batch forward (``adapter_names``), which
  loops over the users in every layer;
* alone: one user's step (K = 1, attached to a second copy of the base) times K, the K users trained
  one after another;
* one wide user: a single user's step over all K x rows rows (a third copy). No routing can beat it, so
  ``ours`` against it is what the routing costs, and ``alone x K`` against it is the most that training
  users together can gain on this device: on a CPU whose cores one user's batch already fills, little.

The throughput ratio is (K x rows) images per joint step against the same images in K lone steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.train.lora import Attachment, LoraSpec, attach  # noqa: E402
from gen.base import Base, load_base  # noqa: E402
from gen.lora_targets import UNET_TARGETS  # noqa: E402
from gen.tiny import save_tiny_pipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import Clock  # noqa: E402


@contextlib.contextmanager
def training_step(base: Base, users: int, rows: int, rank: int, targets: tuple[str, ...]) -> Iterator[tuple[Callable[[], None], Attachment]]:
    """``users`` users' LoRA attached to ``base`` and one forward + backward step over their rows (each user's in turn)."""
    unet, device = base.pipe.unet, base.device
    g = torch.Generator().manual_seed(0)
    n = users * rows
    size, channels = unet.config.sample_size, unet.config.in_channels
    latents = torch.randn(n, channels, size, size, generator=g).to(device, base.dtype)
    context = torch.randn(n, base.pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, generator=g).to(device, base.dtype)
    timesteps = torch.randint(0, 1000, (n,), generator=g).to(device)
    spec = LoraSpec(rank, float(rank), 0.0, targets, None, ((),) * users, ("thing",) * users, tuple(range(users)))
    order = [k for k in range(users) for _ in range(rows)]
    with attach(base, spec) as lora:
        cast_training_params(unet, dtype=torch.float32)  # LoRA in fp32 as the trainer keeps it; the base stays in its dtype

        def step() -> None:
            with lora.rows(order):
                with torch.autocast(device.type, dtype=base.dtype, enabled=base.dtype != torch.float32):
                    loss = unet(latents, timesteps, context).sample.float().pow(2).mean()
                loss.backward()
            unet.zero_grad(set_to_none=True)

        yield step, lora


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="builtin")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--users", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rows", type=int, default=4, help="rows per user per step (the built-in preset: 2 photos + 2 class images)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per routing, after one warm-up")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=",".join(UNET_TARGETS), help="comma-separated LoRA targets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2 users, 2 steps, a tiny pipeline unless --base; numbers meaningless")
    parser.add_argument("--out", default="runs/bench_multi_user.json")
    args = parser.parse_args(argv)
    if min(args.users) < 2:
        parser.error("--users: every K is at least 2 (one user's step is the 'alone' column)")
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.steps, args.users = 2, [2]
        if args.base == "builtin":
            args.base = save_tiny_pipeline(tempfile.mkdtemp(), "sd")
    load = lambda: load_base(args.base, device=device, dtype="float16" if device == "cuda" else "float32")  # noqa: E731
    base, lone, wide = load(), load(), load()  # one user's step stays attached to its own copy; `wide` steps one user with K users' rows
    targets = tuple(args.targets.split(","))
    clock, rows = Clock(base.device), []
    with training_step(lone, 1, args.rows, args.rank, targets) as (alone_step, _):
        for users in args.users:
            with training_step(base, users, args.rows, args.rank, targets) as (step, lora), training_step(wide, 1, users * args.rows, args.rank, targets) as (wide_step, _):
                routed = lambda batched: (lambda: setattr(lora.router, "batched", batched), step)  # noqa: E731
                idle = lambda: None  # noqa: E731
                ms = clock.round_robin({"ours": routed(True), "peft": routed(False), "alone": (idle, alone_step), "wide": (idle, wide_step)}, args.steps)
            ours, peft, alone, one_wide = ms["ours"], ms["peft"], ms["alone"], ms["wide"]
            rows.append({
                "users": users, "ours_ms": ours, "peft_loop_ms": peft, "alone_ms": alone, "alone_ms_times_users": alone * users, "one_wide_user_ms": one_wide,
                "ours_vs_peft_loop": peft / ours, "throughput_vs_alone": alone * users / ours, "peft_loop_throughput_vs_alone": alone * users / peft,
                "routing_cost_vs_one_wide_user": ours / one_wide, "throughput_ceiling_vs_alone": alone * users / one_wide,
            })
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"\none training step, {args.rows} rows per user, rank {args.rank}, {base.source} on {device_name} ({device}, {torch.get_num_threads()} threads)")
    header = ["users", "ours ms", "peft loop ms", "alone x K ms", "one wide user ms", "ours vs peft", "throughput vs alone", "peft's vs alone", "ceiling vs alone"]
    print("  ".join(f"{h:>19}" for h in header))
    for r in rows:
        values = [
            r["users"], r["ours_ms"], r["peft_loop_ms"], r["alone_ms_times_users"], r["one_wide_user_ms"], r["ours_vs_peft_loop"],
            r["throughput_vs_alone"], r["peft_loop_throughput_vs_alone"], r["throughput_ceiling_vs_alone"],
        ]
        print("  ".join(f"{v:>19}" if isinstance(v, int) else f"{v:>19.2f}" for v in values))
    result = {
        "settings": {**vars(args), "device": device, "device_name": device_name, "torch": torch.__version__},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
