"""Observables of each frame (issue 19): the figures agree with what they claim to measure, on
objects whose answer is known (simulated crystals, shifted, ramped, strained)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from cdinn_stream.core.metrics import centred_planes
from cdinn_stream.core.observables import OBSERVABLES
from cdinn_stream.core.observe import frame_observables, reference_objects
from cdinn_stream.core.physics import SUPPORT_THRESHOLD, ramp, strain
from cdinn_stream.core.simulate import diffraction_intensity, simulate

#: the compiled path is tested where it can run: a C++ compiler (inductor's CPU backend needs one)
#: and compiling not turned off; without them the eager figures are tested against the passes
needs_compiler = pytest.mark.skipif(
    not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++"))
    or os.environ.get("CDINN_COMPILE", "1").strip().lower() in ("0", "false", "no", "off"),
    reason="torch.compile needs a C++ compiler on a CPU, and CDINN_COMPILE not 0")


@pytest.fixture(scope="module")
def crystals():
    data = simulate(64, 32, seed=3)
    return torch.from_numpy(data.amplitude.astype(np.float32)), torch.from_numpy(data.phase.astype(np.float32))


def _observe(amp, phase, crops=None, origins=None, **kw):
    crops = torch.from_numpy(diffraction_intensity(amp.numpy(), phase.numpy())) if crops is None else crops
    origins = torch.zeros(len(amp), 2) if origins is None else origins
    return frame_observables(amp, phase, crops, origins, **kw)


def test_every_observable_in_the_table_is_computed_and_the_table_says_its_unit():
    amp, phase = simulate(4, 32, seed=1).amplitude, simulate(4, 32, seed=1).phase
    obs = _observe(torch.from_numpy(amp), torch.from_numpy(phase))
    assert set(obs) == set(OBSERVABLES) - {"chi2"}  # chi2 is the engine's trust figure, computed with the model
    assert all(v.shape == (4,) and v.dtype == torch.float32 for v in obs.values())
    assert all(isinstance(unit, str) and meaning for unit, meaning in OBSERVABLES.values())


def test_the_peak_position_is_sub_pixel_and_in_detector_pixels(crystals):
    """A phase ramp moves the Bragg peak by a known fraction of a pixel; the crop's origin and
    binning put it on the detector."""
    amp, phase = crystals
    offsets = torch.tensor([[0.3, -0.4]]).repeat(len(amp), 1)
    moved = phase + ramp(offsets, 32)
    obs = _observe(amp, moved, origins=torch.tensor([[100.0, 200.0]]).repeat(len(amp), 1))
    np.testing.assert_allclose(np.median(obs["peak_row"]), 116.3, atol=0.08)
    np.testing.assert_allclose(np.median(obs["peak_col"]), 215.6, atol=0.08)


def test_the_peak_position_of_a_binned_crop_is_where_the_peak_is_on_the_detector(crystals):
    """A 2x-oversampled pattern (the detector's pixels half the model's) placed on a detector frame,
    found and cropped 2x2-binned as the pipeline does: the observable is the peak's detector pixel."""
    from cdinn_stream.live.crop import crop_frames, find_peaks

    amp, phase = crystals
    offsets = torch.tensor([[0.3, -0.4]]).repeat(len(amp), 1)
    pattern = diffraction_intensity(amp.numpy(), (phase + ramp(offsets, 32)).numpy(), pad=2)  # peak at 32 + 2 offset
    frames = np.zeros((len(amp), 128, 128), np.float32)
    frames[:, 30:94, 40:104] = pattern
    crops = crop_frames(frames, find_peaks(frames), 32, bin=2)
    obs = frame_observables(amp, phase, torch.from_numpy(crops.frames), torch.from_numpy(crops.origins), bin=2)
    np.testing.assert_allclose(np.median(obs["peak_row"]), 30 + 32 + 0.6, atol=0.15)
    np.testing.assert_allclose(np.median(obs["peak_col"]), 40 + 32 - 0.8, atol=0.15)


