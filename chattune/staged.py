"""Outputs written under a hidden name next to their destination and committed by one rename.

A merge or a quantization killed midway (kill -9, the out-of-memory killer, a preempted job) would otherwise leave
`config.json` and a partial `model.safetensors`: a folder that looks like a model and fails when loaded. Written as
`.NAME.partial-PID` and renamed to `NAME` once whole, the destination is either the complete result or absent. A
staging folder left by a killed process is removed by the next run into the same destination.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

_PARTIAL = ".partial-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: another user's live process
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale(out: str) -> list[str]:
    """Staging folders of `out` whose process is gone (killed mid-write). Returns what was removed."""
    parent, name = os.path.split(os.path.abspath(out))
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(parent):
            prefix = f".{name}{_PARTIAL}"
            if entry.name.startswith(prefix) and entry.name[len(prefix):].isdigit():
                if not _alive(int(entry.name[len(prefix):])):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(entry.path)
    return removed


@contextlib.contextmanager
def staged_dir(out: str) -> Iterator[str]:
    """A fresh staging folder for `out`; renamed to `out` when the block ends without an exception (an existing `out`
    is replaced), removed when it raises."""
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    remove_stale(out)
    staging = os.path.join(parent, f".{name}{_PARTIAL}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.lexists(out):
        replaced = os.path.join(parent, f".{name}.replaced-{os.getpid()}")
        os.rename(out, replaced)
        os.rename(staging, out)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(staging, out)
