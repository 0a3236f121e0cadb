"""What is wrong with the data, located precisely enough to find and fix it: problems of one record, the log of
all of them, and the error that stops a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from chattune.errors import UserError

MAX_SHOWN_PROBLEMS = 20


class DataError(UserError):
    """Unusable training data. The multi-line message lists the problems and the fix; the CLI prints it as is."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, located precisely enough to find and fix it."""

    file: str  # path as the user gave it / as found in a directory
    where: str  # "record 12" (0-based) or "line 13" (1-based, JSONL); "" for file-level problems
    field: str  # "conversations[3].from", "output", ...; "" when not about one field
    message: str  # reads as a predicate of the field ("= 'gpt4'; expected ...", "is missing; ...")

    def __str__(self) -> str:
        # The message continues the field path ("conversations[3].from = 'gpt4'"), so those two join with a space.
        detail = f"{self.field} {self.message}" if self.field else self.message
        return ": ".join(part for part in (self.file, self.where, detail) if part)


_TYPE_NAMES = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}


def type_name(value: object) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


def show(value: str, limit: int = 40) -> str:
    """repr() of a user string, shortened so one bad value cannot flood the error message."""
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


class RecordProblems:
    """Collects the problems of one record; `add(field, message)` keeps the call sites short."""

    def __init__(self, file: str, where: str) -> None:
        self.file, self.where, self.items = file, where, []

    def add(self, field_path: str, message: str) -> None:
        self.items.append(Problem(self.file, self.where, field_path, message))


def string_problem(value: object, missing: bool, expected: str = "a string") -> str | None:
    """Message for a value that should be a string, or None when it is one."""
    if missing:
        return f"is missing; expected {expected}"
    if value is None:
        return f"is null; expected {expected}"
    if not isinstance(value, str):
        return f"must be a string, got {type_name(value)}"
    return None


def os_problem(error: OSError, verb: str = "be read") -> str:
    return f"cannot {verb}: {error.strerror or error}"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass
class ProblemLog:
    """Problems in the order found: the first MAX_SHOWN_PROBLEMS kept, all counted, the files they are in listed."""

    shown: list[Problem] = field(default_factory=list)
    count: int = 0
    files: dict[str, None] = field(default_factory=dict)

    def add(self, problems: Sequence[Problem]) -> None:
        for problem in problems:
            self.count += 1
            self.files.setdefault(problem.file)
            if len(self.shown) < MAX_SHOWN_PROBLEMS:
                self.shown.append(problem)

    def merge(self, other: ProblemLog) -> None:
        self.shown += other.shown[: MAX_SHOWN_PROBLEMS - len(self.shown)]
        self.count += other.count
        self.files.update(other.files)

    def lines(self) -> list[str]:
        lines = [f"  {problem}" for problem in self.shown]
        if self.count > len(self.shown):
            lines.append(f"  ... and {self.count - len(self.shown)} more")
        return lines

    def file_names(self) -> str:
        names = list(self.files)
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more files" if len(names) > 5 else "")
