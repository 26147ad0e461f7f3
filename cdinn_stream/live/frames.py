"""Reading detector frames from the files a detector wrote: one reader per format, shared by the
live callback (``stream_resource``/``stream_datum`` documents) and ``replay`` (Tiled data sources).

Formats, by the mimetype bluesky and Tiled give them:

* ``application/x-hdf5``: one file, the frames in ``parameters["dataset"]`` (ophyd-async's
  HDF writers; read with h5py in SWMR mode, so a file still being written can be read);
* ``multipart/related;type=application/x-npy``: one ``.npy`` file per frame (``ophyd.sim``'s
  ``NPY_SEQ`` detectors, as TiledWriter stores them): the files are ``parameters["data_uris"]``,
  or ``uri`` and a ``parameters["template"]`` such as ``"%s_%d.npy"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlparse

import numpy as np

__all__ = ["FORMATS", "read_frames", "local_path"]

HDF5 = "application/x-hdf5"
NPY_SEQ = "multipart/related;type=application/x-npy"


def local_path(uri: str) -> str:
    """The file path of a ``file://`` URI (or a plain path)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"{uri} is not a local file (scheme {parsed.scheme!r})")
    return parsed.path if parsed.scheme else uri


def _read_hdf5(uris: Sequence[str], parameters: dict, start: int, stop: int) -> np.ndarray:
    import h5py

    dataset = parameters.get("dataset")
    if not dataset:
        raise ValueError("HDF5 frames need parameters['dataset'] (the dataset's path in the file)")
    with h5py.File(local_path(uris[0]), "r", swmr=True) as f:
        return f[dataset][start:stop]


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


def read_frames(mimetype: str | None, uris: Sequence[str], parameters: dict, start: int, stop: int) -> np.ndarray:
    """Frames ``start..stop-1`` of a detector's files (``mimetype`` ``None``: HDF5, as ophyd-async
    writes without saying); a ``ValueError`` for a format no reader knows."""
    reader = FORMATS.get(mimetype or HDF5)
    if reader is None:
        raise ValueError(f"no reader for frames of type {mimetype!r} (readable: {', '.join(FORMATS)})")
    if not uris:
        raise ValueError("no file named for the frames")
    return reader(list(uris), parameters or {}, start, stop)
