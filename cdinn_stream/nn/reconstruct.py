"""The public inference API: :func:`load_model` and :class:`CDIModel.predict`.

>>> from cdinn_stream import load_model
>>> model = load_model()                  # the shipped 32x32 default
>>> rec = model.predict(intensity)        # (H, W) or (N, H, W) detector counts, peak-centred
>>> rec.amplitude, rec.phase              # (N, H, W) float32: [0, 1] and radians
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..core.metrics import fourier_chi2
from ..core.physics import (
    SUPPORT_THRESHOLD,
    add_ramp,
    masked_phase,
    normalized_amplitude,
    peak_offsets,
    roll_frames,
    strain,
)
from . import int8
from .ensemble import symmetry_ensemble
from .folding import fold
from .int8 import Int8CDINN
from .model import CDINN
from .options import DEFAULT_MODEL, PRECISIONS
from .weights import FORMAT, WeightsError, float_network, load_blob

__all__ = ["Reconstruction", "CDIModel", "load_model", "read_network", "model_path", "model_search_path",
           "shipped_model_dirs", "user_models_dir", "resolve_weights", "DEFAULT_MODEL", "validate_frames",
           "keep_freed_memory"]

logger = logging.getLogger(__name__)

_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed blocks of up to 32 MiB in the process (Linux only).

    CPU inference allocates and frees the same large activation tensors for every batch; by
    default glibc hands blocks that large back to the kernel and takes them again, so each batch
    pays page faults on fresh memory. With ``M_MMAP_THRESHOLD`` at 32 MiB and ``M_TRIM_THRESHOLD``
    at 1 GiB they are reused instead: on 2 AMD EPYC cores the paper's network runs about 1.2x
    faster at batch 256-1,024 (``docs/design.md`` section 10); the small default model gains
    nothing. The cost is memory: freed blocks stay with the process (about +350 MiB at the
    pipeline benchmark's peak, and a slow creep in a 100,000-frame soak), so it is off unless
    asked for: call this once, or set ``CDINN_MALLOC_TUNING=1`` and :class:`CDIModel` calls it on
    the CPU. Process-wide; returns whether the settings are in force.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return _MALLOC_TUNED
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        _MALLOC_TUNED = bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(
            libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        _MALLOC_TUNED = False
    logger.debug("glibc malloc tuning for CPU inference: %s", "on" if _MALLOC_TUNED else "unavailable")
    return _MALLOC_TUNED


@dataclass
class Reconstruction:
    """Network output for ``N`` frames.

    Attributes:
        amplitude: ``(N, H, W)`` float32 object amplitude (shape) in [0, 1].
        phase: ``(N, H, W)`` float32 phase in radians at every pixel, wrapped to [-pi, pi), the
            object of the pattern as given (a Bragg peak off ``N // 2`` puts a linear ramp in it;
            :attr:`strain` takes it out); it means something inside :attr:`support` only
            (:attr:`masked_phase` is 0 outside).
        chi2: ``(N,)`` the trust figure of each frame: chi^2 of the reconstruction's ``|FT|^2``
            against the pattern given (the paper's metric, best scale;
            :func:`~cdinn_stream.core.metrics.fourier_chi2`); ``None`` from ``predict(..., chi2=False)``.
    """

    amplitude: np.ndarray
    phase: np.ndarray
    chi2: np.ndarray | None = None

    @property
    def support(self) -> np.ndarray:
        """``(N, H, W)`` bool: amplitude above the paper's threshold of 0.1."""
        return self.amplitude > SUPPORT_THRESHOLD

    @property
    def masked_phase(self) -> np.ndarray:
        """The phase with 0 outside :attr:`support` (for display)."""
        return masked_phase(self.amplitude, self.phase)

    @cached_property
    def strain(self) -> np.ndarray:
        """The phase less its amplitude-weighted linear ramp and offset, 0 outside :attr:`support`:
        the strain view BCDI users read (:func:`cdinn_stream.core.physics.strain`). :attr:`phase` keeps
        the ramp of a Bragg peak off the window's centre, as the pattern has it."""
        return strain(self.amplitude, self.phase)

    @property
    def complex(self) -> np.ndarray:
        """``amplitude * exp(i * phase)`` as complex64."""
        return (self.amplitude * np.exp(1j * self.phase)).astype(np.complex64)

    def __len__(self) -> int:
        return len(self.amplitude)


