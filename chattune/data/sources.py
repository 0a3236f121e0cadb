"""What a --data_path names: files, several comma separated, or directories (their data files, or a
`datasets.save_to_disk` directory); path-level problems and the entries of a directory that are not read."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chattune.data.problems import DataError, Problem, os_problem

DATA_EXTENSIONS = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")


# dataset_dict.json marks a saved DatasetDict; its splits are subdirectories holding the other two files.
_SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _split_paths(data_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """One path, "a.json,b.jsonl", or a list of paths (list items are not split on commas). A path that exists as
    given is not split, so file names with commas work."""
    if isinstance(data_path, (str, os.PathLike)):
        whole = os.fspath(data_path)
        items = [whole] if os.path.lexists(whole.strip()) else whole.split(",")
    else:
        items = [os.fspath(p) for p in data_path]
    return [item.strip() for item in items if item.strip()]


def _missing(path: str) -> str:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        if e.errno == errno.ENOENT:
            return "does not exist"
        return os_problem(e, "be accessed")
    return "does not exist"


def _is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_EXTENSIONS)


def source_files(path: str, kind: str) -> list[Path]:
    """The files on disk behind one source: the file itself, or every file of a save_to_disk directory."""
    return sorted(f for f in Path(path).rglob("*") if f.is_file()) if kind == "saved" else [Path(path)]


def sources_size(items: Sequence[tuple[str, str]]) -> int:
    """Bytes on disk of (path, kind) sources: what reading them means, for progress bars."""
    return sum(f.stat().st_size for path, kind in items for f in source_files(path, kind))


@dataclass
class Sources:
    """What a --data_path names: the sources to read (path, kind "file" | "saved"), path-level problems, and the
    entries of given directories that are not read (listed in the report)."""

    items: list[tuple[str, str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return [path for path, _ in self.items]


def _expand_directory(path: str, out: Sources) -> None:
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        out.problems.append(Problem(path, "", "", os_problem(e, "be listed")))
        return
    if any(marker in names for marker in _SAVE_TO_DISK_MARKERS):
        out.items.append((path, "saved"))
        return
    found = []
    for name in names:
        full = os.path.join(path, name)
        # Hidden files are left out: editors and macOS ("._train.json") leave non-data files with data extensions.
        if _is_data_file(name) and not name.startswith(".") and os.path.isfile(full):
            found.append(full)
        else:
            kind = ("directory, not searched" if os.path.isdir(full) else "hidden" if name.startswith(".")
                    else "broken link" if not os.path.exists(full) else "not a data file")
            out.ignored.append(f"{full} ({kind})")
    if not found:
        message = (f"is a directory without {', '.join(DATA_EXTENSIONS[:-1])} or {DATA_EXTENSIONS[-1]} files "
                   "(subdirectories are not searched)")
        out.problems.append(Problem(path, "", "", message))
    out.items += [(full, "file") for full in found]


def expand_sources(data_path: str | os.PathLike | Sequence[str | os.PathLike]) -> Sources:
    paths = _split_paths(data_path)
    if not paths:
        raise DataError("No data path given; pass a file, a directory, or several files separated by commas.")
    out = Sources()
    for path in paths:
        if not os.path.exists(path):
            out.problems.append(Problem(path, "", "", _missing(path)))
        elif os.path.isdir(path):
            _expand_directory(path, out)
        else:
            out.items.append((path, "file"))
    seen: dict[str, str] = {}
    for path, _ in out.items:
        real = os.path.realpath(path)
        if real in seen:
            out.problems.append(Problem(path, "", "", f"is the same file as {seen[real]}, given twice (it would be "
                                        "trained twice); give each file once"))
        seen.setdefault(real, path)
    return out
