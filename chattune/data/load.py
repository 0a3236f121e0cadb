"""Chunks of records validated into conversations, with every problem tallied; `load_conversations` for data that
fits in memory (calibration sets, evaluation, tests). Training streams its data instead (chattune.data.prepare)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from chattune.data.problems import DataError, Problem, ProblemLog, plural
from chattune.data.reader import (
    BadLine,
    Chunk,
    FileProblem,
    chunk_records,
    source_chunks,
)
from chattune.data.records import Conversation, normalize_record
from chattune.data.sources import Sources, expand_sources

_SKIP_HINT = "Fix the records above, or pass --skip_invalid_records to drop them (the count is reported)."


_FILE_HINT = "Fix or remove these paths; --skip_invalid_records drops invalid records, never unreadable files."


@dataclass
class LoadResult:
    conversations: list[Conversation]
    files: list[str]
    skipped: list[Problem] = field(default_factory=list)  # first problems of the records dropped by skip_invalid
    skipped_records: int = 0
    format_counts: dict[str, int] = field(default_factory=dict)  # format -> conversations kept
    ignored: list[str] = field(default_factory=list)  # entries of given directories not read, with why


@dataclass
class Validated:
    """One chunk, validated: its good conversations and what was wrong with the rest."""

    conversations: list[Conversation] = field(default_factory=list)
    records: int = 0
    bad_records: int = 0
    problems: ProblemLog = field(default_factory=ProblemLog)
    file_problem: Problem | None = None
    formats: dict[str, int] = field(default_factory=dict)


def chosen_or_conversation(record: object, *, file: str, where: str) -> tuple[Conversation | None, list[Problem]]:
    """A supervised conversation, or of a preference pair its chosen conversation (the prompt's turns untrained):
    what the deploy check and GPTQ calibration read, whichever stage trained the model."""
    from chattune.data.pairs import normalize_pair

    if isinstance(record, dict) and record.get("chosen") is not None and record.get("rejected") is not None:
        conversation, problems = normalize_pair(record, file=file, where=where)
        return (dataclasses.replace(conversation, rejected=None) if conversation else None), problems
    return normalize_record(record, file=file, where=where)


def validate_chunk(chunk: Chunk, pairs: bool | None = False) -> Validated:
    """The chunk's records validated: as supervised conversations, with `pairs` as preference pairs
    (chattune.data.pairs), with `pairs` None as either (a pair read as its chosen conversation)."""
    from chattune.data.pairs import normalize_pair

    normalize = chosen_or_conversation if pairs is None else normalize_pair if pairs else normalize_record
    out = Validated()
    try:
        records = chunk_records(chunk)
    except FileProblem as e:
        out.file_problem = Problem(chunk.file, "", "", str(e))
        return out
    out.records = len(records)
    for where, record in records:
        if isinstance(record, BadLine):
            conversation, problems = None, [Problem(chunk.file, where, "", record.message)]
        else:
            conversation, problems = normalize(record, file=chunk.file, where=where)
        if problems:
            out.bad_records += 1
            out.problems.add(problems)
        else:
            out.conversations.append(conversation)
            out.formats[conversation.format] = out.formats.get(conversation.format, 0) + 1
    return out


@dataclass
class Tally:
    """Running totals over all chunks of all sources."""

    file_problems: list[Problem] = field(default_factory=list)
    record_problems: ProblemLog = field(default_factory=ProblemLog)
    records: int = 0
    bad_records: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    @property
    def conversations(self) -> int:
        return self.records - self.bad_records

    def add(self, validated: Validated) -> None:
        problem = validated.file_problem
        if problem and all(p.file != problem.file for p in self.file_problems):  # one per file: its first
            self.file_problems.append(problem)
        self.records += validated.records
        self.bad_records += validated.bad_records
        self.record_problems.merge(validated.problems)
        for fmt, n in validated.formats.items():
            self.formats[fmt] = self.formats.get(fmt, 0) + n

    def error_message(self, skip_invalid: bool) -> str | None:
        sections = []
        if self.file_problems:
            head = f"Cannot use {plural(len(self.file_problems), 'data path')}:"
            sections.append("\n".join([head, *(f"  {p}" for p in self.file_problems), _FILE_HINT]))
        if self.record_problems.count and not skip_invalid:
            head = (
                f"Found {plural(self.record_problems.count, 'problem')} in {self.bad_records} of "
                f"{plural(self.records, 'record')} ({self.record_problems.file_names()}):"
            )
            sections.append("\n".join([head, *self.record_problems.lines(), _SKIP_HINT]))
        return "\n\n".join(sections) or None

    def nothing_left_message(self, files: list[str]) -> str:
        names = ", ".join(files)
        if self.records == 0:
            return f"No records in {names}; there is nothing to train on."
        return "\n".join([
            f"No valid records in {names}: all {self.records} were invalid and skipped; nothing is left to train on.",
            *self.record_problems.lines(),
        ])


def read_sources(sources: Sources, tally: Tally) -> Iterator[Chunk]:
    """The chunks of every source in order; a file-level problem is noted in the tally (and ends that source)."""
    for path, kind in sources.items:
        try:
            yield from source_chunks(path, kind)
        except FileProblem as e:
            if all(p.file != path for p in tally.file_problems):  # one per file: its first (a chunk may have one)
                tally.file_problems.append(Problem(path, "", "", str(e)))


def load_conversations(
    data_path: str | os.PathLike | Sequence[str | os.PathLike], *, skip_invalid: bool = False,
    pairs: bool | None = False) -> LoadResult:
    """Read every record of every file, validate all of them, and return the normalized conversations.

    Raises DataError listing the problems (first MAX_SHOWN_PROBLEMS of them) when any record is invalid, unless
    skip_invalid, which drops those records instead. Unreadable files always raise. Holds every conversation in
    memory: for calibration sets and tests; training streams its data (chattune.data.prepare).
    """
    sources = expand_sources(data_path)
    tally = Tally(file_problems=list(sources.problems))
    conversations: list[Conversation] = []
    for chunk in read_sources(sources, tally):
        validated = validate_chunk(chunk, pairs)
        tally.add(validated)
        conversations += validated.conversations
    message = tally.error_message(skip_invalid)
    if message:
        raise DataError(message)
    if not conversations:
        raise DataError(tally.nothing_left_message(sources.files))
    return LoadResult(
        conversations=conversations,
        files=sources.files,
        skipped=tally.record_problems.shown if skip_invalid else [],
        skipped_records=tally.bad_records,
        format_counts=tally.formats,
        ignored=sources.ignored,
    )
