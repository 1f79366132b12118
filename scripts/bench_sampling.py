"""Benchmark: load a base, then generate 4 images in 25 steps; print a table and write JSON.

    python scripts/bench_sampling.py --base builtin --repeats 5 --out docs/bench_sampling.json

Reports the load time and the median/min generation time over repeats (the first generation,
which warms caches, is timed separately). The issue's bar for the built-in base on a 2-core CPU
is at most 3 s for the load plus 4 images at 64x64 in 25 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gen import Sampler, load_base  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="builtin")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/bench_sampling.json")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1 (the first generation is a warm-up and not counted), got {args.repeats}")

    t0 = time.perf_counter()
    base = load_base(args.base, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    sampler = Sampler(base)
    prompt = "a photo of a red mug on a grass background"
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        sampler.generate(prompt, num_images=args.num_images, steps=args.steps, seed=i)
        times.append(time.perf_counter() - t0)
    first, rest = times[0], times[1:]
    row = {
        "base": base.source,
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "size": base.default_size,
        "num_images": args.num_images,
        "steps": args.steps,
        "load_s": load_s,
        "first_generate_s": first,
        "generate_median_s": statistics.median(rest),
        "generate_min_s": min(rest),
        "load_plus_generate_s": load_s + first,
    }
    print(f"{'base':<10}{'device':<8}{'size':>6}{'images':>8}{'steps':>7}{'load s':>9}{'1st gen s':>11}{'median s':>10}{'load+1st s':>12}")
    print(f"{row['base']:<10}{row['device']:<8}{row['size']:>6}{row['num_images']:>8}{row['steps']:>7}{load_s:>9.2f}{first:>11.2f}{row['generate_median_s']:>10.2f}{row['load_plus_generate_s']:>12.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
