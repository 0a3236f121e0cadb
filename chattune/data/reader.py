"""Data files read in bounded chunks: JSON Lines (blocks of whole lines, parsed where the chunk is processed), JSON
arrays (one record at a time), single JSON documents, Parquet row batches and `save_to_disk` rows. gzip is detected
from the bytes. A record that is not valid JSON is a record problem (skippable); a file that cannot be read at all
raises `FileProblem`.

The array parser is our own (json's raw_decode over a sliding buffer) rather than ijson: ijson's C backend parses
about 3x faster (bench/json_reader.py), but it turns a lone UTF-16 surrogate into "?" without a word, exhausted 23 GB
of memory on 200 kB of nested brackets, and its errors carry no line or column; parsing is about 1% of the
preparation time, which tokenization dominates.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from chattune.data.problems import os_problem
from chattune.data.sources import sources_size

# JSON text is read in blocks of about this size. Measured (bench/prepare_speed.py, 160k short conversations, 2
# workers): 4 MB blocks peak at 745 MB per worker, and each worker's heap keeps growing for its first few blocks as
# their Python objects fragment it; 1 MB blocks peak at 483 MB, flat from the first block, and run 10% faster.
CHUNK_BYTES = 1 << 20


CHUNK_RECORDS = 2000  # Parquet / saved-dataset rows per chunk


_UTF8_BOM = b"\xef\xbb\xbf"


_GZIP_MAGIC = b"\x1f\x8b"


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


_JSONL_RULE = "each line of a JSONL file must be one JSON object"


class FileProblem(Exception):
    """A whole file cannot be used; the message reads as a predicate of the path ("is empty; ...")."""


@dataclass(frozen=True)
class BadLine:
    """A record that is not valid JSON: a record-level problem, skippable like any invalid record."""

    message: str


Records = list[tuple[str, Any]]  # (where, record or BadLine)


@dataclass
class Chunk:
    """A bounded piece of one data file: whole JSONL lines as bytes, parsed where the chunk is processed (perhaps in
    a worker process), or records already parsed (JSON array, Parquet, saved dataset)."""

    file: str
    size: int  # bytes of the input file this chunk accounts for (progress)
    lines: bytes = b""
    first_line: int = 1  # line number of the first line of `lines`
    offset: int = 0  # byte offset of `lines` in the (decompressed) file
    records: Records | None = None


class _Decoder:
    """json's decoder that notes repeated keys (json keeps the last one silently): a record with one is refused,
    because which value the writer meant is unknowable. One per file or chunk being parsed (no shared state)."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.json = json.JSONDecoder(object_pairs_hook=self._pairs)

    def _pairs(self, pairs: list[tuple[str, Any]]) -> dict:
        record = dict(pairs)
        if len(record) != len(pairs):
            seen: set[str] = set()
            self.found += [key for key, _ in pairs if key in seen or seen.add(key)]
        return record

    def duplicate_problem(self) -> str | None:
        """The repeated keys of what was decoded since the last call."""
        if not self.found:
            return None
        keys = ", ".join(repr(k) for k in dict.fromkeys(self.found))
        self.found.clear()
        return f"an object repeats the key {keys}; JSON readers keep only one of the values: remove the duplicate"


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _surrogate(value: Any) -> str | None:
    """The first lone UTF-16 surrogate in the strings of a parsed record (json decodes a lone "\\ud83d" escape into
    a string that no tokenizer can encode)."""
    if isinstance(value, str):
        found = next((ch for ch in value if "\ud800" <= ch <= "\udfff"), None)
        return f"\\u{ord(found):04x}" if found else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((found for item in items if (found := _surrogate(item))), None)


def _checked(value: Any, raw: str, decoder: _Decoder) -> Any:
    """A parsed record, or a BadLine for repeated keys or lone surrogates (looked for only when the raw text has a
    surrogate escape, so valid data pays nothing)."""
    duplicate = decoder.duplicate_problem()
    if duplicate:
        return BadLine(duplicate)
    if _SURROGATE_ESCAPE.search(raw):
        found = _surrogate(value)
        if found:
            return BadLine(f"holds a lone UTF-16 surrogate ({found}), e.g. half of an emoji cut off by a truncation; "
                            "it is not text and cannot be tokenized: fix or remove that string")
    return value


