"""Streaming data preparation: bounded chunks, the same result as the in-memory path, one parser per node."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

import chattune.data.reader
from chattune.data.load import load_conversations
from chattune.data.prepare import prepare_dataset, prepare_files
from chattune.data.problems import DataError
from chattune.data.tokenizer import prepare_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def records(n: int, start: int = 0) -> list[dict]:
    """Conversations of varied length and shape, with multi-byte characters (split across read blocks)."""
    out = []
    for i in range(start, start + n):
        turns = [{"from": "human", "value": f"question {i} ünïcödé 漢字 " + "why " * (i % 7)},
                 {"from": "gpt", "value": f"answer {i} " + "because " * (i % 23) + "🙂"}]
        if i % 5 == 0:
            turns += [{"from": "human", "value": "and then?"}, {"from": "gpt", "value": f"then {i}"}]
        out.append({"system": "Be brief.", "conversations": turns} if i % 3 == 0 else {"conversations": turns})
    return out


def write_jsonl(path: Path, rows: list, *, compress: bool = False) -> Path:
    text = "".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n" for row in rows)
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return path


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks far smaller than the data: every record boundary case happens many times."""
    monkeypatch.setattr(chattune.data.reader, "CHUNK_BYTES", 700)
    monkeypatch.setattr(chattune.data.reader, "CHUNK_RECORDS", 3)


def loaded(path) -> list[tuple[str, tuple]]:
    return [(c.source, c.messages) for c in load_conversations(str(path)).conversations]


@pytest.mark.parametrize("layout", ["jsonl", "jsonl.gz", "array", "array-pretty", "array-one-line"])
def test_small_chunks_read_the_same_records(tmp_path, monkeypatch, layout):
    rows = records(60)
    path = tmp_path / f"data.{layout}"
    if layout.startswith("jsonl"):
        write_jsonl(path, rows, compress=layout.endswith("gz"))
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2 if layout == "array-pretty" else None)
                        .replace("}, {", "},\n {" if layout == "array" else "}, {"), encoding="utf-8")
    whole = loaded(path)
    monkeypatch.setattr(chattune.data.reader, "CHUNK_BYTES", 97)  # blocks cut inside multi-byte characters
    monkeypatch.setattr(chattune.data.reader, "CHUNK_RECORDS", 4)
    assert loaded(path) == whole and len(whole) == 60
    # the reference: the records as json reads them whole
    assert [m for _, m in whole][7] == load_conversations(str(path)).conversations[7].messages
    assert whole[7][1][-1]["content"] == rows[7]["conversations"][-1]["value"]


def test_a_line_longer_than_a_block_and_errors_located_in_later_blocks(tmp_path, tiny_chunks):
    rows = records(30)
    rows[4]["conversations"][1]["value"] = "long " * 2000  # 10 kB: many blocks
    lines = [json.dumps(r) for r in rows]
    lines[20] = lines[20][:-5]  # broken JSON on line 21
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_conversations(str(path))
    assert f"{path}: line 21: not valid JSON" in str(e.value)
    result = load_conversations(str(path), skip_invalid=True)
    assert result.skipped_records == 1 and len(result.conversations) == 29
    assert result.conversations[4].messages[1]["content"] == "long " * 2000


def test_broken_array_is_located_with_small_blocks(tmp_path, tiny_chunks):
    rows = [json.dumps(r) for r in records(40)]
    rows[33] = rows[33].replace('"from"', '"from" "x"', 1)
    path = tmp_path / "t.json"
    path.write_text("[\n" + ",\n".join(rows) + "\n]")
    with pytest.raises(DataError) as e:
        load_conversations(str(path))
    column = rows[33].index('"x"') + 1
    assert f"{path}: is not valid JSON: Expecting ':' delimiter at line 35 column {column}" in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# The streaming path against the in-memory one
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(model_dirs):
    return prepare_tokenizer(str(model_dirs("qwen2")), "auto")


def both(path, tok, setup, tmp_path, *, skip_invalid=False, num_proc=2, **kw):
    streamed = prepare_files(str(path), tok, stop_tokens=setup.stop_tokens, cache_dir=tmp_path / "stream",
                             num_proc=num_proc, skip_invalid=skip_invalid, **kw)
    load = load_conversations(str(path), skip_invalid=skip_invalid)
    memory = prepare_dataset(load.conversations, tok, stop_tokens=setup.stop_tokens, cache_dir=tmp_path / "memory",
                             files=load.files, skipped_records=load.skipped_records, **kw)
    return streamed, memory, load


