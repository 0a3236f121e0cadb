"""Conversations -> token ids and labels, in parallel, cached, with a report of everything that was cut or dropped.

`prepare_dataset` renders every validated conversation with the chat template (`template.render_conversation`),
tokenizes it with offsets, truncates to `max_length` and drops samples left with no trained token. Nothing
disappears silently: `DataReport` counts truncated and dropped samples, and per-turn samples of templates that
rewrite history. The result is cached on disk, keyed by the data, tokenizer, template and settings, so a re-run (and
every other rank of a distributed run) reads it instead of tokenizing again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chattune import __version__
from chattune.data import DataError
from chattune.template import (
    IGNORE_INDEX,
    PromptLimit,
    content_control_tokens,
    encode_samples,
    make_renderer,
    render_conversation,
    trained_turn_indices,
    turn_structure_tokens,
)

# Below this many conversations worker processes cost more than they save.
_PARALLEL_MIN_CONVERSATIONS = 4000


@dataclass
class DataReport:
    files: list[str] = field(default_factory=list)
    conversations: int = 0
    skipped_records: int = 0  # invalid records dropped by --skip_invalid_records
    samples: int = 0  # rendered samples (conversations + turns rendered on their own)
    own_turn_samples: int = 0  # turns trained as samples of their own (the template rewrites them later, or ...)
    token_exact_samples: int = 0  # ... their exact inference prompt tokenizes differently from the conversation
    kept: int = 0
    tokens: int = 0  # in kept samples, after truncation
    trained_tokens: int = 0
    truncated: int = 0  # kept samples cut at max_length
    truncated_tokens: int = 0  # tokens cut from kept samples
    dropped_no_trained: int = 0  # samples whose trained part lay wholly beyond max_length
    eos_appended: int = 0  # last turns the template left without an end-of-turn token; eos appended
    unstopped_turns: int = 0  # trained turns followed by no end-of-turn token (the model may not learn to stop)
    trained_turns: int = 0  # assistant turns trained (tool-calling turns included)
    masked_turns: int = 0  # assistant turns marked not to train (train/loss false, weight 0, --train_on last)
    tool_call_turns: int = 0  # trained assistant turns that call tools
    unrendered_reasoning: int = 0  # trained turns with reasoning_content the template does not render (not trained)
    content_control_tokens: int = 0  # conversations whose text holds turn-structure tokens, encoded as plain text
    capped_texts: int = 0  # message texts so long they were cut before tokenizing (see char_cap)
    beyond_limit_turns: int = 0  # trained turns whose prompt alone fills max_length: not rendered (see PromptLimit)
    max_length: int = 0
    length_histogram: dict[str, int] = field(default_factory=dict)  # untruncated sample lengths
    skipped_examples: list[str] = field(default_factory=list)  # the first problems of the skipped records
    ignored: list[str] = field(default_factory=list)  # entries of given directories that were not read, with why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, other: DataReport) -> None:
        """Add the counts of another part of the same data (a chunk tokenized on its own)."""
        for name, value in vars(other).items():
            if name == "length_histogram":
                for bucket, count in value.items():
                    self.length_histogram[bucket] = self.length_histogram.get(bucket, 0) + count
            elif isinstance(value, int) and not isinstance(value, bool) and name != "max_length":
                setattr(self, name, getattr(self, name) + value)

    def format(self) -> str:
        lines = [
            f"data: {self.conversations} conversations from {len(self.files)} file(s)"
            + (f", {self.skipped_records} invalid records skipped" if self.skipped_records else ""),
            f"  samples {self.samples} ({self.own_turn_samples} turns rendered on their own"
            + (f", {self.token_exact_samples} of them for a token-exact prompt" if self.token_exact_samples else "")
            + f"), kept {self.kept}",
            f"  tokens {self.tokens:,}, trained {self.trained_tokens:,}"
            + (f" ({self.trained_tokens / self.tokens:.0%})" if self.tokens else ""),
            f"  truncated at {self.max_length}: {self.truncated} samples ({self.truncated_tokens:,} tokens cut"
            + (", at least" if self.capped_texts else "") + f"); dropped with no trained token left: "
            f"{self.dropped_no_trained}",
        ]
        if self.capped_texts:
            lines.append(f"  {self.capped_texts} message texts far longer than {self.max_length} tokens were cut "
                         "before tokenizing (their end lies beyond the kept tokens; sample lengths count what "
                         "remained)")
        lines.append(f"  assistant turns trained {self.trained_turns:,} ({self.tool_call_turns:,} with tool calls), "
                     f"masked {self.masked_turns:,}")
        if self.beyond_limit_turns:
            lines.append(f"  {self.beyond_limit_turns:,} assistant turns start after {self.max_length} tokens of "
                         "history (their prompt alone fills the limit): not trained, and not rendered")
        if self.content_control_tokens:
            lines.append(f"  {self.content_control_tokens} conversations hold turn-structure tokens in their text: "
                         "encoded as plain text (--special_tokens_in_content text)")
        if self.unrendered_reasoning:
            lines.append(
                f"  WARNING: {self.unrendered_reasoning} trained turns carry reasoning_content that the chat template "
                "does not render: that reasoning is not trained. Use a template that renders it (e.g. Qwen3's) or "
                "drop the field.")
        if self.eos_appended:
            lines.append(f"  eos appended to {self.eos_appended} last turns (the template leaves them open)")
        if self.unstopped_turns:
            lines.append(
                f"  WARNING: {self.unstopped_turns} trained turns end without an end-of-turn token: the model may not "
                "learn to stop. Use a template that closes assistant turns (--template)."
            )
        if self.skipped_examples:
            lines.append("  skipped records (--skip_invalid_records):")
            lines += [f"    {problem}" for problem in self.skipped_examples]
            if self.skipped_records > len(self.skipped_examples):
                lines.append(f"    ... and {self.skipped_records - len(self.skipped_examples)} more records")
        if self.ignored:
            lines.append(f"  not read from the given directories ({len(self.ignored)}):")
            lines += [f"    {entry}" for entry in self.ignored[:10]]
            if len(self.ignored) > 10:
                lines.append(f"    ... and {len(self.ignored) - 10} more")
        shown = _trim_empty(self.length_histogram)
        if shown:
            lines.append("  sample length (tokens, before truncation):")
            peak = max(shown.values()) or 1
            for bucket, count in shown.items():
                lines.append(f"    {bucket:>13} {count:>8}  {'#' * max(1 if count else 0, round(30 * count / peak))}")
        return "\n".join(lines)


def _trim_empty(histogram: dict[str, int]) -> dict[str, int]:
    """Drop the empty buckets at both ends, so the table shows the range the data covers."""
    items = list(histogram.items())
    nonzero = [i for i, (_, n) in enumerate(items) if n]
    return dict(items[nonzero[0] : nonzero[-1] + 1]) if nonzero else {}


def _bucket_edges(max_length: int) -> list[int]:
    edges, edge = [], 64
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    return [*edges, max_length]


def length_histogram(lengths: Sequence[int], max_length: int) -> dict[str, int]:
    """Counts per power-of-two bucket up to max_length, then one bucket for longer samples (those truncated)."""
    edges = _bucket_edges(max_length)
    counts = [0] * (len(edges) + 1)
    for n in lengths:
        i = next((k for k, e in enumerate(edges) if n <= e), len(edges))
        counts[i] += 1
    names, low = [], 1
    for e in edges:
        names.append(f"{low}-{e}")
        low = e + 1
    names.append(f"> {max_length}")
    return dict(zip(names, counts))


def truncate(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the first `max_length` tokens (the beginning of the conversation and its first answers)."""
    return input_ids[:max_length], labels[:max_length]


