"""GPU paths: device-resident model with pinned host memory, CUDA graphs, GPU -> CPU fallback.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/gpu``. Self-contained
(documents from event-model's ``compose_run``, no RunEngine), so that it runs where only torch,
event-model and pyzmq are installed."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KEY = "bcdi_image"


def _frames(n: int) -> np.ndarray:
    from cdinn_stream.core.simulate import simulate

    return simulate(n, 32, seed=5, photons=1e6, background=0.2).intensity


def _run_through_callback(model, frames: np.ndarray, batch_size: int = 16) -> dict[int, tuple]:
    from event_model import compose_run

    from cdinn_stream.live.callback import ReconstructionCallback

    kept: dict[int, tuple] = {}

    class Keep:
        def open_run(self, uid, start): pass
        def write(self, r):
            for i, s in enumerate(r.frames.seq_nums.tolist()):
                kept[s] = (r.amplitude[i], r.phase[i])
        def close_run(self, uid, stop): pass

    cb = ReconstructionCallback(model=model, sinks=[Keep()], batch_size=batch_size, max_latency=0.05)
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        KEY: {"source": "sim", "dtype": "array", "shape": list(frames.shape[1:])}})
    cb("start", run.start_doc)
    cb("descriptor", desc.descriptor_doc)
    for i in range(0, len(frames), 8):
        page = frames[i : i + 8]
        cb("event_page", desc.compose_event_page(data={KEY: page}, timestamps={KEY: [0.0] * len(page)},
                                                 seq_num=list(range(i + 1, i + 1 + len(page))),
                                                 time=[0.0] * len(page), validate=False))
    cb("stop", run.compose_stop())
    assert cb.flush(60)
    stats = cb.stats()
    cb.close()
    assert stats["frames_failed"] == 0 and stats["frames_dropped"] == 0
    return kept


@pytest.fixture
def no_tf32():
    """fp32 on the GPU as on the CPU: no TF32 tensor-core convolutions or matmuls."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("name", ["cdinn-32", "cdinn-32-paper"])
def test_gpu_pipeline_matches_cpu(name, no_tf32):
    """The shipped models have the autocorrelation channels: their FFT runs on the GPU too."""
    from cdinn_stream.nn.reconstruct import load_model

    frames = _frames(40)
    gpu = _run_through_callback(load_model(name, device="cuda", precision="fp32"), frames)
    cpu = _run_through_callback(load_model(name, device="cpu", precision="fp32"), frames)
    assert sorted(gpu) == sorted(cpu) == list(range(1, 41))
    amp_diff = max(float(np.abs(gpu[s][0] - cpu[s][0]).max()) for s in cpu)
    assert amp_diff < 1e-2, amp_diff


@pytest.mark.parametrize("name", ["cdinn-32", "cdinn-32-paper"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_graphs_equal_eager(precision, name):
    from cdinn_stream.core.physics import normalized_amplitude
    from cdinn_stream.nn.reconstruct import load_model

    eager = load_model(name, device="cuda", precision=precision, cuda_graphs=False)
    graphed = load_model(name, device="cuda", precision=precision, cuda_graphs=True)
    x = normalized_amplitude(_frames(70)).cuda()
    for n in (1, 3, 64, 70):  # buckets 1, 4, 64, 128
        a1, p1 = eager.predict_tensor(x[:n])
        a2, p2 = graphed.predict_tensor(x[:n])
        assert a2.shape == a1.shape
        torch.testing.assert_close(a2, a1, atol=2e-2 if precision != "fp32" else 1e-4, rtol=0)
    assert sorted(graphed._graphs) == [1, 4, 64, 128]


def test_gpu_failure_falls_back_to_cpu_and_loses_nothing(caplog):
    from cdinn_stream.nn.reconstruct import load_model

    model = load_model("cdinn-32", device="cuda", precision="bf16")
    forward = model.network.forward_logits

    def fails_on_gpu(x):
        if x.is_cuda:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return forward(x)

    model.network.forward_logits = fails_on_gpu
    with caplog.at_level(logging.WARNING):
        kept = _run_through_callback(model, _frames(24))
    assert sorted(kept) == list(range(1, 25))
    assert "falling back to the CPU" in caplog.text



def test_folded_form_on_a_gpu_equals_the_network(no_tf32):
    """On a GPU the network runs unfolded by default; the folded form, asked for, gives the same."""
    from cdinn_stream.nn.reconstruct import CDIModel, load_model

    plain = load_model("cdinn-32", device="cuda", precision="fp32", cuda_graphs=False)
    assert plain.folded is None
    folded = CDIModel(plain.network, device="cuda", precision="fp32", fold_small_steps=True)
    assert folded.folded is not None
    frames = _frames(64)
    a, b = folded.predict(frames), plain.predict(frames)
    np.testing.assert_allclose(a.amplitude, b.amplitude, atol=1e-4)
    np.testing.assert_allclose(a.phase, b.phase, atol=1e-3)