def _parse_line(line: str, decoder: _Decoder) -> Any:
    """One JSONL line: the record, or a BadLine saying why not."""
    decoder.found.clear()
    line = line.removeprefix("\ufeff")  # a byte-order mark starting a line (files concatenated): not content
    try:
        value = decoder.json.decode(line)
    except json.JSONDecodeError as e:
        if "\x00" in line:
            return BadLine(f"holds a NUL byte at column {line.index(chr(0)) + 1}, which is not text: remove it")
        return BadLine(f"not valid JSON: {e.msg.removesuffix(' at')} at column {e.colno}; {_JSONL_RULE}")
    except RecursionError:
        return BadLine("not usable: its JSON is nested too deeply to read; a chat record needs a few levels only")
    return _checked(value, line, decoder)


def _parse_jsonl(text: str, first_line: int = 1) -> Records:
    records: Records = []
    decoder = _Decoder()
    # split("\n"), not splitlines(): JSON strings may legally contain raw U+2028 and other "line breaks".
    for number, line in enumerate(text.split("\n"), start=first_line):
        if line.strip():
            records.append((f"line {number}", _parse_line(line, decoder)))
    return records


def _utf8_problem(raw: bytes, error: UnicodeDecodeError, offset: int, first_line: int) -> str:
    line = first_line + raw.count(b"\n", 0, error.start)
    return (f"is not valid UTF-8: byte 0x{raw[error.start]:02x} at byte offset {offset + error.start} (line {line}); "
            "the file must be UTF-8 encoded (re-save it as UTF-8)")


def chunk_records(chunk: Chunk) -> Records:
    """The records of a chunk, parsing its JSONL lines if it carries them. Raises FileProblem (bad UTF-8)."""
    if chunk.records is not None:
        return chunk.records
    try:
        text = chunk.lines.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileProblem(_utf8_problem(chunk.lines, e, chunk.offset, chunk.first_line)) from None
    return _parse_jsonl(text, chunk.first_line)


class _Reader:
    """Reads a (possibly gzip-compressed) file in blocks; `progress()` counts bytes of the file on disk."""

    def __init__(self, path: str) -> None:
        import gzip

        try:
            self.raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise FileProblem(os_problem(e)) from None
        head = self.raw.read(2)
        self.raw.seek(0)
        self.gzip = head == _GZIP_MAGIC
        self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb") if self.gzip else self.raw
        self.reported = 0

    def read(self, n: int = -1) -> bytes:
        import zlib

        try:
            return self.stream.read(n)
        except (OSError, EOFError, zlib.error) as e:
            if self.gzip:
                raise FileProblem(f"is not a readable gzip file: {e}") from None
            raise FileProblem(os_problem(e) if isinstance(e, OSError) else str(e)) from None

    def progress(self) -> int:
        """Bytes of the file consumed since the last call."""
        position = self.raw.tell()
        delta, self.reported = position - self.reported, position
        return delta

    def close(self) -> None:
        self.raw.close()


def _nonblank_lines(buf: bytes, start: int, n: int) -> list[bytes]:
    """The first n complete non-blank lines of buf[start:]."""
    lines = []
    while len(lines) < n:
        end = buf.find(b"\n", start)
        if end < 0:
            break
        if buf[start:end].strip():
            lines.append(buf[start:end])
        start = end + 1
    return lines


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8", errors="replace"))
    except ValueError:
        return False
    except RecursionError:  # a value, too deep to read: a record problem of its line
        return True
    return True