def test_support_and_centroid_follow_the_crystal(crystals):
    amp, phase = crystals
    obs = _observe(amp, phase)
    a = amp.numpy()
    expected = (a > SUPPORT_THRESHOLD * a.reshape(len(a), -1).max(axis=1)[:, None, None]).sum(axis=(1, 2))
    np.testing.assert_array_equal(obs["support_area"].numpy(), expected)
    shifted = _observe(torch.roll(amp, (2, -3), dims=(1, 2)), torch.roll(phase, (2, -3), dims=(1, 2)))
    edges = np.concatenate([a[:, :4].reshape(len(a), -1), a[:, -4:].reshape(len(a), -1),
                            a[:, :, :4].reshape(len(a), -1), a[:, :, -4:].reshape(len(a), -1)], axis=1)
    inside = edges.max(axis=1) == 0  # crystals the roll does not wrap around the window's edge
    assert inside.sum() > 10
    np.testing.assert_allclose((shifted["centroid_row"] - obs["centroid_row"]).numpy()[inside], 2, atol=1e-3)
    np.testing.assert_allclose((shifted["centroid_col"] - obs["centroid_col"]).numpy()[inside], -3, atol=1e-3)


def test_strain_figures_ignore_the_ramp_and_match_the_full_strain_map(crystals):
    """phase_mean and strain_rms do not see where the Bragg peak sits (the ramp); strain_rms is
    the spread of the strain map that :func:`physics.strain` gives (which also fits a plane)."""
    amp, phase = crystals
    obs = _observe(amp, phase)
    ramped = _observe(amp, phase + ramp(torch.tensor([[1.7, -2.2]]).repeat(len(amp), 1), 32))
    np.testing.assert_allclose(ramped["strain_rms"].numpy(), obs["strain_rms"].numpy(), atol=2e-3)
    wrapped = np.angle(np.exp(1j * (ramped["phase_mean"] - obs["phase_mean"]).numpy()))
    assert np.abs(wrapped).max() < 2e-3
    a = amp.numpy().astype(np.float64)
    full = strain(amp, phase).astype(np.float64)
    w = a * (full != 0)
    rms = np.sqrt((w * full**2).sum(axis=(1, 2)) / w.sum(axis=(1, 2)))
    ours = obs["strain_rms"].numpy()
    assert np.median(np.abs(ours - rms) / rms) < 0.15, (ours[:8], rms[:8])
    assert np.corrcoef(ours, rms)[0, 1] > 0.9


def test_correlation_is_one_for_the_same_crystal_whatever_the_ramp_and_offset_and_drops_with_change(crystals):
    amp, phase = crystals
    reference = reference_objects(amp[:1], phase[:1])
    same = _observe(amp[:1], phase[:1] + 0.7 + ramp(torch.tensor([[0.4, 0.9]]), 32), reference=reference)
    assert float(same["correlation"][0]) > 0.999
    strained = _observe(amp[:1], phase[:1] * 2.0, reference=reference)
    others = _observe(amp[1:], phase[1:], reference=reference)
    assert 0.2 < float(strained["correlation"][0]) < 0.99
    assert np.median(others["correlation"].numpy()) < 0.6
    assert torch.isnan(_observe(amp[:2], phase[:2])["correlation"]).all()  # no reference: not a number, not 1


def test_the_centred_planes_give_the_plain_objects_figures(crystals):
    """The trust figure's planes carry the centring checkerboard, a ramp of pi a pixel: the ramp
    removal takes it out, so the figures are those of the plain object's planes."""
    amp, phase = crystals
    crops = torch.from_numpy(diffraction_intensity(amp.numpy(), phase.numpy()))
    plain = (amp * torch.cos(phase), amp * torch.sin(phase))
    reference = reference_objects(amp[:1], phase[:1])
    for ref in (None, reference):
        own = frame_observables(amp, phase, crops, torch.zeros(len(amp), 2), reference=ref, planes=plain)
        shared = frame_observables(amp, phase, crops, torch.zeros(len(amp), 2), reference=ref,
                                   planes=centred_planes(amp, phase))
        for name in own:
            torch.testing.assert_close(shared[name], own[name], equal_nan=True, atol=2e-5, rtol=1e-4)