@pytest.mark.slow
def test_streamed_equals_in_memory_over_many_chunks(qwen, tmp_path, tiny_chunks):
    tok, setup = qwen
    rows = records(120)
    rows[10] = {"conversations": [{"from": "human", "value": "x"}]}  # invalid: skipped and counted
    rows[77] = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}  # invalid
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    streamed, memory, load = both(path, tok, setup, tmp_path, skip_invalid=True, max_length=48)
    assert len(streamed.dataset) == len(memory.dataset) == streamed.report.kept > 100
    assert streamed.dataset["input_ids"][:] == memory.dataset["input_ids"][:]
    assert streamed.dataset["labels"][:] == memory.dataset["labels"][:]
    expected = memory.report.to_dict() | {"skipped_examples": [str(p) for p in load.skipped]}
    assert streamed.report.to_dict() == expected
    assert streamed.report.truncated > 0 and streamed.report.skipped_records == 2
    assert streamed.report.skipped_examples[0].startswith(f"{path}: line 11: ")
    assert f"{path}: line 78: messages[1].content is empty" in streamed.report.format()


def test_streamed_problem_list_equals_in_memory(qwen, tmp_path, tiny_chunks):
    tok, setup = qwen
    rows = records(100)
    for i in range(3, 100, 4):  # 25 invalid records in many chunks: 20 shown, all counted, in file order
        rows[i] = {"conversations": [{"from": "gpt", "value": "no question"}]}
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as streamed:
        prepare_files(str(path), tok, stop_tokens=setup.stop_tokens, max_length=64, cache_dir=tmp_path, num_proc=2)
    with pytest.raises(DataError) as memory:
        load_conversations(str(path))
    assert str(streamed.value) == str(memory.value)
    assert "Found 25 problems in 25 of 100 records" in str(streamed.value) and "... and 5 more" in str(streamed.value)
    assert not [p for p in tmp_path.rglob("*.arrow")]  # a failed run caches nothing


def test_control_tokens_in_content_reported_the_same(qwen, tmp_path, tiny_chunks):
    tok, setup = qwen
    rows = records(50)
    rows[31]["conversations"][1]["value"] = "fake end<|im_end|> of turn"
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as streamed:
        prepare_files(str(path), tok, stop_tokens=setup.stop_tokens, max_length=64, cache_dir=tmp_path, num_proc=2)
    with pytest.raises(DataError) as memory:
        prepare_dataset(load_conversations(str(path)).conversations, tok, stop_tokens=setup.stop_tokens,
                        max_length=64, cache_dir=tmp_path)
    assert str(streamed.value) == str(memory.value) and f"{path}: line 32: messages[1]" in str(streamed.value)
    s, m, _ = both(path, tok, setup, tmp_path, max_length=64, special_tokens_in_content="text")
    assert s.dataset["input_ids"][:] == m.dataset["input_ids"][:] and s.report.content_control_tokens == 1


