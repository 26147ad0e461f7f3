"""Symmetry ensemble: the square's symmetries act on patterns as on objects, and combining views
undoes each view's symmetry, shift, twin and phase offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdinn_stream.core.physics import far_field_torch, twin_torch
from cdinn_stream.nn.ensemble import SYMMETRIES, symmetry_ensemble, transform, untransform


def _objects(b: int = 3, n: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    obj = torch.zeros(b, n, n, dtype=torch.complex128)
    obj[:, 4:11, 5:10] = torch.polar(torch.rand(b, 7, 5, dtype=torch.float64) + 0.2,
                                    torch.rand(b, 7, 5, dtype=torch.float64) * 2 - 1)
    return obj


def test_the_eight_symmetries_are_distinct_and_undone():
    x = torch.arange(64.0).reshape(1, 8, 8)
    seen = {tuple(transform(x, g).flatten().tolist()) for g in SYMMETRIES}
    assert len(SYMMETRIES) == 8 and len(seen) == 8
    for g in SYMMETRIES:
        torch.testing.assert_close(untransform(transform(x, g), g), x)
        assert transform(x, g)[0, 4, 4] == x[0, 4, 4], "the centre N // 2 stays put"


def test_a_symmetry_of_the_object_is_the_same_symmetry_of_its_pattern():
    obj = _objects()
    for g in SYMMETRIES:
        torch.testing.assert_close(far_field_torch(transform(obj, g)).abs(), transform(far_field_torch(obj).abs(), g))


def test_views_shifted_twinned_and_phase_offset_combine_to_the_object():
    obj = _objects()
    calls = []

    def predict(x):  # an ideal network that answers each view in a different but equivalent form
        k = len(calls)
        calls.append(x)
        g = SYMMETRIES[k]
        z = transform(obj, g)
        if k % 2:
            z = twin_torch(z.conj())
        z = torch.roll(z, (k % 3, -(k % 2)), dims=(-2, -1)) * np.exp(1j * 0.7 * k)
        return z.abs().float(), torch.angle(z).float()

    pattern = far_field_torch(obj).abs().float()
    amp, phase = symmetry_ensemble(predict, pattern, 8)
    assert len(calls) == 8
    torch.testing.assert_close(calls[3], transform(pattern, SYMMETRIES[3]))
    torch.testing.assert_close(amp.double(), obj.abs(), atol=1e-5, rtol=0)
    inside = obj.abs() > 0
    diff = torch.angle(torch.polar(torch.ones_like(phase.double()), phase.double()) * obj.conj())
    assert diff[inside].abs().max() < 1e-4


def test_model_with_views(tiny_model):
    from cdinn_stream.core.simulate import simulate
    from cdinn_stream.nn.reconstruct import CDIModel

    eight = CDIModel(tiny_model.network, device="cpu", precision="fp32", views=8)
    rec = eight.predict(simulate(5, 32, seed=1).intensity)
    assert rec.amplitude.shape == rec.phase.shape == (5, 32, 32) and np.isfinite(rec.phase).all()
    assert "views=8" in repr(eight)
    with pytest.raises(ValueError, match="views"):
        CDIModel(tiny_model.network, device="cpu", views=9)


def test_the_live_pipeline_runs_a_model_with_views(tiny_model):
    """Documents through the callback with an 8-view model: every frame comes out once."""
    from event_model import compose_run

    from cdinn_stream.core.simulate import simulate
    from cdinn_stream.live.callback import ReconstructionCallback
    from cdinn_stream.nn.reconstruct import CDIModel

    kept: dict[int, np.ndarray] = {}

    class Keep:
        def open_run(self, uid, start): pass
        def write(self, r):
            kept.update({int(s): r.amplitude[i] for i, s in enumerate(r.frames.seq_nums)})
        def close_run(self, uid, stop): pass

    frames = simulate(12, 32, seed=2, photons=1e6).intensity
    model = CDIModel(tiny_model.network, device="cpu", precision="fp32", views=8)
    cb = ReconstructionCallback(model=model, sinks=[Keep()], batch_size=8, max_latency=0.05)
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "bcdi_image": {"source": "sim", "dtype": "array", "shape": [32, 32]}})
    cb("start", run.start_doc)
    cb("descriptor", desc.descriptor_doc)
    cb("event_page", desc.compose_event_page(data={"bcdi_image": frames}, timestamps={"bcdi_image": [0.0] * 12},
                                             seq_num=list(range(1, 13)), time=[0.0] * 12, validate=False))
    cb("stop", run.compose_stop())
    assert cb.flush(60)
    stats = cb.stats()
    cb.close()
    assert sorted(kept) == list(range(1, 13)) and stats["frames_failed"] == 0
    direct = model.predict(frames)
    np.testing.assert_allclose(np.stack([kept[s] for s in range(1, 13)]), direct.amplitude, atol=1e-4)