@needs_compiler
def test_the_compiled_figures_are_the_eager_ones_and_the_calls_use_them(crystals):
    """The first calls run eagerly while the kernels compile on a thread of their own; then the
    compiled code runs (for the batch sizes it was compiled for: one, and more than one) and gives
    the eager figures."""
    from cdinn_stream.core.observe import KERNELS, compile_observables

    amp, phase = crystals
    crops = torch.from_numpy(diffraction_intensity(amp.numpy(), phase.numpy()))
    reference = reference_objects(amp[:1], phase[:1])
    for kernel in KERNELS:  # other tests' calls (grad mode, normal tensors, other shapes) may have spent the budget
        kernel.reset()
    for batch in (len(amp), 1):
        args = (amp[:batch], phase[:batch], crops[:batch], torch.zeros(batch, 2))
        with torch.inference_mode():
            for kernel in KERNELS:  # the figures of the functions run eagerly, whatever was compiled before
                kernel.enabled = False
            eager = frame_observables(*args, reference=reference)
            for kernel in KERNELS:
                kernel.enabled = True
            assert compile_observables(lambda args=args: frame_observables(*args, reference=reference)), \
                "torch.compile failed, or its code does not fit the calls (see the log)"
            before = [k.compiled_calls for k in KERNELS]
            compiled = frame_observables(*args, reference=reference)
        assert [k.compiled_calls for k in KERNELS] == [b + 1 for b in before]
        for name in eager:
            torch.testing.assert_close(compiled[name], eager[name], equal_nan=True, atol=5e-4, rtol=1e-4)


def test_the_docs_table_lists_every_observable_with_its_unit():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "pipeline.md").read_text()
    for name, (unit, _) in OBSERVABLES.items():
        assert f"| `{name}` | {unit or '-'} |" in text, name


def test_the_trust_figure_from_the_shared_planes_is_the_same(crystals):
    from cdinn_stream.core.metrics import fourier_chi2
    from cdinn_stream.core.physics import normalized_amplitude

    amp, phase = crystals
    x = normalized_amplitude(torch.from_numpy(diffraction_intensity(amp.numpy(), phase.numpy())))
    planes = centred_planes(amp, phase)
    kept = (planes[0].clone(), planes[1].clone())
    shared = fourier_chi2(amp, phase, x, planes=planes)
    torch.testing.assert_close(planes, kept)  # the trust figure leaves them for the observables
    torch.testing.assert_close(shared, fourier_chi2(amp, phase, x))


