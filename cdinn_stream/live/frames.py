"""Reading detector frames from the files a detector wrote: one reader per format, shared by the
live callback (``stream_resource``/``stream_datum`` documents) and ``replay`` (Tiled data sources).

Formats, by the mimetype bluesky and Tiled give them:

* ``application/x-hdf5``: one file, the frames in ``parameters["dataset"]`` (ophyd-async's
  HDF writers; read with h5py in SWMR mode, so a file still being written can be read);
* ``multipart/related;type=application/x-npy``: one ``.npy`` file per frame (``ophyd.sim``'s
  ``NPY_SEQ`` detectors, as TiledWriter stores them): the files are ``parameters["data_uris"]``,
  or ``uri`` and a ``parameters["template"]`` such as ``"%s_%d.npy"``.

And the ``NPY_SEQ`` handler of resource/datum documents (:class:`NumpySeqHandler`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from urllib.parse import urlparse

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "read_frames", "open_frames", "local_path", "FileFrames", "HDF5Files", "AD_HDF5_SPECS",
           "AD_HDF5_DATASET", "group_file_frames", "NumpySeqHandler", "image_keys"]

HDF5 = "application/x-hdf5"
NPY_SEQ = "multipart/related;type=application/x-npy"


def image_keys(data_keys: dict, image_key: str | None = None) -> list[str]:
    """A descriptor's detector image fields: ``image_key`` when given (and there), else every
    field of two or more dimensions (the callback's, the worker pool's and the publisher's rule)."""
    if image_key is not None:
        return [image_key] if image_key in data_keys else []
    return [k for k, dk in data_keys.items() if len(dk.get("shape") or []) >= 2]


class NumpySeqHandler:
    """The handler of ``NPY_SEQ`` resources (``ophyd.sim``'s ``SynSignalWithRegistry``): datum
    ``index`` is the file ``<root>/<resource_path>_<index>.npy``. As ``ophyd.sim.NumpySeqHandler``
    reads them, without importing ophyd (which starts its control layer's threads, eight polling
    10 times a second, in every process that reads frames)."""

    specs = {"NPY_SEQ"}

    def __init__(self, filename: str, root: str = ""):
        self._name = os.path.join(root, filename)

    def __call__(self, index: int) -> np.ndarray:
        return np.load(f"{self._name}_{index}.npy", allow_pickle=False)

    def get_file_list(self, datum_kwarg_gen) -> list[str]:
        """The files of these datums (for export)."""
        return [f"{self._name}_{kwargs['index']}.npy" for kwargs in datum_kwarg_gen]


def local_path(uri: str) -> str:
    """The file path of a ``file://`` URI (or a plain path)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"{uri} is not a local file (scheme {parsed.scheme!r})")
    return parsed.path if parsed.scheme else uri


def _h5py():
    """h5py, with the compression filters of ``hdf5plugin`` registered when it is installed."""
    import h5py

    try:
        import hdf5plugin  # noqa: F401  (registers bitshuffle-LZ4, Blosc, ... with HDF5)
    except ImportError:
        pass
    return h5py


class _FrameMap:
    """Uncompressed frames of an HDF5 dataset read straight from the file's pages: each frame's
    bytes (its chunk, or its place in a contiguous dataset) mapped into memory, so that a window of
    a frame costs the pages it touches, not HDF5's selection machinery (about 10x less for a
    136 x 136 window of an EIGER 1M frame; whole frames are left to HDF5, which copies them faster
    than the first touch of mapped pages). ``None`` (:meth:`of`) for compressed or otherwise
    laid-out data, which HDF5 reads."""

    def __init__(self, dataset, contiguous: bool):
        self.dataset = dataset
        self.path = dataset.file.filename
        self.frame_shape = tuple(dataset.shape[-2:])
        self.dtype = dataset.dtype
        self.frame_bytes = int(np.prod(self.frame_shape)) * self.dtype.itemsize
        self.contiguous = contiguous
        self._offsets: dict[int, int] = {}
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    @classmethod
    def of(cls, dataset) -> _FrameMap | None:
        import h5py

        try:
            plist = dataset.id.get_create_plist()
            if plist.get_nfilters() or not dataset.dtype.isnative or dataset.dtype.kind not in "uif":
                return None
            layout = plist.get_layout()
            frame = tuple(dataset.shape[1:])
            if layout == h5py.h5d.CONTIGUOUS and dataset.id.get_offset() is not None:
                return cls(dataset, True)
            if layout == h5py.h5d.CHUNKED and dataset.chunks == (1, *frame):
                return cls(dataset, False)
        except Exception:  # an older HDF5 or a driver that cannot say: HDF5 reads it
            return None
        return None

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as a read-only view of the mapped file, ``(H, W)``."""
        offset = self._offsets.get(i)
        if offset is None:
            if self.contiguous:
                offset = self.dataset.id.get_offset() + i * self.frame_bytes
            else:
                info = self.dataset.id.get_chunk_info_by_coord((i,) + (0,) * (self.dataset.ndim - 1))
                if info.byte_offset is None or info.size != self.frame_bytes:
                    raise ValueError(f"frame {i} of {self.dataset.name} is not written yet")
                offset = info.byte_offset
            self._offsets[i] = offset
        if offset + self.frame_bytes > self._map.size:  # the file grew since it was mapped
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[offset : offset + self.frame_bytes].view(self.dtype).reshape(self.frame_shape)