@dataclass
class _Job:
    """What a tokenizer worker needs; inherited by forked workers instead of pickled for every chunk."""
    conversations: Sequence[Any]
    tokenizer: Any
    template_kwargs: dict[str, Any] | None
    stop_tokens: list[str]
    max_length: int
    train_on: str = "all"
    plain_tokens: tuple[str, ...] = ()  # turn-structure tokens to encode as plain text where content holds them
    char_cap: int = 0  # message texts are cut to this many characters before rendering (0: never)
    bound_turns: bool = True  # stop rendering a conversation at the first turn whose prompt fills max_length


def char_cap(tokenizer: Any, max_length: int) -> int:
    """A message text length beyond which the rest cannot reach the kept tokens: no token stands for more characters
    than the longest vocabulary entry spells (byte-level entries spell at least as many characters as they decode
    to), so the first half of a text this long holds more than max_length tokens, and cutting the second half leaves
    the first max_length tokens of any sample unchanged. Bounds the work and memory of a 49 MB message by the
    tokens kept rather than by the message."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return 2 * (max_length + 1) * max(longest, 1)


def cap_messages(messages: Sequence[dict], cap: int) -> tuple[Sequence[dict], int]:
    """Messages with content / reasoning_content cut to `cap` characters; the number of texts cut."""
    if not cap:
        return messages, 0
    out, cut = [], 0
    for message in messages:
        long = [k for k in ("content", "reasoning_content")
                if isinstance(message.get(k), str) and len(message[k]) > cap]
        if long:
            message = dict(message) | {k: message[k][:cap] for k in long}
            cut += len(long)
        out.append(message)
    return (tuple(out) if cut else messages), cut


_FORKED_JOB: _Job | None = None  # set in the parent just before forking the worker pool, read by the workers


def _encode_range(bounds: tuple[int, int], job: _Job | None = None) -> dict[str, np.ndarray]:
    """Render, tokenize and truncate conversations[lo:hi]; flat arrays, one entry per sample."""
    job = job or _FORKED_JOB
    lo, hi = bounds
    render = make_renderer(job.tokenizer, job.template_kwargs)
    limit = PromptLimit(job.tokenizer, job.max_length) if job.bound_turns else None
    rendered, tool_turns, capped = [], [], []
    for index in range(lo, hi):
        conv = job.conversations[index]
        messages, cut = cap_messages(conv.messages, job.char_cap)
        samples = render_conversation(render, messages, job.stop_tokens, tools=conv.tools, masked=conv.masked,
                                      train_on=job.train_on, source=conv.source, plain_tokens=job.plain_tokens,
                                      limit=limit)
        trained = trained_turn_indices(messages, conv.masked, job.train_on)
        trained = trained[: len(trained) - samples[0].beyond_limit_turns]
        for k, sample in enumerate(samples):
            rendered.append(sample)
            tool_turns.append(sum(bool(messages[i].get("tool_calls")) for i in trained) if k == 0 else 0)
            capped.append(cut if k == 0 else 0)
    # One sample can give several encodings (answers whose token-exact prompt differs train on their own): the
    # per-sample counts go with the first encoding, the extra ones are "turns rendered on their own".
    encoded, rows = [], []
    for k, encodings in enumerate(encode_samples(job.tokenizer, rendered)):
        for m, pair in enumerate(encodings):
            encoded.append(pair)
            rows.append((k, m))
    first = [m == 0 for _, m in rows]

    def per_row(values: list, empty: Any = 0) -> np.ndarray:
        return np.array([values[k] if m == 0 else empty for k, m in rows])

    ids = [i[: job.max_length] for i, _ in encoded]
    labels = [lab[: job.max_length] for _, lab in encoded]
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    return {
        "input_ids": flat.astype(np.int32),
        "labels": (np.concatenate(labels) if labels else flat).astype(np.int32),
        "kept_length": np.array([len(i) for i in ids], np.int64),
        "length": np.array([len(i) for i, _ in encoded], np.int64),
        "trained": np.array([int((lab != IGNORE_INDEX).sum()) for lab in labels], np.int64),
        "own_turn": np.array([rendered[k].own_turn or not f for (k, _), f in zip(rows, first, strict=True)], bool),
        "token_exact_turns": np.array([not f for f in first], bool),
        "eos_appended": per_row([s.eos_appended for s in rendered], False).astype(bool),
        "unstopped": per_row([s.unstopped_turns for s in rendered]).astype(np.int64),
        "trained_turns": per_row([s.trained_turns for s in rendered]).astype(np.int64),
        "masked_turns": per_row([s.masked_turns for s in rendered]).astype(np.int64),
        "tool_call_turns": per_row(tool_turns).astype(np.int64),
        "unrendered_reasoning": per_row([s.unrendered_reasoning for s in rendered]).astype(np.int64),
        "capped": per_row(capped).astype(np.int64),
        "beyond_limit": per_row([s.beyond_limit_turns for s in rendered]).astype(np.int64),
    }


def _encode_all(job: _Job, num_proc: int, chunk: int = 1000) -> dict[str, np.ndarray]:
    """Encode every conversation, in `num_proc` forked workers when there are enough of them to pay off."""
    global _FORKED_JOB
    from tqdm.auto import tqdm

    n = len(job.conversations)
    ranges = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    bar = tqdm(total=n, desc="Tokenizing conversations", unit="conv", disable=n < chunk)
    parts = []
    if num_proc > 1 and len(ranges) > 1:
        _FORKED_JOB = job
        try:
            with multiprocessing.get_context("fork").Pool(num_proc) as pool:
                for (lo, hi), part in zip(ranges, pool.imap(_encode_range, ranges)):
                    parts.append(part)
                    bar.update(hi - lo)
        finally:
            _FORKED_JOB = None
    else:
        for lo, hi in ranges:
            parts.append(_encode_range((lo, hi), job))
            bar.update(hi - lo)
    bar.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else _encode_range((0, 0), job)


def kept_arrays(encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The flat ids, labels and lengths of the samples with a trained token (the others are dropped and counted)."""
    keep = encoded["trained"] > 0
    token_keep = np.repeat(keep, encoded["kept_length"])
    return {"input_ids": encoded["input_ids"][token_keep], "labels": encoded["labels"][token_keep],
            "lengths": encoded["kept_length"][keep]}


