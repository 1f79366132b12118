"""Many processes at once, and writers killed with SIGKILL at random points.

Workers are forked from the test process, which has already imported torch and the registry:
a fresh interpreter needs ~8 s to import ``gen`` (its ``__init__`` pulls in diffusers), a fork
a few milliseconds, which is what makes 50 kill trials affordable. Workers run torch on one
thread, since OpenMP state does not survive a fork well.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
import traceback

import pytest
import torch

from adapters.registry import Registry
from adapters.registry.synthetic import random_adapter
from adapters.validate import BaseSpec
from gen.base import Base
from gen.tiny import build_tiny_pipeline

PROCESSES, PUTS_EACH = 8, 50
KILL_TRIALS, MAX_DELAY_S = 50, 0.15
FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def spec() -> BaseSpec:
    return BaseSpec.from_base(Base.from_pipeline(build_tiny_pipeline("sd")))


def tiny_adapter(spec: BaseSpec, seed: int):
    return random_adapter(spec, rank=2, max_modules=2, seed=seed)


def same_tensors(a, b) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def _interleaved_worker(root: str, spec: BaseSpec, proc: int, out: str) -> None:
    """Put and read back, all processes on the same user and concept (maximum contention)."""
    torch.set_num_threads(1)
    result = {"versions": [], "errors": []}
    try:
        with Registry(root) as reg:
            user = reg.for_user("shared")
            for j in range(PUTS_EACH):
                seed = proc * 1000 + j
                adapter = tiny_adapter(spec, seed)
                version = user.put(adapter, spec, "rex", training_config={"seed": seed}).version
                result["versions"].append(version)
                if not same_tensors(user.get("rex", version), adapter):
                    result["errors"].append(f"v{version} read back different tensors")
                latest = user.get("rex")
                if latest.version < version:
                    result["errors"].append(f"latest v{latest.version} is older than own v{version}")
    except Exception:
        result["errors"].append(traceback.format_exc())
    with open(out, "w") as f:
        json.dump(result, f)


def test_processes_putting_and_getting_at_once_lose_and_duplicate_nothing(spec, tmp_path):
    root = str(tmp_path / "reg")
    Registry(root).close()  # create the schema once, outside the race
    outs = [str(tmp_path / f"out{i}.json") for i in range(PROCESSES)]
    procs = [FORK.Process(target=_interleaved_worker, args=(root, spec, i, outs[i])) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [json.loads(open(o).read()) for o in outs]
    assert [e for r in results for e in r["errors"]] == []
    versions = sorted(v for r in results for v in r["versions"])
    assert versions == list(range(1, PROCESSES * PUTS_EACH + 1))  # none lost, none duplicated

    with Registry(root) as reg:
        records = reg.for_user("shared").list()
        assert [r.version for r in records] == versions
        by_version = {v: proc * 1000 + j for proc, r in enumerate(results) for j, v in enumerate(r["versions"])}
        assert all(r.training_config["seed"] == by_version[r.version] for r in records)
        assert reg.verify().ok


def _killable_writer(root: str, spec: BaseSpec, fd: int) -> None:
    """Put forever, reporting each committed version on a pipe, until killed."""
    torch.set_num_threads(1)
    reg = Registry(root)
    user = reg.for_user("writer")
    rng = random.Random(time.time_ns() ^ os.getpid())  # forks inherit the parent's random state
    while True:
        seed = rng.getrandbits(31)
        record = user.put(tiny_adapter(spec, seed), spec, "rex", training_config={"seed": seed})
        os.write(fd, f"{record.version}\n".encode())


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


def test_writers_killed_at_random_points_leave_a_valid_registry(spec, tmp_path):
    root = str(tmp_path / "reg")
    Registry(root).close()
    rng = random.Random(0)
    checked: set[int] = set()
    debris_trials = 0
    for _ in range(KILL_TRIALS):
        read_fd, write_fd = os.pipe()
        proc = FORK.Process(target=_killable_writer, args=(root, spec, write_fd))
        proc.start()
        os.close(write_fd)
        time.sleep(rng.uniform(0, MAX_DELAY_S))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        reported = {int(v) for v in _read_all(read_fd).split()}

        with Registry(root) as reg:
            user = reg.for_user("writer")
            records = user.list()
            versions = [r.version for r in records]
            assert versions == sorted(set(versions))
            assert reported <= set(versions)  # every committed put is there
            for record in records:
                if record.version not in checked:  # every visible version reads back whole
                    assert same_tensors(user.get("rex", record.version), tiny_adapter(spec, record.training_config["seed"]))
                    checked.add(record.version)
            report = reg.verify()
            assert report.ok, report.lines()
            debris_trials += bool(report.orphans_removed or report.temp_files_removed)
            assert list(reg.blobs.tmp_dir.iterdir()) == []
    assert checked, "the writer never committed anything; raise MAX_DELAY_S"
    assert debris_trials, "no kill landed inside a put; the trials did not test what they claim"
    print(f"{len(checked)} versions committed over {KILL_TRIALS} kills; {debris_trials} kills landed mid-write")