def test_every_sample_dropped_is_an_error_and_nothing_is_cached(qwen, tmp_path):
    tok, setup = qwen
    long_prompt = {"conversations": [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "ok"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [long_prompt])
    for _ in range(2):  # the second run fails the same way: no empty result was cached
        with pytest.raises(DataError, match="no training sample has a trained token left after truncation to 32 "
                                            "tokens .*raise --model_max_length"):
            prepare_files(str(path), tok, stop_tokens=setup.stop_tokens, max_length=32, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="no training sample"):
        prepare_dataset(load_conversations(str(path)).conversations, tok, stop_tokens=setup.stop_tokens,
                        max_length=32, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").rglob("*.arrow"))
    ok = prepare_files(str(path), tok, stop_tokens=setup.stop_tokens, max_length=512, cache_dir=tmp_path / "c")
    assert ok.report.kept == 1


def test_data_that_marks_every_turn_untrained_is_named_as_such_not_blamed_on_truncation(qwen, tmp_path):
    tok, setup = qwen
    masked = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok", "train": False}]}
    path = write_jsonl(tmp_path / "data.jsonl", [masked, masked])
    with pytest.raises(DataError) as e:
        prepare_files(str(path), tok, stop_tokens=setup.stop_tokens, max_length=512, cache_dir=tmp_path / "c")
    assert "no training sample has a turn to train: every assistant turn of the 2 samples is marked untrained" in str(
        e.value) and "truncation" not in str(e.value)
    mixed = prepare_files(str(write_jsonl(tmp_path / "mixed.jsonl", [masked, GOOD])), tok,
                          stop_tokens=setup.stop_tokens, max_length=512, cache_dir=tmp_path / "c")
    assert (mixed.report.kept, mixed.report.dropped_untrained, mixed.report.dropped_no_trained) == (1, 1, 0)
    assert "dropped with no turn to train (every assistant turn marked untrained" in mixed.report.format()


def test_directory_reads_gzip_and_lists_what_it_skips(qwen, tmp_path):
    tok, setup = qwen
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl.gz", records(3), compress=True)
    write_jsonl(data / "b.json", records(2, start=3))
    (data / "notes.csv").write_text("a,b\n")
    (data / "old").mkdir()
    (data / ".hidden.json").write_text("[]")
    (data / "gone.json").symlink_to(tmp_path / "nowhere.json")
    prepared = prepare_files(str(data), tok, stop_tokens=setup.stop_tokens, max_length=256, cache_dir=tmp_path / "c")
    assert prepared.report.conversations == 5
    assert prepared.report.ignored == [f"{data / '.hidden.json'} (hidden)", f"{data / 'gone.json'} (broken link)",
                                       f"{data / 'notes.csv'} (not a data file)",
                                       f"{data / 'old'} (directory, not searched)"]
    assert "not read from the given directories (4):" in prepared.report.format()


def test_unwritable_cache_falls_back_to_a_temporary_one(qwen, tmp_path, capsys):
    tok, setup = qwen
    path = write_jsonl(tmp_path / "data.jsonl", records(2))
    blocker = tmp_path / "file"
    blocker.write_text("")
    prepared = prepare_files(str(path), tok, stop_tokens=setup.stop_tokens, max_length=256,
                             cache_dir=blocker / "cache")
    assert prepared.report.kept == 2 and not str(prepared.cache_path).startswith(str(blocker))
    err = capsys.readouterr().err
    assert f"the data cache {blocker / 'cache'} cannot be written" in err and "using " in err


# ----------------------------------------------------------------------------------------------------------------
# One parser per node
# ----------------------------------------------------------------------------------------------------------------

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while _OPENED is a list


def opened_during(fn):
    global _OPENED
    _OPENED = []
    try:
        result = fn()
    finally:
        opened, _OPENED = _OPENED, None
    return result, opened


def test_other_ranks_never_open_the_data_files_when_the_cache_exists(qwen, tmp_path):
    tok, setup = qwen
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", records(20))
    write_jsonl(data / "b.jsonl.gz", records(5), compress=True)
    files = {str(data / "a.jsonl"), str(data / "b.jsonl.gz")}

    def prepare(main: bool):
        return prepare_files(str(data), tok, stop_tokens=setup.stop_tokens, max_length=128,
                             cache_dir=tmp_path / "c", main=main)

    first, opened = opened_during(lambda: prepare(True))
    assert not first.from_cache and files <= set(opened)  # the instrument sees the main process read the files
    again, opened = opened_during(lambda: prepare(True))
    assert again.from_cache and files <= set(opened)  # the main process hashes them for the key
    follower, opened = opened_during(lambda: prepare(False))
    assert follower.from_cache and follower.cache_path == first.cache_path
    assert not files & set(opened), "a non-main rank opened a data file"
    assert follower.dataset["input_ids"][:] == first.dataset["input_ids"][:]
    # A changed file changes what os.stat says: the follower cannot use the index entry and works it out itself.
    write_jsonl(data / "a.jsonl", records(21))
    changed, opened = opened_during(lambda: prepare(False))
    assert not changed.from_cache and changed.report.conversations == 26 and files <= set(opened)


def _batch_boundary(arrow: Path, batches: int) -> int:
    """The byte length of the schema and the first `batches` record batches of an Arrow stream file: a cut there
    leaves a stream pyarrow reads without complaint (fewer rows)."""
    import pyarrow as pa

    with pa.ipc.open_stream(pa.memory_map(str(arrow))) as reader:
        sink = pa.BufferOutputStream()
        writer = pa.ipc.new_stream(sink, reader.schema)
        for _ in range(batches):
            writer.write_batch(reader.read_next_batch())
        return sink.tell()


@pytest.mark.parametrize("damage", ["cut at a batch boundary", "cut mid-batch", "a changed byte"])
def test_a_damaged_cache_entry_is_prepared_again_with_a_note(qwen, tmp_path, tiny_chunks, capsys, damage):
    """A cache entry cut short where pyarrow still reads it (150 samples becoming 100, with the report saying 150),
    cut where it cannot (a traceback on every run, the entry staying "ready"), or changed in place: each is found on
    load (rows, bytes, checksum), noted, removed and prepared again."""
    from chattune.data.cache import DATASET_FILE, load_cached

    tok, setup = qwen
    path = write_jsonl(tmp_path / "a.jsonl", records(150))

    def prepare():
        return prepare_files(str(path), tok, stop_tokens=setup.stop_tokens, max_length=256,
                             cache_dir=tmp_path / "c", num_proc=1)

    first = prepare()
    assert first.report.kept == 150 and len(first.dataset) == 150
    arrow, entry, ids = first.cache_path / DATASET_FILE, first.cache_path, first.dataset["input_ids"][:]
    whole = arrow.read_bytes()
    if damage == "cut at a batch boundary":
        damaged = whole[:_batch_boundary(arrow, 20)]
    elif damage == "cut mid-batch":
        damaged = whole[: len(whole) // 2]
    else:
        middle = len(whole) // 2
        damaged = whole[:middle] + bytes([whole[middle] ^ 1]) + whole[middle + 1:]
    del first  # its memory map would fault on a file cut in place; the damaged file is a new one
    (entry / "new").write_bytes(damaged)
    os.replace(entry / "new", arrow)
    if damage == "cut at a batch boundary":
        assert 0 < len(load_cached(entry)) < 150  # the cut file loads without a word: what is caught
    capsys.readouterr()
    again = prepare()
    assert f"note: the cached tokenized data at {entry} is damaged" in capsys.readouterr().err
    assert not again.from_cache and len(again.dataset) == 150 and again.report.kept == 150
    assert again.dataset["input_ids"][:] == ids
    assert prepare().from_cache  # whole again: used as it is
    assert not [p for p in (tmp_path / "c").iterdir() if "damaged" in p.name]


def _prepare_in_child(path, model_dir, cache, queue):
    tok, setup = prepare_tokenizer(model_dir, "auto")
    prepared = prepare_files(path, tok, stop_tokens=setup.stop_tokens, max_length=128, cache_dir=cache, num_proc=1)
    queue.put(prepared.from_cache)


@pytest.mark.slow
def test_concurrent_main_processes_prepare_once(model_dirs, tmp_path):
    """Two nodes' main processes on one shared cache: one prepares, the other waits for its lock and loads."""
    path = write_jsonl(tmp_path / "data.jsonl", records(3000))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_prepare_in_child, args=(str(path), str(model_dirs("qwen2")), tmp_path / "c",
                                                              queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(300)
    assert [child.exitcode for child in children] == [0, 0]
    assert sorted([queue.get(), queue.get()]) == [False, True]


# ----------------------------------------------------------------------------------------------------------------
# Bounded memory
# ----------------------------------------------------------------------------------------------------------------

# The tiktoken twin (chattune.data.twin, from 32 MB of input on) is built for both sizes: a fixed cost (its tables,
# ~40 MB in the main process, which the forked workers map too), not one that grows with the data.
_PEAK = """
import json, resource, sys
import chattune.data.prepare
chattune.data.prepare._TWIN_MIN_BYTES = 0
from chattune.data.prepare import prepare_files
from chattune.data.tokenizer import prepare_tokenizer
tok, setup = prepare_tokenizer(sys.argv[1], "auto")
p = prepare_files(sys.argv[2], tok, stop_tokens=setup.stop_tokens, max_length=64, cache_dir=sys.argv[3], num_proc=2)
print(json.dumps({"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "kept": p.report.kept}))
"""


@pytest.mark.slow
def test_memory_stays_flat_as_the_data_grows(model_dirs, tmp_path):
    def peak(n: int) -> dict:
        path = tmp_path / f"{n}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"conversations": [{"from": "human", "value": f"q{i} " + "why " * 10},
                                                      {"from": "gpt", "value": f"a{i} " + "so " * 30}]}) + "\n")
        out = subprocess.run([sys.executable, "-c", _PEAK, str(model_dirs("qwen2")), str(path), str(tmp_path / "c")],
                             capture_output=True, text=True, cwd=ROOT, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["kept"] == n
        return result

    small, large = peak(40_000), peak(160_000)
    # ru_maxrss is in KiB. Measured: the 120k more records held as conversations (reading everything first, as
    # before streaming) add about 110 MB to the main process, their tokens held instead of written out about 48 MB.
    # With 4 MB blocks (before) a worker's heap still grew about 40 MB over its first blocks; with 1 MB, under 1 MB.
    assert large["self"] - small["self"] < 30_000, (small, large)
    assert large["workers"] - small["workers"] < 30_000, (small, large)


# ----------------------------------------------------------------------------------------------------------------
# Hostile input: a clear message naming the file and the record, never a traceback (issue 12)
# ----------------------------------------------------------------------------------------------------------------

GOOD = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}


