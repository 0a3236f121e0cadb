"""Checkpoints that a kill, a node failure or a full disk cannot leave half written.

A checkpoint is written (by every rank, DeepSpeed shards included) under `output_dir/.chattune-staging/`, then the
main process writes a manifest of its files and sizes and renames the directory to `output_dir/checkpoint-N`: one
atomic step on one filesystem. What is visible as `checkpoint-N` is therefore complete, and rotation
(`--save_total_limit`) runs only after that rename, over complete checkpoints.

A checkpoint that is not complete anyway (one written before this existed, a file truncated or deleted later) is
found when a run resumes: it is renamed to `broken_checkpoint-N` (never deleted) with a warning, and the run resumes
from the previous complete one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator

STAGING = ".chattune-staging"
MANIFEST = "chattune_checkpoint.json"
BROKEN_PREFIX = "broken_"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = re.compile(r"^(adapter_model|model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")

# Errors of the filesystem a save can run into and training can survive; anything else is a bug and propagates.
SAVE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")
# torch.save's zip writer on a failed write: "[enforce fail at inline_container.cc:...] . unexpected pos 576 vs 534"
# or "PytorchStreamWriter failed writing file ...". It carries no errno.
_TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter")


def write_failure(error: BaseException, where: str) -> OSError | None:
    """The filesystem failure behind an exception raised while saving into `where`, as an OSError, or None when it
    is not one (a bug, which must propagate). A full disk does not always raise OSError: safetensors raises its own
    SafetensorError ("I/O error: No space left on device (os error 28)"), tokenizers a bare Exception ("No space
    left on device (os error 28)"), torch.save a RuntimeError without errno."""
    if isinstance(error, OSError):
        return error if error.errno in SAVE_ERRNOS else None
    text = str(error)
    found = _OS_ERROR_CODE.search(text)  # Rust's io::Error, in safetensors' and tokenizers' exceptions
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code)) if code in SAVE_ERRNOS else None
    if isinstance(error, RuntimeError) and any(mark in text for mark in _TORCH_WRITE_FAILED):
        code = errno.ENOSPC if free_bytes(where) < 1 << 20 else errno.EIO
        return OSError(code, os.strerror(code))
    return None


