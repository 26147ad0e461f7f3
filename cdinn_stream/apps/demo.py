"""``cdinn-stream demo``: the whole pipeline on one machine, on 127.0.0.1 only.

Starts an embedded Tiled server (temporary SQLite catalog, random API key), the EPICS IOC and a
ZeroMQ listener; runs a simulated operando Bragg CDI scan (the strain evolves and the Bragg peak
moves across the detector) with a RunEngine that stores raw data with ``TiledWriter`` and
reconstructs live; then replays the stored run from Tiled through the same callback and checks
that the results match. Prints a summary table (``--json``: JSON) and writes a PNG montage of
truth vs reconstruction over the scan.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

__all__ = ["DemoConfig", "run_demo", "loopback_epics_env", "summary_table", "clean_chi2_median"]


@dataclass
class DemoConfig:
    """Options of :func:`run_demo`.

    Attributes:
        frames: frames in the scan.
        model: shipped model name or weights path.
        photons: photons per frame (Poisson noise).
        background: mean background counts per pixel.
        out_dir: where the summary JSON and the montage PNG go.
        seed: seed of the crystal and the noise.
        batch_size: most frames per model call.
        max_latency: seconds a frame waits for a batch to fill.
        frame_shape: detector size (rows, columns).
        prefix: EPICS PV prefix.
        recipe: the sample: a paper-recipe crystal (``"paper"``) or a crystal of the realistic
            recipe with the Bragg peak off the window's centre (``"crystal"``,
            :class:`~cdinn_stream.lab.sim.OperandoCrystal`).
        refine_above: frames whose chi^2 is above this are refined automatically (NN-seeded
            ER/HIO, ``docs/pipeline.md`` "Trust and self-repair"); ``None``: off.
        refine_budget: at most this fraction of the frames refined automatically.
        detector: a detector at its native size instead of ``frame_shape`` (``"eiger1m"``,
            ``"eiger4m"``: :data:`~cdinn_stream.lab.sim.DETECTORS`): its frame, no counts in its
            module gaps (the mask goes to the pipeline), the Bragg peak a third of the way down, peak
            tracking at work.
    """

    frames: int = 300
    model: str = "cdinn-32"
    photons: float = 1e6
    background: float = 0.5
    out_dir: str = "demo-output"
    seed: int = 1
    batch_size: int = 64
    max_latency: float = 0.02
    frame_shape: tuple[int, int] = (128, 128)
    prefix: str = "CDINNDEMO:"
    recipe: str = "paper"
    refine_above: float | None = 0.03
    refine_budget: float = 0.2
    detector: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_epics_env(port: int | None = None) -> int:
    """Point Channel Access (server and client) at 127.0.0.1 on a free port; returns the port.
    Must run before pyepics is first used in the process."""
    port = port or _free_port()
    os.environ.update(EPICS_CA_ADDR_LIST="127.0.0.1", EPICS_CA_AUTO_ADDR_LIST="NO",
                      EPICS_CA_SERVER_PORT=str(port), EPICS_CAS_SERVER_PORT=str(port),
                      EPICS_CAS_INTF_ADDR_LIST="127.0.0.1", EPICS_CAS_AUTO_BEACON_ADDR_LIST="NO",
                      EPICS_CAS_BEACON_ADDR_LIST="127.0.0.1")
    return port


def run_demo(cfg: DemoConfig, *, progress: bool = True) -> dict:
    """Run the demo; returns the summary (also written to ``out_dir/summary.json``)."""
    if os.environ.get("EPICS_CA_ADDR_LIST") != "127.0.0.1" or "EPICS_CAS_SERVER_PORT" not in os.environ:
        loopback_epics_env()  # keep the demo's Channel Access on this machine
    import torch
    from bluesky import RunEngine
    from bluesky.plans import scan
    from bluesky_tiled_plugins import TiledWriter
    from tiled.client import from_uri
    from tqdm.auto import tqdm

    try:
        import caproto  # noqa: F401  (the IOC)
        import epics  # noqa: F401  (pyepics, read back)
        from tiled.server import SimpleTiledServer
    except ImportError as err:
        raise ImportError(f"cdinn-stream demo runs a Tiled server and an EPICS IOC ({err}): "
                          "pip install 'cdinn-stream[all]'") from err

    from ..core.metrics import score
    from ..core.physics import ramp, wrap
    from ..lab.sim import DETECTORS, BCDIFrameSource, OperandoCrystal, make_detector, make_motors
    from ..nn.reconstruct import load_model
    from ..sinks import read_frame_info
    from .config import PipelineConfig
    from .ioc import IOCThread
    from .listen import listen
    from .replay import replay_documents, run_documents

    mask, peak_row = None, None
    cfg = replace(cfg)  # the caller's config stays as given
    if cfg.detector is not None:
        if cfg.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {sorted(DETECTORS)}, not {cfg.detector!r}")
        geometry = DETECTORS[cfg.detector]
        cfg.frame_shape, mask, peak_row = geometry.shape, geometry.mask(), geometry.shape[0] // 3
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="cdinn-demo-"))
    model = load_model(cfg.model)
    summary: dict = {"config": asdict(cfg), "model": model.name, "device": str(model.device),
                     "precision": model.precision}
    with SimpleTiledServer(directory=tmp / "tiled", api_key=secrets.token_hex(16)) as server:
        client = from_uri(server.uri)
        ioc = IOCThread(cfg.prefix).start()
        pipeline = PipelineConfig(model=cfg.model, batch_size=cfg.batch_size, max_latency=cfg.max_latency,
                                  zmq_out=f"tcp://127.0.0.1:{_free_port()}", epics_prefix=cfg.prefix,
                                  spool_dir=str(tmp / "spool"),  # never the user's own spool
                                  refine_above=cfg.refine_above, refine_budget=cfg.refine_budget)
        cb = pipeline.build(model=model, tiled_client=client, mask=mask)
        heard: dict = {}
        listener = threading.Thread(target=lambda: heard.update(listen(pipeline.zmq_out, count=cfg.frames, timeout=10,
                                                                    quiet=True)),
                                    daemon=True)
        listener.start()
        time.sleep(0.3)  # let the subscriber connect before the first message
        peak, strain = make_motors()
        crystal = OperandoCrystal(model.size, seed=cfg.seed, recipe=cfg.recipe)
        source = BCDIFrameSource(crystal, frame_shape=cfg.frame_shape, photons=cfg.photons,
                                 background=cfg.background, peak_motor=peak, strain_motor=strain, seed=cfg.seed,
                                 peak_row=peak_row, mask=mask)
        detector = make_detector(source)
        RE = RunEngine({})
        RE.subscribe(TiledWriter(client))
        RE.subscribe(cb)
        bar = tqdm(total=cfg.frames, desc="live scan", unit="frame", disable=not progress)
        RE.subscribe(lambda name, doc: bar.update(1) if name == "event" else None)
        w = cfg.frame_shape[1]
        t0 = time.monotonic()
        (uid,) = RE(scan([detector], strain, 0.0, 1.0, peak, w * 0.25, w * 0.75, cfg.frames), purpose="cdinn demo")
        scan_s = time.monotonic() - t0
        cb.flush(timeout=120)
        live_s = time.monotonic() - t0
        bar.close()
        listener.join(15)
        import epics

        pv_frames = epics.caget(cfg.prefix + "FRAMES", timeout=2.0)
        live = client["cdinn"][uid]
        amp, phase, trust = live["amplitude"].read(), live["phase"].read(), live["chi2"].read()
        refined = ({k: live[f"refined_{k}"].read() for k in ("seq_num", "chi2_nn", "chi2")}
                   if "refined_seq_num" in live else {"seq_num": np.zeros(0, int), "chi2_nn": np.zeros(0),
                                                      "chi2": np.zeros(0)})
        info = read_frame_info(live)
        seq, crop_peaks = info["seq_num"], np.asarray(info["peak"]).reshape(-1, 2)
        stats = cb.stats()
        cb.close()

        # replay the stored run through the same pipeline
        rcb = PipelineConfig(model=cfg.model, batch_size=cfg.batch_size, max_latency=cfg.max_latency,
                             tiled_parent="cdinn-replay", spool_dir=str(tmp / "spool")).build(model=model,
                                                                                             tiled_client=client,
                                                                                             mask=mask)
        t1 = time.monotonic()
        with tqdm(desc="replay", unit="doc", disable=not progress) as rbar:
            replay_documents(run_documents(client, uid), lambda n, d: (rcb(n, d), rbar.update(1)))
        rcb.flush(timeout=120)
        replay_s = time.monotonic() - t1
        rcb.close()
        replayed = client["cdinn-replay"][uid]
        r_amp = replayed["amplitude"].read()
        r_phase = replayed["phase"].read()
        # end Channel Access while the IOC still answers: against a stopped IOC, pyepics' exit
        # waits out the connection timeout (about 30 s)
        epics.ca.finalize_libca()
        ioc.stop()
    shutil.rmtree(tmp, ignore_errors=True)  # the embedded server's files and the demo's spool

    truth = [source.truth[i - 1] for i in seq]
    true_amp = np.stack([t.amplitude for t in truth])
    true_phase = np.stack([t.phase for t in truth])
    clean = np.stack([t.intensity for t in truth])
    # the clean pattern as the pipeline cropped it: its window centred where the crop put the
    # peak, which for an off-centre Bragg peak is not where the simulator centred its window
    moved = crop_peaks - np.array([t.peak for t in truth])
    seen = np.stack([np.roll(c, tuple(-d), axis=(0, 1)) for c, d in zip(clean, moved, strict=True)])
    undo = ramp(torch.from_numpy(moved), true_amp.shape[-1]).numpy()  # the crop's ramp, for the truth too
    true_seen = np.where(true_amp > 0.1, wrap(true_phase - undo), 0)
    m = score(amp, phase, true_amp, true_seen, seen)
    ref = model.predict(clean)  # the same crystal states, noise-free, as the simulator centred them
    same_chi2 = float(np.median(score(ref.amplitude, ref.phase, true_amp, true_phase, clean)["chi2"]))
    card_chi2 = clean_chi2_median(model, cfg.recipe)
    e2e_chi2 = float(np.median(m["chi2"]))
    summary.update({
        "run_uid": uid,
        "frames": {"events": cfg.frames, "in": stats["frames_in"], "out": stats["frames_out"],
                   "dropped": stats["frames_dropped"], "rejected": sum(stats["rejected"].values()),
                   "in_tiled": int(len(amp)), "over_zeromq": heard.get("frames", 0), "epics_frames_pv": pv_frames},
        "frames_per_s": cfg.frames / live_s,
        "scan_seconds": scan_s,
        "live_seconds": live_s,
        "latency_ms": {"model": {"p50": stats["latency_p50_ms"], "p99": stats["latency_p99_ms"]},
                       **{name: {"p50": v["latency_p50_ms"], "p99": v["latency_p99_ms"]}
                          for name, v in (("zeromq", stats["sinks"].get("ZmqPublisherSink")),
                                          ("tiled", stats["sinks"].get("TiledSink"))) if v}},
        "recipe": cfg.recipe,
        "crop_moved_px": {"median": float(np.median(np.abs(moved).max(axis=1))),
                          "max": int(np.abs(moved).max()) if len(moved) else 0},
        "accuracy": {k: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90))} for k, v in m.items()},
        "model_clean_chi2_median": card_chi2,
        "same_states_clean_chi2_median": same_chi2,
        "chi2_ratio": {"vs_model_clean": e2e_chi2 / card_chi2 if card_chi2 else None,
                       "vs_same_states_clean": e2e_chi2 / same_chi2},
        "trust": _trust(trust, seq, refined, cfg.refine_above, cfg.refine_budget, stats["refined"]),
        "replay": {"seconds": replay_s, "frames": int(len(r_amp)),
                   "max_abs_diff_amplitude": float(np.abs(r_amp - amp).max()) if r_amp.shape == amp.shape else None,
                   "max_abs_diff_phase": float(np.abs(wrap(r_phase - phase)).max())
                                         if r_phase.shape == phase.shape else None},
        "tiled": {"raw": f"<server>/{uid}", "live": f"<server>/cdinn/{uid}", "replay": f"<server>/cdinn-replay/{uid}"},
    })
    if cfg.recipe == "crystal":  # show the strain: the off-centre peak's ramp would hide it
        from ..core.physics import strain as strain_view

        true_phase, phase = strain_view(true_amp, true_phase), strain_view(amp, phase)
    _montage(out / "montage.png", true_amp, true_phase, amp, phase, seq, [t.strain for t in truth],
             phase_label="strain" if cfg.recipe == "crystal" else "phase", chi2=trust, refined=refined,
             above=cfg.refine_above)
    summary["montage"] = str(out / "montage.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def summary_table(s: dict) -> str:
    """The demo summary as a text table."""
    f, a = s["frames"], s["accuracy"]
    rows = [("run uid", s["run_uid"]),
            ("model / device / precision", f"{s['model']} / {s['device']} / {s['precision']}"),
            ("frames: events / in / out", f"{f['events']} / {f['in']} / {f['out']}"),
            ("frames: dropped / rejected", f"{f['dropped']} / {f['rejected']}"),
            ("frames: in Tiled / over ZeroMQ / EPICS PV",
             f"{f['in_tiled']} / {f['over_zeromq']} / {f['epics_frames_pv']}"),
            ("throughput (frames/s, scan included)", f"{s['frames_per_s']:.1f}"),
            *((f"latency p50 / p99 (ms), frame in to {k}", f"{v['p50']:.1f} / {v['p99']:.1f}")
              for k, v in s["latency_ms"].items() if v["p50"] is not None),
            ("support IoU median", f"{a['support_iou']['median']:.3f}"),
            ("sample", s.get("recipe", "paper") + " recipe"),
            ("phase RMSE median (rad)", f"{a['phase_rmse']['median']:.3f}"),
            ("phase RMSE, ramp removed, median (rad)", f"{a['strain_rmse']['median']:.3f}"
             if "strain_rmse" in a else "-"),
            ("chi2 median (vs clean truth)", f"{a['chi2']['median']:.4f}"),
            ("  model on its clean evaluation set", _ratio(s["model_clean_chi2_median"],
                                                            s["chi2_ratio"]["vs_model_clean"])),
            ("  model on these states, clean + centred", _ratio(s["same_states_clean_chi2_median"],
                                                                 s["chi2_ratio"]["vs_same_states_clean"])),
            *_trust_rows(s.get("trust")),
            ("replay: frames / max |diff|", f"{s['replay']['frames']} / amplitude "
                                            f"{s['replay']['max_abs_diff_amplitude']}, phase "
                                            f"{s['replay']['max_abs_diff_phase']}"),
            ("montage", s["montage"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _trust(chi2: np.ndarray, seq: np.ndarray, refined: dict, above: float | None, budget: float,
           counts: dict | None) -> dict:
    """The run's trust figures: chi^2 per frame against its measured crop, and what automatic
    refinement did (the run's median with each refined frame's refined chi^2 in place)."""
    best = dict(zip(seq.tolist(), chi2.tolist(), strict=True))
    best.update(zip(refined["seq_num"].tolist(), np.minimum(refined["chi2"], refined["chi2_nn"]).tolist(),
                    strict=True))
    doubtful = int((chi2 > above).sum()) if above is not None else 0
    return {"chi2_median": float(np.median(chi2)), "chi2_p90": float(np.percentile(chi2, 90)),
            "refine_above": above, "refine_budget": budget, "doubtful": doubtful,
            "refined": int(len(refined["seq_num"])), "over_budget": (counts or {}).get("over_budget", 0),
            "refined_chi2_median_before": float(np.median(refined["chi2_nn"])) if len(refined["chi2"]) else None,
            "refined_chi2_median_after": float(np.median(refined["chi2"])) if len(refined["chi2"]) else None,
            "chi2_median_with_refined": float(np.median(list(best.values())))}


def _trust_rows(t: dict | None) -> list[tuple[str, str]]:
    if not t:
        return []
    rows = [("chi2 per frame vs its measured crop, median / p90", f"{t['chi2_median']:.4f} / {t['chi2_p90']:.4f}")]
    if t["refine_above"] is None:
        return rows + [("automatic refinement", "off")]
    rows.append((f"frames refined automatically (chi2 > {t['refine_above']:g}, budget {t['refine_budget']:.0%})",
                 f"{t['refined']} of {t['doubtful']} doubtful ({t['over_budget']} over budget)"))
    if t["refined"]:
        rows.append(("  refined frames: chi2 median before -> after",
                     f"{t['refined_chi2_median_before']:.4f} -> {t['refined_chi2_median_after']:.5f}"))
        rows.append(("  run's chi2 median, refined frames counted refined", f"{t['chi2_median_with_refined']:.4f}"))
    return rows


def _ratio(reference: float | None, ratio: float | None) -> str:
    if reference is None or ratio is None:
        return "n/a (the model card has no evaluation)"
    return f"{reference:.4f}  (live / this = {ratio:.2f}x; target <= 1.5x)"


def clean_chi2_median(model, recipe: str = "paper") -> float | None:
    """The model card's median chi^2 on its clean evaluation set of ``recipe`` (``None`` when it has none)."""
    key = "evaluation_crystal" if recipe == "crystal" else "evaluation"
    nn = model.card.get(key, {}).get("methods", {}).get("nn", {})
    return nn.get("metrics", {}).get("chi2", {}).get("median")