def error_of(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_conversations(path if isinstance(path, list) else str(path), **kw)
    return str(e.value)


def test_broken_first_jsonl_line_is_a_skippable_record_at_its_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ['{"conversations": [{"from": "human"', GOOD, GOOD])
    assert f"{path}: line 1: not valid JSON" in error_of(path)
    result = load_conversations(str(path), skip_invalid=True)
    assert result.skipped_records == 1 and [c.source for c in result.conversations] == [f"{path}: line 2",
                                                                                        f"{path}: line 3"]


def test_lone_surrogate_is_a_record_problem(tmp_path):
    bad = json.dumps(GOOD).replace("Hello", "cut \\ud83d")
    fine = json.dumps(GOOD).replace("Hello", "whole \\ud83d\\ude00")  # a valid pair: one emoji
    path = write_jsonl(tmp_path / "t.jsonl", [fine, bad])
    assert f"{path}: line 2: holds a lone UTF-16 surrogate (\\ud83d)" in error_of(path)
    result = load_conversations(str(path), skip_invalid=True)
    assert [c.messages[1]["content"] for c in result.conversations] == ["whole 😀"]
    array = tmp_path / "t.json"
    array.write_text(f"[{fine}, {bad}]")
    assert f"{array}: record 1: holds a lone UTF-16 surrogate" in error_of(array)