class FileFrames:
    """Frames ``start..stop`` of an HDF5 dataset ``(frames, H, W)`` (or ``(frames, 1, H, W)``, as
    ophyd-async writes), read only when indexed: ``frames[a:b, rows, cols]`` reads that hyperslab,
    ``np.asarray(frames)`` all of them. ``shape``, ``dtype``, ``ndim`` and ``len`` as an array's.
    Uncompressed frames (one chunk a frame, or contiguous) are read from the mapped file
    (:class:`_FrameMap`), others through HDF5."""

    def __init__(self, dataset, start: int, stop: int, frame_map: _FrameMap | None = None):
        shape = tuple(dataset.shape)
        if len(shape) == 4 and shape[1] == 1:
            self._squeeze = True
        elif len(shape) == 3:
            self._squeeze = False
        else:
            raise ValueError(f"dataset {dataset.name} of shape {shape} is not a stack of 2-D frames")
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"frames {start}..{stop - 1} asked for, {shape[0]} in {dataset.name}")
        self.dataset, self.start, self.stop = dataset, int(start), int(stop)
        self._map = frame_map
        self.shape = (self.stop - self.start, shape[-2], shape[-1])
        self.dtype = dataset.dtype
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, slice):
            a, b, step = first.indices(len(self))
            if step != 1:
                raise IndexError("frames in a file are read in runs of consecutive frames (step 1)")
            frames: slice | int = slice(self.start + a, self.start + max(a, b))
        elif isinstance(first, int | np.integer):
            i = int(first) + (len(self) if first < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"frame {first} of {len(self)}")
            frames = self.start + i
        else:
            raise IndexError("frames in a file are indexed by a slice or an integer")
        mapped = (self._map is not None and all(isinstance(k, slice) for k in rest)
                  and self._window_fraction(rest) < 0.25)  # whole frames: HDF5 reads them faster
        if mapped and isinstance(frames, int):
            return np.array(self._map.frame(frames)[rest])
        if mapped and frames.stop > frames.start:
            return np.stack([self._map.frame(i)[rest] for i in range(frames.start, frames.stop)])
        return self.dataset[(frames, 0, *rest) if self._squeeze else (frames, *rest)]

    def _window_fraction(self, rest: tuple) -> float:
        """The share of a frame's pixels that slices ``rest`` (rows, columns) select."""
        fraction = 1.0
        for k, n in zip(rest, self.shape[1:], strict=False):
            fraction *= len(range(*k.indices(n))) / max(n, 1)
        return fraction

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


def group_file_frames(parts: Sequence[FileFrames]) -> list[FileFrames]:
    """Parts (an event page of ``AD_HDF5`` datums) as few :class:`FileFrames` as can be: one for each
    run of parts that follow one another in one dataset, in order."""
    groups = [parts[0]]
    for p in parts[1:]:
        last = groups[-1]
        if p.dataset == last.dataset and p.start == last.stop:
            groups[-1] = FileFrames(last.dataset, last.start, p.stop, last._map)
        else:
            groups.append(p)
    return groups