def test_the_engine_gives_each_frame_its_observables_whatever_the_batch_holds():
    """Batches of several sizes that mix two runs and two streams: each frame's observables are
    what it gets alone, its correlation against its own run and stream's first frame."""
    import time

    from cdinn_stream.core.physics import normalized_amplitude
    from cdinn_stream.live.blocks import FrameBlock
    from cdinn_stream.live.engine import InferenceEngine
    from cdinn_stream.live.publish import SinkThread
    from cdinn_stream.nn.model import CDINN, ModelConfig
    from cdinn_stream.nn.reconstruct import CDIModel

    torch.manual_seed(0)
    model = CDIModel(CDINN(ModelConfig(32, (8, 16, 32), 1, 4)), name="tiny", device="cpu", precision="fp32")
    frames = simulate(30, 32, seed=9).intensity.astype(np.float32)

    class Keep:
        results: list = []

        def open_run(self, uid, start): pass
        def write(self, result): self.results.append(result)
        def close_run(self, uid, summary): pass

    def block(run, stream, idx):
        seq = np.asarray(idx) + 1
        n = len(seq)
        return FrameBlock(run, stream, seq, seq * 0.1, frames[idx], np.full((n, 2), 7), np.full((n, 2), 23),
                          np.full(n, time.monotonic()))

    keep = Keep()
    engine = InferenceEngine(model, [SinkThread(keep)], batch_size=64, max_latency=0.2)
    for run in ("a", "b"):
        engine.open_run(run, {})
    plan = [("a", "primary", [0, 1, 2]), ("b", "primary", [10, 11]), ("a", "other", [20, 21, 22, 23]),
            ("a", "primary", [3, 4, 5, 6, 7]), ("b", "primary", [12])]
    for run, stream, idx in plan:
        engine.submit(block(run, stream, idx))
    assert engine.flush(timeout=30)
    engine.close()
    got = {(r.frames.run_uid, r.frames.stream, int(s)): {k: float(v[i]) for k, v in r.observables.items()}
           for r in keep.results for i, s in enumerate(r.frames.seq_nums)}
    assert len(got) == 15
    for (run, stream), idx in {("a", "primary"): [0, 1, 2, 3, 4, 5, 6, 7], ("b", "primary"): [10, 11, 12],
                               ("a", "other"): [20, 21, 22, 23]}.items():
        x = normalized_amplitude(torch.from_numpy(frames[idx]))
        amp, phase = model.predict_tensor(x)
        alone = frame_observables(amp, phase, torch.from_numpy(frames[idx]), torch.full((len(idx), 2), 7.0),
                                  reference=reference_objects(amp[:1], phase[:1]))
        for j, i in enumerate(idx):
            for name, value in alone.items():
                np.testing.assert_allclose(got[(run, stream, i + 1)][name], float(value[j]), rtol=2e-4, atol=2e-5,
                                           err_msg=f"{run} {stream} frame {i + 1} {name}")
        assert got[(run, stream, idx[0] + 1)]["correlation"] == pytest.approx(1.0, abs=1e-5)


@needs_compiler
def test_compiled_ahead_the_engines_calls_run_compiled_code_at_once(crystals):
    """``warm_up`` (the engine calls it after ``COMPILE_AFTER`` frames) compiles for the engine's calls: a batch
    of several frames and a batch of one, in inference mode, run compiled code at their first call,
    with no compilation of their own."""
    from cdinn_stream.core.observe import KERNELS, warm_up

    for kernel in KERNELS:
        kernel.reset()
    thread = warm_up(32, "cpu")
    thread.join(600)
    assert not thread.is_alive()
    compiles = [k.compiles for k in KERNELS]
    amp, phase = crystals
    crops = torch.from_numpy(diffraction_intensity(amp.numpy(), phase.numpy()))
    for batch in (13, 1):
        with torch.inference_mode():
            a, p, c = amp[:batch].clone(), phase[:batch].clone(), crops[:batch].clone()
            reference = reference_objects(a[:1], p[:1])
            before = [k.compiled_calls for k in KERNELS]
            frame_observables(a, p, c, torch.zeros(batch, 2), reference=reference, planes=centred_planes(a, p))
        assert [k.compiled_calls for k in KERNELS] == [b + 1 for b in before], batch
    assert [k.compiles for k in KERNELS] == compiles


def test_the_engine_has_the_observables_compiled_only_after_many_frames(monkeypatch):
    """Compiling costs seconds of CPU: an engine that has made fewer than ``COMPILE_AFTER`` frames
    runs the observables eagerly and compiles nothing; past that it starts the compilation."""
    import time

    import cdinn_stream.live.engine as engine_module
    from cdinn_stream.core.observe import KERNELS
    from cdinn_stream.live.blocks import FrameBlock
    from cdinn_stream.live.engine import InferenceEngine
    from cdinn_stream.nn.model import CDINN, ModelConfig
    from cdinn_stream.nn.reconstruct import CDIModel

    for kernel in KERNELS:
        kernel.reset()
    monkeypatch.setattr(engine_module, "COMPILE_AFTER", 40)
    model = CDIModel(CDINN(ModelConfig(32, (8, 16, 32), 1, 4)), name="tiny", device="cpu", precision="fp32")
    frames = simulate(24, 32, seed=9).intensity.astype(np.float32)
    engine = InferenceEngine(model, [], batch_size=8, max_latency=0.01)
    engine.open_run("r", {})

    def feed(lo: int) -> None:
        seq = np.arange(lo, lo + 24)
        engine.submit(FrameBlock("r", "primary", seq, seq * 0.1, frames, np.zeros((24, 2)), np.zeros((24, 2)),
                                 np.full(24, time.monotonic())))
        assert engine.flush(timeout=60)

    feed(1)
    assert not any(k.armed for k in KERNELS) and not any(k.compiles for k in KERNELS)
    feed(25)  # 48 frames made: past COMPILE_AFTER
    engine.close()
    if all(k.enabled for k in KERNELS):  # (off with CDINN_COMPILE=0: then nothing starts)
        assert all(k.armed for k in KERNELS)
        engine._compiling_ahead.join(600)
        assert all(k.compiles >= 1 for k in KERNELS)