def test_deeply_nested_json_is_a_record_problem(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"])
    assert f"{path}: line 2: not usable: its JSON is nested too deeply" in error_of(path)
    assert len(load_conversations(str(path), skip_invalid=True).conversations) == 1


def test_duplicate_keys_and_two_formats_in_one_record(tmp_path):
    dup = '{"conversations": [{"from": "human", "value": "a", "value": "b"}, {"from": "gpt", "value": "c"}]}'
    both_formats = dict(GOOD, messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    path = write_jsonl(tmp_path / "t.jsonl", [dup, both_formats])
    message = error_of(path)
    assert f"{path}: line 1: an object repeats the key 'value'" in message
    assert (f"{path}: line 2: has both `conversations` and `messages`, which are different record formats"
            in message)


@pytest.mark.parametrize("case", ["utf16-no-bom", "utf16-bom", "parquet-named-json"])
def test_wrong_file_kinds_are_named(tmp_path, case):
    path = tmp_path / "t.json"
    if case == "parquet-named-json":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"a": [1]}), str(path))
        expected = "is a Parquet file (it starts with PAR1); name it *.parquet"
    elif case == "utf16-bom":
        path.write_bytes(json.dumps([GOOD]).encode("utf-16"))
        expected = "is UTF-16 or UTF-32 encoded (it starts with that byte-order mark); re-save it as UTF-8"
    else:
        path.write_bytes(json.dumps([GOOD]).encode("utf-16-le"))
        expected = ("holds NUL bytes: it looks UTF-16 or UTF-32 encoded (without a byte-order mark), or binary; "
                    "re-save it as UTF-8 text")
    assert error_of(path, skip_invalid=True).splitlines()[1] == f"  {path}: {expected}"


