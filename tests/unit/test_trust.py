"""Per-frame trust (chi^2 on every result), automatic refinement of doubtful frames within a
budget, refinement on a wider window, and hot-swapped weights (issue 17)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import wait_for

from cdinn_stream.core.metrics import chi2, fourier_chi2
from cdinn_stream.core.simulate import simulate
from cdinn_stream.live.adapt import Adapter
from cdinn_stream.live.blocks import FrameBlock, ResultBlock, RunMarker
from cdinn_stream.live.callback import FrameCropper
from cdinn_stream.live.engine import InferenceEngine
from cdinn_stream.live.refine import Refiner, seed_on_grid
from cdinn_stream.nn.model import CDINN, ModelConfig
from cdinn_stream.nn.reconstruct import CDIModel


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return CDIModel(CDINN(ModelConfig(32, (8, 16, 32), 1, 4)), name="tiny", device="cpu", precision="fp32")


class Keep:
    """A sink keeping what it is given."""

    def __init__(self):
        self.results, self.refined, self.closed = [], [], []

    def open_run(self, uid, start): pass
    def write(self, result): self.results.append(result)
    def write_refined(self, block): self.refined.append(block)
    def close_run(self, uid, summary): self.closed.append(summary)


def _block(run: str, frames: np.ndarray, start: int = 1) -> FrameBlock:
    n = len(frames)
    seq = np.arange(start, start + n)
    return FrameBlock(run, "primary", seq, seq * 0.1, frames.astype(np.float32), np.zeros((n, 2), int),
                      np.zeros((n, 2), int), np.full(n, time.monotonic()))


def test_fourier_chi2_is_the_papers_chi2_in_float32():
    data = simulate(64, 32, seed=5)
    rng = np.random.default_rng(0)
    amp = data.amplitude * rng.uniform(0.5, 1, data.amplitude.shape)
    phase = data.phase + rng.normal(0, 0.3, (64, 32, 32))
    exact = chi2(amp, phase, data.intensity).numpy()
    fast = fourier_chi2(torch.as_tensor(amp, dtype=torch.float32), torch.as_tensor(phase, dtype=torch.float32),
                        torch.as_tensor(np.sqrt(data.intensity) * 7.0))  # any overall scale of the measurement
    np.testing.assert_allclose(fast.numpy(), exact, rtol=1e-4, atol=1e-6)
    assert exact.min() > 1e-3, "the perturbed objects are not exact"
    truth = fourier_chi2(torch.as_tensor(data.amplitude), torch.as_tensor(data.phase),
                         torch.as_tensor(np.sqrt(data.intensity)))
    assert float(truth.max()) < 1e-5, "the true object scores 0"


def test_predict_and_every_engine_result_carry_chi2_against_the_measured_crop(tiny):
    data = simulate(40, 32, seed=1)
    rec = tiny.predict(data.intensity)
    np.testing.assert_allclose(rec.chi2, chi2(rec.amplitude, rec.phase, data.intensity).numpy(), rtol=1e-4, atol=1e-6)
    assert tiny.predict(data.intensity, chi2=False).chi2 is None
    keep = Keep()
    from cdinn_stream.live.publish import SinkThread

    engine = InferenceEngine(tiny, [SinkThread(keep)], batch_size=16)
    engine.open_run("r", {})
    engine.submit(_block("r", data.intensity))
    engine.close_run("r", {"frames": 40})
    assert engine.flush(timeout=30)
    engine.close()
    results = keep.results
    got = np.concatenate([r.chi2 for r in results])
    expected = np.concatenate([chi2(r.amplitude, r.phase, r.frames.frames).numpy() for r in results])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert keep.closed[0]["model_versions"] == [{"version": 0, "name": "tiny"}]


def test_a_swapped_model_takes_over_between_batches_and_every_result_says_which_made_it(tiny):
    keep = Keep()
    from cdinn_stream.live.publish import SinkThread

    engine = InferenceEngine(tiny, [SinkThread(keep)], batch_size=8, max_latency=0.0)
    data = simulate(48, 32, seed=2).intensity
    engine.open_run("r", {})
    engine.submit(_block("r", data[:24]))
    assert engine.flush(timeout=30)
    torch.manual_seed(1)
    other = CDIModel(CDINN(ModelConfig(32, (8, 16, 32), 1, 4)), name="other", device="cpu", precision="fp32")
    assert engine.swap_model(other, path="/nowhere/other.pt", adapted_on="r") == 1
    engine.submit(_block("r", data[24:], start=25))
    engine.close_run("r", {})
    assert engine.flush(timeout=30)
    engine.close()
    versions = np.concatenate([[r.model_version] * len(r.frames) for r in keep.results])
    seq = np.concatenate([r.frames.seq_nums for r in keep.results])
    np.testing.assert_array_equal(seq, np.arange(1, 49))  # nothing lost at the swap
    np.testing.assert_array_equal(versions, [0] * 24 + [1] * 24)
    assert {r.model for r in keep.results if r.model_version == 1} == {"other"}
    amp = np.concatenate([r.amplitude for r in keep.results])[24:]
    np.testing.assert_allclose(amp, other.predict(data[24:]).amplitude, atol=1e-5)  # the new weights made them
    assert [v["version"] for v in keep.closed[0]["model_versions"]] == [0, 1]
    assert keep.closed[0]["model_versions"][1]["adapted_on"] == "r"


def _result(run: str, chi2_values, start: int = 1) -> ResultBlock:
    n = len(chi2_values)
    f = _block(run, np.ones((n, 8, 8), np.float32), start)
    return ResultBlock(f, np.ones((n, 8, 8), np.float32), np.zeros((n, 8, 8), np.float32), np.zeros(n),
                       np.asarray(chi2_values, float))


class Paused(Refiner):
    """A refiner whose thread never refines (the policy alone is under test)."""

    def _start(self) -> None:
        pass


def test_doubtful_frames_are_refined_within_the_budget_oldest_first():
    r = Paused(lambda item: None, above=0.1, budget=0.25)
    r.offer(_result("a", [0.5] * 4, start=1))  # 4 frames earn 1 refinement: frame 1
    r.offer(_result("a", [0.01] * 4, start=5))  # good frames earn 1 more: frame 2, the oldest waiting
    r.offer(_result("a", [0.01, 0.2, 0.01, 0.01], start=9))  # 1 more: frame 3 (older than frame 10)
    queued = [int(s) for item in r._queue for s in item.frames.seq_nums]
    assert queued == [1, 2, 3]
    assert r.frames_doubtful == 5
    r._end_of_run(RunMarker("close", "a", {}))
    assert r.frames_over_budget == 2  # frames 4 and 10 never fitted the budget: counted, not refined
    assert r.stats()["over_budget"] == 2
    none = Paused(lambda item: None, above=0.1, budget=0.0)
    none.offer(_result("b", [0.9] * 10))
    assert not none._queue and none.frames_doubtful == 10


def test_refinement_rests_to_keep_its_share_of_the_cpu():
    published = []
    r = Refiner(published.append, above=0.0, budget=1.0, share=0.25, iterations=20)
    data = simulate(8, 32, seed=3)
    for i in range(4):
        n = 2
        f = _block("a", data.intensity[2 * i : 2 * i + n], start=1 + 2 * i)
        r.offer(ResultBlock(f, data.amplitude[2 * i : 2 * i + n], data.phase[2 * i : 2 * i + n], np.zeros(n),
                            np.ones(n)))
        time.sleep(0.01)  # separate rounds
    t0 = time.monotonic()
    assert r.drain(timeout=60)
    elapsed = time.monotonic() - t0
    r.close()
    assert r.frames_refined == 8
    assert r.busy_seconds <= 0.25 * elapsed * 1.5 + 0.05, (r.busy_seconds, elapsed)


def test_the_refinement_window_is_the_models_detector_window_unbinned():
    data = simulate(6, 32, seed=4, pad=2)  # the detector samples the pattern twice as finely as the model needs
    frames = np.zeros((6, 100, 100), np.float32)
    frames[:, 18:82, 18:82] = data.intensity
    cropper = FrameCropper(32, bin=2, refine_window=2, centre=False)
    assert (cropper.refine_bin, cropper.zoom) == (1, 1)
    block = cropper.block("r", "primary", frames, np.arange(1, 7), np.zeros(6))
    assert block.frames.shape == (6, 32, 32) and block.wide.shape == (6, 64, 64)
    # the same detector pixels around the same peak, unbinned, with the peak at the grid's centre
    for k in range(6):
        r, c = block.peaks[k]
        np.testing.assert_array_equal(block.wide[k], frames[k, r - 32 : r + 32, c - 32 : c + 32])
        assert np.unravel_index(block.wide[k].argmax(), (64, 64)) == (32, 32)
    o = block.origins[0]  # the model's crop is the same window binned 2x2 (its peak lands in bin 16)
    np.testing.assert_allclose(frames[0, o[0] : o[0] + 64, o[1] : o[1] + 64].reshape(32, 2, 32, 2).sum(axis=(1, 3)),
                               block.frames[0], rtol=1e-6)
    assert FrameCropper(32, bin=1, refine_window=2).zoom == 2
    with pytest.raises(ValueError, match="refine_window"):
        FrameCropper(32, bin=3, refine_window=2)
    seed = seed_on_grid(data.amplitude[:2], data.phase[:2], 64)
    assert seed.shape == (2, 64, 64)
    assert torch.allclose(seed.abs()[:, 16:48, 16:48], torch.as_tensor(data.amplitude[:2]))
    zoomed = seed_on_grid(data.amplitude[:2], data.phase[:2], 64, zoom=2)
    area = (zoomed.abs() > 0.1).sum(dim=(1, 2)).numpy() / (data.amplitude[:2] > 0.1).sum(axis=(1, 2))
    assert zoomed.shape == (2, 64, 64) and np.all(np.abs(area - 4) < 0.6), area  # each pixel spans 2x2


def test_refinement_on_the_wide_window_fits_the_finer_pattern():
    data = simulate(6, 32, seed=6, pad=2)
    frames = np.zeros((6, 96, 96), np.float32)
    frames[:, 16:80, 16:80] = data.intensity
    cropper = FrameCropper(32, bin=2, refine_window=2, centre=False)
    block = cropper.block("r", "primary", frames, np.arange(1, 7), np.zeros(6))
    published = []
    r = Refiner(published.append, every=1, iterations=60, zoom=cropper.zoom)
    rng = np.random.default_rng(1)  # a rough seed: the truth, blurred in phase
    r.offer(ResultBlock(block, data.amplitude, data.phase + rng.normal(0, 0.4, data.phase.shape).astype(np.float32),
                        np.zeros(6), np.full(6, 0.1)))
    assert r.drain(timeout=60)
    r.close()
    (refined,) = published
    assert refined.amplitude.shape == (6, 64, 64)
    np.testing.assert_allclose(refined.chi2_refined, chi2(refined.amplitude, refined.phase, block.wide).numpy())
    assert np.median(refined.chi2_refined) < 0.2 * np.median(
        chi2(data.amplitude, data.phase + rng.normal(0, 0.4, data.phase.shape), block.wide).numpy())


@pytest.mark.parametrize("improve, swapped", [(100.0, True), (0.0, False)])
def test_adaptation_swaps_only_a_better_model_and_saves_it_with_a_card(tiny, tmp_path, improve, swapped):
    keep = Keep()
    from cdinn_stream.live.publish import SinkThread

    engine = InferenceEngine(tiny, [SinkThread(keep)], batch_size=32)
    adapter = engine.adapter = Adapter(engine, min_frames=48, every=10_000, holdout=4, steps=5, batch=16, share=1.0,
                                       improve=improve, out_dir=tmp_path)
    data = simulate(64, 32, seed=8).intensity
    engine.open_run("run-1", {})
    engine.submit(_block("run-1", data))
    wait_for(lambda: adapter.rounds >= 1, timeout=60, what="an adaptation round")
    engine.submit(_block("run-1", data, start=65))
    engine.close_run("run-1", {})
    assert engine.flush(timeout=30)
    adapter.close()
    engine.close()
    (entry,) = adapter.history
    assert entry["held_out"] == 16 and entry["frames"] == 48 and entry["swapped"] is swapped
    cards = list(tmp_path.glob("*.json"))
    if not swapped:
        assert not cards and engine.model is tiny and engine.model_version == 0
        return
    (card_path,) = cards
    card = json.loads(card_path.read_text())
    assert card["adapted_on"] == "run-1" and card["adapted_from"] == "tiny"
    assert (tmp_path / card["weights_file"]).is_file()
    assert engine.model_version == 1 and engine.model_versions[1]["path"] == str(tmp_path / card["weights_file"])
    from cdinn_stream.nn.reconstruct import load_model

    reloaded = load_model(tmp_path / card["weights_file"], device="cpu", precision="fp32")
    np.testing.assert_allclose(reloaded.predict(data[:4]).amplitude, engine.model.predict(data[:4]).amplitude,
                               atol=1e-5)


def test_a_run_starts_at_the_sinks_after_the_refinements_and_end_of_the_run_before_it(tiny):
    """The end of a run passes through the refiner (its refinements go first); the next run's start
    waits for it, so every sink sees open A ... close A, open B ... close B."""
    from cdinn_stream.live.publish import SinkThread

    class Order(Keep):
        def __init__(self):
            super().__init__()
            self.events = []

        def open_run(self, uid, start): self.events.append(("open", uid))
        def write(self, result): self.events.append(("write", result.run_uid))
        def write_refined(self, block): self.events.append(("refined", block.run_uid))
        def close_run(self, uid, summary): self.events.append(("close", uid))

    sink = Order()
    threads = [SinkThread(sink)]
    from cdinn_stream.live.publish import to_all

    refiner = Refiner(to_all(threads), above=0.0, budget=1.0, share=0.05, iterations=30)  # long rests
    engine = InferenceEngine(tiny, threads, refiner=refiner, batch_size=8, max_latency=0.0)
    data = simulate(16, 32, seed=9).intensity
    for run in ("A", "B"):
        engine.open_run(run, {})
        engine.submit(_block(run, data))
        engine.close_run(run, {})
    assert engine.flush(timeout=60)
    engine.close()
    kinds = [e for e in sink.events if e[0] in ("open", "close")]
    assert kinds == [("open", "A"), ("close", "A"), ("open", "B"), ("close", "B")]
    refined_a = [i for i, e in enumerate(sink.events) if e == ("refined", "A")]
    assert refined_a and max(refined_a) < sink.events.index(("close", "A"))


def test_background_work_shortens_the_interpreters_switch_interval(tiny):
    import sys

    from cdinn_stream.live.callback import SWITCH_INTERVAL, ReconstructionCallback

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        ReconstructionCallback(model=tiny).close()  # no background work: left alone
        assert sys.getswitchinterval() == pytest.approx(0.005)
        ReconstructionCallback(model=tiny, refine_above=0.05).close()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
    finally:
        sys.setswitchinterval(before)


def test_an_int8_model_is_adapted_through_the_float_model_it_came_from():
    from cdinn_stream.nn.reconstruct import load_model

    int8 = load_model("cdinn-32-int8", device="cpu")
    network = int8.float_network()
    assert isinstance(network, CDINN) and network.config == int8.network.config