def test_the_eager_figures_are_the_compiled_passes_figures(crystals):
    """Without a compiler too: the complex-valued eager code and the real-valued passes that get
    compiled (run here as plain torch) give the same nine figures, with one reference and with
    one a frame."""
    from cdinn_stream.core.observe import _eager_figures, _figures, _support_figures

    amp, phase = crystals
    crops = torch.from_numpy(diffraction_intensity(amp.numpy(), phase.numpy()))
    re, im = centred_planes(amp, phase)
    for reference in (reference_objects(amp[:1], phase[:1]), reference_objects(amp.flip(0), phase.flip(0))):
        with torch.inference_mode():
            eager = _eager_figures(amp, re, im, crops, reference)
            passes = _figures(amp, re, im, *_support_figures(amp, re, im, crops), reference)
        torch.testing.assert_close(eager, passes, atol=5e-4, rtol=1e-4)


def test_the_correlation_alone_is_the_observables_and_the_pool_merge_rebases_it(crystals):
    """``correlation`` computes the observable as ``frame_observables`` does (one reference, one
    a frame); the pool's merge sets a run's against its first stored frame (1 there), whatever
    reference each worker used."""
    from cdinn_stream.apps.worker import correlation_from_first
    from cdinn_stream.core.observe import correlation
    from cdinn_stream.sinks.tiled_layout import OBSERVABLE_COLUMNS

    amp, phase = crystals
    for reference in (reference_objects(amp[:1], phase[:1]), reference_objects(amp.flip(0), phase.flip(0))):
        torch.testing.assert_close(correlation(amp, phase, reference), _observe(amp, phase, reference=reference)[
            "correlation"], atol=1e-4, rtol=1e-4)
    column = OBSERVABLE_COLUMNS.index("correlation")
    obs = np.zeros((len(amp), len(OBSERVABLE_COLUMNS)))
    obs[:, column] = _observe(amp, phase, reference=reference_objects(amp[5:6], phase[5:6]))["correlation"]
    before = obs[:, column].copy()  # against frame 5, as a worker whose first frame that was
    rows = {"amplitude": amp.numpy(), "phase": phase.numpy(), "observables": obs}
    correlation_from_first(rows, chunk=16)  # in chunks, as for long runs
    first = _observe(amp, phase, reference=reference_objects(amp[:1], phase[:1]))["correlation"].numpy()
    np.testing.assert_allclose(rows["observables"][:, column], first, atol=1e-4)
    assert rows["observables"][0, column] == pytest.approx(1.0, abs=1e-5)
    assert np.abs(rows["observables"][:, column] - before).max() > 0.1  # the crystals differ: so do the references


def test_the_work_tensors_of_another_device_are_let_go():
    """After the engine falls back from a GPU to the CPU, the eager figures' work tensors on the
    GPU are freed: the calling thread keeps those of one device (here: the meta device stands for
    the GPU)."""
    from cdinn_stream.core.observe import _WORKSPACE, _work

    _work("test-mask", (4, 8, 8), torch.float32, torch.device("meta"))
    _work("test-mask", (4, 8, 8), torch.float32, torch.device("cpu"))
    assert {k[3] for k in _WORKSPACE.tensors} == {torch.device("cpu")}