DATASET_FILE = "dataset.arrow"  # one Arrow stream of (input_ids, labels), memory-mapped by every rank
REPORT_FILE = "report.json"


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
    return (target / REPORT_FILE).exists() and (target / DATASET_FILE).exists()


def commit(tmp: Path, target: Path, report: DataReport) -> None:
    """Move a finished cache entry into place atomically: a crash mid-write never leaves a half cache behind."""
    try:
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1))
        os.replace(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process (another node's main process) committed the same cache first: use it. Anything else (a
        # full disk, no permission) is an error, not something to pass over.
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not is_ready(target):
            raise


def read_report(target: Path) -> DataReport:
    return DataReport(**json.loads((target / REPORT_FILE).read_text()))


def nothing_kept_error(max_length: int, what: str = "training", flag: str = "--model_max_length") -> DataError:
    return DataError(f"no {what} sample has a trained token left after truncation to {max_length} tokens (every "
                     f"answer starts beyond it); raise {flag}, or shorten the prompts")


def code_fingerprint() -> str:
    """Hash of the source that turns records into ids and labels (reading, rendering, masking, truncation): a change
    to any of it must not serve labels cached by the old code."""
    from chattune import data, stream, template

    h = hashlib.sha256()
    for path in (data.__file__, template.__file__, __file__, stream.__file__):
        h.update(Path(path).read_bytes())
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


def default_cache_dir() -> Path:
    root = os.environ.get("CHATTUNE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "chattune")
    return Path(root).expanduser() / "tokenized"


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
    report. Training streams its files instead (`chattune.stream.prepare_files`); this path serves calibration sets
    and is the reference the streaming path is tested against."""
    key = _fingerprint(conversations, tokenizer, template_kwargs, stop_tokens, max_length,
                       [train_on, special_tokens_in_content])
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / key
    if is_ready(target):
        report = read_report(target)
        report.files, report.skipped_records = list(files), skipped_records
        return Prepared(load_cached(target), report, target, from_cache=True)

    # Not needed for a cached result: the key covers the data and the mode, so it passed this check when written.
    plain_tokens, affected = check_content_tokens(conversations, tokenizer, template_kwargs, stop_tokens,
                                                  special_tokens_in_content)
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if len(conversations) >= _PARALLEL_MIN_CONVERSATIONS else 1
    job = _Job(conversations, tokenizer, template_kwargs, list(stop_tokens), max_length, train_on, plain_tokens,
               char_cap(tokenizer, max_length))
    encoded = _encode_all(job, num_proc)
    report = _report(encoded, max_length, len(conversations), files, skipped_records)
    report.content_control_tokens = affected
    if report.kept == 0:
        raise nothing_kept_error(max_length, what, length_flag)  # nothing cached: a longer limit re-runs clean
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
    from chattune.data import MAX_SHOWN_PROBLEMS

    lines = [f"  {source}: messages[{i}] contains {token!r}" for source, i, token in found[:MAX_SHOWN_PROBLEMS]]
    if total > MAX_SHOWN_PROBLEMS:
        lines.append(f"  ... and {total - MAX_SHOWN_PROBLEMS} more")
    return DataError("\n".join([
        f"{affected} conversations write the chat template's turn-structure tokens ({', '.join(tokens)}) inside "
        "their text; tokenized as control tokens they teach the model to end turns mid-answer, and let user text "
        "forge turns:", *lines,
        "Remove them from the data, or pass --special_tokens_in_content text to encode them as plain text."]))


def _report(encoded: dict[str, np.ndarray], max_length: int, conversations: int, files, skipped_records: int
            ) -> DataReport:
    length, trained = encoded["length"], encoded["trained"]
    kept = trained > 0
    truncated = kept & (length > max_length)
    return DataReport(
        files=list(files), conversations=conversations, skipped_records=skipped_records, max_length=max_length,
        samples=len(length), own_turn_samples=int(encoded["own_turn"].sum()),
        token_exact_samples=int(encoded["token_exact_turns"].sum()),
        eos_appended=int(encoded["eos_appended"].sum()), unstopped_turns=int(encoded["unstopped"].sum()),
        trained_turns=int(encoded["trained_turns"].sum()), masked_turns=int(encoded["masked_turns"].sum()),
        tool_call_turns=int(encoded["tool_call_turns"].sum()),
        unrendered_reasoning=int(encoded["unrendered_reasoning"].sum()), capped_texts=int(encoded["capped"].sum()),
        beyond_limit_turns=int(encoded["beyond_limit"].sum()),
        kept=int(kept.sum()), tokens=int(encoded["kept_length"][kept].sum()), trained_tokens=int(trained.sum()),
        truncated=int(truncated.sum()), truncated_tokens=int((length[truncated] - max_length).sum()),
        dropped_no_trained=int((~kept).sum()), length_histogram=length_histogram(length.tolist(), max_length),
    )


def format_preview(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], color: bool = False) -> str:
    """The sample's text with the trained part marked: ⟦trained⟧ (and green when `color`)."""
    open_, close = ("\x1b[32m⟦", "⟧\x1b[0m") if color else ("⟦", "⟧")
    parts, run, trained = [], [], None
    for token, label in zip(input_ids, labels):
        now = label != IGNORE_INDEX
        if trained is not None and now != trained:
            parts.append((trained, run))
            run = []
        run.append(token)
        trained = now
    if run:
        parts.append((trained, run))
    text = "".join(
        open_ + tokenizer.decode(ids) + close if is_trained else tokenizer.decode(ids) for is_trained, ids in parts
    )
    return text


def trained_segments(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> list[str]:
    """The decoded runs of consecutive trained tokens, in order (what the model learns to write)."""
    segments, run = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            segments.append(tokenizer.decode(run))
            run = []
    if run:
        segments.append(tokenizer.decode(run))
    return segments
