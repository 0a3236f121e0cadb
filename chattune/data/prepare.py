"""Data files -> token ids and labels in bounded memory, parsed once per node.

`prepare_files` reads `--data_path` in chunks (`data.source_chunks`: blocks of JSONL lines, slices of a JSON array,
Parquet row batches), and each chunk is validated, rendered and tokenized in a worker process. The parent keeps a
few chunks in flight, appends each result in order to one Arrow file and adds up the report and the problems (the
first ones kept, all counted); no process ever holds the records or the tokenized dataset. The finished file is
committed into the cache atomically and memory-mapped by every rank.

The cache key covers the data files' bytes (hashed by streaming them), the tokenizer, template and settings, and the
code that makes the labels. Only the main process of a node computes it and prepares the data, holding a lock on
the entry so the main processes of other nodes sharing the cache's filesystem wait for it instead of preparing the
same data again. The other ranks never open a data file: they find the entry through an index keyed by what
`os.stat` says about the files (size, mtime, inode), written by the main process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattune import __version__
from chattune.data.cache import (
    DATASET_FILE,
    ArrowWriter,
    _fingerprint,
    code_fingerprint,
    commit,
    content_key,
    default_cache_dir,
    discard,
    drop_index,
    entry_problem,
    failure_path,
    has_failed,
    is_ready,
    load_cached,
    locked,
    note_failure,
    read_index,
    read_report,
    stat_key,
    usable_cache_dir,
    write_index,
)
from chattune.data.encode import (
    EncodeJob,
    char_cap,
    encode_all,
    encode_conversations,
    kept_arrays,
)
from chattune.data.load import Tally, Validated, read_sources, validate_chunk
from chattune.data.problems import MAX_SHOWN_PROBLEMS, DataError
from chattune.data.reader import Chunk
from chattune.data.report import DataReport, nothing_kept_error, report_of
from chattune.data.sources import Sources, expand_sources, sources_size
from chattune.data.template import (
    content_control_tokens,
    make_renderer,
    turn_structure_tokens,
)
from chattune.data.twin import ascii_twin
from chattune.data.workers import ordered_map

# Below this much input, worker processes cost more than they save.
_PARALLEL_MIN_BYTES = 4 << 20
# From this much input on, checking whether tiktoken reproduces the tokenizer (~2.5 s for a 151k vocabulary) pays: it
# tokenizes ASCII text in a fifth of the tokenizer's time (chattune.data.twin; 100k conversations: 26 s -> 17 s)
_TWIN_MIN_BYTES = 32 << 20


@dataclass
class _Settings:
    """What a worker needs to turn a chunk into samples: handed to the workers when they are forked, never pickled
    per chunk."""

    tokenizer: Any
    template_kwargs: dict[str, Any] | None
    stop_tokens: list[str]
    max_length: int
    train_on: str
    skip_invalid: bool
    control_tokens: tuple[str, ...]  # turn-structure tokens that must not stand in message text
    control_mode: str  # "error" | "text"
    char_cap: int = 0  # message texts are cut to this many characters before rendering (prepare.char_cap)
    pairs: bool = False  # preference pairs (--stage dpo): two samples per record, chosen then rejected
    twin: Any = None  # twin.AsciiTwin: ASCII text tokenized by tiktoken where exact (large inputs; made before forking)


@dataclass
class _ChunkResult:
    size: int
    validated: Validated  # without its conversations: those stay in the worker
    report: DataReport | None = None
    arrays: dict[str, Any] | None = None  # kept samples: flat input_ids, labels, lengths
    control_found: list[tuple[str, int, str]] = field(default_factory=list)
    control_total: int = 0
    control_affected: int = 0


def _process(task: tuple[Chunk, bool], settings: _Settings) -> _ChunkResult:
    """Validate, render and tokenize one chunk (in a worker). With `encode` false only validate: the run already
    failed and goes on only to report every problem."""
    chunk, encode = task
    validated = validate_chunk(chunk, settings.pairs)
    conversations, validated.conversations = validated.conversations, []
    result = _ChunkResult(chunk.size, validated)
    if settings.control_tokens:
        for conversation in conversations:
            found = content_control_tokens(conversation.messages, settings.control_tokens)
            result.control_affected += bool(found)
            result.control_total += len(found)
            room = MAX_SHOWN_PROBLEMS - len(result.control_found)
            result.control_found += [(conversation.source, i, token) for i, token in found[:max(room, 0)]]
    failed = _fails(settings, bool(validated.file_problem), validated.bad_records, result.control_total)
    if encode and not failed and conversations:
        plain = settings.control_tokens if settings.control_mode == "text" else ()
        job = EncodeJob(conversations, settings.tokenizer, settings.template_kwargs, settings.stop_tokens,
                   settings.max_length, settings.train_on, plain, settings.char_cap, pairs=settings.pairs,
                   twin=settings.twin)
        encoded = encode_conversations((0, len(conversations)), job)
        result.report = report_of(encoded, settings.max_length, len(conversations), [], 0)
        result.arrays = kept_arrays(encoded)
    return result


def _fails(settings: _Settings, file_problem: bool, bad_records: int, control_tokens: int) -> bool:
    """Whether these problems stop the run (a chunk's, or all so far)."""
    return bool(file_problem or (bad_records and not settings.skip_invalid)
                or (control_tokens and settings.control_mode == "error"))


class _Run:
    """The parent's side of one preparation: results merged in chunk order."""

    def __init__(self, settings: _Settings, path: Path, total: int, what: str) -> None:
        from tqdm.auto import tqdm

        self.settings = settings
        self.tally = Tally()
        self.report = DataReport(max_length=settings.max_length)
        self.writer = ArrowWriter(path)
        self.control_found: list[tuple[str, int, str]] = []
        self.control_total = self.control_affected = 0
        self.bar = tqdm(total=total, desc=f"Preparing {what} data", unit="B", unit_scale=True, unit_divisor=1024,
                        disable=total < _PARALLEL_MIN_BYTES, file=sys.stderr)

    @property
    def failed(self) -> bool:
        """Once anything makes the run fail, the remaining chunks are only validated (to report all problems)."""
        return _fails(self.settings, bool(self.tally.file_problems), self.tally.bad_records, self.control_total)

    def merge(self, result: _ChunkResult) -> None:
        self.tally.add(result.validated)
        if result.report is not None:
            self.report.add(result.report)
        if result.arrays is not None and not self.failed:
            self.writer.write(result.arrays)
        self.control_found += result.control_found[: MAX_SHOWN_PROBLEMS - len(self.control_found)]
        self.control_total += result.control_total
        self.control_affected += result.control_affected
        self.bar.update(result.size)
        self.bar.set_postfix(conversations=f"{self.tally.conversations:,}", refresh=False)

    def close(self) -> None:
        self.writer.close()
        self.bar.close()


def _run_chunks(run: _Run, sources: Sources, num_proc: int) -> None:
    """Every chunk through `_process`, a few in flight at a time, merged in order. Once the run has failed, the
    chunks handed out after that are only validated (every problem is still listed)."""
    tasks = ((chunk, not run.failed) for chunk in read_sources(sources, run.tally))
    for result in ordered_map(_process, run.settings, tasks, num_proc):
        run.merge(result)

def _settings_text(settings: _Settings) -> str:
    tokenizer = settings.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    values = [tokenizer.chat_template, settings.template_kwargs, settings.stop_tokens, settings.max_length,
              tokenizer.special_tokens_map, settings.train_on, settings.skip_invalid, settings.control_mode,
              *(["pairs"] if settings.pairs else [])]
    vocab_hash = hashlib.sha256(vocab.encode()).hexdigest()
    return f"chattune {__version__} stream v1 code {code_fingerprint()}\n{vocab_hash}\n" + json.dumps(
        values, sort_keys=True, default=str)


def _load(target: Path, sources: Sources, from_cache: bool) -> Prepared:
    report = read_report(target)
    report.files = sources.files
    return Prepared(load_cached(target), report, target, from_cache=from_cache)


def _cached(target: Path, sources: Sources, checksum: bool) -> Prepared | None:
    """The committed entry at `target` if it is whole; a damaged one (cut short, changed) is removed with a note and
    None returned, so it is prepared again instead of training on part of the data or failing on every run."""
    if not is_ready(target):
        return None
    problem = entry_problem(target, checksum)
    if problem is None:
        return _load(target, sources, from_cache=True)
    from chattune.cli import log

    log(f"note: the cached tokenized data at {target} is damaged ({problem}); preparing it again")
    discard(target)
    return None


def prepare_files(
    data_path: str | Sequence[str],
    tokenizer: Any,
    *,
    stop_tokens: Sequence[str],
    max_length: int,
    template_kwargs: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    skip_invalid: bool = False,
    train_on: str = "all",
    special_tokens_in_content: str = "error",
    main: bool = True,
    what: str = "training",
    pairs: bool = False,
) -> Prepared:
    """Read, validate and tokenize the data files of `data_path` into the cache in bounded memory, or load the cached
    result. `main` false (the other ranks of a node, after its main process): find the main process's result through
    the stat index without opening a data file; prepare only if it is not there."""
    sources = expand_sources(data_path)
    if sources.problems:
        problems = Tally(file_problems=sources.problems).error_message(skip_invalid)
        raise DataError(problems)
    render = make_renderer(tokenizer, template_kwargs)
    settings = _Settings(tokenizer, template_kwargs, list(stop_tokens), max_length, train_on, skip_invalid,
                         tuple(turn_structure_tokens(tokenizer, render, stop_tokens)), special_tokens_in_content,
                         char_cap(tokenizer, max_length), pairs)
    cache = usable_cache_dir(cache_dir)
    text = _settings_text(settings)
    stat = stat_key(text, sources)
    if not main:
        key = read_index(cache, stat)
        found = _cached(cache / key, sources, checksum=False) if key else None
        if found:
            return found
        if key and has_failed(cache, key):  # the same data, settings and code fail the same way: not read again
            raise DataError(f"the {what} data could not be prepared: the main process stopped on it (its message "
                            "above lists the problems)")
    total = sources_size(sources.items)
    key = content_key(text, sources, total)
    write_index(cache, stat, key)
    target = cache / key
    found = _cached(target, sources, checksum=True)
    if found:
        return found
    try:
        try:
            return _prepare_locked(cache, key, settings, sources, total, num_proc, what)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            drop_index(cache, stat)
            raise DataError(
                f"the tokenized {what} data does not fit in its cache {cache}: {os.strerror(e.errno)} "
                f"({shutil.disk_usage(cache).free / 1e6:.1f} MB free; it is about {total / 1e6:.1f} MB of text). "
                "Free space there, or pass --data_cache_dir (or set $CHATTUNE_CACHE) to a disk with room; nothing "
                "was left in the cache") from None
    except DataError as e:
        note_failure(cache, key, str(e))  # so the node's other ranks fail at once instead of each reading it all
        raise


def _prepare_locked(cache: Path, key: str, settings: _Settings, sources: Sources, total: int, num_proc: int | None,
                    what: str) -> Prepared:
    target = cache / key
    with locked(cache, key):
        found = _cached(target, sources, checksum=False)  # prepared by another node's main process meanwhile
        if found:
            return found
        if num_proc is None:
            num_proc = min(os.cpu_count() or 1, 8) if total >= _PARALLEL_MIN_BYTES else 1
        if total >= _TWIN_MIN_BYTES and settings.twin is None:
            settings.twin = ascii_twin(settings.tokenizer)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=cache))
        try:
            report = _prepare_into(tmp, settings, sources, total, num_proc, what)
            commit(tmp, target, report)
            failure_path(cache, key).unlink(missing_ok=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(target, sources, from_cache=False)


def _prepare_into(tmp: Path, settings: _Settings, sources: Sources, total: int, num_proc: int, what: str
                  ) -> DataReport:
    run = _Run(settings, tmp / DATASET_FILE, total, what)
    try:
        _run_chunks(run, sources, num_proc)
    finally:
        run.close()
    tally = run.tally
    message = tally.error_message(settings.skip_invalid)
    if message:
        raise DataError(message)
    if run.control_total and settings.control_mode == "error":
        raise control_token_error(settings.control_tokens, run.control_found, run.control_total, run.control_affected)
    if not tally.conversations:
        raise DataError(tally.nothing_left_message(sources.files))
    report = run.report
    report.files, report.conversations = sources.files, tally.conversations
    report.skipped_records = tally.bad_records
    report.skipped_examples = [str(p) for p in tally.record_problems.shown]
    report.ignored = sources.ignored
    report.content_control_tokens = run.control_affected
    if report.kept == 0:
        raise nothing_kept_error(settings.max_length, what, report=report)
    return report


# Below this many conversations worker processes cost more than they save.
_PARALLEL_MIN_CONVERSATIONS = 4000


@dataclass
class Prepared:
    dataset: Any  # datasets.Dataset with input_ids and labels, memory-mapped from the cache
    report: DataReport
    cache_path: Path
    from_cache: bool = False


def prepare_dataset(
    conversations: Sequence[Any],
    tokenizer: Any,
    *,
    stop_tokens: Sequence[str],
    max_length: int,
    template_kwargs: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    files: Sequence[str] = (),
    skipped_records: int = 0,
    train_on: str = "all",
    special_tokens_in_content: str = "error",
    what: str = "training",
    length_flag: str = "--model_max_length",
) -> Prepared:
    """Tokenize `conversations` (validated `data.Conversation`s, all in memory) into a cached `datasets.Dataset` and
    report. Training streams its files instead (`prepare_files`); this path serves calibration sets
    and is the reference the streaming path is tested against."""
    key = _fingerprint(conversations, tokenizer, template_kwargs, stop_tokens, max_length,
                       [train_on, special_tokens_in_content])
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / key
    if is_ready(target):
        if entry_problem(target, checksum=True) is None:
            report = read_report(target)
            report.files, report.skipped_records = list(files), skipped_records
            return Prepared(load_cached(target), report, target, from_cache=True)
        discard(target)  # damaged: made again

    # Not needed for a cached result: the key covers the data and the mode, so it passed this check when written.
    plain_tokens, affected = check_content_tokens(conversations, tokenizer, template_kwargs, stop_tokens,
                                                  special_tokens_in_content)
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if len(conversations) >= _PARALLEL_MIN_CONVERSATIONS else 1
    job = EncodeJob(conversations, tokenizer, template_kwargs, list(stop_tokens), max_length, train_on, plain_tokens,
               char_cap(tokenizer, max_length))
    encoded = encode_all(job, num_proc)
    report = report_of(encoded, max_length, len(conversations), files, skipped_records)
    report.content_control_tokens = affected
    if report.kept == 0:
        raise nothing_kept_error(max_length, what, length_flag, report)  # nothing cached: a longer limit re-runs clean
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=cache))
    writer = ArrowWriter(tmp / DATASET_FILE)
    writer.write(kept_arrays(encoded))
    writer.close()
    commit(tmp, target, report)
    return Prepared(load_cached(target), report, target)


