"""A simulated detector at native size writing HDF5 files as AreaDetector and ophyd-async do.

:func:`write_frames` writes frames (:func:`~cdinn_stream.lab.sim.native_frames`: an EIGER 1M or
4M geometry with module gaps, a drifting and jumping Bragg peak, Poisson counts, hot pixels) to
an HDF5 file laid out as a detector writes it: ``/entry/data/data``, one chunk per frame,
uncompressed or bitshuffle-LZ4 compressed (``hdf5plugin``, as EIGERs write).
:func:`run_documents` gives the bluesky documents of a run that took them, in either of the two
ways detectors say where their frames are:

* ``"ophyd-async"``: ``stream_resource`` + ``stream_datum`` (each datum a page of frames);
* ``"area-detector"``: ``resource`` (spec ``AD_HDF5``) + ``datum`` per frame, referenced by the
  events (``filled: False``), as ophyd's AreaDetector HDF5 plugin does.

Tests, the bench (``cdinn-stream bench --suite detector``) and the demo feed these documents to a
:class:`~cdinn_stream.live.callback.ReconstructionCallback` exactly as a RunEngine would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from event_model import compose_run

__all__ = ["DATASET", "LAYOUTS", "COMPRESSIONS", "write_frames", "run_documents"]

#: where detectors' HDF5 writers put the frames
DATASET = "/entry/data/data"
#: how a run says where its frames are
LAYOUTS = ("ophyd-async", "area-detector")
#: compression of the frames in the file (``None``: none)
COMPRESSIONS = (None, "bslz4")


def write_frames(path: str | Path, frames: np.ndarray, *, compression: str | None = None) -> Path:
    """Write ``(n, H, W)`` frames to ``path`` as ``/entry/data/data``, one chunk per frame,
    uncompressed or ``"bslz4"`` (bitshuffle + LZ4 through ``hdf5plugin``, as EIGERs write)."""
    import h5py

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    options: dict = {}
    if compression == "bslz4":
        try:
            import hdf5plugin
        except ImportError as err:
            raise RuntimeError("bitshuffle-LZ4 needs hdf5plugin: pip install cdinn-stream[detector]") from err
        options = dict(hdf5plugin.Bitshuffle(cname="lz4"))
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.create_dataset(DATASET, data=frames, chunks=(1, *frames.shape[1:]), **options)
    return path


def run_documents(path: str | Path, n: int, shape: tuple[int, int], *, layout: str = "ophyd-async",
                  page: int = 1, data_key: str = "eiger", dtype: str = "uint32") -> Iterator[tuple[str, dict]]:
    """``(name, doc)`` of a run whose ``n`` frames of ``shape`` are in the HDF5 file at ``path``
    (:func:`write_frames`), said the ``layout`` way, ``page`` frames a ``stream_datum`` or event
    page."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    path = Path(path).resolve()
    run = compose_run(metadata={"detector": data_key, "frames_file": str(path)})
    yield "start", run.start_doc
    key = {"source": f"sim:{data_key}", "dtype": "array", "shape": [*shape], "dtype_numpy": np.dtype(dtype).str,
           "external": "STREAM:" if layout == "ophyd-async" else "FILESTORE:"}
    desc = run.compose_descriptor(name="primary", data_keys={data_key: key})
    yield "descriptor", desc.descriptor_doc
    if layout == "ophyd-async":
        res = run.compose_stream_resource(mimetype="application/x-hdf5", uri=path.as_uri(), data_key=data_key,
                                          parameters={"dataset": DATASET})
        yield "stream_resource", res.stream_resource_doc
        for start in range(0, n, page):
            stop = min(start + page, n)
            yield "stream_datum", res.compose_stream_datum(indices={"start": start, "stop": stop},
                                                           seq_nums={"start": start + 1, "stop": stop + 1},
                                                           descriptor=desc.descriptor_doc)
    else:
        res = run.compose_resource(spec="AD_HDF5", root="/", resource_path=str(path).lstrip("/"),
                                   resource_kwargs={"frame_per_point": 1})
        yield "resource", res.resource_doc
        for start in range(0, n, page):
            stop = min(start + page, n)
            datums = [res.compose_datum(datum_kwargs={"point_number": i}) for i in range(start, stop)]
            for datum in datums:
                yield "datum", datum
            now = time.time()
            yield "event_page", desc.compose_event_page(
                data={data_key: [d["datum_id"] for d in datums]}, timestamps={data_key: [now] * len(datums)},
                seq_num=list(range(start + 1, stop + 1)), time=[now] * len(datums),
                filled={data_key: [False] * len(datums)})
    yield "stop", run.compose_stop()
