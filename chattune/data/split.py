"""--val_size: hold out a seeded share of the training conversations, once, as files every later step reads.

The training data is read and validated in one streaming pass that writes every usable conversation, in order, as
a canonical `messages` record (one JSONL line: roles, contents, reasoning, tool calls, tools, untrained turns as
`"train": false`). A seeded choice of ordinals then sends each line to `train.jsonl` or `val.jsonl`. Both are cached
under the data cache (`splits/<key>`, keyed by the files' bytes, the size, the seed and the code), so a re-run, a
resumed run and every rank of a job see exactly the same split. The run copies `val.jsonl` and `val_ids.json` (the
source of every held-out conversation: "data.jsonl: line 12") into its output directory, for evaluation after
training (run_gptq.py, check_deploy.py) on exactly the conversations training never saw.

Memory stays bounded: conversations are streamed to disk, and only one bit per conversation is held for the choice.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chattune import __version__
from chattune.data.load import Tally, read_sources, validate_chunk
from chattune.data.problems import DataError
from chattune.data.records import Conversation
from chattune.data.sources import expand_sources, source_files, sources_size
from chattune.errors import ConfigError

TRAIN_FILE, VAL_FILE, IDS_FILE, META_FILE = "train.jsonl", "val.jsonl", "val_ids.json", "split.json"
TRAIN_SOURCES = "train_sources.txt"  # the source of every line of train.jsonl, for messages about it


def parse_val_size(text: str | float | int | None) -> float | int | None:
    """'0' or empty: no split; a number in (0, 1): that fraction of the conversations; an integer >= 1: that many."""
    try:
        value = float(text) if text not in (None, "") else 0.0
    except (TypeError, ValueError):
        value = float("nan")
    if value == 0:
        return None
    if not math.isfinite(value):
        value = float("nan")
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise ConfigError(f"--val_size {text}: give a fraction between 0 and 1 (0.05: 5% of the conversations) or a "
                      "whole number of conversations (200)")


def held_out_count(val_size: float | int, conversations: int) -> int:
    n = max(1, round(conversations * val_size)) if isinstance(val_size, float) else val_size
    if n >= conversations:
        raise DataError(f"--val_size {val_size} holds out {n} of the {conversations} conversations, leaving nothing to "
                        "train on; use a smaller --val_size")
    return n


def conversation_record(conv: Conversation) -> dict:
    """The conversation as a `messages` record that reads back to the same conversation (a preference pair as the
    canonical pair record, chattune.data.pairs)."""
    if conv.rejected is not None:
        from chattune.data.pairs import pair_record

        return pair_record(conv)
    messages = [dict(m) for m in conv.messages]
    for i in conv.masked:
        messages[i]["train"] = False
    record: dict = {"messages": messages}
    if conv.tools:
        record["tools"] = list(conv.tools)
    return record


@dataclass
class Split:
    train: Path
    val: Path
    ids: Path
    conversations: int = 0  # usable conversations of the data, both parts
    held_out: int = 0
    skipped_records: int = 0  # invalid records dropped (--skip_invalid_records), as the report counts them
    files: list[str] = field(default_factory=list)
    skipped_examples: list[str] = field(default_factory=list)
    copies_left_out: int = 0  # training conversations identical to a held-out one: not trained (counted)
    ignored: list[str] = field(default_factory=list)  # entries of given directories that were not read, with why
    key: str = ""  # identity of the split (data bytes, size, seed, code)

    @property
    def train_sources(self) -> Path:
        return self.train.with_name(TRAIN_SOURCES)

    def original_place(self, message: str) -> str:
        """A message about `train.jsonl: line N` / `val.jsonl: line N` (the split's files) with the user's file and
        record instead."""
        for path, names in ((self.train, self.train_sources), (self.val, None)):
            pattern = re.compile(re.escape(str(path)) + r": line (\d+)")
            if not pattern.search(message):
                continue
            labels = (names.read_text(encoding="utf-8").splitlines() if names is not None
                      else json.loads(self.ids.read_text(encoding="utf-8")))

            def label(match, labels=labels) -> str:
                n = int(match.group(1))
                return labels[n - 1] if 0 < n <= len(labels) else match.group(0)

            message = pattern.sub(label, message)
        return message


def split_data(data_path: str, val_size: float | int, seed: int, cache_dir: str | Path | None = None,
               skip_invalid: bool = False, main: bool = True, pairs: bool = False) -> Split:
    """The train / held-out files of `data_path`, made once per content, size and seed (see the module docstring).
    `main` false: the other ranks of a node find the main process's split (or its failure) without opening a data
    file."""
    from chattune.data.cache import (
        code_fingerprint,
        content_key,
        has_failed,
        locked,
        note_failure,
        read_index,
        stat_key,
        usable_cache_dir,
        write_index,
    )

    sources = expand_sources(data_path)
    if sources.problems:
        raise DataError(Tally(file_problems=sources.problems).error_message(skip_invalid))
    cache = usable_cache_dir(cache_dir)
    text = f"chattune {__version__} split v2 code {code_fingerprint()}\n" + json.dumps([str(val_size), seed,
                                                                                          skip_invalid, pairs])
    stat = "split-" + stat_key(text, sources)
    if not main:
        key = read_index(cache, stat)
        if key and _ready(cache / "splits" / key):
            return _load(cache / "splits" / key)
        if key and has_failed(cache, "split-" + key):
            raise DataError("the training data could not be split: the main process stopped on it (its message "
                            "above lists the problems)")
    key = content_key(text, sources, sources_size(sources.items))
    write_index(cache, stat, key)
    target = cache / "splits" / key
    if _ready(target):
        return _load(target)
    (cache / "splits").mkdir(parents=True, exist_ok=True)
    with locked(cache, "split-" + key):
        if _ready(target):  # made by another process while this one waited for the lock
            return _load(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=cache / "splits"))
        try:
            _write_split(tmp, sources, val_size, seed, skip_invalid, key, pairs)
            try:
                os.replace(tmp, target)
            except OSError as e:  # another node, without a working lock, finished the same split first
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _ready(target):
                    raise
        except DataError as e:
            note_failure(cache, "split-" + key, str(e))  # the node's other ranks fail at once
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(target)


def _write_split(folder: Path, sources, val_size: float | int, seed: int, skip_invalid: bool, key: str,
                 pairs: bool = False) -> None:
    import hashlib

    import numpy as np

    tally = Tally(file_problems=list(sources.problems))
    every, labels = folder / "all.jsonl", folder / "sources.txt"
    with open(every, "w", encoding="utf-8") as out, open(labels, "w", encoding="utf-8") as names:
        for chunk in read_sources(sources, tally):
            validated = validate_chunk(chunk, pairs)
            tally.add(validated)
            for conv in validated.conversations:
                out.write(json.dumps(conversation_record(conv), ensure_ascii=False, sort_keys=True) + "\n")
                names.write(conv.source.replace("\n", " ") + "\n")
    error = tally.error_message(skip_invalid)
    if error:
        raise DataError(error)
    files = [str(f) for path, kind in sources.items for f in source_files(path, kind)]
    if tally.conversations == 0:
        raise DataError(tally.nothing_left_message(files))
    n = held_out_count(val_size, tally.conversations)
    chosen = np.zeros(tally.conversations, dtype=bool)
    chosen[np.random.default_rng(seed).choice(tally.conversations, size=n, replace=False)] = True

    def digest(line: str) -> bytes:
        return hashlib.blake2b(line.encode(), digest_size=16).digest()

    with open(every, encoding="utf-8") as lines:  # canonical lines: equal conversations, equal lines
        held = {digest(line) for k, line in enumerate(lines) if chosen[k]}
    held_out, copies = [], 0
    with open(every, encoding="utf-8") as lines, open(labels, encoding="utf-8") as names, \
            open(folder / TRAIN_FILE, "w", encoding="utf-8") as train, \
            open(folder / TRAIN_SOURCES, "w", encoding="utf-8") as train_names, \
            open(folder / VAL_FILE, "w", encoding="utf-8") as val:
        for k, (line, name) in enumerate(zip(lines, names, strict=True)):
            if chosen[k]:
                val.write(line)
                held_out.append(name.rstrip("\n"))
            elif digest(line) in held:  # a copy of a held-out conversation: training it would leak the evaluation
                copies += 1
            else:
                train.write(line)
                train_names.write(name)
    every.unlink()
    labels.unlink()
    if copies == tally.conversations - n:
        raise DataError(f"every training conversation is a copy of a held-out one ({copies}); the data has too few "
                        "distinct conversations for --val_size")
    (folder / IDS_FILE).write_text(json.dumps(held_out, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    meta = Split(Path(TRAIN_FILE), Path(VAL_FILE), Path(IDS_FILE), tally.conversations, n, tally.bad_records,
                 files, [line.strip() for line in tally.record_problems.lines()], copies, list(sources.ignored), key)
    (folder / META_FILE).write_text(json.dumps(asdict(meta), default=str, indent=1), encoding="utf-8")


def _ready(target: Path) -> bool:
    return (target / META_FILE).exists()  # written last, and the folder is renamed into place whole


def _load(target: Path) -> Split:
    meta = json.loads((target / META_FILE).read_text(encoding="utf-8"))
    meta.update(train=target / TRAIN_FILE, val=target / VAL_FILE, ids=target / IDS_FILE)
    return Split(**meta)


def publish(split: Split, output_dir: str | Path, overwrite: bool = False) -> None:
    """Copy the held-out conversations and their sources into the run's output directory. A run resumed in a
    directory whose held-out set differs (the data, --val_size or --seed changed) would evaluate, and stop early,
    on other conversations, some of which it trained on: refused unless --overwrite_output_dir."""
    out = Path(output_dir)
    previous = out / VAL_FILE
    if not overwrite and previous.is_file() and previous.read_bytes() != split.val.read_bytes():
        raise ConfigError(
            f"--val_size: {previous} holds another held-out split than this run makes (the data, --val_size or "
            "--seed changed since the run in this directory started); resuming would evaluate on other "
            "conversations, some of them trained on. Restore the original data and flags, or start fresh with "
            "--overwrite_output_dir (or another --output_dir)")
    out.mkdir(parents=True, exist_ok=True)
    for source, name in ((split.val, VAL_FILE), (split.ids, IDS_FILE)):
        tmp = out / f".{name}.{os.getpid()}.tmp"
        shutil.copyfile(source, tmp)
        os.replace(tmp, out / name)


def _held_out_dir(model_dir: str | Path) -> Path:
    """Where `model_dir`'s held-out files are: in it, or for a run's checkpoint-N folder in the run's directory (a
    checkpoint holds no copy of them)."""
    folder = Path(model_dir)
    if not (folder / VAL_FILE).is_file() and re.fullmatch(r"checkpoint-\d+", folder.name):
        if (folder.parent / VAL_FILE).is_file():
            return folder.parent
    return folder


def held_out_of(model_dir: str | Path) -> Path | None:
    """The held-out conversations a run (or its checkpoint, or an artifact made from one: merged, GPTQ) carries."""
    path = _held_out_dir(model_dir) / VAL_FILE
    return path if path.is_file() else None


def carry_held_out(source_dir: str | Path, out_dir: str | Path) -> None:
    """Give an artifact made from `source_dir` its held-out conversations, so later steps find them with it."""
    for name in (VAL_FILE, IDS_FILE):
        source = _held_out_dir(source_dir) / name
        if source.is_file() and Path(out_dir).resolve() != source.parent.resolve():
            shutil.copyfile(source, Path(out_dir) / name)


def conversation_key(conv: Conversation) -> str:
    """Identity of a conversation's content (to keep held-out conversations out of another use of the same data)."""
    return json.dumps([conv.messages, conv.tools, conv.masked, conv.rejected], ensure_ascii=False, sort_keys=True)