def check_content_tokens(conversations: Sequence[Any], tokenizer: Any, template_kwargs: dict[str, Any] | None,
                         stop_tokens: Sequence[str], mode: str) -> tuple[tuple[str, ...], int]:
    """Turn-structure tokens written inside message text would be tokenized as real control tokens: the model learns to
    end turns mid-answer, and user text can forge turns. `error` (default) lists the records and stops; `text` encodes
    them as plain text. Returns (tokens to encode as plain text, conversations affected)."""
    tokens = turn_structure_tokens(tokenizer, make_renderer(tokenizer, template_kwargs), stop_tokens)
    found = [(c.source, i, token) for c in conversations for i, token in content_control_tokens(c.messages, tokens)]
    if not found:
        return (), 0
    affected = len({source for source, _, _ in found})
    if mode == "text":
        return tuple(tokens), affected
    raise control_token_error(tokens, found, len(found), affected)


def control_token_error(tokens: Sequence[str], found: Sequence[tuple[str, int, str]], total: int, affected: int
                        ) -> DataError:
    """The error for turn-structure tokens in message text: the first `found` (source, message index, token) of
    `total` occurrences in `affected` conversations."""
    from chattune.data.problems import MAX_SHOWN_PROBLEMS

    lines = [f"  {source}: messages[{i}] contains {token!r}" for source, i, token in found[:MAX_SHOWN_PROBLEMS]]
    if total > MAX_SHOWN_PROBLEMS:
        lines.append(f"  ... and {total - MAX_SHOWN_PROBLEMS} more")
    return DataError("\n".join([
        f"{affected} conversations write the chat template's turn-structure tokens ({', '.join(tokens)}) inside "
        "their text; tokenized as control tokens they teach the model to end turns mid-answer, and let user text "
        "forge turns:", *lines,
        "Remove them from the data, or pass --special_tokens_in_content text to encode them as plain text."]))
