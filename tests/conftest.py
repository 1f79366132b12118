"""Shared fixtures: tiny pipelines saved once per session, and an isolated cache home."""

from __future__ import annotations

import pytest
import torch

from gen.tiny import save_tiny_pipeline

# Tiny models run fastest on one thread, and two test processes' thread pools thrash two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test reads or writes the real user cache (fingerprints, registry)."""
    monkeypatch.setenv("BESPOKE_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> str:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), "sd")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), "sdxl")