def test_a_stray_nul_or_a_mid_file_byte_order_mark_is_a_line_not_the_whole_file(tmp_path):
    """A NUL byte in one line is that line's problem (skippable, named), not a whole file taken for UTF-16; a
    byte-order mark starting a later line (two files concatenated) is not content: the record reads as it is."""
    good = json.dumps(GOOD).encode()
    nul = tmp_path / "nul.jsonl"
    nul.write_bytes(b"\x00" + good + b"\n" + good + b"\n")
    assert f"{nul}: line 1: holds a NUL byte at column 1, which is not text: remove it" in error_of(nul)
    assert load_conversations(str(nul), skip_invalid=True).skipped_records == 1
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b"\xef\xbb\xbf" + good + b"\n" + good + b"\n")
    assert len(load_conversations(str(bom)).conversations) == 3


def test_paths_symlink_loop_comma_and_twice(tmp_path):
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    assert f"{loop}: is a symbolic link loop" in error_of(loop)
    broken = tmp_path / "broken.json"
    broken.symlink_to(tmp_path / "missing.json")
    assert f"{broken}: is a broken symbolic link (to {tmp_path / 'missing.json'}" in error_of(broken)
    comma = write_jsonl(tmp_path / "a,b.jsonl", [GOOD])
    assert len(load_conversations(str(comma)).conversations) == 1
    one = write_jsonl(tmp_path / "one.jsonl", [GOOD])
    assert f"{one}: is the same file as {one}, given twice" in error_of(f"{one},{one}")
    assert "given twice" in error_of([str(one), str(tmp_path / "." / "one.jsonl")])


def test_unreadable_directory_and_bad_gzip(tmp_path):
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(json.dumps(GOOD).encode() * 50)[:-30])
    assert f"{gz}: is not a readable gzip file" in error_of(gz)
    if os.geteuid() != 0:  # root reads any directory
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        assert f"{locked}: cannot be listed: Permission denied" in error_of(locked)


