"""Feedback plans: ordinary bluesky plans that act on the live reconstructions' observables.

They read the observables the pipeline writes to the IOC (``cdinn-stream ioc``, :mod:`cdinn_stream.apps.ioc`:
``P:PEAK_ROW``, ``P:STRAIN_RMS``, ... the latest frame's values, :data:`cdinn_stream.core.observables.OBSERVABLES`)
through ophyd signals, over Channel Access, as any beamline feedback would: the plans do not need
the pipeline in their process, only its IOC. Each plan takes one frame at a time, waits until the
IOC shows that frame's reconstruction (``P:RUN_UID`` and ``P:SEQ_NUM``), then acts on it.

* :func:`keep_peak` -- counts frames and, after each, moves any motor given (a detector stage, the
  sample's angle) to bring the Bragg peak back to its target on the detector: proportional steps
  (``gain``) past a dead band, within limits and a largest step, per axis (:class:`PeakAxis`);
* :func:`ramp_until` -- sets a stimulus (temperature, voltage, gas flow: any settable device)
  through its setpoints, one frame each, until an observable crosses a threshold or stops
  changing, then holds the stimulus there or sets it to a safe value.

From the profile (``profiles/``), with the pipeline's IOC at ``CDINN:``::

    obs = Observables("CDINN:", name="cdinn")
    RE(keep_peak([det], obs, PeakAxis(det_x, "peak_col", target=515, pixels_per_unit=-20), num=500))
    RE(ramp_until([det], obs, heater, np.linspace(300, 900, 601), observable="strain_rms", threshold=0.4))

A frame whose reconstruction does not reach the IOC within ``timeout`` seconds (a rejected frame,
a stopped pipeline) gets no correction and a logged warning; the plan goes on. Needs ophyd and
pyepics (``pip install 'cdinn-stream[epics]'``) and Channel Access pointed at the IOC
(``cdinn-stream ioc`` prints the settings).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import RequestAbort, RequestStop
from ophyd import Component, Device, EpicsSignalRO

from ..sinks.epics import OBSERVABLE_PVS

__all__ = ["Observables", "PeakAxis", "keep_peak", "ramp_until", "latest", "peak_correction", "stop_reason"]

logger = logging.getLogger(__name__)


def _components() -> dict[str, Component]:
    pvs = {**OBSERVABLE_PVS, "chi2": "CHI2", "seq_num": "SEQ_NUM"}
    parts = {name: Component(EpicsSignalRO, pv, kind="hinted") for name, pv in pvs.items()}
    parts["run_uid"] = Component(EpicsSignalRO, "RUN_UID", string=True, kind="omitted")
    return parts


#: An ophyd device of the IOC's observables: ``Observables("CDINN:", name="cdinn")``; one signal
#: per observable (``obs.peak_row``, ``obs.strain_rms``, ...), ``obs.chi2``, ``obs.seq_num`` and
#: ``obs.run_uid`` (the run and frame the values belong to).
Observables = type("Observables", (Device,), {**_components(), "__doc__": "The IOC's observables (PVs)."})


@dataclass
class PeakAxis:
    """One axis of :func:`keep_peak`: ``motor`` moves the Bragg peak's ``observable`` (``"peak_row"``
    or ``"peak_col"``) by ``pixels_per_unit`` detector pixels per motor unit (signed: measure it by
    moving the motor once); ``target`` is where the peak should be (detector pixels); the motor
    stays within ``limits`` and moves at most ``max_step`` a correction."""

    motor: Any
    observable: str
    target: float
    pixels_per_unit: float
    limits: tuple[float, float] | None = None
    max_step: float | None = None


def latest(observables: Device, run_uid: str, seq_num: int, *, timeout: float = 5.0, poll: float = 0.005):
    """Plan stub: the observables (name -> value) of frame ``seq_num`` of run ``run_uid`` (or a later
    frame) once the IOC shows them; ``None`` after ``timeout`` seconds (logged)."""
    deadline = time.monotonic() + timeout
    while True:
        uid = yield from bps.rd(observables.run_uid)
        seen = yield from bps.rd(observables.seq_num)
        if uid == run_uid and seen >= seq_num:
            reading = yield from bps.read(observables)
            return {k[len(observables.name) + 1 :]: v["value"] for k, v in reading.items()}
        if time.monotonic() > deadline:
            logger.warning("no reconstruction of frame %d of run %s on the IOC (%s) within %.1f s: no feedback for it",
                           seq_num, run_uid, observables.prefix, timeout)
            return None
        yield from bps.sleep(poll)


def _run(body, md: dict):
    """``body(uid)`` inside a run (bluesky's ``run_wrapper``, with the run's uid handed to the body:
    the plans match it with the IOC's ``P:RUN_UID``)."""
    uid = yield from bps.open_run(md)

    def closing(exc: BaseException):
        if isinstance(exc, RequestAbort):
            yield from bps.close_run(exit_status="abort", reason=repr(exc))
        elif isinstance(exc, RequestStop):
            yield from bps.close_run()
        else:
            yield from bps.close_run(exit_status="fail", reason=repr(exc))

    yield from bpp.contingency_wrapper(body(uid), except_plan=closing, else_plan=bps.close_run)
    return uid


def _known(observable: str) -> None:
    """Refuse an observable the IOC does not serve (before the plan starts, not after its first frame)."""
    if observable not in {**OBSERVABLE_PVS, "chi2": "CHI2"}:
        raise ValueError(f"no PV serves {observable!r}: choose from {sorted({*OBSERVABLE_PVS, 'chi2'})}")


def peak_correction(axis: PeakAxis, value: float, position: float, gain: float, deadband: float) -> float | None:
    """Where :func:`keep_peak` moves ``axis.motor`` (at ``position``) when the peak is at ``value``:
    ``gain`` of the way back, at most ``max_step``, within ``limits``; ``None`` inside the dead band
    (or nowhere to go)."""
    error = value - axis.target
    if abs(error) <= deadband or axis.pixels_per_unit == 0:
        return None
    step = -gain * error / axis.pixels_per_unit
    if axis.max_step is not None:
        step = max(-axis.max_step, min(axis.max_step, step))
    new = position + step
    if axis.limits is not None:
        low, high = axis.limits
        if not low <= new <= high:
            logger.warning("%s would leave its limits (%s, %s) to hold %s at %s: held at the limit",
                           axis.motor.name, low, high, axis.observable, axis.target)
            new = max(low, min(high, new))
    return None if new == position else new


def keep_peak(detectors: Sequence, observables: Device, axes: PeakAxis | Iterable[PeakAxis], *, num: int,
              gain: float = 0.7, deadband: float = 2.0, timeout: float = 5.0, md: dict | None = None):
    """Count ``num`` frames of ``detectors`` and after each move the axes' motors to keep the Bragg
    peak at its targets (see the module docstring). The events hold the motors' positions; the plan
    returns the corrections made, ``[(seq_num, motor name, new position), ...]``."""
    axes = [axes] if isinstance(axes, PeakAxis) else list(axes)
    for axis in axes:
        _known(axis.observable)
    motors = [a.motor for a in axes]
    md = {"plan_name": "keep_peak", "num_points": num, "feedback": {
        "axes": [{"motor": a.motor.name, "observable": a.observable, "target": a.target,
                  "pixels_per_unit": a.pixels_per_unit} for a in axes], "gain": gain, "deadband": deadband},
          **(md or {})}
    corrections: list[tuple[int, str, float]] = []

    def body(uid: str):
        for seq_num in range(1, num + 1):
            yield from bps.trigger_and_read([*detectors, *motors])
            values = yield from latest(observables, uid, seq_num, timeout=timeout)
            if values is None:
                continue
            for axis in axes:
                position = yield from bps.rd(axis.motor)
                new = peak_correction(axis, float(values[axis.observable]), float(position), gain, deadband)
                if new is not None:
                    yield from bps.mv(axis.motor, new)
                    corrections.append((seq_num, axis.motor.name, new))

    yield from bpp.stage_wrapper(_run(body, md), [*detectors, *motors])
    return corrections


def stop_reason(history: Sequence[float], *, threshold: float | None = None, above: bool = True,
                steady: tuple[float, int] | None = None) -> str | None:
    """Why :func:`ramp_until` stops after the frames whose values are ``history``: ``"crossed"``
    (the last value is past ``threshold``: at or above it with ``above``, at or below it without),
    ``"steady"`` (the last ``steady[1] + 1`` values span no more than ``steady[0]``), or ``None``."""
    if not history:
        return None
    value = history[-1]
    if threshold is not None and (value >= threshold if above else value <= threshold):
        return "crossed"
    if steady is not None and len(history) > steady[1]:
        window = history[-steady[1] - 1 :]
        if max(window) - min(window) <= steady[0]:
            return "steady"
    return None


def ramp_until(detectors: Sequence, observables: Device, stimulus, setpoints: Iterable[float], *,
               observable: str = "strain_rms", threshold: float | None = None, above: bool = True,
               steady: tuple[float, int] | None = None, then: str | float = "hold", timeout: float = 5.0,
               md: dict | None = None):
    """Set ``stimulus`` to each of ``setpoints`` in turn and take one frame of ``detectors`` at each,
    until ``observable`` crosses ``threshold`` (rises past it with ``above``, falls past it without)
    or, with ``steady=(tolerance, frames)``, changes by no more than ``tolerance`` over ``frames``
    frames; then hold the stimulus where it is (``then="hold"``) or set it to ``then`` (a safe value).
    Returns ``{"reason": "crossed" | "steady" | "exhausted", "seq_num", "setpoint", "value"}``."""
    if threshold is None and steady is None:
        raise ValueError("ramp_until needs a threshold, steady=(tolerance, frames), or both")
    _known(observable)
    if then != "hold":
        float(then)  # a safe value, or "hold": said now, not after the ramp
    md = {"plan_name": "ramp_until", "feedback": {"stimulus": stimulus.name, "observable": observable,
                                                   "threshold": threshold, "above": above, "steady": steady,
                                                   "then": then}, **(md or {})}
    outcome: dict = {"reason": "exhausted", "seq_num": None, "setpoint": None, "value": None}

    def body(uid: str):
        history: list[float] = []
        for seq_num, setpoint in enumerate(setpoints, start=1):
            yield from bps.mv(stimulus, setpoint)
            yield from bps.trigger_and_read([*detectors, stimulus])
            values = yield from latest(observables, uid, seq_num, timeout=timeout)
            if values is None:
                continue
            value = float(values[observable])
            history.append(value)
            outcome.update(seq_num=seq_num, setpoint=setpoint, value=value)
            reason = stop_reason(history, threshold=threshold, above=above, steady=steady)
            if reason is not None:
                outcome["reason"] = reason
                return

    def safe():  # also when the plan is stopped, aborted or fails
        if then != "hold":
            yield from bps.mv(stimulus, float(then))

    yield from bpp.finalize_wrapper(bpp.stage_wrapper(_run(body, md), list(detectors)), safe)
    logger.info("ramp_until stopped (%s) at frame %s, %s = %s, %s = %s", outcome["reason"], outcome["seq_num"],
                stimulus.name, outcome["setpoint"], observable, outcome["value"])
    return outcome
