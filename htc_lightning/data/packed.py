"""COCO records ``(image info, annotations)`` packed into a few flat numpy arrays, cached once per node.

A list of per-image Python dicts costs ~30 KiB an image at COCO scale (4 M gc-tracked objects for train2017),
every DDP rank holds its own copy, and every DataLoader worker slowly copies the parts it reads, because reading
a Python object writes its reference count into the page (copy-on-write after ``fork``). detectron2
(``DatasetFromList(serialize=True)``) and mmengine (``BaseDataset(serialize_data=True)``) serialise the list
into one buffer for that reason; :class:`PackedRecords` does the same and also stores the polygon coordinates as
one float64 array (pickle would spend 9 bytes on each). ``records[i]`` rebuilds the same ``(info, anns)`` pair
(polygon coordinates come back as Python floats) on each access, so nothing per image stays alive.

:func:`load_or_build` shares the work between the processes of a node: the first to take a file lock parses the
json and writes the packed arrays to a cache file named by the json's content hash and the dataset's arguments
(in a forked process, so that no process keeps the parse's heap); the others (and later runs) map that file
read-only, so its pages are the page cache's, shared by every rank and worker. Set ``HTC_LIGHTNING_ANN_CACHE``
to a folder (default ``~/.cache/htc_lightning/annotations``) or to ``off``; files smaller than
:data:`CACHE_MIN_BYTES` are parsed in place, as parsing them costs less than hashing.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import mmap
import multiprocessing
import os
import pickle
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CACHE_MIN_BYTES = 32 << 20
_MAGIC = b"HTCPACK1"
_ALIGN = 64
_ARRAYS = ("blob", "blob_offsets", "coords", "part_offsets", "record_parts", "image_ids", "sizes")


class _Polygons(tuple):
    """Stands in for a polygon list inside the pickled record: the number of its parts."""


def _flat_polygon(seg: Any) -> list | None:
    """The parts of a polygon segmentation that can be stored as float64 without loss, else None."""
    if not isinstance(seg, list) or not all(type(p) is list for p in seg):
        return None
    if not set(map(type, itertools.chain.from_iterable(seg))) <= {float, int}:
        return None  # kept verbatim: a later check (or pycocotools) reports it as before
    return seg


class PackedRecords(Sequence):
    """An immutable sequence of COCO records ``(info, anns)`` held in numpy arrays (see the module doc)."""

    def __init__(self, records: Sequence[tuple[dict, list[dict]]] | None = None, *,
                 arrays: dict[str, np.ndarray] | None = None):
        if arrays is not None:
            self._arrays = arrays
            return
        blobs, part_lengths, record_parts = [], [], [0]
        polygons = []
        for info, anns in records:
            packed_anns = []
            for ann in anns:
                seg = _flat_polygon(ann.get("segmentation"))
                if seg is not None:
                    polygons.append(seg)
                    part_lengths += [len(p) for p in seg]
                    ann = {**ann, "segmentation": _Polygons((len(seg),))}
                packed_anns.append(ann)
            record_parts.append(len(part_lengths))
            blobs.append(pickle.dumps((info, packed_anns), protocol=pickle.HIGHEST_PROTOCOL))
        part_offsets = np.zeros(len(part_lengths) + 1, np.int64)
        np.cumsum(part_lengths, out=part_offsets[1:])
        blob_offsets = np.zeros(len(blobs) + 1, np.int64)
        np.cumsum([len(b) for b in blobs], out=blob_offsets[1:])
        coords = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(polygons)), np.float64,
                             count=int(part_offsets[-1]))
        self._arrays = {
            "blob": np.frombuffer(b"".join(blobs), np.uint8), "blob_offsets": blob_offsets, "coords": coords,
            "part_offsets": part_offsets, "record_parts": np.asarray(record_parts, np.int64),
            # the two lists a sampler needs, without unpickling every record
            "image_ids": np.asarray([int(info["id"]) for info, _ in records], np.int64).reshape(-1),
            "sizes": np.asarray([(info.get("height", -1), info.get("width", -1)) for info, _ in records],
                                np.int64).reshape(-1, 2),
        }

    def __len__(self) -> int:
        return len(self._arrays["blob_offsets"]) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        a = self._arrays
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} out of range for {n} records")
        index %= n
        info, anns = pickle.loads(a["blob"][a["blob_offsets"][index]:a["blob_offsets"][index + 1]])
        part = int(a["record_parts"][index])
        offsets = a["part_offsets"]
        for ann in anns:
            seg = ann.get("segmentation")
            if type(seg) is _Polygons:
                ends = offsets[part:part + seg[0] + 1].tolist()
                ann["segmentation"] = [a["coords"][s:e].tolist() for s, e in itertools.pairwise(ends)]
                part += seg[0]
        return info, anns

    @property
    def image_ids(self) -> np.ndarray:
        return self._arrays["image_ids"]

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2) annotated (height, width) of each image, -1 where the json has none."""
        return self._arrays["sizes"]

    @property
    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self._arrays.values())

    def save(self, path: Path, meta: Any) -> None:
        """Writes the arrays (64-byte aligned, for mapping) and a picklable ``meta`` to ``path`` atomically."""
        layout, offset = {}, 0
        for name in _ARRAYS:
            array = self._arrays[name]
            layout[name] = (array.dtype.str, array.shape, offset)
            offset += -(-array.nbytes // _ALIGN) * _ALIGN
        header = pickle.dumps({"layout": layout, "meta": meta}, protocol=pickle.HIGHEST_PROTOCOL)
        start = -(-(len(_MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(_MAGIC + struct.pack("<Q", len(header)) + header)
            for name in _ARRAYS:
                f.seek(start + layout[name][2])
                array = np.ascontiguousarray(self._arrays[name])
                if array.size:  # (a memoryview of an empty array cannot be cast)
                    f.write(memoryview(array).cast("B"))
            f.truncate(start + offset)
        os.replace(tmp, path)  # readers never see a half-written file

    @classmethod
    def load(cls, path: Path) -> tuple[PackedRecords, Any]:
        """Maps a file written by :meth:`save` read-only; returns the records and the saved ``meta``."""
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if buffer[:len(_MAGIC)] != _MAGIC:
            raise ValueError(f"{path} is not a packed annotation cache (delete it)")
        (length,) = struct.unpack("<Q", buffer[len(_MAGIC):len(_MAGIC) + 8])
        header = pickle.loads(buffer[len(_MAGIC) + 8:len(_MAGIC) + 8 + length])
        start = -(-(len(_MAGIC) + 8 + length) // _ALIGN) * _ALIGN
        arrays = {}
        for name, (dtype, shape, offset) in header["layout"].items():
            count = int(np.prod(shape))
            arrays[name] = np.frombuffer(buffer, np.dtype(dtype), count, start + offset).reshape(shape)
        records = cls(arrays=arrays)
        records._path = path
        return records, header["meta"]

    def __reduce__(self):
        # A mapped cache travels to spawned workers as its path (they map it too), in-memory arrays as bytes.
        path = getattr(self, "_path", None)
        if path is not None and path.is_file():
            return _load_records, (path,)
        return _from_arrays, ({k: np.array(v) for k, v in self._arrays.items()},)


def _load_records(path: Path) -> PackedRecords:
    return PackedRecords.load(path)[0]


def _from_arrays(arrays: dict[str, np.ndarray]) -> PackedRecords:
    return PackedRecords(arrays=arrays)


def cache_dir() -> Path | None:
    setting = os.environ.get("HTC_LIGHTNING_ANN_CACHE", "")
    if setting.lower() in ("off", "0", "false", "none"):
        return None
    if setting:
        return Path(setting).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "htc_lightning" / "annotations"


def _digest(paths: Sequence[Path], options: dict[str, Any]) -> str:
    h = hashlib.sha256(repr(sorted((k, repr(v)) for k, v in options.items())).encode())
    for path in paths:
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def load_or_build(target: object, ann_file: Path, options: dict[str, Any], code_files: Sequence[Path],
                  build: Callable[[], Sequence[tuple[dict, list[dict]]]]) -> PackedRecords:
    """``build()`` packed, or the node's cached copy of it.

    ``build`` parses ``ann_file`` and may set attributes on ``target`` (the dataset) and warn; a cache hit
    restores those attributes and repeats those warnings, so a dataset read from the cache is indistinguishable
    from one parsed now. The cache key is the json's content, ``options`` (every argument that changes the
    records) and the source of ``code_files`` (the parser), so an edit of any of them parses afresh.
    """
    folder = cache_dir()
    if folder is None or ann_file.stat().st_size < CACHE_MIN_BYTES:
        return _build(build)
    # Named by the file and options, then by the content: a new version of the json (or of the parser)
    # replaces the old cache file, other splits and options keep theirs.
    family = f"{ann_file.stem}-{_digest([], {'path': ann_file.resolve(), **options})[:8]}"
    path = folder / f"{family}-{_digest([ann_file, *code_files], options)[:24]}.pack"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{path.name}.lock", "a")
    except OSError as e:
        warnings.warn(f"cannot use the annotation cache folder {folder} ({e}); parsing {ann_file} in this "
                      f"process (set HTC_LIGHTNING_ANN_CACHE to a writable folder or to 'off')", stacklevel=3)
        return _build(build)
    with lock:
        # One process of the node parses; the others wait here, then map what it wrote.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            failure = _build_and_save_in_child(target, build, path)
            if failure is not None:  # the folder is not writable after all
                records = _build(build, stacklevel=5)
                warnings.warn(f"cannot write the annotation cache {path} ({failure}); every process parses "
                              f"{ann_file} itself", stacklevel=3)
                return records
            for old in folder.glob(f"{family}-*.pack"):
                if old != path:
                    old.unlink(missing_ok=True)  # processes still mapping it keep their pages
        records, meta = PackedRecords.load(path)
    vars(target).update(meta["attributes"])
    for category, message in meta["warnings"]:
        warnings.warn(message, category, stacklevel=3)
    return records


def _build(build: Callable, stacklevel: int = 4) -> PackedRecords:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = PackedRecords(build())
    for w in caught:  # re-raised after the parse, so they point at the dataset's caller as before
        warnings.warn(w.message, w.category, stacklevel=stacklevel)
    return records


def _build_and_save_in_child(target: object, build: Callable, path: Path) -> str | None:
    """Runs ``build`` in a forked process that writes the cache file, so that the parsed json (GBs of Python
    objects at COCO scale, whose freed heap the allocator keeps) never lives in this one. Re-raises the
    parse's errors here; returns why the file could not be written, None when it was."""
    if multiprocessing.current_process().daemon:  # a daemonic process may not fork: parse here
        return _build_and_save(target, build, path)
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(target, build, path, writer), daemon=True)
    child.start()
    writer.close()
    try:
        kind, value = reader.recv()
    except EOFError:
        kind, value = "error", RuntimeError(f"the process parsing into {path} died")
    child.join()
    if kind == "error":
        raise value
    return value


def _build_and_save(target: object, build: Callable, path: Path) -> str | None:
    before = set(vars(target))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = PackedRecords(build())
    attributes = {k: v for k, v in vars(target).items() if k not in before}
    try:
        records.save(path, {"attributes": attributes, "warnings": [(w.category, str(w.message)) for w in caught]})
    except OSError as e:
        return str(e)
    return None


def _child_main(target: object, build: Callable, path: Path, writer) -> None:
    try:
        writer.send(("ok", _build_and_save(target, build, path)))
    except BaseException as e:  # noqa: BLE001 - every failure of the parse goes to the waiting parent
        try:
            writer.send(("error", e))
        except Exception:  # an exception that does not pickle
            writer.send(("error", RuntimeError(repr(e))))
