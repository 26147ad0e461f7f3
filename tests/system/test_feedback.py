"""Feedback plans through real PVs (issue 19): a RunEngine with ``ophyd.sim`` motors and a
simulated detector, the live pipeline writing to a caproto IOC, and the plans reading the
observables back over Channel Access (pyepics, ophyd ``EpicsSignalRO``). ophyd is imported in the
tests, not at collection: its pyepics layer starts Channel Access when imported, and must see the
session's loopback settings (conftest)."""

from __future__ import annotations

import numpy as np
import pytest

from cdinn_stream.core.simulate import diffraction_intensity
from cdinn_stream.lab.sim import OperandoCrystal, make_detector
from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.nn.reconstruct import load_model
from cdinn_stream.sinks import EpicsSink

SIDE = 128  # detector frames
DRIFT = (12.0, 30.0)  # pixels (row, column) the peak drifts over the temperature ramp without feedback
PIXELS_PER_MM = 20.0  # detector pixels the peak moves per mm of the detector stage


class Recorder:
    """A sink keeping every frame's observables (what the IOC saw, frame by frame)."""

    def __init__(self):
        self.rows: list[dict] = []

    def open_run(self, run_uid, start):
        self.rows = []

    def write(self, result):
        for i, seq in enumerate(result.frames.seq_nums):
            self.rows.append({"seq_num": int(seq), **{k: float(v[i]) for k, v in result.observables.items()}})

    def close_run(self, run_uid, summary):
        pass


def _pattern(amplitude, phase, rng) -> np.ndarray:
    clean = diffraction_intensity(amplitude[None], phase[None])[0]
    return rng.poisson(clean / clean.sum() * 2e6).astype(np.float32)


@pytest.fixture
def RE():
    from bluesky import RunEngine

    return RunEngine({}, call_returns_result=True)  # the plans' return values: corrections, the outcome


@pytest.fixture
def observables(ioc):
    from cdinn_stream.apps.plans import Observables

    obs = Observables(ioc.prefix, name="cdinn")
    obs.wait_for_connection(timeout=10)
    return obs


@pytest.fixture
def pipeline(ioc):
    recorder = Recorder()
    cb = ReconstructionCallback(model=load_model("cdinn-32", device="cpu"), sinks=[EpicsSink(ioc.prefix), recorder])
    yield cb, recorder
    cb.close()


def test_keep_peak_holds_the_bragg_peak_on_target_through_a_500_frame_temperature_ramp(RE, observables, pipeline):
    from ophyd.sim import SynAxis

    from cdinn_stream.apps.plans import PeakAxis, keep_peak

    cb, recorder = pipeline
    RE.subscribe(cb)
    stage_x, stage_y = SynAxis(name="det_x"), SynAxis(name="det_y")
    crystal = OperandoCrystal(32, seed=2)
    rng = np.random.default_rng(0)
    shot = iter(range(10**6))

    def frame() -> np.ndarray:  # the peak drifts with the temperature; the stage moves it back
        t = next(shot) / 500
        amp, phase = crystal.state(t)
        row = SIDE / 2 + DRIFT[0] * t + PIXELS_PER_MM * stage_y.position
        col = SIDE / 2 + DRIFT[1] * t + PIXELS_PER_MM * stage_x.position
        r, c = int(round(row)) - 16, int(round(col)) - 16
        out = rng.poisson(0.2, (SIDE, SIDE)).astype(np.float32)
        out[max(r, 0) : r + 32, max(c, 0) : c + 32] += _pattern(amp, phase, rng)[max(-r, 0) :, max(-c, 0) :][
            : SIDE - max(r, 0), : SIDE - max(c, 0)]
        return out

    axes = [PeakAxis(stage_x, "peak_col", SIDE / 2, PIXELS_PER_MM, limits=(-5, 5), max_step=0.5),
            PeakAxis(stage_y, "peak_row", SIDE / 2, PIXELS_PER_MM, limits=(-5, 5), max_step=0.5)]
    det = make_detector(frame, name="bcdi")
    corrections = RE(keep_peak([det], observables, axes, num=500, deadband=1.0)).plan_result
    assert cb.flush(60)

    rows = recorder.rows
    assert [r["seq_num"] for r in rows] == list(range(1, 501))
    error = np.array([[r["peak_row"] - SIDE / 2, r["peak_col"] - SIDE / 2] for r in rows])
    print(f"keep_peak: {len(corrections)} corrections; |error| max {np.abs(error).max(axis=0)} px, last 100 "
          f"frames {np.abs(error[-100:]).max(axis=0)} px; stage at ({stage_y.position:.3f}, {stage_x.position:.3f}) mm")
    assert np.abs(error).max() <= 3.0, np.abs(error).max(axis=0)
    # the stage did the work: without it the peak would have drifted DRIFT pixels
    np.testing.assert_allclose([stage_y.position, stage_x.position], -np.array(DRIFT) / PIXELS_PER_MM, atol=0.15)
    assert len(corrections) >= 10


def test_ramp_until_stops_at_the_frame_where_the_strain_crosses_its_threshold(RE, observables, pipeline):
    from ophyd.sim import SynAxis

    from cdinn_stream.apps.plans import ramp_until

    cb, recorder = pipeline
    RE.subscribe(cb)
    heater = SynAxis(name="heater")
    crystal = OperandoCrystal(32, seed=4)
    amp, field = crystal.state(1.0)
    rng = np.random.default_rng(1)

    def frame() -> np.ndarray:  # strain grows with the heater's setpoint (0..1)
        out = np.zeros((64, 64), np.float32)
        out[16:48, 16:48] = _pattern(amp, field * 1.5 * heater.position, rng)
        return out

    setpoints = np.linspace(0.0, 1.0, 201)
    det = make_detector(frame, name="bcdi")
    outcome = RE(ramp_until([det], observables, heater, setpoints, observable="strain_rms", threshold=0.5,
                            then=0.0)).plan_result
    assert cb.flush(60)
    values = np.array([r["strain_rms"] for r in recorder.rows])
    crossing = int(np.argmax(values >= 0.5)) + 1  # the first frame past the threshold (seq_num)
    print(f"ramp_until: {outcome}; first crossing at frame {crossing} of {len(values)}; "
          f"strain_rms {values[max(crossing - 3, 0) : crossing + 1]}")
    assert values.max() >= 0.5 and 20 < crossing < 180, "crossed mid-ramp, or the test means little"
    assert outcome["reason"] == "crossed"
    assert crossing <= outcome["seq_num"] <= crossing + 2
    assert len(values) <= outcome["seq_num"] + 2  # no frames taken after the stop
    assert heater.position == 0.0  # then=0.0: the stimulus set to its safe value
