"""The prepared-data cache: an entry is one memory-mapped Arrow file plus its report, committed by one rename.

Its keys (what `os.stat` says about the data files, for ranks that must not open them; the files' bytes, for the
entry itself), the stat index from one to the other, the lock that lets one process prepare an entry, and the
failure marker that tells the others the same data failed. Used by the tokenized data (prepare.py) and the held-out
split (split.py)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from chattune import __version__
from chattune.data.problems import DataError
from chattune.data.report import DataReport
from chattune.data.sources import Sources, source_files

DATASET_FILE = "dataset.arrow"  # one Arrow stream of (input_ids, labels), memory-mapped by every rank


REPORT_FILE = "report.json"
INTEGRITY_FILE = "integrity.json"  # rows, bytes and sha256 of DATASET_FILE, checked on load


def default_cache_dir() -> Path:
    root = os.environ.get("CHATTUNE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "chattune")
    return Path(root).expanduser() / "tokenized"


# The modules whose code decides what a cache entry holds: reading, validating, rendering, masking, encoding.
LABEL_CODE = ("problems", "sources", "reader", "tools", "records", "load", "chat_templates", "template", "encode",
              "report", "cache", "prepare")


def code_fingerprint() -> str:
    """Hash of the source that turns records into ids and labels (reading, rendering, masking, truncation): a change
    to any of it must not serve labels cached by the old code."""
    import importlib

    h = hashlib.sha256()
    for name in LABEL_CODE:
        h.update(Path(importlib.import_module(f"chattune.data.{name}").__file__).read_bytes())
    return h.hexdigest()[:16]


def _fingerprint(conversations, tokenizer, template_kwargs, stop_tokens, max_length, options: Any = ()) -> str:
    h = hashlib.sha256()
    h.update(f"chattune {__version__} prepare v1 code {code_fingerprint()}\n".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    settings = [tokenizer.chat_template, template_kwargs, list(stop_tokens), max_length, tokenizer.special_tokens_map,
                options]
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for c in conversations:
        h.update(json.dumps([c.messages, c.tools, c.masked], ensure_ascii=False, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


class ArrowWriter:
    """Appends samples (flat ids/labels + lengths) to one Arrow stream file, batch by batch, so no process ever
    holds the whole tokenized dataset."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.pa = pa
        self.schema = pa.schema([("input_ids", pa.large_list(pa.int32())), ("labels", pa.large_list(pa.int32()))])
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def write(self, arrays: dict[str, np.ndarray]) -> None:
        pa = self.pa
        if not len(arrays["lengths"]):
            return
        offsets = np.zeros(len(arrays["lengths"]) + 1, np.int64)
        np.cumsum(arrays["lengths"], out=offsets[1:])

        def column(flat: np.ndarray):
            return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int32, copy=False)))

        self.writer.write_batch(pa.record_batch([column(arrays["input_ids"]), column(arrays["labels"])],
                                                schema=self.schema))

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


def load_cached(target: Path):
    """The committed dataset of a cache entry, memory-mapped (nothing is read into memory)."""
    import datasets

    return datasets.Dataset.from_file(str(target / DATASET_FILE))


def is_ready(target: Path) -> bool:
    return all((target / name).exists() for name in (REPORT_FILE, DATASET_FILE, INTEGRITY_FILE))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _integrity(folder: Path, report: DataReport) -> dict[str, Any]:
    """What the entry holds, recorded at commit: its rows (checked against the report), bytes and checksum."""
    rows = len(load_cached(folder))
    if rows != report.kept:
        raise RuntimeError(f"the prepared data holds {rows} samples where {report.kept} were kept (a bug)")
    path = folder / DATASET_FILE
    return {"rows": rows, "bytes": path.stat().st_size, "sha256": _digest(path)}


def entry_problem(target: Path, checksum: bool) -> str | None:
    """What is wrong with a committed entry (a file cut short or changed after it was written), or None. The row
    count and size are always compared; the checksum (a read of the whole file) where `checksum` (once per node)."""
    try:
        want = json.loads((target / INTEGRITY_FILE).read_text())
        size = (target / DATASET_FILE).stat().st_size
    except (OSError, ValueError) as e:
        return f"its files cannot be read ({e})"
    if size != want["bytes"]:
        return f"{DATASET_FILE} is {size:,} bytes where {want['bytes']:,} were written"
    try:
        rows = len(load_cached(target))
    except Exception as e:  # pyarrow's ArrowInvalid on a stream cut mid-batch
        return f"{DATASET_FILE} cannot be read ({type(e).__name__}: {str(e)[:100]})"
    if rows != want["rows"]:
        return f"{DATASET_FILE} holds {rows:,} samples where {want['rows']:,} were written"
    if checksum and _digest(target / DATASET_FILE) != want["sha256"]:
        return f"{DATASET_FILE} does not match the checksum recorded when it was written"
    return None