@pytest.mark.slow
def test_huge_message_is_cut_before_tokenizing_without_changing_the_kept_tokens(qwen, tmp_path, monkeypatch):
    import chattune.data.encode
    import chattune.data.prepare

    tok, setup = qwen
    huge = "lorem ipsum dolor sit amet " * 30_000  # 810k characters
    rows = [{"conversations": [{"from": "human", "value": "Summarize: " + huge}, {"from": "gpt", "value": "ok"}]},
            {"conversations": [{"from": "human", "value": "Recite"}, {"from": "gpt", "value": huge}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    seen = []
    render = chattune.data.encode.render_conversation

    def spy(render_fn, messages, *args, **kw):
        seen.append(max(len(m["content"]) for m in messages))
        return render(render_fn, messages, *args, **kw)

    monkeypatch.setattr(chattune.data.encode, "render_conversation", spy)
    kw = dict(stop_tokens=setup.stop_tokens, max_length=64, num_proc=1)
    cut = prepare_files(str(path), tok, cache_dir=tmp_path / "a", **kw)
    cap = chattune.data.encode.char_cap(tok, 64)
    assert max(seen) <= cap < len(huge) and cut.report.capped_texts == 2
    monkeypatch.setattr(chattune.data.prepare, "char_cap", lambda tokenizer, n: 0)  # the reference: everything tokenized
    whole = prepare_files(str(path), tok, cache_dir=tmp_path / "b", **kw)
    assert max(seen) > len(huge) and whole.report.capped_texts == 0
    assert cut.dataset["input_ids"][:] == whole.dataset["input_ids"][:]
    assert cut.dataset["labels"][:] == whole.dataset["labels"][:]
    assert (cut.report.kept, cut.report.truncated, cut.report.dropped_no_trained) == (2, 1, 1)
    assert (whole.report.kept, whole.report.truncated, whole.report.dropped_no_trained) == (2, 1, 1)
    assert "2 message texts far longer than 64 tokens were cut before tokenizing" in cut.report.format()


@pytest.mark.parametrize("kind", ["array", "parquet", "saved"])
def test_streamed_equals_in_memory_for_every_file_kind(qwen, tmp_path, tiny_chunks, kind):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok, setup = qwen
    rows = records(20)
    rows[6] = {"conversations": [{"from": "gpt", "value": "answer first"}]}  # invalid: skipped and counted
    if kind == "array":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif kind == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), str(path))
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    streamed, memory, load = both(path, tok, setup, tmp_path, skip_invalid=True, max_length=64)
    assert streamed.report.conversations == 19 and streamed.report.skipped_records == 1
    assert streamed.report.skipped_examples[0].startswith(f"{path}: record 6: ")
    assert streamed.dataset["input_ids"][:] == memory.dataset["input_ids"][:]
    assert streamed.dataset["labels"][:] == memory.dataset["labels"][:]
    assert streamed.report.to_dict() == memory.report.to_dict() | {"skipped_examples": [str(p) for p in load.skipped]}


def test_a_one_line_array_is_streamed_not_read_whole(tmp_path, monkeypatch):
    """json.dump(list) writes one line: the array streams from its first block, holding a few blocks at a time."""
    monkeypatch.setattr(chattune.data.reader, "CHUNK_BYTES", 2000)
    monkeypatch.setattr(chattune.data.reader, "CHUNK_RECORDS", 5)
    path = tmp_path / "one_line.json"
    path.write_text(json.dumps(records(1000), ensure_ascii=False), encoding="utf-8")
    assert path.stat().st_size > 100 * 2000
    held, read = [], []
    real_read, real_drop = chattune.data.reader._Reader.read, chattune.data.reader._Text.drop
    monkeypatch.setattr(chattune.data.reader._Reader, "read", lambda self, n=-1: read.append(n) or real_read(self, n))
    monkeypatch.setattr(chattune.data.reader._Text, "drop", lambda self, pos: held.append(len(self.text))
                        or real_drop(self, pos))
    chunks = chattune.data.reader.source_chunks(str(path), "file")
    first = next(chunks)
    assert len(first.records) == 5 and sum(read) < 5 * 2000  # the first records come before the file is read
    rest = [record for chunk in chunks for record in chunk.records]
    assert len(first.records) + len(rest) == 1000 and held and max(held) < 5 * 2000


@pytest.mark.parametrize("head", ["# exported 2024-05-01", '{"a": "raw\ttab"}\n{"b": "raw\ttab"}'])
def test_jsonl_with_junk_first_lines_is_still_jsonl(tmp_path, head):
    path = write_jsonl(tmp_path / "t.jsonl", [head, GOOD, GOOD, GOOD])
    result = load_conversations(str(path), skip_invalid=True)
    assert len(result.conversations) == 3 and result.skipped_records == head.count("\n") + 1
    assert str(result.skipped[0]).startswith(f"{path}: line 1: not valid JSON")


def test_problem_state_does_not_leak_into_the_next_file(tmp_path):
    broken = tmp_path / "a.json"
    broken.write_text('{\n  "role": 1, "role": 2,\n  "conversations": [\n}\n')
    good = write_jsonl(tmp_path / "b.jsonl", [GOOD])
    message = error_of([str(broken), str(good)])
    assert f"{broken}: is not valid JSON" in message and "repeats the key" not in message


def test_one_problem_per_unusable_file(tmp_path):
    raw = ("\n".join([json.dumps(GOOD)] * 60) + "\n").encode().replace(b"Hello", b"Hell\xff", 1)
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(raw)[:-12])  # bad UTF-8 in it, and cut short
    message = error_of(gz)
    assert message.startswith("Cannot use 1 data path:") and message.count(str(gz)) == 1


def test_an_invalid_repo_id_without_a_hub_is_an_error_not_a_traceback(monkeypatch):
    import huggingface_hub.constants as constants
    from fixtures import free_port

    from chattune.hub import model_source_problem

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert "not a local directory, and the Hugging Face hub" in model_source_problem("qwen:7b")


def test_other_ranks_fail_at_once_when_the_main_process_failed(qwen, tmp_path):
    """A rank after a main process that stopped on the data neither reads it again nor prints the whole list."""
    global _OPENED
    tok, setup = qwen
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, {"conversations": [{"from": "gpt", "value": "no question"}]}])

    def prepare(main: bool):
        return prepare_files(str(path), tok, stop_tokens=setup.stop_tokens, max_length=128,
                             cache_dir=tmp_path / "c", main=main)

    with pytest.raises(DataError, match="Found 1 problem in 1 of 2 records"):
        prepare(True)
    _OPENED = []
    try:
        with pytest.raises(DataError) as e:
            prepare(False)
        opened = _OPENED
    finally:
        _OPENED = None
    assert str(e.value) == ("the training data could not be prepared: the main process stopped on it (its message "
                            "above lists the problems)")
    assert str(path) not in opened
    with pytest.raises(DataError, match="Found 1 problem"):  # the main process itself reads it again, in full
        prepare(True)
