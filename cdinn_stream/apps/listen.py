"""``cdinn-stream listen``: subscribe to the ZeroMQ results and print (or plot) what arrives."""

from __future__ import annotations

import time

import numpy as np
import zmq

from ..sinks.zmq import decode_message

__all__ = ["listen", "Tally"]


class Tally:
    """Frames received per run, and frames missed: results, stop messages and heartbeats say how
    many frames of a run the publisher sent (``run_frames``), so a subscriber that fell behind (past the
    publisher's high-water mark, where ZeroMQ drops messages for that subscriber) knows what it lost."""

    def __init__(self):
        self.received: dict[str, int] = {}
        self.missed: dict[str, int] = {}
        self.messages = 0

    @property
    def frames(self) -> int:
        return sum(self.received.values())

    def add(self, topic: str, header: dict, amplitude: np.ndarray | None) -> int | None:
        """Count one decoded message; at a run's stop, returns the frames this subscriber missed."""
        self.messages += 1
        uid = header.get("run_uid")
        if topic == "cdinn.result" and amplitude is not None:
            self.received[uid] = self.received.get(uid, 0) + len(amplitude)
            self._published(uid, header.get("run_frames"))
        elif topic == "cdinn.start":
            self.received.setdefault(uid, 0)
        elif topic == "cdinn.stop":
            self._published(uid, header.get("run_frames"))  # what the publisher sent, not what came in
            return self.missed.get(uid, 0)
        elif topic == "cdinn.heartbeat":
            for run, frames in (header.get("runs") or {}).items():
                if run in self.received:  # runs this subscriber saw
                    self._published(run, frames)
        return None

    def _published(self, uid: str, frames: int | None) -> None:
        """The publisher had sent ``frames`` frames of run ``uid``: what we lack is missed."""
        if frames is not None:
            self.missed[uid] = max(int(frames) - self.received.get(uid, 0), self.missed.get(uid, 0), 0)

    def summary(self) -> dict:
        return {"messages": self.messages, "frames": self.frames, "runs": len(self.received),
                "missed": sum(self.missed.values())}


def listen(address: str, *, count: int | None = None, timeout: float | None = None, plot: str | None = None,
           quiet: bool = False) -> dict:
    """Print one line per message from ``address``; stop after ``count`` frames or ``timeout`` s of silence
    (heartbeats do not break a silence).

    With ``plot=PATH``, the latest amplitude and phase are saved as a PNG at every stop message.
    Returns counts: messages, frames, runs, and frames missed (see :class:`Tally`).
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"cdinn.")
    sock.connect(address)
    tally = Tally()
    latest = None
    try:
        last = time.monotonic()
        while count is None or tally.frames < count:
            left = None if timeout is None else timeout - (time.monotonic() - last)
            if left is not None and left <= 0:
                break  # silence: heartbeats alone do not count as activity
            if not sock.poll(None if left is None else int(left * 1000) + 1):
                break
            topic, header, amp, phase = decode_message(sock.recv_multipart())
            if topic != "cdinn.heartbeat":
                last = time.monotonic()
            missed = tally.add(topic, header, amp)
            if topic == "cdinn.refined":
                if not quiet:
                    print(f"{header['run_uid'][:8]} refined seq {header['seq_num']} ({header['iterations']} ER/HIO "
                          f"iterations): chi2 {np.median(header['chi2_nn']):.4f} -> "
                          f"{np.median(header['chi2_refined']):.4f}", flush=True)
            elif amp is not None:
                latest = (header, amp[-1], phase[-1])
                if not quiet:
                    seq = header["seq_num"]
                    lat = 1e3 * float(np.median(header["latency_s"]))
                    trust = f" chi2 {np.median(header['chi2']):.4f}" if header.get("chi2") else ""
                    swapped = f" model v{header['model_version']}" if header.get("model_version") else ""
                    print(f"{header['run_uid'][:8]} seq {seq[0]}..{seq[-1]} ({len(seq)} frames) "
                          f"peak {header['peak'][-1]} support {(amp[-1] > 0.1).sum()} px{trust}{swapped} "
                          f"latency {lat:.1f} ms", flush=True)
            elif topic == "cdinn.start":
                if not quiet:
                    print(f"run {header['run_uid']} started", flush=True)
            elif topic == "cdinn.stop":
                if not quiet:
                    print(f"run {header['run_uid']} done: {header.get('run_frames')} frames published"
                          + (f"; MISSED {missed} (this subscriber fell behind the publisher)" if missed else ""),
                          flush=True)
                if plot and latest is not None:
                    _plot(plot, *latest)
    finally:
        sock.close()
    return tally.summary()


def _plot(path: str, header: dict, amplitude: np.ndarray, phase: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(6, 3), dpi=100)
    ax[0].imshow(amplitude, cmap="gray", vmin=0, vmax=1)
    ax[0].set_title("amplitude")
    im = ax[1].imshow(np.where(amplitude > 0.1, phase, np.nan), cmap="twilight_shifted", vmin=-np.pi, vmax=np.pi)
    ax[1].set_title("phase (rad)")
    fig.colorbar(im, ax=ax[1])
    fig.suptitle(f"run {header['run_uid'][:8]} seq_num {header['seq_num'][-1]} ({time.strftime('%H:%M:%S')})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