def discard(target: Path) -> None:
    """Remove a damaged entry: renamed aside first (one step), so no process loads it while it is deleted."""
    aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.replace(target, aside)
    shutil.rmtree(aside, ignore_errors=True)


def commit(tmp: Path, target: Path, report: DataReport) -> None:
    """Move a finished cache entry into place atomically: a crash mid-write never leaves a half cache behind."""
    try:
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1))
        (tmp / INTEGRITY_FILE).write_text(json.dumps(_integrity(tmp, report)))
        os.replace(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process (another node's main process) committed the same cache first: use it. Anything else (a
        # full disk, no permission) is an error, not something to pass over.
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not is_ready(target):
            raise


def read_report(target: Path) -> DataReport:
    return DataReport(**json.loads((target / REPORT_FILE).read_text()))


HASH_BLOCK = 8 << 20


def stat_key(settings_text: str, sources: Sources) -> str:
    """What the data files look like to os.stat (never opening them), with the settings: the index entry the main
    process writes for the other ranks of its node."""
    h = hashlib.sha256(settings_text.encode())
    for path, kind in sources.items:
        for f in source_files(path, kind):
            st = f.stat()
            h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:24]


def content_key(settings_text: str, sources: Sources, total: int) -> str:
    """The cache key: settings and the bytes of every data file (`total` of them), streamed (nothing is parsed or
    held)."""
    from tqdm.auto import tqdm

    h = hashlib.sha256(settings_text.encode())
    with tqdm(total=total, desc="Hashing data files", unit="B", unit_scale=True, unit_divisor=1024,
              disable=total < (1 << 30), file=sys.stderr) as bar:
        for path, kind in sources.items:
            h.update(f"{path}\0{kind}\n".encode())
            for f in source_files(path, kind):
                h.update(f"{f.relative_to(path) if kind == 'saved' else ''}\n".encode())
                try:
                    with open(f, "rb") as stream:
                        while block := stream.read(HASH_BLOCK):
                            h.update(block)
                            bar.update(len(block))
                except OSError as e:
                    raise DataError(f"{f}: cannot be read: {e.strerror or e}") from None
    return h.hexdigest()[:20]


def usable_cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache directory, or a temporary one (with a warning) when it cannot be written."""
    from chattune.cli import log

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, prefix=".probe."):
            pass
        return cache
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / f"chattune-{os.getuid()}" / "tokenized"
        fallback.mkdir(parents=True, exist_ok=True)
        log(f"warning: the data cache {cache} cannot be written ({e.strerror or e}); using {fallback} for this run "
            "(set --data_cache_dir or CHATTUNE_CACHE to a writable directory to keep the cache)")
        return fallback


def index_path(cache: Path, stat_key: str) -> Path:
    return cache / "index" / stat_key


def write_index(cache: Path, stat_key: str, key: str) -> None:
    path = index_path(cache, stat_key)
    tmp = path.with_name(f".{stat_key}.{os.getpid()}.tmp")
    try:  # only an optimisation for the other ranks: they prepare themselves without it
        path.parent.mkdir(exist_ok=True)
        tmp.write_text(key)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a full disk: no half-written file left in the index


def drop_index(cache: Path, stat_key: str) -> None:
    with contextlib.suppress(OSError):
        index_path(cache, stat_key).unlink(missing_ok=True)


def read_index(cache: Path, stat_key: str) -> str | None:
    try:
        return index_path(cache, stat_key).read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def locked(cache: Path, key: str) -> Iterator[None]:
    """Exclusive right to prepare `key` among the processes sharing the cache (other nodes' main processes on a
    shared filesystem). POSIX record locks work over NFS; where locking is not supported, go on without it: the
    atomic commit still keeps the cache whole."""
    import fcntl

    from chattune.cli import log

    with open(cache / f".{key}.lock", "a+") as f:
        try:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):  # held elsewhere: EAGAIN on Linux, EACCES on some systems
                log(f"waiting for another process preparing the same data (lock {cache / f'.{key}.lock'})")
                fcntl.lockf(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        yield


def failure_path(cache: Path, key: str) -> Path:
    return cache / "failed" / key


def note_failure(cache: Path, key: str, message: str) -> None:
    try:  # only spares the other ranks the work; they find the problem themselves
        failure_path(cache, key).parent.mkdir(exist_ok=True)
        failure_path(cache, key).write_text(message)
    except OSError:
        with contextlib.suppress(OSError):
            failure_path(cache, key).unlink(missing_ok=True)


def has_failed(cache: Path, key: str) -> bool:
    return failure_path(cache, key).exists()
