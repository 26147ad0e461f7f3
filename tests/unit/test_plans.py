"""The feedback plans' decision rules, as pure functions (their loops over real PVs: tests/system/test_feedback.py)."""

from __future__ import annotations

import importlib.util

import pytest

# not imported here: ophyd starts Channel Access when imported, and must see the system tests'
# loopback settings (tests/system/conftest.py), which are set after collection
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ophyd") is None, reason="needs ophyd")


def _axis(**kw):
    from ophyd.sim import SynAxis

    from cdinn_stream.apps.plans import PeakAxis

    return PeakAxis(SynAxis(name="m"), "peak_col", **{"target": 100.0, "pixels_per_unit": 20.0, **kw})


def test_a_peak_correction_goes_gain_of_the_way_back_within_step_and_limits():
    from cdinn_stream.apps.plans import peak_correction

    axis = _axis()
    assert peak_correction(axis, 101.5, 0.0, gain=0.5, deadband=2.0) is None  # inside the dead band
    assert peak_correction(axis, 110.0, 0.0, gain=0.5, deadband=2.0) == pytest.approx(-0.25)  # 10 px at 20 px/unit
    assert peak_correction(_axis(pixels_per_unit=-20.0), 110.0, 0.0, gain=0.5, deadband=2.0) == pytest.approx(0.25)
    assert peak_correction(_axis(max_step=0.1), 110.0, 0.0, gain=0.5, deadband=2.0) == pytest.approx(-0.1)
    assert peak_correction(_axis(limits=(-0.2, 1.0)), 110.0, 0.0, gain=0.5, deadband=2.0) == pytest.approx(-0.2)
    assert peak_correction(_axis(limits=(0.0, 1.0)), 110.0, 0.0, gain=0.5, deadband=2.0) is None  # at its limit
    assert peak_correction(_axis(pixels_per_unit=0.0), 110.0, 0.0, gain=0.5, deadband=2.0) is None


def test_a_ramp_stops_on_the_crossing_or_when_it_settles():
    from cdinn_stream.apps.plans import stop_reason

    assert stop_reason([0.1, 0.2, 0.31], threshold=0.3) == "crossed"
    assert stop_reason([0.1, 0.2, 0.29], threshold=0.3) is None
    assert stop_reason([0.5, 0.4, 0.29], threshold=0.3, above=False) == "crossed"
    assert stop_reason([0.1, 0.5, 0.51, 0.50, 0.505], steady=(0.02, 3)) == "steady"
    assert stop_reason([0.1, 0.5, 0.51, 0.50], steady=(0.02, 3)) is None  # not yet 4 values that settle
    assert stop_reason([], threshold=0.3) is None


def test_plans_refuse_an_observable_no_pv_serves_before_they_start():
    from cdinn_stream.apps.plans import PeakAxis, keep_peak, ramp_until

    with pytest.raises(ValueError, match="no PV serves 'peak_x'"):
        next(keep_peak([], None, PeakAxis(None, "peak_x", 0.0, 1.0), num=1))
    with pytest.raises(ValueError, match="no PV serves 'strain'"):
        next(ramp_until([], None, None, [0.0], observable="strain", threshold=1.0))
