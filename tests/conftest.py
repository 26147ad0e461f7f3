"""Shared fixtures: small simulated sets and a tiny random model (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from cdinn_stream.core.simulate import simulate
from cdinn_stream.nn.model import CDINN, ModelConfig
from cdinn_stream.nn.reconstruct import CDIModel


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_set():
    return simulate(64, 32, seed=3)


@pytest.fixture
def tiny_model() -> CDIModel:
    torch.manual_seed(0)
    return CDIModel(CDINN(ModelConfig(32, (4, 8, 16), 1)), name="tiny", device="cpu", precision="fp32")


@pytest.fixture(autouse=True)
def _spool_in_tmp(tmp_path, monkeypatch):
    """Results spooled for an unreachable Tiled server go to the test's folder, not ~/.cache."""
    monkeypatch.setenv("CDINN_SPOOL", str(tmp_path / "spool"))


@pytest.fixture
def tiny_weights(tmp_path):
    """A small untrained model's weights file."""
    from cdinn_stream.nn.weights import save_weights

    path = tmp_path / "tiny.pt"
    save_weights(CDINN(ModelConfig(32, (4, 8, 16), 1, 2)), path)
    return path
