"""Registry latency: put, get and list (p50/p99) with many records across many users.

    python scripts/bench_registry.py                       # 10,000 records across 1,000 users
    python scripts/bench_registry.py --records 500 --users 50 --out /tmp/quick.json

Every put is durable (blob fsynced and renamed, record committed with synchronous=FULL), so put
latency is mostly the disk's fsync time. ``get`` is an index lookup plus reading the blob's
tensors; ``record`` is the index lookup alone. Adapters are tiny (rank 4 on a few modules of the
built-in tiny SD UNet) so the numbers measure the registry, not tensor I/O.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adapters.registry import Registry
from adapters.registry.synthetic import random_adapter
from adapters.validate import BaseSpec
from gen.base import Base
from gen.tiny import build_tiny_pipeline

CONCEPTS_PER_USER = 3


def percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, round(q * (len(sorted_ms) - 1)))]


def summarize(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {"n": len(ms), "p50_ms": percentile(ms, 0.50), "p99_ms": percentile(ms, 0.99), "mean_ms": statistics.fmean(ms), "max_ms": ms[-1]}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(records: int, users: int, samples: int, modules: int, root: Path, seed: int) -> dict:
    rng = random.Random(seed)
    spec = BaseSpec.from_base(Base.from_pipeline(build_tiny_pipeline("sd")))
    names = [f"user{u:05d}" for u in range(users)]
    placed: list[tuple[str, str, int]] = []
    put_s = []
    with Registry(root) as reg:
        handles = {name: reg.for_user(name) for name in names}
        started = time.perf_counter()
        for i in range(records):
            user, concept = names[i % users], f"concept{(i // users) % CONCEPTS_PER_USER}"
            adapter = random_adapter(spec, rank=4, max_modules=modules, seed=i)
            record = None

            def put():
                nonlocal record
                record = handles[user].put(adapter, spec, concept, tags=["bench"], metrics={"i": i})

            put_s.append(timed(put))
            placed.append((user, concept, record.version))
            if (i + 1) % max(1, records // 10) == 0:
                print(f"  put {i + 1}/{records} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

        picks = [rng.choice(placed) for _ in range(samples)]
        record_s = [timed(lambda p=p: handles[p[0]].record(p[1], p[2])) for p in picks]
        get_s = [timed(lambda p=p: handles[p[0]].get(p[1], p[2])) for p in picks]
        latest_s = [timed(lambda p=p: handles[p[0]].get(p[1])) for p in picks]
        list_s = [timed(lambda u=u: handles[u].list()) for u in (rng.choice(names) for _ in range(samples))]
        verify_s = timed(reg.verify)
        blob = reg.blobs.path(reg.for_user(placed[0][0]).record(placed[0][1], placed[0][2]).sha256)
        return {
            "config": {"records": records, "users": users, "concepts_per_user": CONCEPTS_PER_USER, "samples": samples,
                       "lora_modules": modules, "rank": 4, "blob_bytes": blob.stat().st_size},
            "machine": {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__},
            "results": {
                "put": summarize(put_s),
                "get (by version)": summarize(get_s),
                "get (latest)": summarize(latest_s),
                "record (index only)": summarize(record_s),
                "list (one user)": summarize(list_s),
            },
            "verify_all_s": verify_s,
            "index_bytes": (root / "index.sqlite").stat().st_size,
        }


def print_table(report: dict) -> None:
    cfg = report["config"]
    print(f"\n{cfg['records']:,} records across {cfg['users']:,} users; blobs of {cfg['blob_bytes']:,} bytes "
          f"(rank {cfg['rank']} on {cfg['lora_modules']} modules)\n")
    print(f"| {'operation':<22} | {'n':>6} | {'p50 ms':>8} | {'p99 ms':>8} | {'mean ms':>8} |")
    print(f"|{'-' * 24}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, r in report["results"].items():
        print(f"| {name:<22} | {r['n']:>6} | {r['p50_ms']:>8.3f} | {r['p99_ms']:>8.3f} | {r['mean_ms']:>8.3f} |")
    print(f"\nverify (rehash everything): {report['verify_all_s']:.1f} s; index size {report['index_bytes'] / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000, help="records to put (default 10,000)")
    parser.add_argument("--users", type=int, default=1_000, help="users they are spread across (default 1,000)")
    parser.add_argument("--samples", type=int, default=2_000, help="gets and lists to time (default 2,000)")
    parser.add_argument("--modules", type=int, default=4, help="LoRA modules per adapter (default 4)")
    parser.add_argument("--root", default=None, help="registry folder (default: a fresh temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_registry.json", help="JSON report path (default runs/bench_registry.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_registry_") as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "registry"
        report = run(args.records, args.users, args.samples, args.modules, root, args.seed)
    print_table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
