"""A live view of the reconstructions in a matplotlib figure, for IPython (issue 19).

:class:`LiveReconstructionView` is a pipeline sink (one of ``ReconstructionCallback``'s
``sinks``): its ``write``, on the sink's own thread, only keeps the latest frame and appends each
frame's observables to bounded trend buffers (microseconds a batch). The figure is redrawn from
the GUI's event loop by a canvas timer (:meth:`LiveReconstructionView.start`, ``rate`` times a
second), never from the pipeline's threads, and only when something new came: the latest
amplitude, its strain map (the phase less its ramp and offset, in the support: a display version
of :func:`cdinn_stream.core.physics.strain`), and the trends of the chosen observables (chi^2 by default with the strain
spread, the peak position and the correlation with the run's first frame) against seq_num.
Like bluesky's live plots, it needs an interactive backend (``%matplotlib qt`` or ``widget``) for
the timer to fire; with a non-interactive one, call :meth:`~LiveReconstructionView.update` yourself.

In a profile::

    view = LiveReconstructionView()
    cb = ReconstructionCallback(sinks=[ZmqPublisherSink(), view])
    RE.subscribe(cb)
    view.start()
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from matplotlib.transforms import Bbox

from ..core.observables import OBSERVABLES, SUPPORT_FRACTION, strain_map

__all__ = ["LiveReconstructionView", "DEFAULT_TRENDS"]

#: seconds at least between redraws of the whole figure (a trend outgrowing its limits waits, clipped)
WHOLE_INTERVAL = 2.0
#: seconds between redraws of the title (frame number, status): text costs more than the images
TITLE_INTERVAL = 0.5
#: the observables whose trends are drawn unless told otherwise
DEFAULT_TRENDS = ("chi2", "strain_rms", "peak_row", "peak_col", "correlation")


class LiveReconstructionView:
    """The latest reconstruction and the observables' trends, redrawn ``rate`` times a second at
    most (see the module docstring). ``history``: frames kept in the trends; ``fig``: a figure to
    draw in (a new one by default). :attr:`redraws` counts the redraws that showed something new."""

    def __init__(self, trends: tuple[str, ...] = DEFAULT_TRENDS, *, rate: float = 10.0, history: int = 2000,
                 fig=None):
        unknown = [t for t in trends if t not in OBSERVABLES]
        if unknown:
            raise ValueError(f"unknown observables {unknown}: choose from {list(OBSERVABLES)}")
        self.trends = tuple(trends)
        self.rate = rate
        self._lock = threading.Lock()
        self._seq: deque[int] = deque(maxlen=history)
        self._values = {name: deque(maxlen=history) for name in self.trends}
        self._latest: tuple[np.ndarray, np.ndarray, int] | None = None
        self._run = ""
        self._status = "waiting for a run"
        self._fresh = False
        self._timer = None
        self.redraws = 0
        self.redraw_times: list[float] = []
        self._fig = fig
        self._artists: dict = {}
        self._background = None  # the figure without its changing artists, for blitting
        self._titled = 0.0  # when the title was last drawn
        self._drawn_whole = 0.0  # when the whole figure was last drawn (new limits)
        self._planned = 0  # frames the run's start document announces (num_points), if any
        self._new_run = False  # a run opened since the last update

    # -- the sink side (the pipeline's sink thread) --------------------------------------
    def open_run(self, run_uid: str, start: dict) -> None:
        with self._lock:
            self._seq.clear()
            for values in self._values.values():
                values.clear()
            self._latest, self._run, self._status, self._fresh = None, run_uid, "running", True
            self._new_run = True  # the GUI's thread resets the limits (never this one: it may be drawing)
            self._planned = int(start.get("num_points") or 0)  # the seq_num axis spans the planned frames

    def write(self, result) -> None:
        """Keep the last frame and the observables of every frame (no drawing here)."""
        columns = {"chi2": np.asarray(result.chi2, float), **result.observables}
        seq = result.frames.seq_nums
        with self._lock:
            self._seq.extend(int(s) for s in seq)
            for name, values in self._values.items():
                values.extend(np.asarray(columns.get(name, np.full(len(seq), np.nan)), float).tolist())
            self._latest = (result.amplitude[-1].copy(), result.phase[-1].copy(), int(seq[-1]))
            self._fresh = True

    def close_run(self, run_uid: str, summary: dict) -> None:
        with self._lock:
            self._status = f"done ({summary.get('stop', {}).get('exit_status', '')})"
            self._fresh = True

    # -- the GUI side ---------------------------------------------------------------------
    @property
    def figure(self):
        """The figure (made on first use)."""
        if self._fig is None:
            import matplotlib.pyplot as plt

            self._fig = plt.figure(figsize=(11, 6.5))
        if not self._artists:
            self._layout()
        return self._fig

    def _layout(self) -> None:
        fig = self._fig
        grid = fig.add_gridspec(len(self.trends), 3, width_ratios=(1, 1, 1.6))
        amp_ax, strain_ax = fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[:, 1])
        blank = np.zeros((2, 2))
        amp = amp_ax.imshow(blank, cmap="viridis", vmin=0, vmax=1)
        amp_ax.set_title("amplitude")
        fig.colorbar(amp, ax=amp_ax, fraction=0.046, shrink=0.6)
        phase = strain_ax.imshow(blank, cmap="RdBu_r", vmin=-np.pi, vmax=np.pi)
        strain_ax.set_title("strain phase (rad)")
        fig.colorbar(phase, ax=strain_ax, fraction=0.046, shrink=0.6)
        for ax in (amp_ax, strain_ax):
            ax.set_xticks([])
            ax.set_yticks([])
        lines = {}
        for i, name in enumerate(self.trends):
            ax = fig.add_subplot(grid[i, 2])
            (lines[name],) = ax.plot([], [], lw=1, label=name)
            unit = OBSERVABLES[name][0]
            ax.set_ylabel(f"{name}\n({unit})" if unit else name, fontsize=8)
            ax.tick_params(labelsize=7)
            if i < len(self.trends) - 1:
                ax.tick_params(labelbottom=False)
        fig.axes[-1].set_xlabel("seq_num")
        self._artists = {"amplitude": amp, "strain": phase, "lines": lines, "title": fig.suptitle("")}

    def update(self) -> bool:
        """Redraw if anything new came (False: nothing to do). Call from the GUI's thread.

        Only the images, the trend lines and the title are drawn over a saved background (blitting);
        the whole figure is drawn again only when a trend outgrows its axes' limits (they grow with
        headroom), and then at most every ``WHOLE_INTERVAL`` seconds: it costs 10-20 blitted updates."""
        with self._lock:
            if not self._fresh:
                return False
            self._fresh = False
            latest, run, status, new_run = self._latest, self._run, self._status, self._new_run
            self._new_run = False
            seq = np.fromiter(self._seq, float, len(self._seq))
            values = {name: np.fromiter(v, float, len(v)) for name, v in self._values.items()}
        fig = self.figure  # made on first use, with its artists
        art = self._artists
        if new_run:  # new limits for the new run: the whole figure is drawn below
            self._background = None
            for ax in fig.axes:
                ax._cdinn_limits = None
        if latest is not None:
            amp, phase, last = latest
            top = float(amp.max()) or 1.0
            art["amplitude"].set_data(amp / top)
            shown = strain_map(amp, phase)
            art["strain"].set_data(np.where(amp > SUPPORT_FRACTION * top, shown, np.nan))
            art["title"].set_text(f"run {run[:8]}  frame {last}  ({len(seq)} frames shown)  {status}")
        else:
            art["title"].set_text(f"run {run[:8]}  {status}")
        for line in art["lines"].values():
            line.set_data(seq, values[line.get_label()])
        now = time.monotonic()
        rescaled = False
        if self._background is None or now - self._drawn_whole > WHOLE_INTERVAL:  # at most so often: dear
            for line in art["lines"].values():
                rescaled |= _grow_limits(line.axes, seq, values[line.get_label()], self._planned)
        if rescaled:
            self._drawn_whole = now
        self._draw(rescaled)
        self.redraws += 1
        self.redraw_times.append(time.monotonic())
        return True

    def _draw(self, whole: bool) -> None:
        """Draw the changing artists over their axes' saved backgrounds (the title, whose text is
        dear to draw, every ``TITLE_INTERVAL`` s), or the whole figure and save the backgrounds."""
        fig, art = self._fig, self._artists
        canvas = fig.canvas
        changing = [art["amplitude"], art["strain"], *art["lines"].values()]
        if not getattr(canvas, "supports_blit", False):
            canvas.draw_idle()
            return
        now = time.monotonic()
        if whole or self._background is None:
            for artist in [*changing, art["title"]]:
                artist.set_animated(True)
            canvas.draw()  # everything but the changing artists
            top = art["title"].get_window_extent(canvas.get_renderer())
            strip = Bbox.from_extents(fig.bbox.x0, top.y0 - 2, fig.bbox.x1, fig.bbox.y1)
            self._background = {id(ax): canvas.copy_from_bbox(ax.bbox) for ax in {a.axes for a in changing}}
            self._background["title"] = (canvas.copy_from_bbox(strip), strip)
            self._titled = 0.0
        for ax in {a.axes for a in changing}:
            canvas.restore_region(self._background[id(ax)])
        for artist in changing:
            artist.axes.draw_artist(artist)
        for ax in {a.axes for a in changing}:
            canvas.blit(ax.bbox)
        if now - self._titled > TITLE_INTERVAL:
            region, strip = self._background["title"]
            canvas.restore_region(region)
            fig.draw_artist(art["title"])
            canvas.blit(strip)
            self._titled = now


    def start(self) -> LiveReconstructionView:
        """Redraw from the GUI's event loop, ``rate`` times a second at most (a canvas timer; an
        interactive backend runs it: ``%matplotlib qt`` or ``widget``)."""
        fig = self.figure
        if self._timer is None:
            self._timer = fig.canvas.new_timer(interval=max(int(1000 / self.rate), 1))
            self._timer.add_callback(self._tick)
            self._timer.start()
        if hasattr(fig, "show") and fig.canvas.manager is not None:
            fig.show()
        return self

    def _tick(self) -> None:
        """The timer's callback: :meth:`update`, returning nothing (matplotlib drops a timer
        callback that returns False or 0, and ``update`` says False when nothing came)."""
        self.update()

    def stop(self) -> None:
        """Stop redrawing (the figure stays as it is)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None


def _grow_limits(ax, x: np.ndarray, y: np.ndarray, planned: int = 0) -> bool:
    """Widen ``ax``'s limits to hold the data, with headroom (x to the run's ``planned`` frames, or
    to twice what is there; y by half the range); True when they changed. Limits only grow within a
    run, so redraws of the whole figure are few."""
    finite = np.isfinite(y)
    if not len(x) or not finite.any():
        return False
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    fresh = getattr(ax, "_cdinn_limits", None) is None
    changed = False
    if fresh or x.max() > x1 or x.min() < x0:
        first = float(x.min())
        ax.set_xlim(first, max(first + 10, planned, first + 2 * (x.max() - first)))
        changed = True
    lo, hi = float(y[finite].min()), float(y[finite].max())
    if fresh or lo < y0 or hi > y1:
        pad = max(0.5 * (hi - lo), 1e-3 * max(abs(hi), 1e-9))
        ax.set_ylim(lo - pad, hi + pad)
        changed = True
    ax._cdinn_limits = True
    return changed