def _check_encoding(head: bytes) -> None:
    if head.startswith(b"PAR1"):
        raise FileProblem("is a Parquet file (it starts with PAR1); name it *.parquet")
    if head.startswith(_UTF16_BOMS) or head.startswith((b"\x00\x00\xfe\xff",)):
        raise FileProblem("is UTF-16 or UTF-32 encoded (it starts with that byte-order mark); re-save it as UTF-8")
    if head[:4096].count(b"\x00") > len(head[:4096]) // 8:  # UTF-16 text is half NULs; a stray NUL is a line's problem
        raise FileProblem("holds NUL bytes: it looks UTF-16 or UTF-32 encoded (without a byte-order mark), or binary; "
                           "re-save it as UTF-8 text")


def _json_chunks(path: str, chunk_bytes: int, chunk_records: int) -> Iterator[Chunk]:
    """A JSON file by content: JSON Lines (streamed in blocks of whole lines), a JSON array (streamed record by
    record), or one JSON document (one record). gzip-compressed files are read the same way."""
    reader = _Reader(path)
    try:
        buf, eof = reader.read(chunk_bytes), False
        _check_encoding(buf)
        start = len(_UTF8_BOM) if buf.startswith(_UTF8_BOM) else 0
        while not eof and not buf[start:].strip():  # only blanks so far: read on to the first character
            more = reader.read(chunk_bytes)
            eof = not more
            buf += more
        first_at = len(buf) - len(buf[start:].lstrip())
        if first_at >= len(buf):
            raise FileProblem("is empty; expected a JSON array of records, one JSON object, or JSONL (one per line)")
        if buf[first_at:first_at + 1] == b"[":  # streamed right away, however long its first line
            records = _array_chunks(path, reader, buf, start, eof, chunk_bytes, chunk_records)
            del buf  # the generator owns the first block now; this frame must not keep it alive
            yield from records
            return
        # JSON Lines or one document: decided on the first two complete non-blank lines.
        while not eof and len(_nonblank_lines(buf, start, 2)) < 2:
            more = reader.read(max(chunk_bytes, len(buf)))
            eof = not more
            buf += more
        lines = _nonblank_lines(buf + (b"\n" if eof else b""), start, 2)
        # JSON Lines when the first line is a value of its own, or the second an object (the first is then a broken
        # record, reported at its line and skippable like any other); else one (pretty-printed) document, unless
        # that fails on its first line too (a JSONL file whose first lines are broken).
        if _is_json(lines[0]) or (len(lines) > 1 and lines[1].lstrip().startswith(b"{") and _is_json(lines[1])):
            records = _jsonl_chunks(path, reader, buf, start, eof, chunk_bytes)
        else:
            if not eof:
                buf, eof = buf + reader.read(), True
            first_line = 1 + buf.count(b"\n", start, first_at)
            document = _parse_document(buf, start, first_line)
            if document is not None:
                yield Chunk(path, size=reader.progress(), records=document)
                return
            records = _jsonl_chunks(path, reader, buf, start, eof, chunk_bytes)
        del buf
        yield from records
    finally:
        reader.close()