def committed(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` directory, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def files_and_sizes(path: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = os.path.getsize(full)
    return out


def write_manifest(path: str) -> None:
    files = files_and_sizes(path)
    files.pop(MANIFEST, None)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump({"files": files, "written": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)


def problem(path: str) -> str | None:
    """What is missing or damaged in the checkpoint at `path`, or None when it is complete."""
    manifest = os.path.join(path, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                files = json.load(f)["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"{MANIFEST} is unreadable ({e})"
        for name, size in files.items():
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                return f"{name} is missing"
            if os.path.getsize(full) != size:
                return f"{name} has {os.path.getsize(full):,} bytes, {size:,} were written"
        return None
    return _structural_problem(path)  # written before manifests existed, or by another tool


def _structural_problem(path: str) -> str | None:
    names = set(os.listdir(path))
    if "trainer_state.json" not in names:
        return "trainer_state.json is missing"
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"trainer_state.json is unreadable ({e})"
    weights = [n for n in names if WEIGHT_FILES.match(n)]
    if not weights and "latest" not in names:  # `latest` names DeepSpeed's global_stepN folder
        return "it holds no model or adapter weights"
    for name in sorted(names):
        full = os.path.join(path, name)
        why = _file_problem(full)
        if why:
            return f"{name} is damaged ({why})"
    return None


def _file_problem(path: str) -> str | None:
    """A cheap integrity check: safetensors headers cover the file; torch's zip files have their central directory."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, "pt"):
                return None
        except Exception as e:  # SafetensorError: truncated, or not a safetensors file
            return str(e).splitlines()[0]
    if path.endswith((".pt", ".pth", ".bin")) and os.path.isfile(path):
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as e:
            return str(e)
    return None


def move_aside(path: str) -> str:
    """Rename a broken checkpoint out of the way of resume and rotation (kept for the user to inspect)."""
    parent, name = os.path.split(path)
    target = os.path.join(parent, BROKEN_PREFIX + name)
    if os.path.exists(target):
        target += time.strftime("-%Y%m%d-%H%M%S")
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another process of the run (on a shared filesystem) moved it first
        pass
    return target


def commit(staging_checkpoint: str, final: str) -> None:
    """Manifest, then one rename: `final` appears complete or not at all."""
    write_manifest(staging_checkpoint)
    if os.path.isdir(final):  # an earlier attempt at the same step that was left behind (broken): keep it aside
        move_aside(final)
    os.replace(staging_checkpoint, final)


def rotate(output_dir: str, limit: int | None, keep: set[str]) -> list[str]:
    """Delete the oldest complete checkpoints beyond `limit` (never the newest, never those in `keep`)."""
    if not limit or limit <= 0:
        return []
    checkpoints = [path for _, path in committed(output_dir)]
    protected = {os.path.abspath(p) for p in keep if p} | ({os.path.abspath(checkpoints[-1])} if checkpoints else set())
    removable = [p for p in checkpoints if os.path.abspath(p) not in protected]
    deleted = removable[:max(0, len(checkpoints) - limit)]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def dir_bytes(path: str) -> int:
    return sum(files_and_sizes(path).values()) if os.path.isdir(path) else 0


def free_bytes(path: str) -> int:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free


def size_text(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


OWNER_LOCK = ".chattune.lock"


@contextlib.contextmanager
def owned(output_dir: str) -> Iterator[None]:
    """The output directory held by this run alone, for its whole life: a second run into it (whose checkpoints would
    mix with this one's) is refused with who holds it. A POSIX record lock, released by the kernel when the process
    ends however it ends (a killed run leaves the file, which locks nothing); the file is removed when the run ends.
    Where the filesystem has no locks, the run goes on without."""
    import socket

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, OWNER_LOCK)
    with _locked(path, output_dir) as f:
        if f is None:
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:  # removed while still held, so `path` names our file: the directory holds only the run's files
            with contextlib.suppress(OSError):
                os.unlink(path)


@contextlib.contextmanager
def _locked(path: str, output_dir: str) -> Iterator:
    """`path` open and locked, where `path` still names the file locked. A run ending unlinks its lock file while
    holding it, so a run that opened the file just before may then lock a file no longer in the directory, while a
    third run creates and locks a new one: both would run. Such a lock is dropped and taken again on what `path`
    names now. Yields None where the filesystem has no locks."""
    import fcntl

    from chattune.errors import ConfigError

    while True:
        with open(path, "a+") as f:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):  # ENOLCK, EOPNOTSUPP: no locking here
                    yield None
                    return
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise ConfigError(f"--output_dir {output_dir}: another run is writing there ({holder}); wait for it "
                                  "to end, or choose another --output_dir") from None
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(f.fileno()).st_ino:
                yield f
                return
        # the file locked was unlinked by the run that ended: closing it dropped the lock; take what `path` names now


MODE_NAMES = {"lora": "LoRA", "qlora": "Q-LoRA", "full": "full fine-tuning"}


def resume_problem(checkpoint: str, mode: str, base: str, fingerprint: str | None) -> str | None:
    """Why `checkpoint` cannot be resumed by this run (another mode, another base), or None. Read from the
    chattune.json every checkpoint carries; a checkpoint without one (written by another tool) is not judged."""
    try:
        with open(os.path.join(checkpoint, "chattune.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    theirs = info.get("mode")
    fresh = "start fresh with --overwrite_output_dir (or use another --output_dir)"
    if theirs and theirs != mode:
        return (f"{checkpoint} was written by a {MODE_NAMES.get(theirs, theirs)} run and this run is "
                f"{MODE_NAMES.get(mode, mode)}: run with the same mode to resume it, or {fresh}")
    recorded = info.get("base_fingerprint")
    if recorded and fingerprint and recorded != fingerprint:
        return (f"{checkpoint} was trained from {info.get('base_model') or 'another base'}, whose weights differ from "
                f"{base}'s (weight fingerprint {recorded} vs {fingerprint}): pass the base it was trained from, or "
                f"{fresh}")
    return None
