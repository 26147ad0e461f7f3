"""``cdinn-stream listen``: subscribe to the ZeroMQ results and print (or plot) what arrives."""

from __future__ import annotations

import time

import numpy as np
import zmq

from .sinks.zmq import decode_message

__all__ = ["listen"]


def listen(address: str, *, count: int | None = None, timeout: float | None = None, plot: str | None = None,
           quiet: bool = False) -> dict:
    """Print one line per message from ``address``; stop after ``count`` frames or ``timeout`` s of silence.

    With ``plot=PATH``, the latest amplitude and phase are saved as a PNG at every stop message.
    Returns counts: messages, frames, runs.
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"cdinn.")
    sock.connect(address)
    stats = {"messages": 0, "frames": 0, "runs": 0}
    latest = None
    try:
        while count is None or stats["frames"] < count:
            if not sock.poll(int(timeout * 1000) if timeout else None):
                break
            topic, header, amp, phase = decode_message(sock.recv_multipart())
            stats["messages"] += 1
            if amp is not None:
                stats["frames"] += len(amp)
                latest = (header, amp[-1], phase[-1])
                if not quiet:
                    seq = header["seq_num"]
                    lat = 1e3 * float(np.median(header["latency_s"]))
                    print(f"{header['run_uid'][:8]} seq {seq[0]}..{seq[-1]} ({len(seq)} frames) "
                          f"peak {header['peak'][-1]} support {(amp[-1] > 0.1).sum()} px "
                          f"latency {lat:.1f} ms", flush=True)
            elif topic == "cdinn.start":
                stats["runs"] += 1
                if not quiet:
                    print(f"run {header['run_uid']} started", flush=True)
            elif topic == "cdinn.stop":
                if not quiet:
                    print(f"run {header['run_uid']} done: {header.get('frames')} frames", flush=True)
                if plot and latest is not None:
                    _plot(plot, *latest)
    finally:
        sock.close()
    return stats


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