def _jsonl_chunks(path: str, reader: _Reader, buf: bytes, start: int, eof: bool, chunk_bytes: int
                  ) -> Iterator[Chunk]:
    line, offset, pending = 1, start, buf[start:]
    del buf
    while pending:
        cut = len(pending) if eof else pending.rfind(b"\n") + 1
        if cut and (eof or cut >= chunk_bytes // 2):
            block, pending = pending[:cut], pending[cut:]
            yield Chunk(path, size=reader.progress(), lines=block, first_line=line, offset=offset)
            line += block.count(b"\n")
            offset += cut
        if not eof:
            more = reader.read(max(chunk_bytes, len(pending)))  # a line longer than a block: grow, do not rescan
            eof = not more
            pending += more


def _json_error(error: json.JSONDecodeError) -> str:
    return error.msg.removesuffix(" at")  # "Invalid control character at" + " at line ..." reads twice


def _parse_document(raw: bytes, start: int, first_line: int) -> Records | None:
    """The one record of a JSON document; None when it is not JSON already on its first line (then the file is
    JSON Lines with a broken first record)."""
    try:
        text = raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileProblem(_utf8_problem(raw[start:], e, start, 1)) from None
    decoder = _Decoder()
    try:
        value = decoder.json.decode(text)
    except json.JSONDecodeError as e:
        if e.lineno == first_line and e.msg != "Extra data":
            return None
        raise FileProblem(f"is not valid JSON: {_json_error(e)} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise FileProblem("is not usable: its JSON is nested too deeply to read") from None
    return [("record 0", _checked(value, text, decoder))]  # not an array: those start with "[" and are streamed


class _Text:
    """Incrementally decoded UTF-8 text of a file with line and column bookkeeping for error messages."""

    def __init__(self, reader: _Reader, raw: bytes, start: int, eof: bool, block: int) -> None:
        self.reader, self.block, self.eof = reader, block, eof
        self.text, self.carry = "", b""
        self.byte_offset, self.lines_before, self.dropped_lines, self.column_base = start, 1, 0, 0
        self._feed(raw[start:])

    def _feed(self, raw: bytes) -> None:
        raw = self.carry + raw
        try:
            self.text += raw.decode("utf-8")
            self.carry = b""
        except UnicodeDecodeError as e:
            # A character split across two blocks: keep its first bytes for the next block.
            if not self.eof and e.reason == "unexpected end of data" and len(raw) - e.start < 4:
                self.text += raw[: e.start].decode("utf-8")
                self.carry = raw[e.start:]
            else:
                raise FileProblem(_utf8_problem(raw, e, self.byte_offset, self.lines_before)) from None
        consumed = len(raw) - len(self.carry)
        self.lines_before += raw.count(b"\n", 0, consumed)
        self.byte_offset += consumed

    def more(self, at_least: int = 0) -> bool:
        """Read another block (at least `at_least` bytes); False at the end of the file."""
        if self.eof:
            return False
        raw = self.reader.read(max(self.block, at_least))
        self.eof = not raw
        self._feed(raw)
        return not self.eof or bool(raw)

    def drop(self, pos: int) -> None:
        """Forget text before pos (already parsed), keeping line/column numbers right."""
        newline = self.text.rfind("\n", 0, pos)
        if newline >= 0:
            self.dropped_lines += self.text.count("\n", 0, pos)
            self.column_base = pos - newline - 1
        else:
            self.column_base += pos
        self.text = self.text[pos:]

    def where(self, pos: int) -> str:
        newline = self.text.rfind("\n", 0, pos)
        line = 1 + self.dropped_lines + self.text.count("\n", 0, pos)
        column = pos - newline if newline >= 0 else self.column_base + pos + 1
        return f"line {line} column {column}"


def _array_chunks(path: str, reader: _Reader, raw: bytes, start: int, eof: bool, chunk_bytes: int,
                  chunk_records: int) -> Iterator[Chunk]:
    """A JSON array, parsed one record at a time (json's raw_decode), so memory holds one chunk of records."""
    text = _Text(reader, raw, start, eof, chunk_bytes)
    del raw
    pos = text.text.index("[") + 1
    records: Records = []
    decoder = _Decoder()
    index = 0

    def skip_space(at: int) -> int:
        while True:
            while at < len(text.text) and text.text[at] in " \t\r\n":
                at += 1
            if at < len(text.text) or not text.more():
                return at

    def fail(message: str, at: int) -> FileProblem:
        return FileProblem(f"is not valid JSON: {message} at {text.where(at)}")

    value_next = True  # at the start, and after each comma
    while True:
        pos = skip_space(pos)
        if pos >= len(text.text):
            raise fail("Expecting value" if value_next else "Expecting ',' delimiter", pos)
        if text.text[pos] == "]" and (index == 0 or not value_next):
            pos = skip_space(pos + 1)
            if pos < len(text.text):
                raise fail("Extra data", pos)
            break
        if not value_next:
            if text.text[pos] != ",":
                raise fail("Expecting ',' delimiter", pos)
            pos, value_next = pos + 1, True
            continue
        decoder.found.clear()
        try:
            value, end = decoder.json.raw_decode(text.text, pos)
            if end == len(text.text) and text.more():  # a value that may go on in the next block: parse it again
                continue
        except json.JSONDecodeError as e:
            # Errors of a value cut at the end of the buffer point at its last few characters (or at the start of
            # an unterminated string): read on and parse again. Anything earlier is a real syntax error.
            truncated = e.msg.startswith("Unterminated string") or e.pos >= len(text.text) - 8
            if truncated and text.more(at_least=len(text.text)):
                continue
            raise fail(_json_error(e), e.pos) from None
        except RecursionError:
            raise FileProblem(f"is not usable: record {index} is nested too deeply to read") from None
        records.append((f"record {index}", _checked(value, text.text[pos:end], decoder)))
        index, pos, value_next = index + 1, end, False
        if len(records) >= chunk_records:
            yield Chunk(path, size=reader.progress(), records=records)
            records = []
        if pos > chunk_bytes and 2 * pos > len(text.text):  # each drop copies at most as much as it frees
            text.drop(pos)
            pos = 0
    if records or index == 0:
        yield Chunk(path, size=reader.progress(), records=records)


def _without_struct_nulls(value: Any) -> Any:
    """An Arrow row with the null fields of its structs dropped. Arrow gives every struct of a column every field any
    row has: a tool call's `arguments` gains `"unit": null` because another call passed a unit, a tool schema gains the
    properties of other tools. A null field of a struct is indistinguishable from an absent one; absent is what the
    data said in every other row."""
    if isinstance(value, dict):
        return {k: _without_struct_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_struct_nulls(v) for v in value]
    return value


def _parquet_chunks(path: str, chunk_records: int) -> Iterator[Chunk]:
    import pyarrow as pa  # imported here: only Parquet users pay for it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        size, total, index = os.path.getsize(path), max(parquet.metadata.num_rows, 1), 0
        batches = parquet.iter_batches(batch_size=chunk_records)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            rows = [_without_struct_nulls(row) for row in batch.to_pylist()]
            yield Chunk(path, size=size * len(rows) // total,
                        records=[(f"record {index + i}", row) for i, row in enumerate(rows)])
            index += len(rows)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise FileProblem(f"cannot be read as Parquet: {e}") from None


def _saved_dataset_chunks(path: str, chunk_records: int) -> Iterator[Chunk]:
    import datasets  # imported here: slow to import, and only save_to_disk directories need it

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - any failure means the directory is unusable; say why, not a traceback
        raise FileProblem(f"cannot be loaded with datasets.load_from_disk: {e}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            splits = ", ".join(dataset) or "none"
            raise FileProblem(
                f"is a DatasetDict without a 'train' split (splits: {splits}); "
                f"pass the split's own directory instead, e.g. {os.path.join(path, next(iter(dataset), 'SPLIT'))}"
            )
        dataset = dataset["train"]
    size = sources_size([(path, "saved")])
    for start in range(0, len(dataset), chunk_records):
        rows = [_without_struct_nulls(row)
                for row in dataset.select(range(start, min(start + chunk_records, len(dataset)))).to_list()]
        yield Chunk(path, size=size * len(rows) // max(len(dataset), 1),
                    records=[(f"record {start + i}", row) for i, row in enumerate(rows)])
    if not len(dataset):
        yield Chunk(path, size=size, records=[])


def source_chunks(path: str, kind: str, chunk_bytes: int | None = None, chunk_records: int | None = None
                  ) -> Iterator[Chunk]:
    """The chunks of one source (a file, or a save_to_disk directory). Raises FileProblem."""
    chunk_bytes, chunk_records = chunk_bytes or CHUNK_BYTES, chunk_records or CHUNK_RECORDS
    if kind == "saved":
        return _saved_dataset_chunks(path, chunk_records)
    if path.lower().endswith(".parquet"):
        return _parquet_chunks(path, chunk_records)
    return _json_chunks(path, chunk_bytes, chunk_records)  # .json, .jsonl, .gz or anything else: decided by content
