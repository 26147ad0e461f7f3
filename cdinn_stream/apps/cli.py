"""The ``cdinn-stream`` command line: simulate, train, evaluate, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..nn.options import DEFAULT_MODEL, PRECISION_HELP, PRECISIONS
from ..sinks.zmq import DEFAULT_ADDRESS as ZMQ_ADDRESS
from .view import DEFAULT_PORT as VIEW_PORT

__all__ = ["main"]

if TYPE_CHECKING:
    from .config import PipelineConfig


def _widths(text: str) -> tuple[int, ...]:
    return tuple(int(w) for w in text.split(","))


def _cmd_simulate(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from ..core.simulate import simulate

    with tqdm(total=args.n, desc="simulating", unit="sample") as bar:
        data = simulate(args.n, args.size, seed=args.seed, photons=args.photons, background=args.background,
                        pad=args.pad, remove_ramp=args.remove_ramp, progress=bar.update, workers=args.workers,
                        recipe=args.recipe, offset=args.offset)
    if args.out.endswith(".npz"):
        np.savez_compressed(args.out, intensity=data.intensity, amplitude=data.amplitude, phase=data.phase)
    else:  # a folder of .npy files: fast to write and memory-mapped by train --data
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for key in ("intensity", "amplitude", "phase"):
            np.save(Path(args.out) / f"{key}.npy", getattr(data, key))
    print(f"wrote {len(data)} samples to {args.out} (intensity {data.intensity.shape}, amplitude, phase)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from ..lab.train import RUNTIME_FIELDS, TrainConfig, resume_config, train

    if args.photons is not None and len(args.photons) > 2:
        raise ValueError("--photons takes one number (photons per frame) or two (LOW HIGH)")
    # TrainConfig field: (its flag, the value given, None when not given); the defaults are TrainConfig's,
    # or with --resume the stored recipe's
    options = {
        "size": ("--size", args.size), "widths": ("--widths", args.widths),
        "convs_per_stage": ("--convs-per-stage", args.convs_per_stage),
        "space_to_depth": ("--space-to-depth", args.space_to_depth), "patterson": ("--patterson", args.patterson),
        "phase_head": ("--phase-head", args.phase_head),
        "n_train": ("--n-train", args.n_train), "n_val": ("--n-val", args.n_val),
        "batch_size": ("--batch-size", args.batch_size), "epochs": ("--epochs", args.epochs),
        "patience": ("--patience", args.patience), "lr": ("--lr", args.lr), "seed": ("--seed", args.seed),
        "max_minutes": ("--max-minutes", args.max_minutes), "threads": ("--threads", args.threads),
        "photons": ("--photons", None if args.photons is None else (
            args.photons[0] if len(args.photons) == 1 else tuple(args.photons))),
        "background": ("--background", args.background), "fourier_weight": ("--fourier-weight", args.fourier_weight),
        "remove_ramp": ("--remove-ramp", args.remove_ramp), "init_weights": ("--init-weights", args.init_weights),
        "phase_weight": ("--phase-weight", args.phase_weight),
        "offset_invariant": ("--absolute-phase", None if args.absolute_phase is None else False),
        "support_weight": ("--support-weight", args.support_weight),
        "support_pos_weight": ("--support-pos-weight", args.support_pos_weight),
        "device": ("--device", args.device), "amp": ("--no-amp", None if args.no_amp is None else False),
        "fresh_noise": ("--fresh-noise", args.fresh_noise), "data": ("--data", args.data),
        "workers": ("--workers", args.workers), "schedule": ("--schedule", args.schedule),
        "data_recipe": ("--recipe", args.recipe), "crystal_fraction": ("--crystal-fraction", args.crystal_fraction),
        "centre": ("--centre", args.centre),
    }
    given = {field: value for field, (_, value) in options.items() if value is not None}
    out = Path(args.out)
    if args.resume:
        cfg = resume_config(out, given, flags={field: flag for field, (flag, _) in options.items()})
    else:
        cfg = TrainConfig(out_dir=out, **given)
    try:
        result = train(cfg, resume=args.resume)
    except KeyboardInterrupt:
        ckpt = out / "checkpoint.pt"
        if ckpt.is_file():
            again = ["cdinn-stream", "train", "--out", str(out), "--resume"]
            for field in RUNTIME_FIELDS:  # where and how it ran, as given: the recipe is in the checkpoint
                flag, value = options.get(field, (None, None))
                if value is not None:
                    again += [flag] if isinstance(value, bool) else [flag, str(value)]
            print(f"\ninterrupted: the last checkpoint, {ckpt}, is safe (saved at the end of the last epoch); "
                  f"resume with:\n  {shlex.join(again)}", file=sys.stderr)
        else:
            print("\ninterrupted before the first epoch ended: nothing was saved", file=sys.stderr)
        return 130
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1))
    print(f"training curve: {out / 'training_curve.png'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..lab.evaluate import CRYSTAL_PHOTON_DECADES, OFFSETS, PHOTON_DECADES, evaluate, report_table
    from ..nn.reconstruct import load_model, resolve_weights

    weights = resolve_weights(args.model, precision=args.precision)  # its sha256 goes into the report
    model = load_model(weights, device=args.device, precision=args.precision, views=args.views)
    decades = CRYSTAL_PHOTON_DECADES if args.recipe == "crystal" else PHOTON_DECADES
    offsets = None if args.offsets is None else tuple(args.offsets or OFFSETS)
    report = evaluate(model, args.out, n=args.n, seed=args.seed, photons=args.photons, erhio=not args.no_erhio,
                      erhio_iterations=args.iterations, refine_iterations=args.refine_iterations,
                      noise=None if args.noise is None else tuple(args.noise or decades), recipe=args.recipe,
                      offsets=offsets, weights=weights, data=args.data)
    print(report_table(report))
    print(f"report and figures in {args.out}/ (report.json, report.md, examples.png, best.png, worst.png)")
    return 0


def _cmd_deepen(args: argparse.Namespace) -> int:
    from ..nn.model import deepen
    from ..nn.weights import read_weights, save_weights

    deeper = deepen(read_weights(args.weights))
    save_weights(deeper, args.out, meta={"deepened_from": str(args.weights)})
    print(f"wrote {args.out}: {deeper.config}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from ..lab.card import attach_crystal_evaluation, publish

    if args.attach:
        if not args.crystal_evaluation:
            raise ValueError("--attach needs --crystal-evaluation DIR")
        card = attach_crystal_evaluation(args.attach, args.crystal_evaluation, args.models, force=args.force)
        print(f"added the crystal-recipe evaluation in {args.crystal_evaluation} to {card}")
        return 0
    if not (args.run and args.evaluation and args.name):
        raise ValueError("publish needs RUN, EVALUATION and --name (or --attach NAME --crystal-evaluation DIR)")

    card = publish(args.run, args.evaluation, args.name, args.models, lineage=args.lineage, after_card=args.after,
                   also=args.also, crystal_evaluation=args.crystal_evaluation, force=args.force)
    print(f"wrote {card} and its weights beside it")
    return 0


def _load_benchmarks():
    """The ``benchmarks`` package of the source checkout this package runs from."""
    import importlib.util

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (root / "__init__.py").is_file():
        raise SystemExit("cdinn-stream bench runs the benchmarks of a source checkout (benchmarks/): "
                         "clone the repository and install it with pip install -e '.[bench]'")
    spec = importlib.util.spec_from_file_location("benchmarks", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)
    return module


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = "bench-output" if args.device == "cpu" else "bench-output/gpu"
    bench = _load_benchmarks()
    results = bench.run_benchmarks(args.out, model_name=args.model, models=tuple(args.models),
                                   suites=tuple(args.suite), n=args.n, quick=args.quick, device=args.device)
    print(bench.bench_table(results))
    print(f"results in {args.out}/bench.json and {args.out}/bench.md")
    return 0


def _cmd_ioc(args: argparse.Namespace) -> int:
    try:
        from .ioc import client_environment, run_ioc, server_port
    except ImportError as err:
        raise SystemExit(f"cdinn-stream ioc: {err}") from None

    port = server_port(args.port)
    print(f"serving {args.prefix}AMPLITUDE, {args.prefix}PHASE, ... on {' '.join(args.interfaces)}, port {port} "
          "(Ctrl-C to stop)")
    print("Channel Access clients (EpicsSink, --epics-prefix, caget) find this IOC with, before they start:")
    print(f"export {client_environment(tuple(args.interfaces), port)}", flush=True)
    run_ioc(args.prefix, interfaces=tuple(args.interfaces), max_size=args.max_size, port=port)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    import numpy as np

    from ..lab.train import FinetuneConfig, finetune
    from ..nn.reconstruct import resolve_weights

    if not Path(args.frames).is_file():
        raise ValueError(f"no frames file {args.frames} (an .npz with an 'intensity' array)")
    try:
        data = np.load(args.frames)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {args.frames} as an .npz file ({err})") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{args.frames} holds one array: give an .npz with an 'intensity' array")
    with data:
        if "intensity" not in data.files:
            raise ValueError(f"{args.frames} has no 'intensity' array (it has {data.files})")
        intensity = data["intensity"]
    weights = str(resolve_weights(args.init_weights))
    result = finetune(FinetuneConfig(intensity=intensity, init_weights=weights, out_dir=Path(args.out),
                                     kind=args.kind, epochs=args.epochs, patience=args.patience, lr=args.lr,
                                     threads=args.threads, source=str(args.frames)))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1))
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    from ..sinks import TiledSink
    from ..sinks.spool import Spool

    spool = Spool(args.spool)
    runs = spool.runs()
    if not runs:
        print(f"nothing to backfill in {spool.root}")
        return 0
    frames = sum(spool.frames(uid) for uid in runs)
    print(f"{len(runs)} runs, {frames} frames waiting in {spool.root}")
    sink = TiledSink.from_uri(args.tiled, api_key=args.api_key or os.environ.get("TILED_API_KEY"),
                              spool_dir=spool.root)
    written = sink.backfill()
    left = spool.runs()
    for uid in left:
        server = spool.manifest(uid).get("server")
        if server and server != sink.store.location:
            print(f"run {uid} was spooled for {server}, not {sink.store.location}: give that server's URL")
    print(json.dumps({"frames_written": written, "runs_left": left}))
    return 0 if not left else 1


def _cmd_listen(args: argparse.Namespace) -> int:
    from .listen import listen

    stats = listen(args.address, count=args.count, timeout=args.timeout, plot=args.plot)
    print(json.dumps(stats))
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    from .view import serve_view

    print(json.dumps(serve_view(args.zmq, host=args.host, port=args.port, history=args.history)))
    return 0


def _pipeline(args: argparse.Namespace, *, parent: str | None = None) -> PipelineConfig:
    """The pipeline settings: the environment (``PipelineConfig.from_env``), then the options given."""
    from .config import PipelineConfig

    return PipelineConfig.from_env(model=args.model, device=args.device, precision=args.precision, views=args.views,
                                   batch_size=args.batch_size, zmq_out=args.zmq_out, tiled_uri=args.tiled_out,
                                   tiled_api_key=args.api_key, tiled_parent=parent, epics_prefix=args.epics_prefix,
                                   bin=args.bin, refine_above=args.refine_above, refine_budget=args.refine_budget,
                                   refine_share=args.refine_share,
                                   refine_window=args.refine_window, adapt=args.adapt or None)


def _cmd_replay(args: argparse.Namespace) -> int:
    if args.window is not None and not args.nats:
        raise SystemExit("replay: --window cuts the frames sent to the worker pool: it needs --nats URL")
    if args.nats:
        return _cmd_replay_nats(args)
    from .config import connect_tiled
    from .replay import replay_run

    config = _pipeline(args, parent=args.parent)
    source = connect_tiled(args.tiled, config.tiled_api_key)
    # results go to --tiled-out, else to the server the run came from (never to $TILED_URL unasked)
    cb = config.build(tiled_client=None if args.tiled_out else source)
    print(json.dumps(replay_run(source, args.uid, cb, pace=args.pace)))
    return 0


def _window_side(text: str) -> int:
    """``--window``: a side of at least :data:`~cdinn_stream.live.windows.MIN_SIDE` pixels."""
    from ..live.windows import MIN_SIDE

    side = int(text)
    if side < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"a window of {side} pixels is too small: at least the model's window on the "
                                         "detector plus 16 pixels (twice it is safe)")
    return side


def _nats_settings(args: argparse.Namespace, beamline: str):
    from ..live.jetstream import JetStreamSettings

    return JetStreamSettings(url=args.nats, prefix=args.prefix, beamline=beamline,
                             **{k: getattr(args, k) for k in ("ack_wait", "max_deliver", "max_ack_pending")
                                if getattr(args, k, None) is not None})


def _cmd_replay_nats(args: argparse.Namespace) -> int:
    from ..live.nats_publisher import JetStreamPublisher
    from .config import connect_tiled
    from .replay import replay_documents, run_documents

    source = connect_tiled(args.tiled, args.api_key or os.environ.get("TILED_API_KEY"))
    publisher = JetStreamPublisher(_nats_settings(args, args.beamline), window=args.window)
    try:
        n = replay_documents(run_documents(source, args.uid), publisher, pace=args.pace)
    finally:
        published = publisher.close()
    print(json.dumps({"documents": n, "published": published, **publisher.stats()}))
    return 0 if published else 1


def _cmd_worker(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from .worker import build_worker

    if args.adapt:
        raise ValueError("--adapt is not available in the worker pool: each worker would adapt its own weights, and "
                         "a frame redelivered to another worker would no longer give the same result")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    worker = build_worker(_pipeline(args, parent=args.parent), _nats_settings(args, args.beamline),
                          name=args.name, group=args.group, close_wait=args.close_wait)

    async def run() -> dict:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        return await worker.run(stop)

    print(f"worker {worker.name}: frames from {args.nats} (Ctrl-C to stop)", flush=True)
    print(json.dumps(asyncio.run(run()), default=str))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    if args.tiled_follow:
        return _serve_tiled_follow(args)
    from bluesky.callbacks.zmq import RemoteDispatcher

    cb = _pipeline(args).build()
    dispatcher = RemoteDispatcher(args.zmq)
    dispatcher.subscribe(cb)
    print(f"reconstructing documents from {args.zmq} (Ctrl-C to stop)", flush=True)
    try:
        dispatcher.start()
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        cb.close()
        print(json.dumps(cb.stats()))
    return 0


def _serve_tiled_follow(args: argparse.Namespace) -> int:
    """``serve --tiled-follow URL``: the runs TiledWriter writes to that server, reconstructed as they are written."""
    from .config import connect_tiled
    from .follow import follow

    config = _pipeline(args)
    source = connect_tiled(args.tiled_follow, config.tiled_api_key)  # an unreachable server: one line, exit 2
    cb = config.build()
    follower = follow(source, cb)
    print(f"reconstructing the runs written to {args.tiled_follow} as they are written (Ctrl-C to stop)", flush=True)
    try:
        follower.join()
    except KeyboardInterrupt:
        pass
    finally:
        follower.close()
        cb.close()
        print(json.dumps({**cb.stats(), "followed": follower.stats()}))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo, summary_table

    summary = run_demo(DemoConfig(frames=args.frames, model=args.model, out_dir=args.out, photons=args.photons,
                                   recipe=args.recipe, refine_budget=args.refine_budget, detector=args.detector,
                                   refine_above=None if args.refine_above < 0 else args.refine_above),
                       progress=not args.json)
    print(json.dumps(summary, indent=1, default=str) if args.json else summary_table(summary))
    return 0


def _add_sink_options(p: argparse.ArgumentParser, *, tiled_out: str = "default $TILED_URL") -> None:
    """The pipeline's options; each left out takes its environment variable, then the default
    (``PipelineConfig.from_env``, docs/pipeline.md "Configuration")."""
    p.add_argument("--zmq-out", default=None,
                   help="publish results on this ZeroMQ address (e.g. tcp://127.0.0.1:5579; default $CDINN_ZMQ_OUT)")
    p.add_argument("--tiled-out", default=None, help=f"write results to this Tiled server ({tiled_out})")
    p.add_argument("--api-key", default=None,
                   help="Tiled API key (default: $TILED_API_KEY; keep keys out of profiles and shell history)")
    p.add_argument("--epics-prefix", default=None,
                   help="write the IOC's PVs with this prefix (e.g. CDINN:; default $CDINN_EPICS_PREFIX)")
    p.add_argument("--model", default=None,
                   help=f"model name (on the model search path) or .pt path (default $CDINN_MODEL or {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cpu or cuda (default $CDINN_DEVICE, else cuda when available)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=PRECISION_HELP.replace("(default auto:", "(default $CDINN_PRECISION or auto:"))
    p.add_argument("--batch-size", type=int, default=None,
                   help="most frames per model call (default $CDINN_BATCH_SIZE or 256)")
    p.add_argument("--views", type=int, default=None, choices=range(1, 9), metavar="{1..8}",
                   help="symmetric copies of each pattern the network sees, combined (default $CDINN_VIEWS or 1; "
                        "8: more accurate, 8x the network's time)")
    p.add_argument("--bin", type=int, default=None,
                   help="crop a bin x model-size window around the Bragg peak and bin it to the model's size "
                        "(default $CDINN_BIN or 1)")
    p.add_argument("--refine-above", type=float, default=None, metavar="CHI2",
                   help="refine (NN-seeded ER/HIO) every frame whose chi2 is above this, within the budget "
                        "(default $CDINN_REFINE_ABOVE, else off; docs/pipeline.md 'Trust and self-repair')")
    p.add_argument("--refine-budget", type=float, default=None, metavar="FRACTION",
                   help="at most this fraction of each run's frames refined automatically (default "
                        "$CDINN_REFINE_BUDGET or 0.2)")
    p.add_argument("--refine-share", type=float, default=None, metavar="SHARE",
                   help="at most this share of one core's time spent refining (default $CDINN_REFINE_SHARE or 0.5)")
    p.add_argument("--refine-window", type=int, default=None,
                   help="refine on a window this many times the model's, at the same centre (with --bin equal to "
                        "it: the model's detector window unbinned; default $CDINN_REFINE_WINDOW or 1)")
    p.add_argument("--adapt", action="store_true",
                   help="adapt the model to each run live (Fourier loss on its frames) and hot-swap better weights "
                        "(default $CDINN_ADAPT, else off)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs)."""
    p = argparse.ArgumentParser(
        prog="cdinn-stream",
        description="Real-time coherent diffraction inversion (CDI NN) for Bragg CDI beamlines.",
        epilog="Each command has its own --help. Conventions: README.md, 'Conventions'.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="write simulated samples (paper or crystal recipe) to an .npz file",
                       description="Simulate random crystals (the paper's convex blobs with smooth strain phase, or "
                                   "--recipe crystal: sectioned faceted crystals with displacement-field strain, "
                                   "the Bragg peak off-centre and detector effects) and their diffraction "
                                   "intensities, and save them as intensity/amplitude/phase arrays.")
    s.add_argument("--recipe", choices=("paper", "crystal"), default="paper", help="default paper")
    s.add_argument("--offset", type=float, default=None,
                   help="the Bragg peak this many pixels off the centre (default: the recipe's own)")
    s.add_argument("out", help="output .npz file, or a folder for intensity/amplitude/phase .npy files")
    s.add_argument("--workers", type=int, default=1, help="processes (same samples for any number)")
    s.add_argument("-n", type=int, default=1000, help="number of samples (default 1000)")
    s.add_argument("--size", type=int, default=32, choices=(32, 64, 128), help="frame size N (default 32)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--photons", type=float, default=None,
                   help="Poisson noise: total photons per frame (crystal recipe: with its detector effects)")
    s.add_argument("--background", type=float, default=0.0, help="constant background per pixel")
    s.add_argument("--pad", type=int, default=1, help="zero-padding factor of the object (2: oversampled)")
    s.add_argument("--remove-ramp", action="store_true",
                   help="remove each phase's linear ramp (strain relative to the mean lattice)")
    s.set_defaults(func=_cmd_simulate)

    t = sub.add_parser("train", help="train a CDI NN on simulated data (checkpoints, resume, curve PNG)",
                       description="Adam, batch 256, 180k/20k train/validation split, early stopping on the "
                                   "validation loss, a checkpoint each epoch (--resume continues), fixed seed.",
                       epilog="--resume continues the run in OUT with the recipe stored in its checkpoint: options "
                              "left out take the stored values, options given must match them (--device, "
                              "--threads, --workers and --no-amp may change). Ctrl-C keeps the last checkpoint.")
    # the recipe's options default to None ("not given"): _cmd_train fills in TrainConfig's defaults, named in
    # the help, or with --resume the stored recipe's values
    t.add_argument("--out", default="runs/cdinn-32", help="output folder (default runs/cdinn-32)")
    t.add_argument("--size", type=int, default=None, choices=(32, 64, 128), help="frame size N (default 32)")
    t.add_argument("--widths", type=_widths, default=None,
                   help="encoder widths, comma-separated (default 32,64,128, as the paper)")
    t.add_argument("--convs-per-stage", type=int, default=None,
                   help="3x3 convolutions per stage (default 1; the paper: 2)")
    t.add_argument("--space-to-depth", type=int, default=None,
                   help="fold r x r pixel blocks into channels at input and output (default 4, the shipped "
                        "models; 1 for the paper's network: --widths 32,64,128 --convs-per-stage 2 "
                        "--space-to-depth 1)")
    t.add_argument("--patterson", action="store_true", default=None,
                   help="add the autocorrelation (inverse FFT of the intensity, the Patterson map) as two "
                        "more input channels")
    t.add_argument("--phase-head", choices=("angle", "vector"), default=None,
                   help="phase output: angle (one channel through a sigmoid, the paper's) or vector (two channels, "
                        "phase = atan2(s, c): continuous across wraps and dislocation vortices); with "
                        "--init-weights of an angle network, its vector head starts from the angle's (default angle)")
    t.add_argument("--n-train", type=int, default=None, help="training samples (default 180000, the paper's)")
    t.add_argument("--n-val", type=int, default=None,
                   help="validation samples (default 20000, the paper's); with --data, the ones after the training "
                        "samples")
    t.add_argument("--batch-size", type=int, default=None, help="samples per Adam step (default 256)")
    t.add_argument("--epochs", type=int, default=None, help="most epochs (default 30; early stopping may end sooner)")
    t.add_argument("--patience", type=int, default=None,
                   help="epochs without improvement before stopping (default 4)")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 0.001)")
    t.add_argument("--seed", type=int, default=None, help="seed of data, initial weights, shuffling (default 0)")
    t.add_argument("--photons", type=float, nargs="+", default=None, metavar="N",
                   help="train on Poisson-noisy patterns: photons per frame, or LOW HIGH for a log-uniform range "
                        "(e.g. --photons 1e4 1e7; default: noise-free)")
    t.add_argument("--background", type=float, default=None,
                   help="background counts per pixel with --photons (default 0)")
    t.add_argument("--fourier-weight", type=float, default=None,
                   help="add the physics-aware |FT| loss with this weight (default 0)")
    t.add_argument("--remove-ramp", action="store_true", default=None,
                   help="simulate strain relative to the mean lattice (linear phase ramp removed)")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="stop after the epoch past this budget (default: no limit)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    t.add_argument("--init-weights", default=None, help="start from these weights (fine-tuning)")
    t.add_argument("--phase-weight", type=float, default=None, help="weight of the phase loss (default 1)")
    t.add_argument("--absolute-phase", action="store_true", default=None,
                   help="score the absolute phase (default: up to a global offset, which |F| cannot see)")
    t.add_argument("--support-weight", type=float, default=None,
                   help="weight of the support-edge cross-entropy at the 0.1 threshold (default 1)")
    t.add_argument("--support-pos-weight", type=float, default=None,
                   help="extra cost of a missed support pixel (default 8)")
    t.add_argument("--recipe", default=None, choices=("paper", "crystal", "mixed"),
                   help="simulated data: the paper's recipe, the realistic crystal recipe, or both (default paper)")
    t.add_argument("--crystal-fraction", type=float, default=None,
                   help="share of crystal-recipe samples with --recipe mixed (default 0.5)")
    t.add_argument("--centre", action="store_true", default=None,
                   help="centre each pattern on its Bragg peak as inference does and train on the matching phase "
                        "(the shipped cdinn-32 is trained so)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from OUT/checkpoint.pt, with its stored recipe")
    t.add_argument("--device", default=None,
                   help="cpu, cuda, or auto (CUDA when available); the data set is moved there (default cpu)")
    t.add_argument("--no-amp", action="store_true", default=None,
                   help="train in fp32 on CUDA (default: bf16 autocast)")
    t.add_argument("--fresh-noise", action="store_true", default=None,
                   help="draw new Poisson noise (--photons, --background) for every batch, on the device")
    t.add_argument("--data", default=None,
                   help="train on this folder of intensity/amplitude/phase .npy (or .npz) instead of simulating")
    t.add_argument("--workers", type=int, default=None,
                   help="processes simulating the data (default 1; same samples for any number)")
    t.add_argument("--schedule", choices=("plateau", "cosine"), default=None,
                   help="plateau: halve the rate when validation stalls, with early stopping; cosine: decay to "
                        "lr/100 over --max-minutes (or --epochs) (default plateau)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="score a model on fresh samples against ER/HIO; JSON + figures",
                       description="Simulate fresh samples, reconstruct them with the network and with "
                                   "620-iteration ER/HIO (and NN-seeded refinement), and write report.json, "
                                   "report.md and the figures examples.png, best.png, worst.png. The report "
                                   "records the sha256 of the weights evaluated, which publish checks.")
    e.add_argument("--model", default=DEFAULT_MODEL,
                   help="model name (on the model search path) or path to a .pt (default %(default)s)")
    e.add_argument("--out", default="evaluation", help="output folder (default ./evaluation)")
    e.add_argument("-n", type=int, default=None,
                   help="number of samples (default 1000; with --data the file's first 1000, or all if fewer)")
    e.add_argument("--data", default=None,
                   help="score the samples of this labelled .npz or folder of intensity/amplitude/phase .npy (as "
                        "train --data) instead of simulating them; ER/HIO gets their objects' noise-free 2x "
                        "oversampled patterns")
    e.add_argument("--views", type=int, default=1, choices=range(1, 9), metavar="{1..8}",
                   help="symmetric copies of each pattern the network sees, combined (default 1; 8: all the "
                        "square's symmetries, 8x the network's time, more accurate)")
    e.add_argument("--recipe", choices=("paper", "crystal"), default="paper",
                   help="the paper's recipe or the realistic crystal recipe (sectioned faceted crystals, textured "
                        "amplitude, displacement-field strain, the Bragg peak off-centre; default paper)")
    e.add_argument("--seed", type=int, default=None,
                   help="seed of the fresh samples (default: the recipe's reported evaluation set)")
    e.add_argument("--photons", type=float, default=None, help="evaluate on Poisson-noisy patterns")
    e.add_argument("--iterations", type=int, default=620, help="ER/HIO iterations (default 620)")
    e.add_argument("--refine-iterations", type=int, default=100,
                   help="iterations of NN-seeded ER/HIO refinement (0: skip)")
    e.add_argument("--no-erhio", action="store_true", help="skip the ER/HIO baseline")
    e.add_argument("--noise", type=float, nargs="*", default=None, metavar="PHOTONS",
                   help="also score the NN with Poisson noise at these photons per frame "
                        "(--noise alone: 1e4 1e5 1e6 1e7; with --recipe crystal 1e3 ... 1e8, with its detector "
                        "effects)")
    e.add_argument("--offsets", type=float, nargs="*", default=None, metavar="PIXELS",
                   help="also score the NN with the Bragg peak this many pixels off the window's centre "
                        "(--offsets alone: 0 0.5 1 2)")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    e.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    e.set_defaults(func=_cmd_evaluate)

    dp = sub.add_parser("deepen", help="double the convolutions per stage, keeping the function (net2net)",
                        description="Write weights of a network with twice the convolutions per stage whose new "
                                    "layers start as identities; fine-tune them with train --init-weights.")
    dp.add_argument("weights", help="input weights (.pt)")
    dp.add_argument("out", help="output weights (.pt)")
    dp.set_defaults(func=_cmd_deepen)

    pb = sub.add_parser("publish", help="ship a trained model: weights + model card JSON into models/",
                        description="Copy RUN/best.pt to MODELS/NAME.pt and write the model card MODELS/NAME.json "
                                    "(recipe, data, epochs, validation curve, evaluation metrics, code commit).")
    pb.add_argument("run", nargs="?", help="training output folder (holds best.pt and history.json)")
    pb.add_argument("evaluation", nargs="?", help="evaluation folder of those weights (holds report.json)")
    pb.add_argument("--name", help="model name, e.g. cdinn-32")
    pb.add_argument("--attach", default=None, metavar="NAME",
                    help="only add --crystal-evaluation to the card of the shipped model NAME, keeping the rest")
    pb.add_argument("--models", default="models",
                    help="models folder (default ./models, on the model search path: load_model(NAME) finds it)")
    pb.add_argument("--force", action="store_true",
                    help="replace an existing model NAME (a shipped one too, with a warning)")
    pb.add_argument("--lineage", nargs="*", default=[],
                    help="earlier training folders this run was fine-tuned from, oldest first")
    pb.add_argument("--after", default=None, metavar="CARD",
                    help="model card (JSON) of the weights the earliest stage started from: its lineage and "
                         "final stage go first in the new card (copy it first if NAME overwrites it)")
    pb.add_argument("--also", nargs="*", default=[], metavar="EVALUATION",
                    help="more evaluation folders of the same weights (e.g. evaluate --views 8), kept in the card "
                         "under other_evaluations")
    pb.add_argument("--crystal-evaluation", default=None, metavar="EVALUATION",
                    help="evaluation folder of the same weights on the crystal recipe (evaluate --recipe crystal), "
                         "kept in the card as evaluation_crystal")
    pb.set_defaults(func=_cmd_publish)

    d = sub.add_parser("demo", help="the whole live pipeline on this machine: Tiled, IOC, ZeroMQ, scan, replay",
                       description="Start an embedded Tiled server, the EPICS IOC and a ZeroMQ listener (127.0.0.1 "
                                   "only), run a simulated operando scan with live reconstruction, replay it from "
                                   "Tiled, and print a summary; writes OUT/summary.json and OUT/montage.png. Needs "
                                   "the Tiled server and caproto: pip install 'cdinn-stream[all]'.")
    d.add_argument("--frames", type=int, default=300, help="frames in the scan (default 300)")
    d.add_argument("--model", default=DEFAULT_MODEL, help="shipped model name or .pt path (default %(default)s)")
    d.add_argument("--photons", type=float, default=1e6, help="photons per frame (default 1e6)")
    d.add_argument("--out", default="demo-output", help="output folder (default ./demo-output)")
    d.add_argument("--recipe", choices=("paper", "crystal"), default="paper",
                   help="the sample: a paper-recipe crystal, or a crystal of the realistic recipe with its Bragg "
                        "peak off the window's centre (default paper)")
    d.add_argument("--refine-above", type=float, default=0.03, metavar="CHI2",
                   help="refine automatically the frames whose chi2 is above this, within the budget (default "
                        "%(default)s; 0 refines every frame the budget allows; a negative value turns it off)")
    d.add_argument("--refine-budget", type=float, default=0.2, metavar="FRACTION",
                   help="at most this fraction of the frames refined automatically (default %(default)s)")
    d.add_argument("--detector", choices=("eiger1m", "eiger4m"), default=None,
                   help="frames at a detector's native size (EIGER 1M: 1065 x 1030, 4M: 2167 x 2070) with its module "
                        "gaps, instead of 128 x 128: the Bragg peak is tracked (docs/pipeline.md, 'Detector-native "
                        "frames'); the raw frames go to Tiled too, so keep --frames modest (default: 128 x 128)")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(func=_cmd_demo)

    i = sub.add_parser("ioc", help="serve the EPICS PVs (caproto) that the pipeline writes",
                       description="Serve P:AMPLITUDE, P:PHASE, P:SHAPE, P:SUPPORT_SIZE, P:PHASE_RMS (the standard "
                                   "deviation of the phase inside the support, about its circular mean, rad), "
                                   "P:FRAME_RATE, P:FRAMES, P:SEQ_NUM, P:RUN_UID, P:STATUS with caproto "
                                   "(pip install 'cdinn-stream[epics]').",
                       epilog="Channel Access clients find IOCs by UDP broadcast, which usually does not reach an "
                              "IOC on 127.0.0.1: start each client (EpicsSink, --epics-prefix, caget) with "
                              "EPICS_CA_ADDR_LIST=<an address given to --interfaces> EPICS_CA_AUTO_ADDR_LIST=NO "
                              "EPICS_CA_SERVER_PORT=<--port>. The IOC prints the line to export when it starts.")
    i.add_argument("--prefix", default="CDINN:", help="PV prefix (default CDINN:)")
    i.add_argument("--interfaces", nargs="+", default=["127.0.0.1"], help="addresses to bind (default 127.0.0.1)")
    i.add_argument("--port", type=int, default=None,
                   help="UDP port for Channel Access searches (default $EPICS_CA_SERVER_PORT, else 5064)")
    i.add_argument("--max-size", type=int, default=128, help="largest frame side the waveforms hold")
    i.set_defaults(func=_cmd_ioc)

    ft = sub.add_parser("finetune", help="fine-tune a model on unlabelled frames with the physics-aware loss",
                        description="Fine-tune on frames without ground truth (measured data, or `cdinn-stream "
                                    "simulate` output): the loss compares |FT| of the prediction with the measured "
                                    "amplitudes (normalised squared error, 1 - Pearson correlation, or Poisson "
                                    "likelihood at low counts). Writes OUT/best.pt, history.json and a curve PNG.")
    ft.add_argument("frames", help=".npz with an 'intensity' array (n, N, N), Bragg peak at N//2")
    ft.add_argument("--init-weights", default=DEFAULT_MODEL,
                    help="model name (on the model search path) or .pt (default %(default)s)")
    ft.add_argument("--out", default="runs/finetune", help="output folder (default runs/finetune)")
    ft.add_argument("--kind", choices=("nse", "pearson", "poisson"), default="nse", help="the |FT| loss (default nse)")
    ft.add_argument("--epochs", type=int, default=10, help="most epochs (default %(default)s)")
    ft.add_argument("--patience", type=int, default=2,
                    help="epochs without a better held-out loss before stopping (default %(default)s)")
    ft.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default %(default)s)")
    ft.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ft.set_defaults(func=_cmd_finetune)

    bf = sub.add_parser("backfill", help="write results spooled while Tiled was unreachable",
                        description="When the Tiled server was away at the end of a run, its results stay in the "
                                    "spool (default $CDINN_SPOOL or ~/.cache/cdinn-stream/spool). This writes "
                                    "them to the server, in order, and marks their runs complete.")
    bf.add_argument("--tiled", required=True, help="Tiled server URL")
    bf.add_argument("--api-key", default=None,
                    help="Tiled API key (default: $TILED_API_KEY)")
    bf.add_argument("--spool", default=None, help="spool folder (default $CDINN_SPOOL or ~/.cache/cdinn-stream/spool)")
    bf.set_defaults(func=_cmd_backfill)

    lsn = sub.add_parser("listen", help="subscribe to the ZeroMQ results and print (or plot) them",
                         description="Print one line per result message; --plot saves the latest frame as a PNG.")
    lsn.add_argument("address", help="publisher address, e.g. tcp://127.0.0.1:5578")
    lsn.add_argument("--count", type=int, default=None, help="stop after this many frames")
    lsn.add_argument("--timeout", type=float, default=None, help="stop after this many seconds of silence")
    lsn.add_argument("--plot", default=None, help="save the latest amplitude/phase to this PNG at each run end")
    lsn.set_defaults(func=_cmd_listen)

    vw = sub.add_parser("view", help="follow the pipeline's runs live in a browser (from its ZeroMQ results)",
                        description="Serve a page that follows the runs the pipeline publishes on ZeroMQ: the "
                                    "latest amplitude and strain (phase, ramp removed) images, every frame's "
                                    "observables as trends (chi2, strain_rms, peak_row/peak_col, intensity, "
                                    "correlation, support_area, ...), and counts (frames received and missed, run "
                                    "uid, frame rate, model version). The page updates about 10 times a second and "
                                    "says when no publisher is heard or a run ends. It is one more ZeroMQ "
                                    "subscriber: it never slows the pipeline (a PUB socket drops for a slow "
                                    "subscriber alone, and the page counts what it missed). No torch needed.",
                        epilog="Prints the page's URL; open it in a browser on this machine. Ctrl-C stops it. "
                               "E.g. cdinn-stream view --zmq tcp://127.0.0.1:5578 beside a pipeline started with "
                               "--zmq-out tcp://127.0.0.1:5578 (or CDINN_ZMQ_OUT).")
    vw.add_argument("--zmq", default=ZMQ_ADDRESS, metavar="ADDRESS",
                    help="where the pipeline publishes its results (its --zmq-out or $CDINN_ZMQ_OUT; default "
                         "%(default)s)")
    vw.add_argument("--host", default="127.0.0.1",
                    help="address to serve the page on (default %(default)s: this machine only; the page has no "
                         "login, so any other address shows it to that whole network)")
    vw.add_argument("--port", type=int, default=VIEW_PORT,
                    help="port to serve the page on (default %(default)s; 0: a free one)")
    vw.add_argument("--history", type=int, default=5000, metavar="FRAMES",
                    help="frames of each run the trends keep (default %(default)s)")
    vw.set_defaults(func=_cmd_view)

    r = sub.add_parser("replay", help="reconstruct a stored run from Tiled (as bluesky's TiledWriter stores it)",
                       description="Read the run's documents from Tiled and feed them to the live callback; "
                                   "results go to the sinks given (Tiled: container cdinn-replay/UID).")
    r.add_argument("uid", help="uid of the raw run")
    r.add_argument("--tiled", required=True, help="Tiled server URL holding the raw run")
    r.add_argument("--pace", choices=("fast", "recorded"), default="fast", help="as fast as possible or as recorded")
    r.add_argument("--parent", default="cdinn-replay",
                   help="Tiled container for the results (default %(default)s: the live results stay)")
    r.add_argument("--nats", default=None, metavar="URL",
                   help="publish the run into this NATS JetStream server instead, for the worker pool (cdinn-stream "
                        "worker) to reprocess; the sink options are then the workers' (docs/pipeline.md 'Scale-out')")
    r.add_argument("--beamline", default="replay",
                   help="with --nats: the subjects' beamline token (default %(default)s)")
    r.add_argument("--prefix", default="cdinn", help="with --nats: the subjects' prefix (default %(default)s)")
    r.add_argument("--window", type=_window_side, default=None, metavar="PIXELS",
                   help="with --nats: send each inline frame cut to a PIXELS x PIXELS window around its Bragg peak "
                        "(at least the model's window on the detector plus 16; twice it is safe), not whole: detector "
                        "frames over the server's max_payload travel so (docs/pipeline.md 'Scale-out')")
    _add_sink_options(r, tiled_out="default: the server the run is read from")
    r.set_defaults(func=_cmd_replay)

    wk = sub.add_parser("worker", help="one worker of a pool sharing runs through NATS JetStream (scale-out)",
                        description="Pull frames from the JetStream work queue that every worker shares, follow "
                                    "every run's control documents, reconstruct with the live pipeline and "
                                    "acknowledge each frame message only once its results are in Tiled and on "
                                    "ZeroMQ. Start any number, on any hosts, against one NATS server and one Tiled "
                                    "server; a worker that dies leaves its frames to the others (after --ack-wait). "
                                    "Documents come from a JetStreamPublisher on the RunEngine (or cdinn-stream "
                                    "replay --nats). Needs pip install 'cdinn-stream[nats]'.",
                        epilog="E.g. cdinn-stream worker --nats nats://10.0.0.5:4222 --tiled http://10.0.0.6:8000 "
                               "--zmq tcp://0.0.0.0:5579 (each worker binds its own ZeroMQ address; subscribers "
                               "connect to all). Runs stored: <parent>/<run uid>, merged in seq_num order when "
                               "every frame is acknowledged (docs/pipeline.md 'Scale-out').")
    wk.add_argument("--nats", required=True, metavar="URL", help="the NATS server, e.g. nats://127.0.0.1:4222")
    wk.add_argument("--tiled", dest="tiled_out", default=None, metavar="URL",
                    help="Tiled server for the results (default $TILED_URL; same as --tiled-out)")
    wk.add_argument("--zmq", dest="zmq_out", default=None, metavar="ADDRESS",
                    help="publish results on this ZeroMQ address (default $CDINN_ZMQ_OUT; same as --zmq-out)")
    wk.add_argument("--parent", default=None, help="Tiled container of the runs (default $CDINN_TILED_PARENT or cdinn)")
    wk.add_argument("--prefix", default="cdinn", help="first token of the subjects (default %(default)s)")
    wk.add_argument("--beamline", default="*", help="take the runs of this beamline only (default: all)")
    wk.add_argument("--group", default="workers",
                    help="the pool: its workers share the durable consumer <group>-<beamline> (default "
                         "%(default)s; two pools must take disjoint beamlines: the server refuses overlapping ones)")
    wk.add_argument("--name", default=None,
                    help="this worker's name (default host-pid): keep it stable per worker, so that a restart "
                         "finds what its earlier process spooled; its Tiled partitions are <uid>.<name>-p<token>")
    wk.add_argument("--ack-wait", type=float, default=None, metavar="S",
                    help="seconds to store a frame's results before the server hands it to another worker "
                         "(default 30; set when the consumer is first made)")
    wk.add_argument("--max-deliver", type=int, default=None,
                    help="deliveries of a frame message at most (default 10); after the last, its frames are logged "
                         "as lost and its run completes without them (frames_lost in the run's metadata)")
    wk.add_argument("--max-ack-pending", type=int, default=None,
                    help="frame messages out, unacknowledged, over the pool at most: the back-pressure (default 1024)")
    wk.add_argument("--close-wait", type=float, default=5.0, metavar="S",
                    help="seconds the merging worker waits for the others to close their partitions (default 5)")
    wk.add_argument("--threads", type=int, default=None, help="torch CPU threads of this worker")
    _add_sink_options(wk)
    wk.set_defaults(func=_cmd_worker)

    sv = sub.add_parser("serve", help="reconstruct runs out of process: from a bluesky-0MQ-proxy or following Tiled",
                        description="Subscribe a RemoteDispatcher to the proxy's output and run the callback. "
                                    "E.g. with `bluesky-0MQ-proxy 5577 5578`: cdinn-stream serve --zmq "
                                    "tcp://127.0.0.1:5578 --zmq-out tcp://127.0.0.1:5579, then cdinn-stream listen "
                                    "tcp://127.0.0.1:5579 (the results need an address of their own). Or, where the "
                                    "scan writes its runs with TiledWriter(client, batch_size=1): cdinn-stream serve "
                                    "--tiled-follow http://127.0.0.1:8000 --api-key KEY reconstructs each new run "
                                    "while it is written, through Tiled's streaming API (docs/pipeline.md, "
                                    "'Following Tiled').")
    source = sv.add_mutually_exclusive_group(required=True)
    source.add_argument("--zmq",
                        help="the proxy's output address, where documents come from, e.g. tcp://127.0.0.1:5578")
    source.add_argument("--tiled-follow", metavar="URL",
                        help="instead, follow the runs that TiledWriter writes to this Tiled server (or container) "
                             "from now on, each reconstructed while it is written, every frame once and in order; "
                             "the server streams with `tiled serve catalog --temp`, or --cache memory / --cache "
                             "redis://... (without: polled every 2 s); key from --api-key or $TILED_API_KEY")
    _add_sink_options(sv)
    sv.set_defaults(func=_cmd_serve)

    b = sub.add_parser("bench", help="speed benchmarks; writes JSON + a markdown table",
                       description="Measure, in one run on this machine: the simulator; the model's frames/s per "
                                   "batch size, size and precision against a matmul peak; 620-iteration ER/HIO "
                                   "(and cohere-core's) against the NN; the pipeline end to end (throughput, "
                                   "latency at 100 frames/s, memory over 100,000 frames). Results go to OUT. "
                                   "Needs a source checkout (benchmarks/); the full run takes about 10 minutes "
                                   "on 2 cores.")
    b.add_argument("--out", default=None,
                   help="output folder (default ./bench-output, git-ignored, or bench-output/gpu with --device cuda; "
                        "the committed results are made with --out benchmarks/results)")
    b.add_argument("--model", default=DEFAULT_MODEL,
                   help="model of the ER/HIO and pipeline suites (default %(default)s)")
    b.add_argument("--models", nargs="+", default=["cdinn-32", "cdinn-64"],
                   help="models of the model suite (default cdinn-32 cdinn-64)")
    b.add_argument("--suite", nargs="+", default=["simulate", "model", "erhio", "pipeline"],
                   choices=["simulate", "model", "erhio", "pipeline", "trust", "detector", "observables", "scale"],
                   help="suites to run (default: all but trust and detector, which take about 10 minutes each on "
                        "2 cores; detector: native-size 256x256, EIGER 1M and 4M frames end to end, inline and "
                        "from HDF5 files, needs hdf5plugin for its compressed runs; observables: what the per-frame "
                        "observables add to the model's time, a minute; scale: 1, 2 and 4 NATS JetStream workers "
                        "against the single-process pipeline and the latency the broker adds, a few minutes, needs "
                        "the nats extra)")
    b.add_argument("-n", type=int, default=1024, help="patterns in the batched ER/HIO timing (default 1024)")
    b.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    b.add_argument("--device", default="cpu",
                   help="cpu or cuda: cuda runs the model suite (also with CUDA graphs) and the pipeline on the GPU "
                        "(default cpu)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cdinn-stream`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as err:
        print(f"cdinn-stream {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        if "cdinn-stream[" not in str(err):  # not a missing extra: a real bug, keep the traceback
            raise
        print(f"cdinn-stream {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
