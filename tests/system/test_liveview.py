"""The IPython live view (issue 19): redrawn during a scan from the GUI's thread, showing every
frame by the end. The figure renders for real (Agg); the GUI's event loop is played by the test's
main thread, the RunEngine runs in another, as under IPython. Its rate and what it costs the scan
are measured by ``cdinn-stream bench --suite observables``, not here."""

from __future__ import annotations

import threading
import time

import numpy as np

from cdinn_stream.core.simulate import diffraction_intensity
from cdinn_stream.lab.sim import OperandoCrystal, make_detector
from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.nn.reconstruct import load_model

FRAMES = 600
DELAY = 0.005  # s between frames: a 200 Hz detector at most


def _frames(n: int) -> np.ndarray:
    crystal = OperandoCrystal(32, seed=3)
    states = [crystal.state(s) for s in np.linspace(0, 1, n)]
    clean = diffraction_intensity(np.stack([a for a, _ in states]), np.stack([p for _, p in states]))
    frames = np.zeros((n, 64, 64), np.float32)
    frames[:, 16:48, 16:48] = np.random.default_rng(0).poisson(clean / clean.sum(axis=(1, 2), keepdims=True) * 1e6)
    return frames


def _scan(sinks, gui=None) -> tuple[float, dict]:
    """A count of FRAMES frames through the pipeline, the RunEngine in its own thread; ``gui``
    called every 0.1 s in this thread meanwhile. Seconds the scan took, and the pipeline's stats."""
    from bluesky import RunEngine
    from bluesky.plans import count

    frames = iter(_frames(FRAMES))
    cb = ReconstructionCallback(model=load_model("cdinn-32", device="cpu"), sinks=sinks)
    RE = RunEngine({}, context_managers=[])  # no SIGINT handler: not the main thread
    RE.subscribe(cb)
    det = make_detector(lambda: next(frames), name="bcdi")
    t0 = time.monotonic()
    scan = threading.Thread(target=RE, args=(count([det], num=FRAMES, delay=DELAY),))
    scan.start()
    while scan.is_alive():
        if gui is not None:
            gui()
        time.sleep(0.1)
    scan.join()
    seconds = time.monotonic() - t0
    assert cb.flush(60)
    stats = cb.stats()
    cb.close()  # the sinks have written everything
    if gui is not None:
        gui()  # the GUI's next tick shows the end of the run
    return seconds, stats


def test_the_live_view_redraws_during_the_scan_and_shows_every_frame():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cdinn_stream.apps.liveview import LiveReconstructionView

    fig = Figure(figsize=(11, 6.5))
    FigureCanvasAgg(fig)
    view = LiveReconstructionView(fig=fig, rate=10).start()  # its canvas timer calls update()
    timer = view._timer
    assert timer.interval == 100 and len(timer.callbacks) == 1
    seconds, stats = _scan([view], gui=timer._on_timer)  # the GUI's event loop firing the timer
    times = np.array(view.redraw_times)
    during = times[times < times[0] + seconds - 0.5]  # redraws while frames came
    print(f"live view: {view.redraws} redraws, {len(during)} during the {seconds:.2f} s scan")
    assert len(during) >= 3, "the view must follow the scan, not only show its end"
    # what it drew: the last frame, the trends of every frame
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 5 and all(len(line.get_xdata()) == FRAMES for line in lines), [
        len(line.get_xdata()) for line in lines]
    np.testing.assert_array_equal(lines[0].get_xdata(), np.arange(1, FRAMES + 1))
    assert np.isfinite(np.asarray(fig.axes[0].images[0].get_array())).any()
    assert f"frame {FRAMES}" in fig._suptitle.get_text()
    assert view.update() is False  # nothing new: no redraw
    assert len(timer.callbacks) == 1, "the timer kept its callback through idle ticks"
    view.stop()
    assert view._timer is None