class HDF5Files:
    """The HDF5 files one run reads frames from, each opened once (SWMR) and closed with the run."""

    def __init__(self) -> None:
        self._files: dict[str, object] = {}
        self._maps: dict[tuple[str, str], _FrameMap | None] = {}
        self._datasets: dict[tuple[str, str], object] = {}

    def frames(self, path: str, name: str, start: int, stop: int) -> FileFrames:
        """Frames ``start..stop`` of dataset ``name`` of the file at ``path``, read when indexed."""
        ds = self.dataset(path, name, stop)
        key = (path, name)
        if key not in self._maps:
            self._maps[key] = _FrameMap.of(ds)
        return FileFrames(ds, start, stop, self._maps[key])

    def dataset(self, path: str, name: str, stop: int):
        """Dataset ``name`` of the file at ``path``, holding at least ``stop`` frames: one handle
        per dataset, refreshed in place while a writer adds frames in SWMR mode (a file written
        otherwise is opened again to see them). Too few frames even then: ``ValueError``."""
        key = (path, name)
        ds = self._datasets.get(key)
        if ds is None:
            ds = self._datasets[key] = self._file(path)[name]
        if ds.shape[0] < stop:
            try:
                ds.refresh()
            except Exception:  # not written in SWMR mode: see the file anew
                self._files.pop(path).close()
                for k in [k for k in self._datasets if k[0] == path]:
                    self._datasets.pop(k)
                    self._maps.pop(k, None)
                ds = self._datasets[key] = self._file(path)[name]
        if ds.shape[0] < stop:
            raise ValueError(f"frames up to {stop - 1} asked for, {ds.shape[0]} in {name} of {path} (yet)")
        return ds

    def _file(self, path: str):
        f = self._files.get(path)
        if f is None:
            h5py = _h5py()
            try:
                f = self._files[path] = h5py.File(path, "r", swmr=True)
            except OSError as err:
                raise OSError(f"cannot open {path} ({err}); a file still being written can be read live only "
                              "when its writer uses SWMR mode (AreaDetector: the HDF5 plugin's SWMR mode, "
                              "spec AD_HDF5_SWMR; ophyd-async writes SWMR): else replay the run afterwards") from err
        return f

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:
                logger.exception("closing %s failed", f)
        self._files.clear()
        self._maps.clear()
        self._datasets.clear()


def _open_hdf5(uris: Sequence[str], parameters: dict, start: int, stop: int, files: HDF5Files) -> FileFrames:
    dataset = parameters.get("dataset")
    if not dataset:
        raise ValueError("HDF5 frames need parameters['dataset'] (the dataset's path in the file)")
    return files.frames(local_path(uris[0]), dataset, start, stop)


def _read_hdf5(uris: Sequence[str], parameters: dict, start: int, stop: int) -> np.ndarray:
    files = HDF5Files()
    try:
        return np.asarray(_open_hdf5(uris, parameters, start, stop, files))
    finally:
        files.close()


#: ``resource`` specs of AreaDetector's HDF5 plugin files, which the live callback reads itself
#: (a page of datums as one range of frames), and where those files hold the frames
AD_HDF5_SPECS = frozenset({"AD_HDF5", "AD_HDF5_SWMR"})
AD_HDF5_DATASET = "/entry/data/data"


def _npy_paths(uris: Sequence[str], parameters: dict, stop: int) -> list[str]:
    uris = parameters.get("data_uris") or uris  # every file, as Tiled lists a multipart data source
    template = parameters.get("template")
    if len(uris) >= stop or not template:
        return [local_path(u) for u in uris]
    base = local_path(uris[0])
    if template.count("%") == 2:  # "%s_%d.npy": the file stem, then the index (TiledWriter's NPY_SEQ)
        return [template % (base, i) for i in range(stop)]
    return [base + template % i for i in range(stop)]


def _read_npy(uris: Sequence[str], parameters: dict, start: int, stop: int) -> np.ndarray:
    paths = _npy_paths(uris, parameters, stop)
    if stop > len(paths):
        raise ValueError(f"frames {start}..{stop - 1} asked for, {len(paths)} files known")
    return np.stack([np.load(paths[i], allow_pickle=False) for i in range(start, stop)])


#: mimetype -> reader ``(uris, parameters, start, stop) -> (stop - start, ...) frames``
FORMATS = {HDF5: _read_hdf5, NPY_SEQ: _read_npy}


def open_frames(mimetype: str | None, uris: Sequence[str], parameters: dict, start: int, stop: int,
                files: HDF5Files) -> FileFrames | np.ndarray:
    """Frames ``start..stop-1`` as :func:`read_frames`, but HDF5 frames as :class:`FileFrames` of
    ``files`` (read when cropped: only the windows searched, when the peak is tracked)."""
    if (mimetype or HDF5) == HDF5 and uris:
        return _open_hdf5(list(uris), parameters or {}, start, stop, files)
    return read_frames(mimetype, uris, parameters, start, stop)


def read_frames(mimetype: str | None, uris: Sequence[str], parameters: dict, start: int, stop: int) -> np.ndarray:
    """Frames ``start..stop-1`` of a detector's files (``mimetype`` ``None``: HDF5, as ophyd-async
    writes without saying); a ``ValueError`` for a format no reader knows."""
    reader = FORMATS.get(mimetype or HDF5)
    if reader is None:
        raise ValueError(f"no reader for frames of type {mimetype!r} (readable: {', '.join(FORMATS)})")
    if not uris:
        raise ValueError("no file named for the frames")
    return reader(list(uris), parameters or {}, start, stop)
