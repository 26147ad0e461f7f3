"""The observables of each reconstructed frame (:data:`cdinn_stream.core.observables.OBSERVABLES`),
batched in torch on the model's device: :func:`frame_observables`.

The figures are two passes of pure torch over the objects' real and imaginary planes (the
trust figure's :func:`~cdinn_stream.core.metrics.centred_planes`, made once a batch for both):
the first finds the support, its moments and the object's phase ramp (the mean phase step between
neighbouring pixels), the second sums the objects with their ramp taken out (phase mean and spread;
correlation with the run's first frame). The centring checkerboard on those planes is itself a
ramp, of pi a pixel, so the ramp removal takes it out with the object's own: every figure is the
plain object's. Both passes are one call of a kernel that ``torch.compile`` has compiled into a
few fused loops (:class:`FusedKernel`: about 1.2 us a frame on two CPU cores); compiling takes
seconds of CPU, so it is done only for a process that makes many frames (the live engine starts it after its
first 20,000: :func:`warm_up`), on a thread of its own. Until then, and where no compiler is at
hand or with ``CDINN_COMPILE=0``, the same figures come from complex-valued eager torch
(:func:`_eager_figures`, about 5 us a frame: the real-valued passes, written for the compiler,
would take 11 eagerly).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

import torch

from .metrics import centred_planes
from .observables import PEAK_WINDOW
from .physics import SUPPORT_THRESHOLD

__all__ = ["frame_observables", "reference_objects", "correlation", "FusedKernel", "KERNELS", "compile_observables",
           "warm_up"]

logger = logging.getLogger(__name__)

#: ``CDINN_COMPILE=0`` runs the observables eagerly (no ``torch.compile``)
COMPILE_ENV = "CDINN_COMPILE"


# --- the figures: pure functions of the planes (run eagerly, or compiled by FusedKernel) -------------------------


def _support_figures(a: torch.Tensor, re: torch.Tensor, im: torch.Tensor, crops: torch.Tensor
                     ) -> tuple[torch.Tensor, ...]:
    """First pass. The support is the amplitude above :data:`SUPPORT_THRESHOLD` of each frame's
    maximum (``top``); in it, the amplitude's mass, centroid and sum of squares, and the ramp: the
    angles of ``sum z[r + 1] conj(z[r])`` along rows and columns (amplitude-weighted mean phase
    steps), returned as the ramp's separable factors ``exp(-i step (r - N // 2))``, ``(B, 2, N)``
    (cosine, sine) for rows and for columns. And, from the measured ``crops``, the counts and the
    intensity centre of mass of the :data:`PEAK_WINDOW` around the crop's centre. Returns ``top``,
    the factors and the ``(9, B)`` figures (mass, row and column moments, sum of squares, support
    area; counts; the window's counts and row and column moments)."""
    n = a.shape[-1]
    top = a.flatten(1).amax(dim=1).clamp_min(1e-30)
    mask = (a > SUPPORT_THRESHOLD * top[:, None, None]).float()
    x, y = re * mask, im * mask
    row_re = (x[:, 1:] * x[:, :-1] + y[:, 1:] * y[:, :-1]).sum(dim=(1, 2))
    row_im = (y[:, 1:] * x[:, :-1] - x[:, 1:] * y[:, :-1]).sum(dim=(1, 2))
    col_re = (x[:, :, 1:] * x[:, :, :-1] + y[:, :, 1:] * y[:, :, :-1]).sum(dim=(1, 2))
    col_im = (y[:, :, 1:] * x[:, :, :-1] - x[:, :, 1:] * y[:, :, :-1]).sum(dim=(1, 2))
    coords = torch.arange(n, device=a.device, dtype=torch.float32) - n // 2
    along_rows = -torch.atan2(row_im, row_re)[:, None] * coords
    along_cols = -torch.atan2(col_im, col_re)[:, None] * coords
    rows = torch.stack([torch.cos(along_rows), torch.sin(along_rows)], dim=1)
    cols = torch.stack([torch.cos(along_cols), torch.sin(along_cols)], dim=1)
    w = a * mask
    mass = w.sum(dim=(1, 2))
    moment_row = (w * coords[None, :, None]).sum(dim=(1, 2))
    moment_col = (w * coords[None, None, :]).sum(dim=(1, 2))
    own = (w * w).sum(dim=(1, 2))
    support = mask.sum(dim=(1, 2))
    figures = torch.stack([mass, moment_row, moment_col, own, support, *_peak_window(crops)])
    return top, rows, cols, figures


def _peak_window(crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The crops' counts, and the counts and row and column moments (crop pixels from the centre)
    of the :data:`PEAK_WINDOW` around each crop's centre, ``(B,)`` each."""
    m, k = crops.shape[-1], PEAK_WINDOW
    counts = crops.float()
    around = counts[:, m // 2 - k : m // 2 + k + 1, m // 2 - k : m // 2 + k + 1].clamp_min(0)
    offsets = torch.arange(-k, k + 1, device=crops.device, dtype=torch.float32)
    return (counts.sum(dim=(1, 2)), around.sum(dim=(1, 2)), (around * offsets[None, :, None]).sum(dim=(1, 2)),
            (around * offsets[None, None, :]).sum(dim=(1, 2)))


def _demodulate(a: torch.Tensor, re: torch.Tensor, im: torch.Tensor, top: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The objects in their supports with their ramps taken out, ``z exp(-i ramp)``: real and
    imaginary planes (the ramp's factor a pixel is the product of its row's and column's)."""
    mask = (a > SUPPORT_THRESHOLD * top[:, None, None]).float()
    x, y = re * mask, im * mask
    cr, sr = rows[:, 0, :, None], rows[:, 1, :, None]
    cc, sc = cols[:, 0, None, :], cols[:, 1, None, :]
    c, s = cr * cc - sr * sc, sr * cc + cr * sc
    return x * c - y * s, x * s + y * c


def _figures(a: torch.Tensor, re: torch.Tensor, im: torch.Tensor, top: torch.Tensor, rows: torch.Tensor,
             cols: torch.Tensor, first: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Second pass: the sum of the demodulated objects and their inner product with the
    ``reference`` planes ``(1 or B, 2, N, N)``; with the first pass's ``first`` figures, the
    observables, ``(9, B)`` in :data:`OBSERVABLES` order, but the peak's row and column in crop
    pixels from the crop's centre."""
    dx, dy = _demodulate(a, re, im, top, rows, cols)
    total_re, total_im = dx.sum(dim=(1, 2)), dy.sum(dim=(1, 2))
    mass, moment_row, moment_col, own, support, intensity, peak_mass, peak_row, peak_col = first.unbind(0)
    mass, peak_mass = mass.clamp_min(1e-30), peak_mass.clamp_min(1e-30)
    length = torch.sqrt(total_re * total_re + total_im * total_im)
    # circular standard deviation of the phase, amplitude-weighted: sqrt(-2 ln R), R the length of
    # the mean unit phasor; the RMS about the mean for a spread well under a radian, and defined
    # (not wrapped into nonsense) for phases spread over the whole circle
    strain_rms = torch.sqrt(-2 * torch.log((length / mass).clamp(1e-12, 1.0)))
    correlation = _correlation(dx, dy, own, reference)
    return torch.stack([peak_row / peak_mass, peak_col / peak_mass, intensity, support, moment_row / mass,
                        moment_col / mass, torch.atan2(total_im, total_re), strain_rms, correlation])


def _on_detector(figures: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``figures`` with the peak's row and column (rows 0 and 1, crop pixels from the crop's
    centre) in detector pixels: times the crops' binning ``scale`` (0-d), plus ``offsets`` ``(B, 2)``,
    each crop centre's detector pixel."""
    return torch.cat([figures[:2] * scale + offsets.T, figures[2:]])


def _observe(a: torch.Tensor, re: torch.Tensor, im: torch.Tensor, crops: torch.Tensor, reference: torch.Tensor,
             offsets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Both passes and the peak in detector pixels: the observables ``(9, B)`` in :data:`_NAMES`
    order (one compiled call: two loop nests, and no call of their own for the small figures)."""
    return _on_detector(_figures(a, re, im, *_support_figures(a, re, im, crops), reference), offsets, scale)


def _correlation(dx: torch.Tensor, dy: torch.Tensor, own: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``|<z, z_ref>| / (|z| |z_ref|)`` ``(B,)`` of the demodulated planes ``dx``, ``dy`` (``own``:
    their ``sum |z|**2``) with the ``reference`` planes ``(1 or B, 2, N, N)``."""
    rr, ri = reference[:, 0], reference[:, 1]
    cross_re, cross_im = (dx * rr + dy * ri).sum(dim=(1, 2)), (dy * rr - dx * ri).sum(dim=(1, 2))
    theirs = (rr * rr + ri * ri).sum(dim=(1, 2))
    return torch.sqrt(cross_re * cross_re + cross_im * cross_im) / torch.sqrt(own * theirs).clamp_min(1e-30)


#: the rows :func:`_observe` returns
_NAMES = ("peak_row", "peak_col", "intensity", "support_area", "centroid_row", "centroid_col", "phase_mean",
          "strain_rms", "correlation")


_COMPILER = threading.Lock()  # one compilation at a time in the process
_EXITING = threading.Event()  # the interpreter is exiting: no compilation starts
_AHEAD: list[threading.Thread] = []  # warm_up's threads


def _wait_for_compilations(timeout: float = 60.0) -> None:
    """At exit, let a compilation in progress end (the interpreter aborts if it exits under one)."""
    _EXITING.set()
    end = time.monotonic() + timeout
    for thread in [*_AHEAD, *(k._compiling for k in KERNELS if k._compiling is not None)]:
        thread.join(max(0.0, end - time.monotonic()))


# before atexit's handlers (inductor's among them, which shut its compile workers down)
getattr(threading, "_register_atexit", atexit.register)(_wait_for_compilations)


def _compiling_enabled() -> bool:
    """Not ``CDINN_COMPILE=0``, and torch has compiler stances (2.6 and later)."""
    return (os.environ.get(COMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
            and hasattr(torch.compiler, "set_stance"))


class FusedKernel:
    """``fn`` compiled by ``torch.compile`` (one fused loop nest instead of dozens of torch
    operations), compiled off the caller's thread. The first dimension of its tensor arguments
    (of more than one row) is the batch, compiled for any size; the others are compiled for the
    sizes of the call (a frame's loops of known length: 25 % faster than for any size), and a
    call of other sizes compiles code of its own for them.

    A call runs the compiled code when code compiled earlier fits its arguments (shapes, device,
    dtypes); otherwise it returns ``None`` (the caller computes the figures eagerly) and, once the
    kernel is armed (:meth:`arm`), starts compiling for arguments like its own on a thread of its
    own, so that the live pipeline never waits seconds for the compiler. A compilation that fails
    (no C++ compiler, a device without a backend), or compiled code that raises, is logged once and
    the kernel is off; so is every kernel with ``CDINN_COMPILE=0``. Whether compiled code fits is
    asked of torch itself, under the compiler's ``fail_on_recompile`` stance for the length of the
    call; the stance is process-wide, so a function of the user's compiled for the first time on
    another thread in those microseconds would fail with that message (set ``CDINN_COMPILE=0``
    where that can happen).
    """

    #: compilations at most (batches of one and of more, one or a reference a frame, inference or
    #: normal tensors, each device: each takes one; 8 is also torch's own limit for a function)
    MAX_COMPILES = 8

    def __init__(self, fn) -> None:
        self.fn = fn
        self.compiled = None
        self.compiles = 0  # compilations finished
        self.compiled_calls = 0  # calls that ran the compiled code
        self.enabled = _compiling_enabled()
        self.armed = False
        self._compiling: threading.Thread | None = None
        self._starting = threading.Lock()  # one thread starts a compilation (the engine's, warm_up's)

    def __call__(self, *args):
        """The compiled code's result, or ``None`` where it cannot run (not compiled yet, or not
        for calls like this one: then, once :meth:`arm` was called, a compilation starts)."""
        # the compiler's stance is global: it is set only under _COMPILER, which every compilation
        # holds too, so that no compilation of ours runs under it (a call finding the lock taken
        # gets None)
        if self.enabled and self.compiled is not None and _COMPILER.acquire(blocking=False):
            try:
                with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
                    result = self.compiled(*args)
                self.compiled_calls += 1
                return result
            except Exception as err:  # noqa: BLE001 - the caller's eager code gives the figures
                if "fail_on_recompile" in str(err):
                    logger.debug("%s: no compiled code fits the call: %s", self.fn.__name__, err)
                    self._compile_for(args)
                else:
                    self.enabled = False
                    logger.warning("%s: its compiled code failed (%s: %s): run eagerly from now on", self.fn.__name__,
                                   type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            finally:
                _COMPILER.release()
        elif self.enabled and self.compiled is None:
            self._compile_for(args)
        return None

    def arm(self) -> None:
        """Let calls that compiled code does not fit start compilations (off until then: a process
        that makes a few thousand frames never pays the seconds of compiling)."""
        self.armed = True

    def reset(self) -> None:
        """Forget the compiled code (after a compilation in progress ends) and the counts."""
        self.wait()
        with _COMPILER:
            if self.compiled is not None:
                torch._dynamo.reset_code(self.fn.__code__)
            self.compiled, self.compiles, self.compiled_calls = None, 0, 0
            self.enabled, self.armed = _compiling_enabled(), False

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a compilation in progress; True when none is left."""
        thread = self._compiling
        if thread is not None:
            thread.join(timeout)
        return self._compiling is None or not self._compiling.is_alive()

    def _compile_for(self, args: tuple) -> None:
        """Start compiling for arguments like ``args`` (copies of them), unless a compilation is
        running or the budget of compilations is spent."""
        with self._starting:
            self._start_compiling(args)

    def _start_compiling(self, args: tuple) -> None:
        if ((self._compiling is not None and self._compiling.is_alive()) or not self.enabled or not self.armed
                or _EXITING.is_set()):
            return
        if self.compiles >= self.MAX_COMPILES:
            logger.warning("%s: compiled %d times and still not fitting its calls: run eagerly from now on",
                           self.fn.__name__, self.compiles)
            self.enabled = False
            return
        copies = []
        for a in args:  # an inference tensor's copy is one too (the compiled code's guards tell them apart)
            if isinstance(a, torch.Tensor):
                with torch.inference_mode(a.is_inference()):
                    a = a.detach().clone()
                if a.dim() and a.shape[0] > 1:  # the batch: any size; the frame's sizes fixed (loops of known length)
                    torch._dynamo.mark_dynamic(a, 0)
                for d in range(1, a.dim()):  # also when another frame size compiles (dynamo would make it any size)
                    torch._dynamo.mark_static(a, d)
            copies.append(a)
        self._compiling = threading.Thread(target=self._compile, args=(tuple(copies),), daemon=True,
                                           name=f"compile-{self.fn.__name__}")
        self._compiling.start()

    def _compile(self, args: tuple) -> None:
        with _COMPILER:
            try:
                if self.compiled is None:
                    # (dynamic in the batch: marked on the copies)
                    self.compiled = torch.compile(self.fn, fullgraph=True, options=_inductor_options())
                with torch.inference_mode():  # as every call runs it (no autograd: one variant fewer)
                    self.compiled(*args)
                self.compiles += 1
            except Exception as err:  # noqa: BLE001 - any compiler failure leaves the eager path
                self.enabled = False
                logger.warning("%s: torch.compile failed (%s: %s): the observables run eagerly (about 4x slower; "
                               "set %s=0 to skip trying)", self.fn.__name__, type(err).__name__,
                               str(err).splitlines()[0] if str(err) else "", COMPILE_ENV)


def _inductor_options() -> dict:
    """Inductor's settings for the kernels: the demodulated planes, read by four sums, stay in
    registers (by default inductor stores them, 2 MB a batch of 256, and reads them back: 10 %
    slower); the settings this torch does not know are left out."""
    from torch._inductor import config

    wanted = {"realize_opcount_threshold": 1000, "realize_reads_threshold": 100, "realize_acc_reads_threshold": 100}
    return {k: v for k, v in wanted.items() if hasattr(config, k)}


_OBSERVE = FusedKernel(_observe)
#: the observables' kernels (``enabled``, ``compiles``, ``compiled_calls``, ``wait()``)
KERNELS = (_OBSERVE,)


def compile_observables(call, rounds: int = 4, timeout: float = 600.0) -> bool:
    """Make the compiled kernels fit ``call()`` (a call of :func:`frame_observables`): call it and
    wait for the compilations it starts, a few rounds. True when its last call ran compiled code
    (False where the kernels are eager: no compiler, ``CDINN_COMPILE=0``). For benchmarks and
    tests; the live pipeline does not wait (its calls run eagerly until the code is compiled)."""
    for kernel in KERNELS:
        kernel.arm()
    for _ in range(rounds):
        if _EXITING.is_set():
            return False
        before = [k.compiled_calls for k in KERNELS]
        call()
        if all(k.compiled_calls > b for k, b in zip(KERNELS, before, strict=True)):
            return True
        if not all(k.wait(timeout) and k.enabled for k in KERNELS):
            return False
    return False


_WORKSPACE = threading.local()  # per thread: work tensors of the last batch shape (fresh ones page-fault on a CPU)


def _work(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The calling thread's work tensor ``name``, the first ``shape[0]`` frames of one kept for the
    largest batch seen (a batch's 1-2 MB temporaries, allocated afresh, cost more than the
    arithmetic on them; live batches vary in size)."""
    store = _WORKSPACE.__dict__.setdefault("tensors", {})
    key = (name, tuple(shape[1:]), dtype, device, torch.is_inference_mode_enabled())
    kept = store.get(key)
    if kept is None or kept.shape[0] < shape[0]:
        for other in [k for k in store if k[3] != device]:  # another device's (before a fall back to the CPU): freed
            del store[other]
        kept = store[key] = torch.empty(tuple(shape), dtype=dtype, device=device)
    return kept[: shape[0]]


def _eager_figures(a: torch.Tensor, re: torch.Tensor, im: torch.Tensor, crops: torch.Tensor,
                   reference: torch.Tensor) -> torch.Tensor:
    """:func:`_support_figures` then :func:`_figures`, the same figures in complex arithmetic: what
    runs until the kernels are compiled (a complex product is one vectorised operation in eager
    torch where the real-valued passes take four: 2x faster uncompiled, 4-5x slower than compiled)."""
    b, n = a.shape[0], a.shape[-1]
    shape, device = tuple(a.shape), a.device
    top = a.flatten(1).amax(dim=1).clamp_min(1e-30)
    mask = torch.gt(a, (SUPPORT_THRESHOLD * top)[:, None, None], out=_work("mask", shape, torch.float32, device))
    obj = torch.complex(re, im, out=_work("obj", shape, torch.complex64, device))
    z = torch.mul(obj, mask, out=_work("z", shape, torch.complex64, device))
    rows = torch.mul(z[:, 1:], z[:, :-1].conj(), out=_work("rows", (b, n - 1, n), torch.complex64, device))
    cols = torch.mul(z[:, :, 1:], z[:, :, :-1].conj(), out=_work("cols", (b, n, n - 1), torch.complex64, device))
    steps = torch.stack([torch.angle(rows.sum(dim=(1, 2))), torch.angle(cols.sum(dim=(1, 2)))], dim=1)
    coords = torch.arange(n, device=device, dtype=torch.float32) - n // 2
    angles = -steps[:, :, None] * coords
    factors = torch.complex(torch.cos(angles), torch.sin(angles))  # (B, 2, N): the rows' and the columns'
    z.mul_(factors[:, 1, None, :]).mul_(factors[:, 0, :, None])  # the ramp is separable: no exponential a pixel
    w = torch.mul(a, mask, out=_work("w", shape, torch.float32, device))
    by_row = w.sum(dim=2)
    mass = by_row.sum(dim=1).clamp_min(1e-30)
    total = z.sum(dim=(1, 2))
    strain_rms = (-2 * torch.log((total.abs() / mass).clamp(1e-12, 1.0))).sqrt()
    own = torch.mul(w, w, out=_work("own", shape, torch.float32, device)).sum(dim=(1, 2))
    ref = torch.complex(reference[:, 0], reference[:, 1])
    cross = torch.mul(z, ref.conj(), out=_work("cross", shape, torch.complex64, device)).sum(dim=(1, 2))
    correlation = cross.abs() / (own * ref.abs().square().sum(dim=(1, 2))).sqrt().clamp_min(1e-30)
    intensity, peak_mass, peak_row, peak_col = _peak_window(crops)
    peak_mass = peak_mass.clamp_min(1e-30)
    return torch.stack([peak_row / peak_mass, peak_col / peak_mass, intensity,
                        mask.sum(dim=(1, 2)), (by_row * coords).sum(dim=1) / mass,
                        (w.sum(dim=1) * coords).sum(dim=1) / mass, torch.angle(total), strain_rms, correlation])


def warm_up(n: int, device: torch.device | str = "cpu", *, batch: int = 8) -> threading.Thread | None:
    """Compile the kernels for ``n x n`` objects on ``device`` as the live engine calls them (in
    inference mode, batches of ``batch`` frames and of one, one reference), on a thread of its own
    (the engine calls it once it has made ``COMPILE_AFTER`` frames); returns the thread (``None``
    when compiling is off)."""
    if not all(k.enabled for k in KERNELS):
        return None
    for kernel in KERNELS:
        kernel.arm()

    def run() -> None:
        try:
            generator = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                for b in (batch, 1):
                    amp, phase, crops = (torch.rand((b, n, n), generator=generator).to(device) for _ in range(3))
                    planes = centred_planes(amp, phase)
                    reference = reference_objects(amp[:1], phase[:1])
                    origins = torch.zeros((b, 2))
                    args = (amp, phase, crops, origins)
                    compile_observables(lambda a=args, r=reference, p=planes: frame_observables(*a, reference=r,
                                                                                                planes=p))
        except Exception:  # noqa: BLE001 - a warm-up that fails leaves the calls to compile (or not) themselves
            logger.warning("compiling the observables ahead failed", exc_info=True)

    thread = threading.Thread(target=run, daemon=True, name="compile-observables-ahead")
    _AHEAD.append(thread)
    thread.start()
    return thread


def reference_objects(amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The ramp-removed objects in their supports, as real and imaginary planes ``(B, 2, N, N)``,
    that ``correlation`` compares later frames with (the engine keeps each run's first frame's)."""
    a, p = amplitude.float(), phase.float()
    re, im = a * torch.cos(p), a * torch.sin(p)  # its own: the batch's work tensors stay as they are
    top, rows, cols = _support_figures(a, re, im, a)[:3]
    return torch.stack(_demodulate(a, re, im, top, rows, cols), dim=1)


def correlation(amplitude: torch.Tensor, phase: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``correlation`` ``(B,)`` of objects ``(B, N, N)`` with the planes of
    :func:`reference_objects` (one, or one a frame), as :func:`frame_observables` computes it, in
    plain eager torch: for results made elsewhere against another reference (the worker pool's
    merge recomputes its stored runs' against their first stored frame)."""
    with torch.inference_mode():
        z = reference_objects(amplitude, phase)
        x, y = z[:, 0], z[:, 1]
        return _correlation(x, y, (x * x + y * y).sum(dim=(1, 2)), reference.float())


def frame_observables(amplitude: torch.Tensor, phase: torch.Tensor, crops: torch.Tensor, origins: torch.Tensor, *,
                      bin: int = 1, reference: torch.Tensor | None = None,
                      planes: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """:data:`OBSERVABLES` (but ``chi2``) of ``(B, N, N)`` reconstructions, each ``(B,)`` float32
    (computed in inference mode: no autograd through them).

    ``crops`` are the measured ``(B, M, M)`` crops the model saw (counts, the peak at ``M // 2``),
    ``origins`` ``(B, 2)`` their top-left detector pixel and ``bin`` their binning; ``reference``
    the planes of :func:`reference_objects` (one, or one a frame) that ``correlation`` compares
    with (NaN without one); ``planes`` the reconstructions' real and imaginary planes, when the
    caller has them: :func:`~cdinn_stream.core.metrics.centred_planes` (made here when not given)
    or the plain ``amplitude * cos(phase)``, ``amplitude * sin(phase)`` (the same figures).

    Two passes over the objects: about 1.2 us a frame on two CPU cores once compiled, 5-6 us
    before (``cdinn-stream bench --suite observables``)."""
    n, m = amplitude.shape[-1], crops.shape[-1]
    a = amplitude.float()
    re, im = centred_planes(amplitude, phase) if planes is None else planes
    ref = reference if reference is not None else torch.zeros((1, 2, n, n), device=a.device)
    centre = m // 2 * bin + (bin - 1) / 2  # the crop centre's detector pixel, from the origin
    offsets = origins.to(device=a.device, dtype=torch.float32) + centre
    scale = torch.tensor(float(bin), device=a.device)  # (a tensor: a float argument would compile anew for each)
    figures = _OBSERVE(a, re, im, crops, ref, offsets, scale)
    if figures is None:
        with torch.inference_mode():  # as the compiled code (its work tensors take no autograd)
            figures = _on_detector(_eager_figures(a, re.float(), im.float(), crops, ref.float()), offsets, scale)
    values = list(figures.unbind(0))
    if reference is None:
        values[-1] = torch.full_like(values[-1], float("nan"))
    return dict(zip(_NAMES, values, strict=True))