def _montage(path: Path, true_amp, true_phase, amp, phase, seq, strain, k: int = 8, phase_label: str = "phase",
             chi2: np.ndarray | None = None, refined: dict | None = None, above: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.physics import masked_phase

    idx = np.linspace(0, len(amp) - 1, min(k, len(amp))).astype(int)
    fig = plt.figure(figsize=(1.7 * len(idx), 9.2), dpi=100)
    grid = fig.add_gridspec(5, len(idx), height_ratios=[1, 1, 1, 1, 1.1])
    ax = np.array([[fig.add_subplot(grid[r, j]) for j in range(len(idx))] for r in range(4)])
    rows = [("true shape", true_amp, "gray", 0, 1), ("NN shape", amp, "gray", 0, 1),
            (f"true {phase_label}", true_phase, "twilight_shifted", -np.pi, np.pi),
            (f"NN {phase_label}", masked_phase(amp, phase), "twilight_shifted", -np.pi, np.pi)]
    for r, (label, arr, cmap, vmin, vmax) in enumerate(rows):
        for j, i in enumerate(idx):
            ax[r, j].imshow(arr[i], cmap=cmap, vmin=vmin, vmax=vmax)
            ax[r, j].set_xticks([])
            ax[r, j].set_yticks([])
            if r == 0:
                ax[r, j].set_title(f"seq {seq[i]}\nstrain {strain[i]:.2f}", fontsize=8)
            if r == 3 and chi2 is not None:
                ax[r, j].set_xlabel(f"chi2 {chi2[i]:.4f}", fontsize=8)
        ax[r, 0].set_ylabel(label, fontsize=9)
    if chi2 is not None:  # the trust figure of every frame, and what refinement made of the doubtful ones
        trend = fig.add_subplot(grid[4, :])
        trend.semilogy(seq, chi2, ".", ms=3, label="NN, every frame")
        if refined is not None and len(refined["seq_num"]):
            trend.semilogy(refined["seq_num"], refined["chi2"], "x", ms=4, label="refined automatically")
        if above is not None:
            trend.axhline(above, color="gray", lw=0.8, ls="--", label=f"refine above {above:g}")
        trend.set_xlabel("seq_num")
        trend.set_ylabel("chi2 vs measured crop", fontsize=9)
        trend.legend(fontsize=7, loc="upper right")
        trend.grid(alpha=0.3)
    fig.suptitle("Operando scan: truth vs live reconstruction (twins and shifts are equivalent)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