def validate_frames(intensity: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Check a ``(H, W)`` or ``(N, H, W)`` stack of intensities; return it as ``(N, H, W)``.

    Raises:
        ValueError: wrong dimensionality or size, complex or non-numeric data, NaN or inf,
            negative values, or an all-zero frame; the message names the frames at fault.
    """
    if not isinstance(intensity, torch.Tensor):
        arr = np.asarray(intensity)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"intensities must be real numbers, got dtype {arr.dtype}")
        intensity = torch.from_numpy(np.ascontiguousarray(arr))
    elif intensity.is_complex() or intensity.dtype == torch.bool:
        raise ValueError(f"intensities must be real numbers, got dtype {intensity.dtype}")
    x = intensity
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected (H, W) or (N, H, W) intensities, got shape {tuple(intensity.shape)}")
    if tuple(x.shape[-2:]) != (size, size):
        raise ValueError(
            f"frames are {tuple(x.shape[-2:])} but this model takes ({size}, {size}): crop around the "
            "Bragg peak first (cdinn_stream.live.crop) or load a model of that size"
        )
    if len(x) == 0:
        raise ValueError("no frames given")
    x = x.float()

    def frames(bad: torch.Tensor) -> str:
        idx = torch.nonzero(bad).flatten().tolist()
        return f"{idx[:10]}{' ...' if len(idx) > 10 else ''}"

    # each frame's extremes (a NaN makes both NaN, an inf one of them); amin and amax apart are
    # 15x faster than aminmax along a dimension on a CPU (torch 2.13)
    flat = x.reshape(len(x), -1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    finite = torch.isfinite(low) & torch.isfinite(high)
    if not bool(finite.all()):
        raise ValueError(f"NaN or inf in frame(s) {frames(~finite)}")
    negative = low < 0
    if bool(negative.any()):
        raise ValueError(f"negative intensities in frame(s) {frames(negative)}: subtract background and clip at 0")
    empty = high == 0
    if bool(empty.any()):
        raise ValueError(f"all-zero frame(s) {frames(empty)}: nothing to reconstruct")
    return x


#: Largest batch that :class:`CDIModel` replays as a CUDA graph (larger ones run eagerly).
GRAPH_MAX_BATCH = 4096


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CUDA with bf16, or a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def resolve_precision(precision: str, device: torch.device, *, int8: bool = False) -> str:
    """``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"`` for ``precision`` on ``device``; ``"auto"``
    is int8 for an int8 network (``int8``), else bf16 where the hardware has it natively (the
    shipped models lose no accuracy in bf16, see ``benchmarks/results``), else fp32. Raises
    ``ValueError`` on an unknown name, fp16 on a CPU, or a precision the network is not made for
    (int8 runs int8 networks only, and only on a CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if int8 or precision == "int8":
        if not int8:
            raise ValueError("int8 needs an int8 network: load one (e.g. load_model('cdinn-32-int8'))")
        if precision not in ("auto", "int8"):
            raise ValueError(f"an int8 network computes in int8, not {precision}")
        if device.type != "cpu":
            raise ValueError(f"the int8 network runs on a CPU only, not {device}")
        return "int8"
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 inference needs a GPU; use bf16 or fp32 on the CPU")
    return precision


class CDIModel:
    """A trained network on a device, with its model card; call :meth:`predict`."""

    def __init__(self, network: CDINN | Int8CDINN, *, name: str = "custom", card: dict | None = None,
                 device: str | torch.device | None = None, precision: str = "auto", cuda_graphs: bool | None = None,
                 views: int = 1, fold_small_steps: bool | None = None, centre: bool | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() and not isinstance(network, Int8CDINN) else "cpu"
        if not isinstance(network, Int8CDINN):  # an int8 one says it runs on a CPU only (resolve_precision)
            check_device(device)
        self.device = torch.device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        #: replay a captured CUDA graph per batch-size bucket (powers of two) instead of launching
        #: each kernel from Python (default on a GPU): on an H200, 5.6x faster at batch 1 and 3x at
        #: batch 1,024 (benchmarks/results/gpu-h200)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[int, tuple] = {}
        if not 1 <= views <= 8:
            raise ValueError(f"views must be 1 to 8, not {views}")
        #: symmetric copies of each pattern the network sees (:mod:`cdinn_stream.nn.ensemble`); 1: the
        #: pattern alone; 8: all the square's symmetries, combined (8 network calls per frame)
        self.views = views
        self.precision = resolve_precision(precision, self.device, int8=isinstance(network, Int8CDINN))
        self._autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
                                "int8": None}[self.precision]
        # channels-last: the convolutions run about 1.5-2x faster on CPU (and suit GPU tensor cores)
        self.network = network.to(self.device, memory_format=torch.channels_last).eval()
        if isinstance(network, Int8CDINN) and fold_small_steps is False:
            raise ValueError("an int8 network is the folded form itself: fold_small_steps=False cannot apply")
        if fold_small_steps is None:
            fold_small_steps = self.device.type == "cpu"
        #: the network's inference form (:mod:`cdinn_stream.nn.folding`: its convolutions on 1x1 and 2x2
        #: grids as dense matrices: the same results in about 0.7x the time on a CPU), or ``None`` to
        #: call :attr:`network` itself (the default on a GPU, where the network is not the cost; and for
        #: an int8 network, which is a folded form already). It is made from the network's weights
        #: once, here: after changing them, make a new CDIModel
        self.folded = None
        if fold_small_steps and isinstance(network, CDINN):
            folded = fold(self.network)
            self.folded = folded.to(memory_format=torch.channels_last) if folded is not self.network else None
        if self.device.type == "cpu" and os.environ.get("CDINN_MALLOC_TUNING") == "1":
            keep_freed_memory()
        #: centre each pattern on its Bragg peak before the network and put the ramp back after
        #: (:meth:`predict_tensor`); default: as the network was trained (``config.centred_input``,
        #: true of the shipped cdinn-32 and cdinn-32-int8)
        self.centre = bool(network.config.centred_input) if centre is None else centre
        self.name = name
        self.card = card or {}

    @property
    def size(self) -> int:
        """Frame size ``N`` the network takes."""
        return self.network.config.size

    def __repr__(self) -> str:
        return (f"CDIModel(name={self.name!r}, size={self.size}, device={str(self.device)!r}, "
                f"precision={self.precision!r}, views={self.views}, centre={self.centre})")

    @torch.inference_mode()
    def predict_tensor(self, amplitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network call on normalised amplitudes ``(B, N, N)`` already on :attr:`device`;
        returns amplitude and phase (the network's phase at every pixel) on the device. With :attr:`views`
        ``> 1`` the network sees that many symmetric copies and their results are combined.

        With :attr:`centre` (as the network was trained), a pattern whose Bragg peak is whole pixels off ``N // 2``
        (:func:`~cdinn_stream.core.physics.peak_offsets`) is rolled onto it for the network, and the
        matching linear ramp is added back to the phase (wrapped to ``[-pi, pi)``): the result is
        the object of the pattern as given."""
        shifts = peak_offsets(amplitude.square()) if self.centre else None
        # on a CPU, skip the roll and the ramp when nothing moves (the live path: the crop has centred
        # every frame); on a GPU, always apply them rather than wait for the answer
        if shifts is not None and self.device.type == "cpu" and not bool(shifts.any()):
            shifts = None
        if shifts is not None:
            amplitude = roll_frames(amplitude, -shifts)
        if self.views == 1:
            amp, phase = self._single(amplitude)
        else:
            amp, phase = symmetry_ensemble(self._single, amplitude, self.views)
        if shifts is not None:
            phase = add_ramp(phase, shifts)
        return amp, phase

    def _single(self, amplitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cuda_graphs and len(amplitude) <= GRAPH_MAX_BATCH:
            return self._replay(amplitude)
        return self._forward(amplitude)

    def _replay(self, amplitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(amplitude)
        bucket = 1 << max(0, (n - 1).bit_length())
        if bucket not in self._graphs:
            static_in = torch.ones((bucket, self.size, self.size), device=self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up outside the graph (cuDNN picks its algorithms)
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread-local capture: other threads (live adaptation, refinement) may use CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self._forward(static_in)
            self._graphs[bucket] = (graph, static_in, static_out)
        graph, static_in, (amp, phase) = self._graphs[bucket]
        static_in[:n].copy_(amplitude)
        graph.replay()
        return amp[:n].clone(), phase[:n].clone()

    def _forward(self, amplitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = amplitude.contiguous()[:, None].contiguous(memory_format=torch.channels_last)
        dtype = self._autocast_dtype
        # no autocast weight cache: it would free the cast weights a captured CUDA graph still reads
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                            cache_enabled=False):
            if isinstance(self.network, Int8CDINN):
                return self.network(x)
            if self.folded is not None:
                return self.folded(x)
            logits = self.network.forward_logits(x)
        return self.network.outputs(*logits)

    def sibling(self, network: CDINN | Int8CDINN, **changes) -> CDIModel:
        """A model with another network and this one's name, card, device, precision, views and
        centring (``changes`` override them; an int8 network goes to the CPU in int8)."""
        int8_net = isinstance(network, Int8CDINN)
        settings = {"name": self.name, "card": self.card, "device": "cpu" if int8_net else self.device,
                    "precision": "auto" if int8_net or self.precision == "int8" else self.precision,
                    "views": self.views, "centre": self.centre, **changes}
        return CDIModel(network, **settings)

    def float_network(self) -> CDINN:
        """A float copy of the network, on the CPU, to train: for an int8 model, the float model it
        was quantized from (its card's ``fine_tuned_from``, looked up by name)."""
        if isinstance(self.network, Int8CDINN):
            source = self.card.get("fine_tuned_from")
            if isinstance(source, dict):  # a published card holds its source's card
                source = source.get("name")
            if not source:
                raise ValueError(f"the int8 model {self.name} names no float model (fine_tuned_from) it came from")
            network = read_network(resolve_weights(source))
            if not isinstance(network, CDINN):
                raise ValueError(f"{source}, the source of {self.name}, is not a float model")
            return network
        return copy.deepcopy(self.network).float().cpu().to(memory_format=torch.contiguous_format)

    def on_cpu(self) -> CDIModel:
        """The same model on the CPU (fp16, which the CPU lacks, becomes the CPU's default)."""
        return CDIModel(self.network.cpu(), name=self.name, card=self.card, device="cpu", views=self.views,
                        centre=self.centre, precision="auto" if self.precision == "fp16" else self.precision)

    def predict(self, intensity: np.ndarray | torch.Tensor, *, batch_size: int = 1024, chi2: bool = True
                ) -> Reconstruction:
        """Shape, phase and trust (:attr:`Reconstruction.chi2`) of ``(H, W)`` or ``(N, H, W)``
        diffraction intensities.

        Intensities are detector counts (any overall scale), zero frequency at ``N // 2``;
        numpy or torch, on any device. Raises ``ValueError`` on bad input (see
        :func:`validate_frames`). ``chi2=False`` skips the trust figure (about 4 us per 32x32
        frame on two CPU cores).
        """
        x = validate_frames(intensity, self.size)
        parts: list[tuple[torch.Tensor, ...]] = []
        for i in range(0, len(x), batch_size):
            chunk = normalized_amplitude(x[i : i + batch_size].to(self.device, non_blocking=True))
            a, p = self.predict_tensor(chunk)
            trust = (fourier_chi2(a, p, chunk).cpu(),) if chi2 else ()
            parts.append((a.float().cpu(), p.float().cpu(), *trust))
        joined = [torch.cat(arrays).numpy() if len(parts) > 1 else arrays[0].numpy()
                  for arrays in zip(*parts, strict=True)]
        return Reconstruction(*joined)


#: Environment variable of the folders searched first for a model name (``os.pathsep``-separated).
MODELS_ENV = "CDINN_MODELS"


def shipped_model_dirs() -> list[Path]:
    """The package's own models folders: ``cdinn_stream/_models`` of an installed wheel, and
    ``models/`` of the source checkout it runs from (where they exist)."""
    dirs = [Path(str(resources.files("cdinn_stream") / "_models")),
            Path(__file__).resolve().parents[2] / "models"]  # source checkout
    return [d for d in dirs if d.is_dir()]


def user_models_dir() -> Path:
    """The user's models folder: ``$XDG_DATA_HOME/cdinn-stream/models`` (default
    ``~/.local/share/cdinn-stream/models``)."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "cdinn-stream" / "models"


def _search_path() -> list[tuple[str, Path]]:
    """:func:`model_search_path` with where each folder comes from."""
    env = [("$" + MODELS_ENV, Path(d)) for d in os.environ.get(MODELS_ENV, "").split(os.pathsep) if d]
    labelled, seen = [], set()
    for label, d in (*env, ("./models", Path("models")), ("user", user_models_dir()),
                     *(("shipped", d) for d in shipped_model_dirs())):
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            labelled.append((label, d))
    return labelled


def model_search_path() -> list[Path]:
    """Folders searched for a model name, in order, whether they exist or not: each folder of
    ``$CDINN_MODELS`` (``os.pathsep``-separated), ``./models`` of the current directory, the
    user's folder (:func:`user_models_dir`), then the shipped models (:func:`shipped_model_dirs`)."""
    return [d for _, d in _search_path()]


def _model_dirs() -> list[Path]:
    return [d for d in model_search_path() if d.is_dir()]


def model_path(name: str) -> Path:
    """Path of the weights of the model ``name`` (``<folder>/<name>.pt``), from the first folder of
    :func:`model_search_path` that has it. Raises ``ValueError`` naming the folders searched."""
    for d in _model_dirs():
        p = d / f"{name}.pt"
        if p.is_file():
            return p
    known = sorted({p.stem for d in _model_dirs() for p in d.glob("*.pt")})
    looked = ", ".join(f"{label} {d.absolute()}" for label, d in _search_path())
    raise ValueError(f"no model named {name!r}: no shipped model named so, and none on the model search path "
                     f"({looked}; ${MODELS_ENV} puts folders first); known: {known} (or give a path to a .pt file)")


def resolve_weights(name_or_path: str | Path, *, precision: str = "auto") -> Path:
    """The weights file :func:`load_model` reads for ``name_or_path``: a path as it is, a name
    through :func:`model_path` (its int8 sibling with ``precision="int8"``)."""
    p = Path(name_or_path)
    if p.suffix == ".pt" or p.exists():
        return p
    name = str(name_or_path)
    if precision == "int8" and not name.endswith("-int8"):
        name += "-int8"
    return model_path(name)


def check_device(device: str | torch.device | None) -> None:
    """Raise ``ValueError`` (not torch's bare ``AssertionError``) for a CUDA device torch cannot use."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available in this torch build/machine: use device='cpu'")


def read_network(path: str | Path) -> CDINN | Int8CDINN:
    """The network in a weights file: a :class:`CDINN` (float, :data:`~cdinn_stream.nn.weights.FORMAT`)
    or an :class:`~cdinn_stream.nn.int8.Int8CDINN` (:data:`cdinn_stream.nn.int8.FORMAT`); raises
    :class:`~cdinn_stream.nn.weights.WeightsError` on a bad file (and ``RuntimeError`` for an int8
    file on a torch without oneDNN's int8 operators)."""
    blob = load_blob(path, "cpu", (FORMAT, int8.FORMAT))
    if blob["format"] == FORMAT:
        return float_network(blob, path)
    if not int8.int8_available():
        raise RuntimeError(f"{path} is an int8 network, and this torch build has no oneDNN int8 operators "
                           "(x86 CPU builds do): use the float model")
    try:
        return int8.read_int8_weights(blob)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise WeightsError(f"int8 weights in {path} do not match their configuration: {err}") from err


def load_model(name_or_path: str | Path = DEFAULT_MODEL, *, device: str | torch.device | None = None,
               precision: str = "auto", cuda_graphs: bool | None = None, views: int = 1,
               fold_small_steps: bool | None = None, centre: bool | None = None) -> CDIModel:
    """Load a model by name (``"cdinn-32"``, ``"cdinn-64"``, or one you published) or a weights file by path.

    A name is looked up on the model search path (:func:`model_search_path`), first match wins:

    1. the folders in ``$CDINN_MODELS`` (``os.pathsep``-separated, e.g. ``/data/models:/lab/models``);
    2. ``./models`` of the current directory (where ``cdinn-stream publish`` writes by default);
    3. the user's folder ``$XDG_DATA_HOME/cdinn-stream/models`` (default ``~/.local/share/cdinn-stream/models``);
    4. the shipped models (the package's own ``models/``).

    An unknown name raises ``ValueError`` listing the folders searched.

    The model goes to ``device`` (default: CUDA when available, else CPU) and computes in
    ``precision`` (see :func:`resolve_precision`); ``cuda_graphs`` replays captured CUDA graphs
    (default: on a GPU); ``views`` (1-8) combines the network over symmetric copies of each
    pattern (:mod:`cdinn_stream.nn.ensemble`: more accurate, ``views`` times the network's cost);
    ``fold_small_steps`` runs the network's folded inference form (:mod:`cdinn_stream.nn.folding`;
    default: on a CPU). An int8 weights file (``"cdinn-32-int8"``, :mod:`cdinn_stream.nn.int8`) loads
    to the CPU in int8; ``precision="int8"`` with a shipped float model's name loads its int8
    sibling (``cdinn-32`` -> ``cdinn-32-int8``). ``centre`` centres each pattern on its Bragg peak
    (:meth:`CDIModel.predict_tensor`); default: as the network was trained (its card's recipe).
    Weights are read with ``weights_only=True``; the model card (``<name>.json`` beside the
    weights) is attached. ``device="cuda"`` on a torch or machine without CUDA raises ``ValueError``.
    """
    p = resolve_weights(name_or_path, precision=precision)
    network = read_network(p)
    card_path = p.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    return CDIModel(network, name=p.stem, card=card, device=device, precision=precision, cuda_graphs=cuda_graphs,
                    views=views, fold_small_steps=fold_small_steps, centre=centre)
